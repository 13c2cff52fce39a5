"""The plain PyTorch reference for HoReN retrieval, on the ops of horen_fast.hopfield.

Runs on any device, widens half types to float32, keeps float64 as is, and never synchronizes
with the host (the per-row stop rule is a mask, not a Python branch). Registered with
horen_fast.dispatch as the "retrieve" implementation "torch" (lowest priority: it serves every
call, so "auto" falls back to it).
"""
from __future__ import annotations

import torch

from .. import dispatch
from ..hopfield import (RetrievalResult, damped_update, exact_best, normalize_queries, select_match,
                        softmax_partials)
from ..retrieval import RetrievalParams, compute_dtype

__all__ = ["refine", "retrieve_torch"]


def refine(queries: torch.Tensor, keys: torch.Tensor, p: RetrievalParams
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query after the Hopfield steps for every row, the mask of usable rows, and the keys in
    the compute dtype (converted once, for the final scores too)."""
    dtype = compute_dtype(queries, keys)
    k = keys.to(dtype)
    q, valid = normalize_queries(queries, dtype)
    running = valid.clone()
    for _ in range(p.steps):
        _, _, y = softmax_partials(q, k, p.beta)
        q, running = damped_update(q, y, running, p.alpha, p.eps)
    return q, valid, k


def retrieve_torch(queries: torch.Tensor, keys: torch.Tensor, p: RetrievalParams) -> RetrievalResult:
    q, valid, k = refine(queries, keys, p)
    best, index = exact_best(q, k, q @ k.T)
    return select_match(best, index, valid, p.threshold)


def reasons(queries: torch.Tensor, keys: torch.Tensor, p: RetrievalParams) -> list[str]:
    return []  # any device, any floating dtype


dispatch.register("retrieve", "torch", reasons, retrieve_torch, priority=0)
