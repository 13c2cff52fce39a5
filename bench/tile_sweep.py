"""Which tile size is fastest on this CPU? (issue 13, item 1)

The retrieval kernel sizes its tiles of keys from the caches it detects (csrc/common/machine.h:
``tile_bytes``, a quarter of one core's L2, for one query; twice that for the batched loops).
This times whole retrievals (the C++ kernel, ``auto``) with ``tile_bytes`` overridden through
``horen_fast.native.set_tuning`` to each size given, in turn over the repetitions (medians), next
to the detected size. Run it on a quiet machine:

    python -m bench.tile_sweep [--cases 50000x14336x1:bfloat16,...] [--tiles 128,256,512,1024] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from horen_fast import native
from horen_fast.benchmark import _DTYPES, _keys, _parse_cases, _queries, cpu_model

CASES = "50000x14336x1:bfloat16,50000x14336x1:float32,10000x14336x16:bfloat16,10000x14336x16:float32"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=CASES, help="NxDxB[:dtype],...")
    p.add_argument("--tiles", default="128,256,512,1024,2048", help="tile_bytes to try, in KiB")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    if not native.RETRIEVE_BUILT:
        print("tile_sweep: needs the C++ kernel", file=sys.stderr)
        return 2
    detected = native.machine()["tile_bytes"]
    tiles = [int(t) << 10 for t in args.tiles.split(",")]
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; L2 {native.machine()['l2_bytes'] >> 10} KiB, "
          f"detected tile_bytes {detected >> 10} KiB; median ms per retrieval")
    print("| N | d | B | keys | " + " | ".join(f"{t >> 10} KiB" for t in tiles) + " |")
    print("|---:|---:|---:|---|" + "---:|" * len(tiles))
    try:
        for n, d, b, dtype in _parse_cases(args.cases):
            keys = _keys(n, d, _DTYPES[dtype])
            q = _queries(keys, b).float().contiguous()
            index, score = torch.empty(b, dtype=torch.long), torch.empty(b)
            matched = torch.empty(b, dtype=torch.bool)
            times: dict[int, list[float]] = {t: [] for t in tiles}
            for _ in range(args.reps):
                for t in tiles:
                    native.set_tuning(tile_bytes=t, work_per_thread=0)
                    isa = native.retrieve_isa(q, keys)
                    t0 = time.perf_counter()
                    native._retrieve_ext.retrieve(q, keys, index, score, matched, 20.0, 0.1, 1, 0.85, 1e-5, isa,
                                                  torch.get_num_threads())
                    times[t].append(time.perf_counter() - t0)
            print(f"| {n} | {d} | {b} | {dtype} | "
                  + " | ".join(f"{statistics.median(times[t]) * 1e3:.1f}" for t in tiles) + " |", flush=True)
    finally:
        native.set_tuning(tile_bytes=0, work_per_thread=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
