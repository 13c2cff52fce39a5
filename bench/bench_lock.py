"""The cost of the Codebook's lock on the retrieve path (it must stay below 1% of a retrieve).

    python bench/bench_lock.py [--n 1000] [--d 1536] [--batch 1] [--calls 2000] [--backend auto]

Reports medians (the machine may be busy): a whole ``Codebook.retrieve`` call, the same retrieval
called directly on the keys (``horen_fast.retrieve``: no codebook around it), and one uncontended
acquire + release of the codebook's lock kind (threading.RLock), timed over blocks of 1000.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from horen_fast import Codebook, retrieve


def _median_s(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _lock_s(blocks: int) -> float:
    lock, per = threading.RLock(), []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(1000):
            with lock:
                pass
        per.append((time.perf_counter() - t0) / 1000)
    return statistics.median(per)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    cb = Codebook(args.d, 8, backend=args.backend)
    cb.add(torch.randn(args.n, args.d, generator=g), torch.randn(args.n, 8, generator=g))
    q = torch.randn(args.batch, args.d, generator=g)
    opts = dict(cb.config)
    for _ in range(50):  # warm up both paths
        cb.retrieve(q)
        retrieve(q, cb.keys, **opts)
    whole = _median_s(lambda: cb.retrieve(q), args.calls)
    direct = _median_s(lambda: retrieve(q, cb.keys, **opts), args.calls)
    lock = _lock_s(max(args.calls // 10, 50))
    out = {"n": args.n, "d": args.d, "batch": args.batch, "backend": args.backend, "calls": args.calls,
           "codebook_retrieve_us": round(whole * 1e6, 2), "direct_retrieve_us": round(direct * 1e6, 2),
           "lock_acquire_release_us": round(lock * 1e6, 4),
           "lock_share_of_retrieve_pct": round(100 * lock / whole, 4)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
