"""The published HoReN edit loop, written literally: the baseline of bench_edit.py.

It reproduces how the authors' experiment code makes an edit (read to understand, not copied),
including the costs horen-fast removes (SPEC 3 and 5, "deliberate difference"):

- every one of the ``n_iter`` optimization steps runs the FULL model forward and backward on
  prompt + target (all layers, all positions), with the labels, as ``model(**tokens).loss``;
- the adapter retrieves inside every forward pass, over all keys, with the published retrieval
  (bench/published.py: a host sync per Hopfield step);
- one prompt length for the whole batch (the smallest count of masked labels, minus one);
- the codebook starts with one random placeholder key (slot 0, zero value) and grows by
  ``torch.cat`` (a full copy of keys and values per added entry);
- the Adam optimizer is created anew at every edit over ALL stored values (a fresh
  ``nn.Parameter`` made by ``torch.cat``), so every optimizer step touches N x d_value numbers;
- the loss is read back to the host at every step;
- a label "matches" when the mean of the label tensors (with their -100s) are equal.
"""
from __future__ import annotations

import math
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from .published import published_retrieve

__all__ = ["PublishedAdapter", "PublishedHoReN", "published_tokenize"]


def _module(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the dotted module path."""
    parts = path.split(".")
    parent = model
    for p in parts[:-1]:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    return parent, parts[-1]


def published_tokenize(tokenizer, prompt: str, target: str) -> dict:
    """prompt + " " + target, labels -100 on the prompt's tokens and on padding."""
    prompt_ids = tokenizer([prompt], return_tensors="pt", padding=True, truncation=True)["input_ids"]
    n_prompt = int((prompt_ids[0] != tokenizer.pad_token_id).sum())
    tokens = tokenizer([f"{prompt} {target}"], return_tensors="pt", padding=True, truncation=True)
    labels = tokens["input_ids"].clone()
    labels[0, :n_prompt] = -100
    labels[tokens["input_ids"] == tokenizer.pad_token_id] = -100
    tokens["labels"] = labels
    return dict(tokens)


class PublishedAdapter(nn.Module):
    """The wrapped layer with the published codebook (value mode)."""

    def __init__(self, layer: nn.Linear, *, strategy: str, beta: float, alpha: float,
                 max_iter: int, eps: float, threshold: float, val_init: str, seed: int):
        super().__init__()
        self.layer = layer
        self.strategy, self.val_init = strategy, val_init
        self.beta, self.alpha, self.max_iter, self.eps = beta, alpha, max_iter, eps
        self.threshold = threshold
        d_key, d_value = layer.weight.shape[1], layer.weight.shape[0]
        self.value_dim = d_value
        g = torch.Generator(device=layer.weight.device).manual_seed(seed)
        placeholder = torch.randn(1, d_key, generator=g, device=layer.weight.device,
                                  dtype=layer.weight.dtype)
        self.register_buffer("keys", F.normalize(placeholder, dim=-1))
        self.values = nn.Parameter(torch.zeros(1, d_value, device=layer.weight.device),
                                   requires_grad=False)
        self.key_labels = [torch.tensor(-1)]
        self.key_id = -1
        self.editing = False
        self.iter = 0
        self.edit_label = None
        self.chosen_key = None
        self.new_value = None       # optional callable(layer_out_row) -> initial value (parity check)

    def _query(self, x: torch.Tensor, last: int) -> torch.Tensor:
        if self.strategy == "last_prompt_token" or last == -1:
            q = x[:, last, :]
        elif self.strategy == "first_prompt_token":
            q = x[:, 0, :]
        else:
            n_prompt = last + 1
            m = re.fullmatch(r"last_(\d+(?:\.\d+)?)_perc_prompt_tokens_avg", self.strategy)
            if m:
                k = max(int(math.ceil(n_prompt * float(m.group(1)) / 100.0)), 1)
            else:
                k = min(int(re.fullmatch(r"last_(\d+)_prompt_tokens_avg", self.strategy).group(1)),
                        n_prompt)
            q = x[:, n_prompt - k:n_prompt, :].mean(dim=1)
        return F.normalize(q, dim=-1)

    def _lookup(self, q):
        index, score, matched = published_retrieve(q, self.keys.to(q.dtype), beta=self.beta,
                                                   alpha=self.alpha, max_iter=self.max_iter,
                                                   eps=self.eps, threshold=self.threshold)
        return index, score, matched

    def _labels_match(self, stored) -> bool:
        if stored.numel() == 1 and int(stored.item()) == -1:
            return False
        return bool(self.edit_label.float().mean() == stored.float().mean())

    def _add_entry(self, q, layer_out, last):
        self.keys = torch.cat([self.keys, q.detach().to(self.keys.dtype)], dim=0)
        if self.new_value is not None:
            init = self.new_value(layer_out[:, last, :].detach()).reshape(1, -1).float()
        elif self.val_init == "cold":
            init = torch.rand(1, self.value_dim, device=self.values.device)
        else:
            init = layer_out[:, last, :].detach().float()
        self.values = nn.Parameter(torch.cat([self.values, init], dim=0), requires_grad=True)
        self.key_labels.append(self.edit_label)

    def forward(self, x):
        out = self.layer(x)
        if not self.editing and len(self.keys) == 1:
            return out
        last = min(self.key_id, x.shape[1] - 1)
        q = self._query(x, last)
        index, score, matched = self._lookup(q)
        if self.editing and self.iter == 0:
            add = True
            if score.item() > self.threshold:
                add = not self._labels_match(self.key_labels[int(index.item())])
            if add:
                self._add_entry(q, out, last)
                index, score, matched = self._lookup(q)
        self.chosen_key = index
        update = self.values[index] * matched.unsqueeze(1).to(self.values.dtype)
        out = out.clone()
        out[:, last, :] += update.to(out.dtype)
        return out


class PublishedHoReN:
    """Installs a PublishedAdapter on ``layer`` and edits the published way. ``edit`` returns a
    dict: loss (last step), losses, seconds, entry (the slot the edit trained), entries."""

    def __init__(self, model: nn.Module, tokenizer, *, layer: str, n_iter: int = 50,
                 edit_lr: float = 1.0, strategy: str = "last_60_perc_prompt_tokens_avg",
                 beta: float = 20.0, alpha: float = 0.1, max_iter: int = 1, eps: float = 1e-5,
                 threshold: float = 0.85, val_init: str = "cold", seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.n_iter, self.edit_lr = n_iter, edit_lr
        parent, name = _module(model, layer)
        self.parent, self.name, self.original = parent, name, getattr(parent, name)
        self.adapter = PublishedAdapter(self.original, strategy=strategy, beta=beta, alpha=alpha,
                                        max_iter=max_iter, eps=eps, threshold=threshold,
                                        val_init=val_init, seed=seed)
        setattr(parent, name, self.adapter)

    def detach(self):
        setattr(self.parent, self.name, self.original)

    def __len__(self):
        return len(self.adapter.keys) - 1

    def edit(self, prompt: str, target: str) -> dict:
        # The published editor is rebuilt per request: freeze everything, re-enable the values.
        for p in self.model.parameters():
            p.requires_grad = False
        if len(self.adapter.keys) > 1:
            self.adapter.values.requires_grad_(True)
        tokens = published_tokenize(self.tokenizer, prompt, target)
        tokens = {k: v.to(self.adapter.values.device) for k, v in tokens.items()}
        ad = self.adapter
        ad.key_id = int((tokens["labels"] == -100).sum(dim=1).min().item() - 1)
        ad.editing, ad.edit_label = True, tokens["labels"]
        losses, optimizer = [], None
        start = time.perf_counter()
        for i in range(self.n_iter):
            ad.iter = i
            loss = self.model(**tokens).loss
            if i == 0:
                optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                             self.edit_lr)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach().cpu().item()))
        seconds = time.perf_counter() - start
        ad.editing = False
        return {"loss": losses[-1] if losses else float("nan"), "losses": losses,
                "seconds": seconds, "entry": int(ad.chosen_key.item()) if ad.chosen_key is not None
                else -1, "entries": len(ad.keys) - 1}

    @torch.no_grad()
    def value(self, entry: int) -> torch.Tensor:
        return self.adapter.values[entry].detach().clone()
