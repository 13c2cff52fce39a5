"""Sweep the wrapped layer, beta and tau for the embedded SmolLM2 on the ZsRE dev records.

Retrieval decides everything that tau, beta and the layer change: whether an edit prompt or its
paraphrase reaches an entry made for its target, and whether an unrelated prompt matches nothing
(then its output is bit-for-bit the unedited one). Queries do not depend on the edits (the adapter
changes only what comes after the wrapped layer), so one forward pass over all prompts gives the
queries at every layer; the codebook of N sequential edits is replayed exactly (reuse / replace /
add, SPEC 5.3) for every tau; and the retrieval-only rates (Rel_r, Gen_r, Loc_r, OP_r) come from
the Hopfield final scores (horen_fast.calibrate.retrieval_table). The best settings are then
confirmed with full runs (``horen-fast eval``), which add what retrieval cannot see: whether the
trained value carries to the paraphrase.

    python bench/sweep_defaults.py --data ../shared/data/zsre_dev.jsonl --n 300 \
        --layers 3,6,9,12,15,18,21,24,27,29 --betas 10,20,40 --out sweep.json

Writes a JSON file with every row and prints a markdown table of the best tau per (layer, beta).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from horen_fast.calibrate import DEFAULT_TAUS, edit_label, prompt_queries, retrieval_table  # noqa: E402
from horen_fast.data import read_records  # noqa: E402
from horen_fast.models import load_model  # noqa: E402

STRATEGY = "last_60_perc_prompt_tokens_avg"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/zsre_dev.jsonl"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", default="3,6,9,12,15,18,21,24,27,29")
    ap.add_argument("--betas", default="10,20,40")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--queries", default=None, help="cache file for the queries (torch .pt, reused if present)")
    ap.add_argument("--out", default=None, help="write all rows (JSON) here")
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"no records file at {args.data}; pass --data", file=sys.stderr)
        return 2
    records = read_records(args.data, args.n)
    layers = [int(x) for x in args.layers.split(",")]
    betas = [float(x) for x in args.betas.split(",")]
    n = len(records)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, progress=False)
    prompts = [r.prompt for r in records] + [r.rephrase for r in records] + [r.loc_prompt for r in records]
    cached = torch.load(args.queries) if args.queries and os.path.exists(args.queries) else {}
    todo = [layer for layer in layers if layer not in cached]
    if todo:
        cached.update(prompt_queries(model, tok, prompts, todo, STRATEGY, batch_size=args.batch_size))
        if args.queries:
            torch.save(cached, args.queries)
    query_seconds = time.perf_counter() - t0
    labels = [edit_label(tok, r.prompt, r.target) for r in records]

    rows, best = [], []
    for layer in layers:
        q = cached[layer]
        for beta in betas:
            t = retrieval_table(q[:n], q[n:2 * n], q[2 * n:], labels, DEFAULT_TAUS, beta=beta)
            for k in range(len(t.taus)):
                rows.append({"layer": layer, "beta": beta, **t.row(k)})
            best.append({"layer": layer, "beta": beta, **t.row(t.best())})
        print(f"layer {layer} done", file=sys.stderr, flush=True)

    print(f"queries: {query_seconds:.0f} s for {len(prompts)} prompts, {len(layers)} layers; n = {n}")
    print("| layer | beta | tau | Rel_r | Gen_r | Loc_r | OP_r | entries |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in sorted(best, key=lambda r: -r["op"]):
        print(f"| {b['layer']} | {b['beta']:g} | {b['tau']:.4f} | {b['rel']:.3f} | {b['gen']:.3f} | "
              f"{b['loc']:.3f} | {b['op']:.3f} | {b['entries']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": n, "data": args.data, "best": best, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
