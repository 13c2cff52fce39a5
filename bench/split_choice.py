"""Is auto's choice of the bfloat16 split scores right on this CPU? (issue 13, item 2)

Prints what ``horen_fast.native.split_speedup()`` measured (the probe ``auto`` decides from), the
choice it makes per key dtype, and then times whole retrievals of B queries with the two AVX-512
paths forced by name (``avx512``: float32 FMAs; ``avx512bf16``: the split scores), in turn over the
repetitions, medians reported. Run it on a quiet machine:

    python -m bench.split_choice [--cases 50000x14336x16:bfloat16,...] [--reps 7] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from horen_fast import native
from horen_fast.benchmark import _DTYPES, _keys, _parse_cases, _queries, cpu_model

CASES = "50000x14336x16:bfloat16,50000x14336x16:float32,50000x1536x16:bfloat16,1000x1536x16:bfloat16"


def time_paths(n: int, d: int, b: int, dtype: str, reps: int) -> dict:
    keys = _keys(n, d, _DTYPES[dtype])
    q = _queries(keys, b).float().contiguous()
    index, score = torch.empty(b, dtype=torch.long), torch.empty(b)
    matched = torch.empty(b, dtype=torch.bool)
    inner = max(1, int(2e9 // (n * d * b)))  # calls per timing: about 0.1 s of work at least
    times: dict[str, list[float]] = {"avx512": [], "avx512bf16": []}
    results = {}
    for _ in range(reps):
        for isa in times:
            t0 = time.perf_counter()
            for _ in range(inner):
                native._retrieve_ext.retrieve(q, keys, index, score, matched, 20.0, 0.1, 1, 0.85, 1e-5, isa,
                                              torch.get_num_threads())
            times[isa].append((time.perf_counter() - t0) / inner)
            results[isa] = index.clone()
    fma, split = (statistics.median(times[i]) * 1e3 for i in ("avx512", "avx512bf16"))
    return {"N": n, "d": d, "B": b, "dtype": dtype, "avx512_ms": fma, "avx512bf16_ms": split,
            "split_speedup": fma / split, "auto": native.retrieve_isa(q, keys),
            "same_decisions": bool(torch.equal(results["avx512"], results["avx512bf16"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=CASES, help="NxDxB[:dtype],... (bfloat16 or float32 keys)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not native.RETRIEVE_BUILT or "avx512bf16" not in native.supported_isas():
        print("split_choice: needs the C++ kernel and a CPU with AVX512_BF16", file=sys.stderr)
        return 2
    probe = native.split_speedup()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; probe (split_speedup): "
          + ", ".join(f"{k} keys {v:.2f}x" for k, v in probe.items())
          + "; auto's bar: " + ", ".join(f"{k} {v}x" for k, v in native.SPLIT_MIN_SPEEDUP.items()))
    print("| N | d | B | keys | avx512 ms | avx512bf16 ms | split speedup | auto picks | same decisions |")
    print("|---:|---:|---:|---|---:|---:|---:|---|---|")
    rows = []
    for n, d, b, dtype in _parse_cases(args.cases):
        r = time_paths(n, d, b, dtype, args.reps)
        rows.append(r)
        print(f"| {n} | {d} | {b} | {dtype} | {r['avx512_ms']:.3f} | {r['avx512bf16_ms']:.3f} | "
              f"{r['split_speedup']:.2f}x | {r['auto']} | {r['same_decisions']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "probe": probe, "bar": native.SPLIT_MIN_SPEEDUP, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
