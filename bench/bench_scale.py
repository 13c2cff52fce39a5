"""What scale costs (issue 14, item 5): bytes per stored edit and generation speed of an edited
model with 0, 1K, 10K and 50K entries against the unedited model.

    python -m bench.bench_scale [--sizes 1000,10000,50000] [--threads 2] [--json out.json]

- Bytes per stored edit: keys, values, labels (4 target tokens each, as a ZsRE target is) and a
  FAISS flat prefilter index, counted from the stored tensors and the serialized index; the file
  bytes of ``editor.save``; and the resident memory (VmRSS) the codebook adds to the process.
- Generation: greedy ``editor.generate`` (the KV-cache path: the edit is retrieved once, at the
  prefill) at batch 1 on real ZsRE prompts: prefill seconds (``max_new_tokens=1``) and decode
  tokens/s (from ``max_new_tokens=33`` minus the prefill), medians over the prompts and repeats,
  against an unedited copy of the model (its own ``generate``), timed alternately with the edited
  one, prompt by prompt, so that both see the same machine.

The entries are synthetic (random unit keys, small values), so no prompt matches one; a matching
prompt costs one more value row added at one position. Retrieval cost does not depend on the keys.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre_dev.jsonl"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fill(codebook, n: int, seed: int = 0) -> None:
    """Add n synthetic entries: random unit keys, values of norm ~0.2, 4-token labels."""
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, n, 4096):
        m = min(n, lo + 4096) - lo
        keys = torch.randn(m, codebook.key_dim, generator=g)
        keys = keys / keys.norm(dim=1, keepdim=True)
        values = 0.01 * torch.randn(m, codebook.value_dim, generator=g)
        labels = torch.randint(0, 49_000, (m, 4), generator=g).tolist()
        codebook.add(keys.to(codebook.dtype), values.to(codebook.dtype), labels)


def stored_bytes(codebook) -> dict:
    """Bytes held per live entry: key and value rows, labels (Python tuples of ints, as stored)."""
    import sys
    n = len(codebook)
    labels = codebook.get_labels(codebook.ids)
    label_bytes = sum(sys.getsizeof(t) + sum(sys.getsizeof(x) for x in t) for t in labels if t is not None)
    return {"key": codebook.key_dim * codebook.keys.element_size(),
            "value": codebook.value_dim * codebook.values.element_size(),
            "label": label_bytes / max(n, 1),
            "capacity_rows": codebook.capacity, "entries": n}


def index_bytes(codebook) -> float:
    """Bytes per entry of a FAISS flat prefilter index over the codebook's keys."""
    import faiss
    import numpy as np
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(codebook.key_dim))
    keys = codebook.keys.float().numpy()
    index.add_with_ids(keys, np.arange(len(keys), dtype=np.int64))
    return faiss.serialize_index(index).nbytes / max(len(keys), 1)


def _timed(gen, enc, tokenizer, new_tokens: int) -> float:
    t = time.perf_counter()
    gen(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=tokenizer.eos_token_id)
    return time.perf_counter() - t


def gen_speed(gens: dict, tokenizer, prompts, repeats: int, decode_tokens: int = 32) -> dict:
    """{name: {prefill_ms, decode_tokens_per_s}} for each generate function in ``gens``, timed in
    turn on each prompt (alternating, so that a change of machine load hits all alike)."""
    times = {name: {1: [], decode_tokens + 1: []} for name in gens}
    for _ in range(repeats):
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt")
            for steps in (1, decode_tokens + 1):
                for name, gen in gens.items():
                    times[name][steps].append(_timed(gen, enc, tokenizer, steps))
    out = {}
    for name, t in times.items():
        pre, full = statistics.median(t[1]), statistics.median(t[decode_tokens + 1])
        out[name] = {"prefill_ms": 1e3 * pre, "decode_tokens_per_s": decode_tokens / max(full - pre, 1e-9)}
    return out


def main(argv=None) -> int:
    from horen_fast.benchmark import cpu_model
    from horen_fast.evaluate import build_editor
    from horen_fast.models import load_model
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not args.data.is_file():
        raise SystemExit(f"no ZsRE records at {args.data}; pass --data PATH")
    prompts = [json.loads(line)["src"] for line in args.data.read_text(encoding="utf-8").splitlines()[:args.prompts]]
    editor, config = build_editor(args.model, progress=False)
    tok = editor.tokenizer
    print(f"# {cpu_model()} ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.model} layer {config.layer}, keys {editor.codebook.key_dim} x values {editor.codebook.value_dim}")
    unedited_copy, _ = load_model(args.model, progress=False)
    rows = []
    for n in [0, *sizes]:
        before = rss_bytes()
        fill(editor.codebook, n - len(editor.codebook))
        row = {"entries": n, "rss_added_mb": (rss_bytes() - before) / 2**20}
        speed = gen_speed({"edited": editor.generate, "unedited": unedited_copy.generate}, tok, prompts, args.repeats)
        row.update(speed["edited"])
        row["unedited"] = speed["unedited"]
        if n:
            row["bytes_per_edit"] = stored_bytes(editor.codebook)
            row["bytes_per_edit"]["faiss_flat_index"] = index_bytes(editor.codebook)
            with tempfile.TemporaryDirectory() as d:
                editor.save(d)
                row["file_bytes_per_edit"] = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) / n
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| entries | prefill ms (unedited) | ratio | decode tokens/s (unedited) | ratio |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        u = r["unedited"]
        print(f"| {r['entries']} | {r['prefill_ms']:.1f} ({u['prefill_ms']:.1f}) | {r['prefill_ms'] / u['prefill_ms']:.2f}x | "
              f"{r['decode_tokens_per_s']:.1f} ({u['decode_tokens_per_s']:.1f}) | "
              f"{r['decode_tokens_per_s'] / u['decode_tokens_per_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
