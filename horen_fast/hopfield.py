"""The Hopfield math of HoReN retrieval, written once, in torch.

Every retrieval path is built from these ops: the torch reference backend (all keys at once), the
FAISS prefilter (each row's candidate keys plus the sketch's modelled tail), the ShardedCodebook
(each rank's keys, only the softmax sums all-reduced). The fused C++ and Triton kernels compute
the same quantities in one pass and are tested against the reference built on them.

One step, for unit queries q [B, d] and keys k:

    s     = beta * q @ k.T                      scores
    m     = max_i s_i                           row max
    z     = sum_i exp(s_i - m)                  softmax denominator (relative to m)
    y     = sum_i exp(s_i - m) k_i              exp-weighted key sum (relative to m)
    r     = y / ||y||                           the retrieved pattern (z cancels)
    stop  where ||r - q|| < eps                 (per row; a stopped row keeps q from then on)
    q'    = normalize((1 - alpha) q + alpha r)

``softmax_partials`` gives (m, z, y) for ANY subset of keys; partial sums of disjoint subsets
combine exactly (``combine_partials``): with M = max(m_j), z = sum_j exp(m_j - M) z_j and
y = sum_j exp(m_j - M) y_j. A modelled tail enters as one more partial: a log mass L and a mean key
mu are the partial (m=L, z=1, y=mu). Across ranks: all_reduce MAX of m, ``rescale_partials`` to
that max, all_reduce SUM of z and y.

TIE RULE (the one rule of every backend, Codebook and ShardedCodebook): when several keys share
the best final cosine, the match is the FIRST key in storage order, i.e. the lowest position; in a
ShardedCodebook the lowest rank, then the lowest position in that rank (``best_match`` takes the
positions to compare, so the same function serves candidates and shards). A matrix product does
not give identical keys identical dot products (GEMM blocking), so paths that score with one use
``exact_best``: it rescores each row's best few keys, every key by the same reduction, before
applying the rule; exact duplicate keys then tie exactly.

FINAL-SCORE BOUND (used by the C++ kernel, csrc/retrieve/kernel.cpp, and the Triton kernels to avoid
re-reading every key after the last step). Let q be the query of the last step (unit), s_i = q.k_i
its cosines, r the retrieved pattern, u = (1 - alpha) q + alpha r. The final cosine is
c_i = ((1 - alpha) s_i + alpha r.k_i) / ||u||. Write rho = r.q and sigma = ||r - rho q||. Since
(r - rho q) is orthogonal to q,

    r.k_i = rho s_i + (r - rho q).(k_i - s_i q),   so   |r.k_i - rho s_i| <= sigma ||k_i - s_i q||,

and ||k_i - s_i q|| = sqrt(||k_i||^2 - s_i^2). Hence, with c1 = (1 - alpha) + alpha rho and
c2 = alpha sigma,

    c_i in [ (c1 s_i - c2 perp_i) / ||u||,  (c1 s_i + c2 perp_i) / ||u|| ],   perp_i = sqrt(||k_i||^2 - s_i^2).

A key can be the match only if its upper bound exceeds the threshold and reaches the best lower
bound of its row (``bound_candidates``); only those are rescored exactly. Kernels add their own
rounding slack; ``final_bound`` is the exact-arithmetic reference. (The loose form
|r.k_i| <= ||k_i|| bounds the same c_i but leaves many more candidates when keys are clustered.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RetrievalResult", "normalize_queries", "softmax_partials", "combine_partials", "rescale_partials",
           "damped_update", "best_match", "exact_best", "select_match", "final_bound", "bound_candidates"]

_TINY = 1e-30


@dataclass(frozen=True)
class RetrievalResult:
    """Per row: ``index`` (int64, -1 where not matched), ``score`` (the final cosine where
    matched, NaN elsewhere), ``matched`` (bool, index >= 0)."""
    index: torch.Tensor
    score: torch.Tensor
    matched: torch.Tensor

    def __iter__(self):  # allows ``index, score, matched = retrieve(...)``
        return iter((self.index, self.score, self.matched))


def normalize_queries(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows of ``x`` [B, d] in ``dtype``, and the mask of usable rows (finite, non-zero).

    Unusable rows (zero, or any NaN/inf component) become zero with ``valid`` False. The norm is
    computed in float64 after dividing each row by its largest magnitude, so every finite non-zero
    row normalizes correctly however large or small it is (float32 rows with ||x|| from 1e-35 to
    1e35, float64 rows of normal numbers from about 1e-300 to 1e300), where a plain norm would
    overflow or underflow."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"queries must be a torch.Tensor [B, d], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"queries must be 2-D [B, d], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point or not dtype.is_floating_point:
        raise TypeError(f"normalize_queries needs floating dtypes, got queries {x.dtype} and target "
                        f"{dtype}; convert with .float()")
    w = x.detach().to(torch.float64)
    scale = w.abs().amax(dim=1, keepdim=True) if w.shape[1] else w.new_zeros(w.shape[0], 1)
    valid = torch.isfinite(w).all(dim=1) & (scale[:, 0] > 0)
    one = torch.ones_like(scale)
    w = torch.where(valid[:, None], w / torch.where(valid[:, None], scale, one), torch.zeros_like(w))
    norm = w.norm(dim=1, keepdim=True)  # in [1, sqrt(d)] for valid rows
    q = w / torch.where(valid[:, None], norm, one)
    return q.to(dtype), valid


def softmax_partials(q: torch.Tensor, keys: torch.Tensor, beta: float,
                     present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m [B], z [B], y [B, d]) of one Hopfield step over a subset of keys.

    ``keys`` is [N, d] (the same keys for every row) or [B, k, d] (each row its own candidates);
    ``present`` (bool [B, N] or [B, k]) marks the keys that exist (absent ones add nothing). A row
    with no key gets m = -inf, z = 0, y = 0, the neutral element of ``combine_partials``."""
    if keys.dim() == 2:
        s = beta * (q @ keys.T)
    else:
        s = beta * torch.bmm(keys, q[:, :, None])[:, :, 0]
    if present is not None:
        s = torch.where(present, s, torch.full_like(s, float("-inf")))
    if s.shape[1]:
        m = s.max(dim=1).values
    else:
        m = torch.full((q.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - shift[:, None])  # exp(-inf) = 0 for absent keys
    z = e.sum(dim=1)
    y = e @ keys if keys.dim() == 2 else torch.bmm(e[:, None, :], keys)[:, 0]
    return m, z, y


def rescale_partials(m: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                     m_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) taken from a row max ``m`` to a larger common max ``m_new`` (>= m): multiplied by
    exp(m - m_new). Rows whose m is -inf (no keys) stay 0. After this, partials sum exactly."""
    f = torch.where(torch.isfinite(m), torch.exp(m - torch.where(torch.isfinite(m_new), m_new, m)),
                    torch.zeros_like(m))
    return z * f, y * f[:, None]


def combine_partials(m_list, z_list, y_list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (m, z, y) of the union of disjoint key subsets, from their partials."""
    if not (len(m_list) == len(z_list) == len(y_list)) or not m_list:
        raise ValueError(f"combine_partials needs equally many m, z and y partials (at least one), got "
                         f"{len(m_list)}, {len(z_list)} and {len(y_list)}")
    m = torch.stack(list(m_list)).max(dim=0).values
    z = torch.zeros_like(z_list[0])
    y = torch.zeros_like(y_list[0])
    for mi, zi, yi in zip(m_list, z_list, y_list):
        zs, ys = rescale_partials(mi, zi, yi, m)
        z, y = z + zs, y + ys
    return m, z, y


def damped_update(q: torch.Tensor, y: torch.Tensor, running: torch.Tensor, alpha: float,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One damped step on the unit sphere with the per-row stop rule, no host sync.

    r = normalize(y); a running row stops when ||r - q|| < eps (or is not a number) and keeps q;
    the others move to normalize((1 - alpha) q + alpha r). Returns (q_next, running_next)."""
    r = torch.nn.functional.normalize(y, dim=1, eps=_TINY)
    running = running & ((r - q).norm(dim=1) >= eps)
    step = torch.nn.functional.normalize((1 - alpha) * q + alpha * r, dim=1, eps=_TINY)
    return torch.where(running[:, None], step, q), running


def best_match(c: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(best [B], index [B]) of final cosines ``c`` [B, N] under THE tie rule: among the keys with
    the best cosine, the lowest position. ``positions`` ([N] or [B, N], int64) are the storage
    positions of c's columns (default 0..N-1); absent columns should hold -inf in c. A row with
    no finite best (no keys, NaN) gets best -inf/NaN, which ``select_match`` never matches."""
    b, n = c.shape
    if positions is None:
        positions = torch.arange(n, device=c.device)
    if n == 0:
        return (torch.full((b,), float("-inf"), dtype=c.dtype, device=c.device),
                torch.full((b,), -1, dtype=torch.long, device=c.device))
    best = c.max(dim=1).values
    big = torch.iinfo(torch.long).max
    pos = positions.expand(b, n)
    index = torch.where(c == best[:, None], pos, torch.full_like(pos, big)).min(dim=1).values
    return best, torch.where(index == big, torch.full_like(index, -1), index)


def exact_best(q: torch.Tensor, keys: torch.Tensor, c: torch.Tensor, positions: torch.Tensor | None = None,
               window: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(best [B], index [B]) like ``best_match``, robust to the rounding of a matrix product.

    A GEMM does not give identical rows identical dot products (its blocking treats the last rows
    differently), so exact duplicate keys may score one ulp apart in ``c`` [B, N]. The ``window``
    best columns of each row are therefore rescored in q's dtype, every key by the same reduction,
    and the tie rule is applied to those scores: duplicates of the best key (up to ``window`` of
    them) tie exactly and the lowest position wins. ``keys`` is [N, d] or
    [B, N, d] (each row its own candidates, matching c's columns); absent columns hold -inf in c.
    The returned best has c's dtype."""
    b, n = c.shape
    if n == 0:
        return best_match(c, positions)
    w = min(window, n)
    top, col = c.topk(w, dim=1, sorted=False)                             # [B, w]
    if keys.dim() == 2:
        kw = keys[col.reshape(-1)].reshape(b, w, -1)
    else:
        kw = torch.gather(keys, 1, col[:, :, None].expand(b, w, keys.shape[2]))
    exact = torch.linalg.vecdot(kw.to(q.dtype), q[:, None, :])  # the same reduction for every key
    exact = torch.where(torch.isfinite(top) | torch.isnan(top), exact, torch.full_like(exact, float("-inf")))
    if positions is None:
        pos = col
    else:
        pos = torch.gather(positions.expand(b, n), 1, col)
    best, index = best_match(exact, pos)
    return best.to(c.dtype), index


def select_match(best: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                 threshold: float) -> RetrievalResult:
    """The result contract: matched where the row is usable and best > threshold; index -1 and
    score NaN where not matched."""
    matched = valid & (best > threshold) & (index >= 0)
    return RetrievalResult(index=torch.where(matched, index, torch.full_like(index, -1)),
                           score=torch.where(matched, best, torch.full_like(best, float("nan"))),
                           matched=matched)


def final_bound(q: torch.Tensor, y: torch.Tensor, s: torch.Tensor, alpha: float,
                key_sq_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) [B, N] bounds of the final cosines after the last step (module docstring),
    from that step's query q [B, d] (unit), its weighted key sum y [B, d] and cosines s = q @ k.T
    [B, N]; ``key_sq_norms`` [N] are ||k_i||^2 (default 1). For rows that take the step; a row that
    stops keeps s as its final cosines."""
    r = torch.nn.functional.normalize(y, dim=1, eps=_TINY)
    rho = (r * q).sum(dim=1)
    sigma = (r - rho[:, None] * q).norm(dim=1)
    nrm = ((1 - alpha) * q + alpha * r).norm(dim=1).clamp(min=_TINY)
    c1 = ((1 - alpha) + alpha * rho)[:, None]
    c2 = (alpha * sigma)[:, None]
    kk = torch.ones_like(s) if key_sq_norms is None else key_sq_norms.to(s.dtype)[None, :].expand_as(s)
    perp = torch.sqrt(torch.clamp(kk - s * s, min=0))
    return (c1 * s - c2 * perp) / nrm[:, None], (c1 * s + c2 * perp) / nrm[:, None]


def bound_candidates(lower: torch.Tensor, upper: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [B, N]: the keys that can still be a row's match given bounds of their final cosines
    (upper above the threshold and at least the best lower bound of the row)."""
    return (upper > threshold) & (upper >= lower.max(dim=1, keepdim=True).values)
