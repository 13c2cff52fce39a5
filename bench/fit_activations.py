"""Fit the synthetic key generator (horen_fast/synthetic.py) to real activations.

    python bench/fit_activations.py [--records ../shared/data/zsre_dev.jsonl] [--rank 128]

Runs SmolLM2-135M (horen_fast.models.load_model("smollm2")) over the ZsRE prompts, rephrases and
unrelated (locality) prompts, takes the paper's query (the mean of the wrapped layer's input over
the last 60% of prompt tokens) at the default layer's down_proj, and saves into
horen_fast/resources/smollm2_zsre_activations.safetensors (about 400 KB, shipped as package data
and read by horen_fast.synthetic.ActivationModel.load()):
- the mean and a rank-r factor F of the covariance (cov ~ F F^T + noise_std^2 I), from all prompts;
- the empirical cosine between each prompt's key and its rephrase's key (101 quantiles), which the
  generator uses for its paraphrase-like queries;
- summary statistics (pairwise cosines, nearest-key cosine of unrelated prompts) in the metadata.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from horen_fast._files import save_tensors  # noqa: E402
from horen_fast.adapter import build_queries  # noqa: E402
from horen_fast.data import read_records  # noqa: E402
from horen_fast.synthetic import FIT_FILE, KIND  # noqa: E402

STRATEGY = "last_60_perc_prompt_tokens_avg"


@torch.no_grad()
def activations(model, tokenizer, layer: int, prompts: list[str]) -> torch.Tensor:
    captured = {}
    mlp = model.model.layers[layer].mlp.down_proj
    handle = mlp.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    out = []
    tokenizer.padding_side = "right"
    try:
        for lo in range(0, len(prompts), 32):  # right-padded batches; the mask marks each prompt
            enc = tokenizer(prompts[lo: lo + 32], return_tensors="pt", padding=True)
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            q, _ = build_queries(captured["x"].float(), enc.attention_mask.bool(), STRATEGY)
            out.extend(q)
            print(f"  {lo + len(q)}/{len(prompts)} prompts", flush=True)
    finally:
        handle.remove()
    return torch.stack(out)


def quantiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.double(), torch.linspace(0, 1, 101, dtype=torch.float64)).float()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default=str(ROOT.parent / "shared" / "data" / "zsre_dev.jsonl"))
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--out", default=str(FIT_FILE))
    args = ap.parse_args(argv)

    from horen_fast.arch import default_layer
    from horen_fast.models import load_model

    t0 = time.time()
    model, tok = load_model("smollm2", progress=False)
    print(f"model loaded in {time.time() - t0:.0f}s", flush=True)
    layer = default_layer(model)
    recs = [r for r in read_records(args.records) if r.rephrase and r.loc_prompt]
    src = activations(model, tok, layer, [r.prompt for r in recs])
    reph = activations(model, tok, layer, [r.rephrase for r in recs])
    loc = activations(model, tok, layer, [r.loc_prompt for r in recs])
    x = torch.cat([src, reph, loc]).double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    r = min(args.rank, n - 1)
    var = s ** 2 / (n - 1)
    factor = vh[:r].T * var[:r].sqrt()                       # [d, r]
    noise_var = float(var[r:].sum() / max(d - r, 1))

    unit = torch.nn.functional.normalize
    ks, kr, kl = unit(src, dim=1), unit(reph, dim=1), unit(loc, dim=1)
    para = (ks * kr).sum(1)
    pair = ks @ ks.T
    off = pair[~torch.eye(len(ks), dtype=torch.bool)]
    loc_near = (kl @ ks.T).max(1).values
    stats = {"records": len(recs), "layer": layer, "d": d, "rank": r,
             "captured_variance": float(var[:r].sum() / var.sum()),
             "pairwise_cos_mean": float(off.mean()), "pairwise_cos_std": float(off.std()),
             "paraphrase_cos_median": float(para.median()), "paraphrase_cos_p10": float(para.quantile(.1)),
             "unrelated_nearest_cos_median": float(loc_near.median()),
             "unrelated_nearest_cos_max": float(loc_near.max()), "seconds": round(time.time() - t0, 1)}
    tensors = {"mean": mean.float(), "factor": factor.to(torch.float16),
               "noise_std": torch.tensor([noise_var ** 0.5], dtype=torch.float32),
               "paraphrase_cos": quantiles(para)}
    save_tensors(args.out, tensors, {"kind": KIND, "model": "SmolLM2-135M-Instruct (GGUF Q4_1)",
                                     "strategy": STRATEGY, "stats": stats})
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    for k, v in stats.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
