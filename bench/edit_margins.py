"""How far an edit's target margins get in n_iter Adam steps: what an early-stopping rule can save.

Edits ``--records`` ZsRE records with ``HoReNEditor.edit_many`` (n_iter fixed, no early stop) and
records, at every step of every edit, the smallest target margin (the target token's logit minus
the largest other logit, over the edit's target tokens: the quantity ``early_stop_margin`` reads)
and the loss. It prints, for each margin m, the mean and largest first step at which an edit's
margin reached m (n_iter + 1 when it never did): the step at which ``early_stop_margin=m`` would
have stopped it, and the median margin and loss at a few steps.

    python -m bench.edit_margins                     # 32 dev records, layer 15, n_iter 50
    python -m bench.edit_margins --records 64 --threads 2

The trace is taken by wrapping ``training._Batch.losses`` (the loss pass the training loop runs
at each step), so the edits are exactly the ones ``edit_many`` makes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .bench_edit import DEFAULT_DATA, load_records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--layer", default="15")
    ap.add_argument("--n-iter", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margins", default="3,4,5,6,8,10")
    args = ap.parse_args(argv)

    from horen_fast import training
    from horen_fast.config import HoReNConfig
    from horen_fast.editor import HoReNEditor
    from horen_fast.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, progress=False)
    editor = HoReNEditor(model, tok, HoReNConfig(layer=args.layer, n_iter=args.n_iter))
    records = load_records(args.data, args.records)

    traces: list[tuple[torch.Tensor, torch.Tensor]] = []   # per loss pass: (loss [rows], margin [rows])
    plain = training._Batch.losses

    def traced(self, entries, margins=False):
        loss, gap = plain(self, entries, margins=True)
        traces.append((loss.detach().clone(), gap.clone()))
        return loss, (gap if margins else None)

    training._Batch.losses = traced
    try:
        editor.edit_many([(r["prompt"], r["target"]) for r in records], progress=False)
    finally:
        training._Batch.losses = plain

    # one batch = n_iter loss passes + the final one; batches follow each other in the trace
    per_batch = args.n_iter + 1
    if len(traces) % per_batch:
        raise SystemExit(f"unexpected trace length {len(traces)} (not a multiple of {per_batch})")
    # [steps, edits]: each batch's passes stacked, the batches side by side
    loss, margin = (torch.cat([torch.stack([t[k] for t in traces[b:b + per_batch]])
                               for b in range(0, len(traces), per_batch)], 1).float() for k in (0, 1))
    print(f"{margin.shape[1]} edits, n_iter {args.n_iter}, layer {args.layer}, model {args.model}")
    print("| margin m | mean first step reaching m | largest | edits that never reach it |")
    print("| ---: | ---: | ---: | ---: |")
    for m in (float(x) for x in args.margins.split(",")):
        reached = margin >= m
        hit = reached.any(0)
        first = torch.where(hit, reached.int().argmax(0), per_batch).float()
        print(f"| {m:g} | {first.mean().item():.1f} | {int(first.max())} | {int((~hit).sum())} |")
    print("| step | median margin | median loss |")
    print("| ---: | ---: | ---: |")
    for s in sorted({5, 10, 20, 30, 40, args.n_iter} & set(range(per_batch))):
        print(f"| {s} | {margin[s].median().item():.2f} | {loss[s].median().item():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
