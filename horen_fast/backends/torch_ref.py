"""The plain PyTorch reference for HoReN retrieval (SPEC 3), written for clarity.

Runs on any device, widens half types to float32, keeps float64 as is, and never synchronizes
with the host (the per-row stop rule is a mask, not a Python branch).
"""
from __future__ import annotations

import torch

from ..retrieval import RetrievalParams, RetrievalResult, compute_dtype, register_backend


def normalize_queries(queries: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows and a mask of usable rows (finite, non-zero). Unusable rows become zero."""
    q = queries.to(dtype)
    norm = q.norm(dim=1, keepdim=True)
    valid = torch.isfinite(norm) & (norm > 0)
    q = torch.where(valid, q / torch.where(valid, norm, torch.ones_like(norm)), torch.zeros_like(q))
    return q, valid[:, 0]


def refine(queries: torch.Tensor, keys: torch.Tensor, p: RetrievalParams) -> tuple[torch.Tensor, torch.Tensor]:
    """q_M of SPEC 3 for every row, plus the mask of usable rows."""
    dtype = compute_dtype(queries, keys)
    k = keys.to(dtype)
    q, valid = normalize_queries(queries, dtype)
    running = valid.clone()
    for _ in range(p.steps):
        weights = torch.softmax(p.beta * (q @ k.T), dim=1)
        r = torch.nn.functional.normalize(weights @ k, dim=1, eps=1e-30)
        running = running & ((r - q).norm(dim=1) >= p.eps)
        step = torch.nn.functional.normalize((1 - p.alpha) * q + p.alpha * r, dim=1, eps=1e-30)
        q = torch.where(running[:, None], step, q)
    return q, valid


def retrieve_torch(queries: torch.Tensor, keys: torch.Tensor, p: RetrievalParams) -> RetrievalResult:
    q, valid = refine(queries, keys, p)
    best, index = (q @ keys.to(q.dtype).T).max(dim=1)
    matched = valid & (best > p.threshold)
    return RetrievalResult(
        index=torch.where(matched, index, torch.full_like(index, -1)),
        score=torch.where(matched, best, torch.full_like(best, float("nan"))),
        matched=matched,
    )


register_backend("torch", lambda device: True, retrieve_torch)
