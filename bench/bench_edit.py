"""Seconds per edit: the published HoReN edit loop vs HoReNEditor, on SmolLM2-135M (CPU).

The same ZsRE records are edited, in the same run, by

- ``published``: bench/published_edit.py (n_iter full forward+backward passes per edit, an
  optimizer over all stored values, codebook grown by torch.cat, retrieval in every forward);
- ``ours @ 10``: HoReNEditor whose codebook already holds 10 entries;
- ``ours @ 10K``: HoReNEditor whose codebook already holds 10,000 synthetic entries (added through
  Codebook.add), to show that an edit costs O(1) in the number of stored edits;
- ``ours edit_many``: the same two editors given ``--batch`` records at once (``edit_many`` trains
  up to 16 independent edits together, equal to editing them one by one): seconds per edit are
  the call's time over the number of records.

``--early-stop-margin M`` gives our editors ``HoReNConfig(early_stop_margin=M)`` (an edit stops
once every target token is the argmax by M logits; n_iter stays the cap); the published loop
always runs n_iter steps.

Each editor works on its own copy of the model, and the three are interleaved record by record, so
a burst of load on a shared machine hits all of them alike. Medians are reported. A parity check
runs one record through both loops from the same initial value and compares the trained values.

    python -m bench.bench_edit                       # defaults: 5 records, layer 15, n_iter 50
    python -m bench.bench_edit --records 10 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "zsre_dev.jsonl"


def load_records(path: Path, n: int, skip: int = 0) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"no ZsRE records at {path}; pass --data PATH (a JSONL file with src/alt)")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if len(out) == n:
                break
            r = json.loads(line)
            out.append({"prompt": r["src"], "target": r["alt"]})
    return out


def prefill(editor, n: int, seed: int = 0) -> None:
    """Add n synthetic entries (random unit keys, small random values) to the editor's codebook."""
    cb = editor.codebook
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, n, 2048):
        m = min(n, lo + 2048) - lo
        keys = torch.randn(m, cb.key_dim, generator=g)
        values = 0.01 * torch.randn(m, cb.value_dim, generator=g)
        cb.add(keys.to(cb.device, cb.dtype), values.to(cb.device, cb.dtype))


def parity(model, tokenizer, record: dict, layer: str, n_iter: int) -> dict:
    """Train one record with both loops from the same initial value; compare values and losses."""
    from horen_fast.config import HoReNConfig
    from horen_fast.editor import HoReNEditor

    from .published_edit import PublishedHoReN

    ours_model = copy.deepcopy(model)
    ed = HoReNEditor(ours_model, tokenizer, HoReNConfig(layer=layer, n_iter=n_iter))
    res = ed.edit(record["prompt"], record["target"])
    ours = ed.codebook.get_values(res.id)[0].float()
    p_ids, t_ids = ed.encode(record["prompt"], record["target"])
    init = ed.trainer.initial_entry(ed.config, p_ids + t_ids, None, ed.codebook.value_dim, ed.codebook.dtype).float()

    pub_model = copy.deepcopy(model)
    pub = PublishedHoReN(pub_model, tokenizer, layer=layer, n_iter=n_iter)
    pub.adapter.new_value = lambda y: init.clone()
    out = pub.edit(record["prompt"], record["target"])
    theirs = pub.value(out["entry"]).float()
    with torch.no_grad():
        final_loss_pub = float(pub_model(**_tokens(tokenizer, record)).loss)
    return {
        "rel_diff": float((ours - theirs).norm() / theirs.norm()),
        "max_abs_diff": float((ours - theirs).abs().max()),
        "moved": float((theirs - init).norm() / init.norm()),
        "loss_ours": res.loss, "loss_published": final_loss_pub,
    }


