"""Exact vs FAISS-prefiltered retrieval on large realistic codebooks: latency and agreement.

    python bench/bench_prefilter.py --sizes 50000 200000 1000000 --index ivf --candidates 256 \
        --out bench/results/prefilter.json

Keys come from horen_fast.synthetic.ActivationModel.load() (fitted to SmolLM2 activations; the
fit ships as package data in horen_fast/resources/), generated in float32 chunks straight
into the codebook. Queries: paraphrase-like (near a stored key, at the fitted paraphrase cosine)
and unrelated (fresh draws). Exact = Codebook.retrieve(exact=True), i.e. retrieve(backend="auto");
the backend it resolves to is printed. A row agrees when matched and index are both equal.
Latency: median wall time of whole calls at B = 1 and B = 64 (the prefiltered path includes the
FAISS search, the host copies, the sketch's tail and rescue passes and the Hopfield step over the
candidates). "candidates only" is the same prefilter with its sketch detached: the top-k alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from horen_fast import Codebook  # noqa: E402
from horen_fast.retrieval import _pick_backend, _load_builtin_backends  # noqa: E402
from horen_fast.synthetic import ActivationModel  # noqa: E402


def timed(fn, batches: list, reps: int) -> float:
    """Median seconds of fn(batch), cycling through the batches (several different queries, so
    one lucky or unlucky query does not stand for all)."""
    fn(batches[0])  # warm-up
    out = []
    for i in range(reps):
        t = time.perf_counter()
        fn(batches[i % len(batches)])
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def build(model: ActivationModel, n: int, args) -> Codebook:
    cb = Codebook(model.dim, 1, threshold=args.threshold,
                  prefilter={"index": args.index, "candidates": args.candidates, **json.loads(args.options)})
    zero = torch.zeros(args.chunk, 1)
    for lo, block in model.iter_keys(n, seed=n, chunk=args.chunk):
        cb.add(block, zero[: block.shape[0]])
    cb.prefilter.rebuild(cb.keys, cb.slot_ids) if cb.prefilter.needs_rebuild else None
    return cb


def candidates_only(cb: Codebook, q: torch.Tensor):
    """The prefiltered answer without the sketch's tail and rescue (the candidates alone)."""
    sketch, cb.prefilter.sketch = cb.prefilter.sketch, None
    try:
        return cb.retrieve(q)
    finally:
        cb.prefilter.sketch = sketch


def agreement(cb: Codebook, queries: torch.Tensor, batch: int) -> dict:
    a_idx, c_idx, e_idx, e_m = [], [], [], []
    for lo in range(0, queries.shape[0], batch):
        q = queries[lo: lo + batch]
        a, e = cb.retrieve(q), cb.retrieve(q, exact=True)
        a_idx.append(a.index), e_idx.append(e.index), e_m.append(e.matched)
        c_idx.append(candidates_only(cb, q).index)
    a_idx, c_idx, e_idx, e_m = torch.cat(a_idx), torch.cat(c_idx), torch.cat(e_idx), torch.cat(e_m)
    return {"agree": (a_idx == e_idx).float().mean().item(),
            "agree_candidates_only": (c_idx == e_idx).float().mean().item(),
            "exact_matched": e_m.float().mean().item(), "rows": int(queries.shape[0])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--index", default="ivf", choices=["flat", "ivf", "ivf_sq8", "hnsw"])
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.85, help="match threshold tau (SmolLM2's calibrated: 0.735)")
    ap.add_argument("--options", default="{}", help='prefilter_options as JSON, e.g. \'{"nprobe": 64}\'')
    ap.add_argument("--queries", type=int, default=512, help="of each kind, for agreement")
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model = ActivationModel.load()
    _load_builtin_backends()
    backend = _pick_backend(torch.device("cpu"))
    print(f"keys: {model.source}; exact backend: auto -> {backend}; torch threads {torch.get_num_threads()}")
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        cb = build(model, n, args)
        built = time.perf_counter() - t0
        g = torch.Generator().manual_seed(n + 7)
        pick = torch.randint(0, n, (args.queries,), generator=g)
        para = model.paraphrases(cb.keys[pick], seed=n + 1)
        unrel = model.unrelated(args.queries, seed=n + 2)
        res = {"n": n, "index": args.index, "candidates": args.candidates, "options": args.options,
               "threshold": args.threshold, "backend": backend,
               "build_s": round(built, 1), "prefilter": repr(cb.prefilter),
               "paraphrase": agreement(cb, para, 64), "unrelated": agreement(cb, unrel, 64)}
        for b in args.batches:  # batches of paraphrase and unrelated queries, half each (B=1: alternating)
            mixed = torch.stack([para[: args.queries // 2], unrel[: args.queries // 2]], 1).reshape(-1, para.shape[1])
            qs = [mixed[lo: lo + b] for lo in range(0, min(len(mixed), 20 * b) - b + 1, b)]
            fast = timed(lambda q: cb.retrieve(q), qs, max(args.reps * 4, 20))
            bare = timed(lambda q: candidates_only(cb, q), qs, max(args.reps * 4, 20))
            exact = timed(lambda q: cb.retrieve(q, exact=True), qs, args.reps)
            res[f"B{b}"] = {"exact_ms": round(exact * 1e3, 2), "prefilter_ms": round(fast * 1e3, 2),
                            "candidates_only_ms": round(bare * 1e3, 2), "speedup": round(exact / fast, 1)}
        rows.append(res)
        print(json.dumps(res), flush=True)
        del cb
    heads = " | ".join(f"B={b} exact / prefilter ms (x)" for b in args.batches)
    print(f"\n| N | index, k | {heads} | agree paraphrase | agree unrelated | candidates only "
          f"(para / unrel) | exact matched (para / unrel) |")
    print("|---|---|" + "---|" * len(args.batches) + "---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'B{b}']['exact_ms']} / {r[f'B{b}']['prefilter_ms']} ({r[f'B{b}']['speedup']}x)"
                 for b in args.batches]
        p, u = r["paraphrase"], r["unrelated"]
        print(f"| {r['n']:,} | {r['index']}, {r['candidates']} | " + " | ".join(cells)
              + f" | {p['agree']:.4f} | {u['agree']:.4f} | {p['agree_candidates_only']:.4f} / "
              f"{u['agree_candidates_only']:.4f} | {p['exact_matched']:.2f} / {u['exact_matched']:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": model.source, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
