"""HoReN retrieval (the damped Hopfield step of horen_fast.hopfield): one public function, backends behind one dispatch point.

``retrieve`` validates its arguments, then asks ``horen_fast.dispatch`` for an implementation of
the op "retrieve": ``"torch"`` (the plain PyTorch reference on horen_fast.hopfield, any device),
``"cpp"`` (the fused C++ kernel, CPU) and ``"triton"`` (the fused Triton kernels, CUDA, or the CPU
under ``TRITON_INTERPRET=1``). ``backend="auto"`` picks Triton on CUDA and C++ on the CPU, and
falls back to torch with one warning naming why the preferred one refused. A forced backend that
cannot serve the call raises ``NotSupportedError`` (a ValueError) listing every reason.

A backend registers ``dispatch.register("retrieve", name, reasons, run, priority, devices=...)``
with ``reasons(queries, keys, params) -> list[str]`` and ``run(queries, keys, params) ->
RetrievalResult``; both get validated 2-D float tensors on one device (queries [B, d] of any norm,
keys [N, d], N >= 1, B >= 1) and ``RetrievalParams``.

Result contract, row by row:
- ``index``: position of the best key after the damped Hopfield step(s) when its final cosine is
  above ``threshold``; -1 otherwise (no match, empty codebook, zero or non-finite query). Ties go
  to the lowest position (the tie rule of horen_fast.hopfield).
- ``score``: the final cosine of that key where matched, NaN where not matched. (The fused kernels
  decide "no match" from a bound, without scoring every key again, so an unmatched row has no
  exact best score; ``final_scores`` gives the full matrix when it is needed.)
- ``matched``: ``index >= 0``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from . import dispatch
from .dispatch import NotSupportedError
from .hopfield import RetrievalResult

__all__ = ["RetrievalResult", "RetrievalParams", "NotSupportedError", "retrieve", "final_scores",
           "available_backends", "check_params", "check_tensors", "compute_dtype", "empty_result"]


@dataclass(frozen=True)
class RetrievalParams:
    beta: float
    alpha: float
    steps: int
    threshold: float
    eps: float


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The retrieve backends that can serve float32 tensors on ``device``, preferred first."""
    _load_builtin_backends()
    try:
        probe = torch.zeros(1, 1, device=device)
    except (RuntimeError, AssertionError):  # e.g. CUDA not available here
        return []
    args = (probe, probe, check_params(20.0, 0.1, 1, 0.85, 1e-5))
    return [name for name, why in dispatch.reasons_for("retrieve", *args).items() if not why]


def check_params(beta: float, alpha: float, steps: int, threshold: float, eps: float) -> RetrievalParams:
    """Validate the retrieval hyper-parameters (shared by retrieve, the Codebook and the config)."""
    if not _real(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0 (the paper uses 20.0), got {beta!r}")
    if not _real(alpha) or not (0 < alpha <= 1):
        raise ValueError(f"alpha must be in (0, 1] (the paper uses 0.1), got {alpha!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (the paper uses 1), got {steps!r}")
    if not _real(threshold) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (a cosine, e.g. 0.85), got {threshold!r}")
    if not _real(eps) or not (eps >= 0):
        raise ValueError(f"eps must be a number >= 0 (default 1e-5), got {eps!r}")
    return RetrievalParams(float(beta), float(alpha), int(steps), float(threshold), float(eps))


def _real(x) -> bool:  # a plain or numpy number, not a bool
    if type(x) is float or type(x) is int:  # the common case, without the ABC checks (per call)
        return True
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_tensors(queries, keys) -> None:
    """Raise a clear TypeError/ValueError unless queries [B, d] and keys [N, d] are 2-D floating
    tensors of one width on one device."""
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
    if queries.shape[1] == 0:
        raise ValueError("the width d of queries and keys is 0: there is nothing to compare; d is the "
                         "wrapped layer's input width and must be >= 1")


def compute_dtype(queries: torch.Tensor, keys: torch.Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (half types are widened)."""
    return torch.float64 if torch.float64 in (queries.dtype, keys.dtype) else torch.float32


def empty_result(batch: int, device, dtype) -> RetrievalResult:
    return RetrievalResult(
        index=torch.full((batch,), -1, dtype=torch.long, device=device),
        score=torch.full((batch,), float("nan"), dtype=dtype, device=device),
        matched=torch.zeros(batch, dtype=torch.bool, device=device),
    )


_loaded = False


def _load_builtin_backends() -> None:
    # every builtin, not just "torch": importing torch_ref alone (the prefilter does) registers it
    global _loaded
    if _loaded:
        return
    from .backends import torch_ref  # noqa: F401  (registers "torch")
    from .backends import cpp  # noqa: F401  (registers "cpp")
    from .backends import triton as _triton  # noqa: F401  (registers "triton")
    _loaded = True


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
    check_tensors(queries, keys)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string ('auto', 'torch', 'cpp' or 'triton'), got {backend!r}")
    _load_builtin_backends()
    run = dispatch.select("retrieve", queries, keys, params, impl=backend)
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        return empty_result(queries.shape[0], queries.device, compute_dtype(queries, keys))
    return run(queries, keys, params)


def final_scores(queries: torch.Tensor, keys: torch.Tensor, *, beta: float = 20.0, alpha: float = 0.1,
                 steps: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """The full matrix of final cosines [B, N] (after the Hopfield steps), NaN rows for zero or
    non-finite queries. Reads the codebook fully; for calibration and analysis, not the hot path."""
    params = check_params(beta, alpha, steps, 0.0, eps)
    check_tensors(queries, keys)
    from .backends.torch_ref import refine
    q, valid, k = refine(queries, keys, params)
    c = q @ k.T
    return torch.where(valid[:, None], c, torch.full_like(c, float("nan")))