def _tokens(tokenizer, record):
    from .published_edit import published_tokenize
    return published_tokenize(tokenizer, record["prompt"], record["target"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a model folder")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--records", type=int, default=5, help="records timed per editor")
    ap.add_argument("--layer", default="15", help="layer index or module path")
    ap.add_argument("--n-iter", type=int, default=50)
    ap.add_argument("--big", type=int, default=10_000, help="entries prefilled for the O(1) check")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--batch", type=int, default=16, help="records per edit_many call (0: skip)")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--early-stop-margin", type=float, default=None,
                    help="HoReNConfig.early_stop_margin of our editors (default: none, n_iter steps)")
    args = ap.parse_args(argv)

    from horen_fast.config import HoReNConfig
    from horen_fast.editor import HoReNEditor
    from horen_fast.models import load_model

    from .published_edit import PublishedHoReN

    torch.set_num_threads(args.threads)
    layer = int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer
    t0 = time.perf_counter()
    base, tok = load_model(args.model, progress=False)
    load_s = time.perf_counter() - t0
    records = load_records(args.data, max(args.records, args.batch) + 1)
    warmup, batch_records, records = records[0], records[1:args.batch + 1], records[1:args.records + 1]

    cfg = HoReNConfig(layer=layer, n_iter=args.n_iter, early_stop_margin=args.early_stop_margin)
    small = HoReNEditor(copy.deepcopy(base), tok, cfg)
    big = HoReNEditor(copy.deepcopy(base), tok, cfg)
    prefill(small, 10, seed=1)
    prefill(big, args.big, seed=2)
    pub = PublishedHoReN(copy.deepcopy(base), tok, layer=small.layer_path, n_iter=args.n_iter)

    # one untimed edit each (first-call allocations, lazy imports)
    for ed in (small, big):
        ed.edit(warmup["prompt"], warmup["target"])
    pub.edit(warmup["prompt"], warmup["target"])
    small.forget(small.codebook.ids[-1])
    big.forget(big.codebook.ids[-1])

    times = {"published": [], "ours @ 10": [], f"ours @ {args.big:,}": []}
    losses = {k: [] for k in times}
    for i, r in enumerate(records):
        out = pub.edit(r["prompt"], r["target"])
        times["published"].append(out["seconds"])
        losses["published"].append(out["loss"])
        for name, ed in (("ours @ 10", small), (f"ours @ {args.big:,}", big)):
            res = ed.edit(r["prompt"], r["target"])
            times[name].append(res.seconds)
            losses[name].append(res.loss)
            ed.forget(res.id)            # keep the codebook at its size
        print(f"  record {i + 1}/{len(records)}: " + ", ".join(
            f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr, flush=True)

    if args.batch:
        for name, ed in (("ours edit_many @ 10", small), (f"ours edit_many @ {args.big:,}", big)):
            t = time.perf_counter()
            res = ed.edit_many(batch_records, progress=False)
            per = (time.perf_counter() - t) / len(res)
            times[name] = [per]
            losses[name] = [statistics.median(r.loss for r in res)]
            for i in {r.id for r in res} & set(ed.codebook.ids):   # reused entries repeat ids
                ed.forget(i)
            print(f"  {name}: {per:.2f}s per edit ({len(res)} records)", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    pub_med = med["published"]
    stop = "" if args.early_stop_margin is None else f" (ours: early_stop_margin {args.early_stop_margin})"
    print(f"\nEdit speed, {args.model} layer {small.layer_path}, n_iter {args.n_iter}{stop}, "
          f"{len(records)} ZsRE records, {args.threads} torch thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"(model load {load_s:.1f}s)\n")
    print("| editor | median s/edit | min | max | published / this | median reported loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} | {pub_med / med[k]:.1f}x | "
              f"{statistics.median(losses[k]):.4f} |")
    big_name = f"ours @ {args.big:,}"
    print(f"\n(edit_many rows: one call on {args.batch} records, seconds per edit = call time / "
          f"{args.batch}; min = max = median)" if args.batch else "")
    print(f"{big_name} vs ours @ 10: {100 * (med[big_name] / med['ours @ 10'] - 1):+.1f}% per edit")
    if args.batch:
        b_small, b_big = f"ours edit_many @ 10", f"ours edit_many @ {args.big:,}"
        print(f"edit_many @ {args.big:,} vs @ 10: {100 * (med[b_big] / med[b_small] - 1):+.1f}% per edit")
    if not args.no_parity:
        p = parity(base, tok, records[0], small.layer_path, args.n_iter)
        print(f"\nparity (record 1, same initial value): relative difference of the trained values "
              f"{p['rel_diff']:.2e} (max abs {p['max_abs_diff']:.2e}; training moved the value by "
              f"{p['moved']:.2f} of its norm); final loss ours {p['loss_ours']:.5f}, published "
              f"{p['loss_published']:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
