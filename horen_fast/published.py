"""The published HoReN retrieval, written literally: the baseline of every retrieval benchmark.

This mirrors how the authors' code computes it (read to understand, not copied): every Hopfield
step multiplies the query with the whole key matrix for scores, softmaxes, multiplies again for
the retrieved pattern, checks the stop rule for the whole batch with a host synchronization, and
a final product over all keys scores the refined query: three full reads of the codebook per step
plus one, and a host sync each step. It lives in the package (not only in bench/) so that
``horen-fast bench`` can time it on any machine the package is installed on.
"""
from __future__ import annotations

import torch

__all__ = ["published_retrieve"]


def published_retrieve(queries: torch.Tensor, keys: torch.Tensor, beta: float = 20.0,
                       alpha: float = 0.1, max_iter: int = 1, eps: float = 1e-5,
                       threshold: float = 0.85):
    """Returns (index, score, matched) like the published adapter's lookup (index of the best key,
    its cosine, and whether it clears the threshold)."""
    q = torch.nn.functional.normalize(queries.to(keys.dtype), dim=-1)
    for _ in range(max_iter):
        scores = beta * (q @ keys.T)
        attn = torch.softmax(scores.float(), dim=-1).to(keys.dtype)
        retrieved = torch.nn.functional.normalize(attn @ keys, dim=-1)
        if torch.norm(retrieved - q) < eps:  # host sync, whole batch
            break
        q = torch.nn.functional.normalize((1 - alpha) * q + alpha * retrieved, dim=-1)
    cos = q @ keys.T
    score, index = cos.max(dim=-1)
    return index, score, score > threshold
