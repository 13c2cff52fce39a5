"""HoReN retrieval (SPEC section 3): one public function, backends behind it.

``retrieve`` validates its arguments, then hands the work to a backend from the registry:
``"torch"`` (the plain PyTorch reference, any device), ``"cpp"`` (the fused C++ kernel, CPU) and
``"triton"`` (the fused Triton kernels, CUDA, or the CPU under ``TRITON_INTERPRET=1``).
``backend="auto"`` picks Triton on CUDA and C++ on the CPU, and falls back to torch (warning once)
when the fast one is not available.

Result contract, row by row:
- ``index``: position of the best key after the damped Hopfield step(s) when its final cosine is
  above ``threshold``; -1 otherwise (no match, empty codebook, zero or non-finite query).
- ``score``: the final cosine of that key where matched, NaN where not matched. (The fused kernels
  decide "no match" from a bound, without scoring every key again, so an unmatched row has no
  exact best score; ``final_scores`` gives the full matrix when it is needed.)
- ``matched``: ``index >= 0``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["RetrievalResult", "retrieve", "final_scores", "register_backend", "available_backends"]


@dataclass(frozen=True)
class RetrievalResult:
    index: torch.Tensor    # int64 [B]
    score: torch.Tensor    # float [B]
    matched: torch.Tensor  # bool [B]

    def __iter__(self):  # allows ``index, score, matched = retrieve(...)``
        return iter((self.index, self.score, self.matched))


@dataclass(frozen=True)
class RetrievalParams:
    beta: float
    alpha: float
    steps: int
    threshold: float
    eps: float


# name -> (is_available(device) -> bool, fn(queries, keys, params) -> RetrievalResult)
_BACKENDS: dict[str, tuple[Callable[[torch.device], bool], Callable]] = {}
_warned_fallback: set[str] = set()


def register_backend(name: str, is_available: Callable[[torch.device], bool], fn: Callable) -> None:
    """Add a retrieval backend. ``fn(queries, keys, params)`` gets validated 2-D float tensors on
    one device (queries [B, d] of any norm, keys [N, d] with N >= 1) and returns a RetrievalResult."""
    _BACKENDS[name] = (is_available, fn)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    _load_builtin_backends()
    device = torch.device(device)
    return [name for name, (ok, _) in _BACKENDS.items() if ok(device)]


def check_params(beta: float, alpha: float, steps: int, threshold: float, eps: float) -> RetrievalParams:
    """Validate the retrieval hyper-parameters (shared by retrieve, the Codebook and the config)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0 (the paper uses 20.0), got {beta!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha <= 1):
        raise ValueError(f"alpha must be in (0, 1] (the paper uses 0.1), got {alpha!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (the paper uses 1), got {steps!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (a cosine, e.g. 0.85), got {threshold!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0):
        raise ValueError(f"eps must be a number >= 0 (default 1e-5), got {eps!r}")
    return RetrievalParams(float(beta), float(alpha), int(steps), float(threshold), float(eps))


def _check_tensors(queries, keys) -> None:
    for name, t, shape in (("queries", queries, "[B, d]"), ("keys", keys, "[N, d]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D {shape}, got shape {tuple(t.shape)}; "
                             f"use .reshape(-1, d) or .unsqueeze(0) to make it 2-D")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16 or "
                            f"float64), got {t.dtype}; convert with .float()")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"width mismatch: queries have d={queries.shape[1]} but keys have "
                         f"d={keys.shape[1]}; both must be the wrapped layer's input width")
    if queries.device != keys.device:
        raise ValueError(f"queries are on {queries.device} but keys are on {keys.device}; "
                         f"move them to one device")


def compute_dtype(queries: torch.Tensor, keys: torch.Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (half types are widened)."""
    return torch.float64 if torch.float64 in (queries.dtype, keys.dtype) else torch.float32


def empty_result(batch: int, device, dtype) -> RetrievalResult:
    return RetrievalResult(
        index=torch.full((batch,), -1, dtype=torch.long, device=device),
        score=torch.full((batch,), float("nan"), dtype=dtype, device=device),
        matched=torch.zeros(batch, dtype=torch.bool, device=device),
    )


def _load_builtin_backends() -> None:
    # every builtin, not just "torch": importing torch_ref alone (the prefilter does) registers it
    if {"torch", "cpp", "triton"} <= _BACKENDS.keys():
        return
    from .backends import torch_ref  # noqa: F401  (registers "torch")
    from .backends import cpp  # noqa: F401  (registers "cpp")
    from .backends import triton as _triton  # noqa: F401  (registers "triton")


def _pick_backend(device: torch.device) -> str:
    preferred = "triton" if device.type == "cuda" else "cpp"
    ok, _ = _BACKENDS.get(preferred, (lambda d: False, None))
    if ok(device):
        return preferred
    if preferred not in _warned_fallback:
        _warned_fallback.add(preferred)
        warnings.warn(f"horen_fast: the {preferred} backend is not available on {device}; using the "
                      f"torch reference backend (slower). See README 'Backends' to enable it.",
                      RuntimeWarning, stacklevel=3)
    return "torch"


def retrieve(queries: torch.Tensor, keys: torch.Tensor, *, beta: float = 20.0, alpha: float = 0.1,
             steps: int = 1, threshold: float = 0.85, eps: float = 1e-5,
             backend: str = "auto") -> RetrievalResult:
    """Damped Hopfield retrieval of ``queries`` [B, d] (any norm) against unit-norm ``keys`` [N, d].

    Each row is normalized, refined by ``steps`` damped Hopfield steps on the unit sphere (inverse
    temperature ``beta``, damping ``alpha``, per-row stop when the retrieved pattern is within
    ``eps`` of the query), then matched to the key of highest cosine if that cosine exceeds
    ``threshold``. No host synchronization: safe under CUDA graphs and torch.compile.
    """
    params = check_params(beta, alpha, steps, threshold, eps)
    _check_tensors(queries, keys)
    _load_builtin_backends()
    if backend == "auto":
        backend = _pick_backend(queries.device)
    elif backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', "
                         + ", ".join(repr(b) for b in sorted(_BACKENDS)))
    else:
        ok, _ = _BACKENDS[backend]
        if not ok(queries.device):
            raise RuntimeError(f"backend {backend!r} is not available for tensors on "
                               f"{queries.device}; available here: {available_backends(queries.device)}")
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        return empty_result(queries.shape[0], queries.device, compute_dtype(queries, keys))
    return _BACKENDS[backend][1](queries, keys, params)


def final_scores(queries: torch.Tensor, keys: torch.Tensor, *, beta: float = 20.0, alpha: float = 0.1,
                 steps: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """The full matrix of final cosines [B, N] (after the Hopfield steps), NaN rows for zero or
    non-finite queries. Reads the codebook fully; for calibration and analysis, not the hot path."""
    params = check_params(beta, alpha, steps, 0.0, eps)
    _check_tensors(queries, keys)
    from .backends.torch_ref import refine
    q, valid = refine(queries, keys, params)
    c = q @ keys.to(q.dtype).T
    return torch.where(valid[:, None], c, torch.full_like(c, float("nan")))
