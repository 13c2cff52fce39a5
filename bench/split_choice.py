"""Is auto's choice of the bfloat16 split scores right on this CPU? (issue 13, item 2)

Prints what ``horen_fast.native.split_speedup()`` measured (the probe ``auto`` decides from), the
choice it makes per key dtype, and then times whole retrievals of B queries with the AVX-512 paths
forced by name (``avx512``: float32 FMAs; ``avx512bf16``: AVX512_BF16 split scores; ``amx``: AMX-BF16
tiles, where the CPU has them), in turn over the repetitions, medians reported. Run it on a quiet
machine:

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
    times: dict[str, list[float]] = {isa: [] for isa in ("avx512", *_split_isas())}
    results = {}
    for _ in range(reps):
        for isa in times:
            t0 = time.perf_counter()
            for _ in range(inner):
                native._retrieve_ext.retrieve(q, keys, index, score, matched, 20.0, 0.1, 1, 0.85, 1e-5, isa,
                                              torch.get_num_threads())
            times[isa].append((time.perf_counter() - t0) / inner)
            results[isa] = index.clone()
    ms = {isa: statistics.median(t) * 1e3 for isa, t in times.items()}
    return {"N": n, "d": d, "B": b, "dtype": dtype, **{f"{isa}_ms": v for isa, v in ms.items()},
            **{f"{isa}_speedup": ms["avx512"] / ms[isa] for isa in _split_isas()},
            "auto": native.retrieve_isa(q, keys),
            "same_decisions": all(torch.equal(results["avx512"], results[isa]) for isa in _split_isas())}


def _split_isas() -> list[str]:
    return [isa for isa in native.SPLIT_ISAS if isa in native.supported_isas()]


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
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; probe (split_speedup) and auto's bar: "
          + "; ".join(f"{isa}: " + ", ".join(f"{k} keys {v:.2f}x (bar {native.SPLIT_MIN_SPEEDUP[isa][k]}x)"
                                             for k, v in per.items()) for isa, per in probe.items()))
    isas = _split_isas()
    print("| N | d | B | keys | avx512 ms | " + " | ".join(f"{i} ms | {i} speedup" for i in isas)
          + " | auto picks | same decisions |")
    print("|---:|---:|---:|---|---:|" + "---:|---:|" * len(isas) + "---|---|")
    rows = []
    for n, d, b, dtype in _parse_cases(args.cases):
        r = time_paths(n, d, b, dtype, args.reps)
        rows.append(r)
        print(f"| {n} | {d} | {b} | {dtype} | {r['avx512_ms']:.3f} | "
              + " | ".join(f"{r[i + '_ms']:.3f} | {r[i + '_speedup']:.2f}x" for i in isas)
              + f" | {r['auto']} | {r['same_decisions']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "probe": probe, "bar": native.SPLIT_MIN_SPEEDUP, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
