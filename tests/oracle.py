"""An independent float64 oracle for HoReN retrieval, written from SPEC section 3 with numpy.

It does not import horen_fast. Besides the decision it reports, row by row, whether the case sits
on a knife edge (top-2 final cosines within GAP, the best cosine within GAP of the threshold, or
the stop rule within a hair of eps), where a float32 kernel may legitimately decide otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAP = 1e-4


@dataclass
class OracleResult:
    index: np.ndarray    # int64 [B], -1 where not matched
    score: np.ndarray    # float64 [B], NaN where not matched
    matched: np.ndarray  # bool [B]
    knife: np.ndarray    # bool [B]
    best: np.ndarray     # float64 [B], best final cosine (NaN for unusable rows / empty codebook)


def oracle_retrieve(queries, keys, beta=20.0, alpha=0.1, steps=1, threshold=0.85, eps=1e-5) -> OracleResult:
    Q = np.asarray(queries, dtype=np.float64)
    K = np.asarray(keys, dtype=np.float64)
    B, N = Q.shape[0], K.shape[0]
    index = np.full(B, -1, dtype=np.int64)
    score = np.full(B, np.nan)
    best = np.full(B, np.nan)
    matched = np.zeros(B, dtype=bool)
    knife = np.zeros(B, dtype=bool)
    for b in range(B):
        x = Q[b]
        if N == 0 or not np.all(np.isfinite(x)) or not np.any(x):
            continue
        x = x / np.max(np.abs(x))  # every finite non-zero row is a direction, however large or small
        q = x / np.sqrt(np.sum(x * x))
        for _ in range(steps):
            s = beta * (K @ q)
            s = s - s.max()
            p = np.exp(s)
            p /= p.sum()
            r = p @ K
            r = r / np.linalg.norm(r)
            dist = np.linalg.norm(r - q)
            if abs(dist - eps) <= 1e-6 * max(eps, 1e-12) + 1e-9:
                knife[b] = True
            if dist < eps:
                break
            q = (1 - alpha) * q + alpha * r
            q = q / np.linalg.norm(q)
        c = K @ q
        j = int(np.argmax(c))
        best[b] = c[j]
        if N > 1:
            second = np.partition(c, -2)[-2]
            if c[j] - second < GAP:
                knife[b] = True
        if abs(c[j] - threshold) < GAP:
            knife[b] = True
        if c[j] > threshold:
            index[b], score[b], matched[b] = j, c[j], True
    return OracleResult(index, score, matched, knife, best)


def assert_agrees(result, expected: OracleResult, *, atol: float = 2e-4, context: str = "") -> None:
    """Every non-knife-edge row must make the same decision and report the same score."""
    idx = result.index.cpu().numpy()
    matched = result.matched.cpu().numpy()
    score = result.score.detach().double().cpu().numpy()
    ok = ~expected.knife
    bad = np.nonzero(ok & ((matched != expected.matched) | (idx != expected.index)))[0]
    assert bad.size == 0, (
        f"{context}: decisions differ on rows {bad[:8].tolist()}: got index {idx[bad[:8]].tolist()} "
        f"expected {expected.index[bad[:8]].tolist()} (best oracle cosine "
        f"{expected.best[bad[:8]].round(6).tolist()})")
    m = ok & expected.matched
    if m.any():
        err = np.abs(score[m] - expected.score[m]).max()
        assert err <= atol, f"{context}: score error {err:.2e} > {atol:.0e}"
    assert np.all(np.isnan(score[ok & ~expected.matched])), f"{context}: unmatched rows must score NaN"
    assert np.array_equal(matched, idx >= 0), f"{context}: matched must equal index >= 0"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def anisotropic_keys(rng: np.random.Generator, n: int, d: int, cos: float = 0.5) -> np.ndarray:
    """Unit keys clustered around one direction with pairwise cosine about ``cos`` (like real MLP
    activations), plus a few near-duplicates."""
    if n == 0:
        return np.zeros((0, d))
    mu = unit(rng.standard_normal(d))
    noise = unit(rng.standard_normal((n, d)))
    a = np.sqrt(cos)
    k = unit(a * mu + np.sqrt(1 - cos) * noise) if d > 1 else np.sign(rng.standard_normal((n, 1))) + 0.0
    if n >= 4:  # near-duplicate pairs
        m = max(1, n // 20)
        src = rng.integers(0, n, m)
        dst = rng.integers(0, n, m)
        k[dst] = unit(k[src] + 1e-3 * rng.standard_normal((m, d)))
    return k


def mixed_queries(rng: np.random.Generator, keys: np.ndarray, b: int, d: int) -> np.ndarray:
    """Paraphrase-like queries (near a stored key), unrelated ones, exact keys, zero and NaN rows,
    at arbitrary norms."""
    n = keys.shape[0]
    out = np.empty((b, d))
    for i in range(b):
        kind = rng.integers(0, 6)
        if kind <= 1 and n:
            noise = rng.uniform(0.05, 0.6)
            out[i] = keys[rng.integers(0, n)] + noise * unit(rng.standard_normal(d))
        elif kind == 2 and n:
            out[i] = keys[rng.integers(0, n)]
        elif kind == 3 and n:
            out[i] = unit(keys.mean(0) + rng.standard_normal(d) * rng.uniform(0.01, 0.2))
        else:
            out[i] = rng.standard_normal(d)
        out[i] *= rng.uniform(0.01, 100.0)
    if b >= 3:
        out[rng.integers(0, b)] = 0.0
        out[rng.integers(0, b), rng.integers(0, d)] = np.nan
    return out
