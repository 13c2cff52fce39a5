"""ZsRE Rel/Gen/Loc/OP of the published HoReN edit loop (bench/published_edit.py), measured with
the same records, metrics (horen_fast.evaluate, SPEC 6) and model as `horen-fast eval`:

    python -m bench.published_eval --data ../shared/data/zsre_dev.jsonl --n 100 --out published.json

The published evaluation generates without a KV cache (each step re-runs the whole sequence) and
places the value at one prompt position for the whole batch; it runs here one prompt at a time
(batch size 1, so no padding) with the value at that prompt's last token, which is the published
code's behaviour on an unpadded prompt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


class PublishedGenerator:
    """What horen_fast.evaluate needs of an editor (generate, model, len) over a PublishedHoReN."""

    def __init__(self, published):
        self.published = published
        self.model = published.model

    def __len__(self) -> int:
        return len(self.published)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        if input_ids.shape[0] != 1:
            raise ValueError("the published adapter takes one prompt position per batch: use batch size 1")
        self.published.adapter.key_id = input_ids.shape[1] - 1
        kwargs["use_cache"] = False
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", default=None, help="module path (default: the editor default for the model)")
    ap.add_argument("--threshold", type=float, default=0.85, help="tau (the paper's 0.85)")
    ap.add_argument("--checkpoints", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from horen_fast.data import read_records
    from horen_fast.evaluate import run_sequential
    from horen_fast.models import load_model
    from horen_fast.arch import resolve_layer
    from .published_edit import PublishedHoReN

    model, tok = load_model(args.model, progress=False)
    layer = args.layer or resolve_layer(model, 15)[0]
    records = read_records(args.data, n=args.n)
    pub = PublishedHoReN(model, tok, layer=layer, threshold=args.threshold)
    gen = PublishedGenerator(pub)
    marks = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    t0 = time.perf_counter()
    body = run_sequential(gen, records, marks, batch_size=1, tokenizer=tok,
                          edit_fn=lambda g, r: g.published.edit(r.prompt, r.target))
    summary = {k: body["checkpoints"][-1][k] for k in ("n", "rel", "gen", "loc", "op")}
    report = {"algorithm": "published (bench/published_edit.py)", "layer": layer,
              "threshold": args.threshold, "seconds": time.perf_counter() - t0,
              "torch": torch.__version__, **body}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
