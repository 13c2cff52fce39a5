"""How much arithmetic an exact edit must do: the published loop's multiply-adds per edit over ours.

For each ZsRE record (prompt P tokens, target m tokens, T = P + m), counted from the model's
config, per optimization step (n_iter of them per edit):

- published: the full model forward on all T positions (every layer, the LM head on every
  position), then the backward pass from the loss down to the edited layer L, on all T positions
  (activation gradients only: the weights are frozen);
- ours (HoReNEditor's fast path): blocks L.. forward and backward on the m positions p .. T-2 only
  (everything before L and before p comes from the cached first pass), the LM head on those m
  positions.

A linear layer's backward for the input costs what its forward costs; attention's score and
weighted-sum products are counted both ways against the context each position sees. The ratio is
what a perfectly efficient implementation of each could gain: an exact edit (same loss, same
gradients, same Adam steps) cannot do less arithmetic than "ours" here.

    python -m bench.edit_flops --records 5            # the records bench_edit.py times
    python -m bench.edit_flops --records 374 --layer 27
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.bench_edit import DEFAULT_DATA, load_records


def per_token(cfg) -> tuple[int, int, int]:
    """(multiply-adds of one decoder block's projections and MLP per token, per attended position
    (attention scores + weighted sum), of the LM head per token)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    proj = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    mlp = 3 * h * inter
    return proj + mlp, 2 * heads * hd, h * cfg.vocab_size


def counts(cfg, layer: int, P: int, m: int) -> tuple[float, float]:
    """(published, ours) multiply-adds per optimization step."""
    block, attn, head = per_token(cfg)
    n_layers = cfg.num_hidden_layers
    T = P + m
    ctx_all = sum(range(1, T + 1))                # positions 0..T-1 attend to 1..T positions
    ctx_ours = sum(range(P, T))                   # positions p..T-2 attend to P..T-1 positions
    fwd_pub = n_layers * (T * block + ctx_all * attn) + T * head
    bwd_pub = (n_layers - layer) * (T * block + 2 * ctx_all * attn) + T * head
    fwd_ours = (n_layers - layer) * (m * block + ctx_ours * attn) + m * head
    bwd_ours = (n_layers - layer) * (m * block + 2 * ctx_ours * attn) + m * head
    return fwd_pub + bwd_pub, fwd_ours + bwd_ours


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--records", type=int, default=5)
    ap.add_argument("--layer", type=int, default=15)
    args = ap.parse_args(argv)

    from horen_fast import HoReNConfig, HoReNEditor
    from horen_fast.models import load_model

    model, tok = load_model("smollm2", progress=False)
    editor = HoReNEditor(model, tok, HoReNConfig(layer=args.layer))
    cfg = model.config
    rows = []
    for rec in load_records(Path(args.data), args.records):
        p_ids, t_ids = editor.encode(rec["prompt"], rec["target"])
        pub, ours = counts(cfg, args.layer, len(p_ids), len(t_ids))
        rows.append((len(p_ids), len(t_ids), pub, ours))
    print("| record | prompt tokens | target tokens | published GMAC/step | ours GMAC/step | ratio |")
    print("|---|---|---|---|---|---|")
    for i, (P, m, pub, ours) in enumerate(rows):
        print(f"| {i} | {P} | {m} | {pub / 1e9:.2f} | {ours / 1e9:.3f} | {pub / ours:.1f}x |")
    total_pub, total_ours = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"\nall {len(rows)} records, layer {args.layer}: published / ours = {total_pub / total_ours:.2f}x "
          f"(median per record {statistics.median(r[2] / r[3] for r in rows):.2f}x)")


if __name__ == "__main__":
    main()
