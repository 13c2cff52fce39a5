"""The fused C++ CPU kernel (csrc/horen_cpu.cpp), built at install time as horen_fast._C.

Not available when the extension was not built; retrieve(backend="auto") then falls back to torch.

The kernel reads the keys in place (their data pointer and row stride; rows must have contiguous
columns, otherwise one contiguous copy is made). Queries are converted to the compute dtype
(small, [B, d]); the result tensors are allocated here and filled by the kernel, which releases
the GIL while it runs.

Environment: ``HOREN_FAST_CPU_ISA`` = ``auto`` (default), ``avx512``, ``avx2`` or ``scalar`` picks
the instruction set of the inner loops (read at every call; for tests and comparisons).
"""
from __future__ import annotations

import os

import torch

from ..retrieval import RetrievalParams, RetrievalResult, compute_dtype, register_backend

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError:  # the extension was not built
    _C = None

# key dtype codes of csrc/horen_cpu.cpp
_KEY_TYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def is_available(device) -> bool:
    return _C is not None and torch.device(device).type == "cpu"


def cpu_isa() -> str:
    """The instruction set the kernel will use: HOREN_FAST_CPU_ISA, or the best this CPU has."""
    if _C is None:
        raise RuntimeError("the C++ kernel is not built; run `pip install -e .` or "
                           "`python setup.py build_ext --inplace`")
    isa = os.environ.get("HOREN_FAST_CPU_ISA", "auto").strip().lower() or "auto"
    if isa not in ("auto", "avx512", "avx2", "scalar"):
        raise ValueError(f"HOREN_FAST_CPU_ISA must be auto, avx512, avx2 or scalar, got {isa!r}")
    if isa == "auto":
        return _C.best_isa()
    if not _C.isa_supported(isa):
        raise RuntimeError(f"HOREN_FAST_CPU_ISA={isa} but this CPU does not support it "
                           f"(best available: {_C.best_isa()})")
    return isa


def kernel_keys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The keys as the kernel reads them: the same memory whenever the rows have contiguous
    columns (any row stride, any of the four supported dtypes); a copy only otherwise."""
    k = keys.detach()
    if k.dtype not in _KEY_TYPES:  # e.g. float8: widen once
        k = k.to(dtype)
    if k.shape[1] > 1 and k.stride(1) != 1:
        k = k.contiguous()
    return k


def retrieve_cpp(queries: torch.Tensor, keys: torch.Tensor, params: RetrievalParams) -> RetrievalResult:
    if not is_available(queries.device):
        raise RuntimeError(f"the cpp backend needs CPU tensors and the built extension "
                           f"(tensors are on {queries.device}, extension built: {_C is not None})")
    dtype = compute_dtype(queries, keys)
    q = queries.detach().to(dtype).contiguous()
    k = kernel_keys(keys, dtype)
    B, d = q.shape
    N = k.shape[0]
    index = torch.empty(B, dtype=torch.long)
    score = torch.empty(B, dtype=dtype)
    matched = torch.empty(B, dtype=torch.bool)
    _C.retrieve(q.data_ptr(), B, d, dtype == torch.float64, k.data_ptr(), N, k.stride(0),
                _KEY_TYPES[k.dtype], params.beta, params.alpha, params.steps, params.threshold,
                params.eps, index.data_ptr(), score.data_ptr(), matched.data_ptr(), cpu_isa(),
                torch.get_num_threads())
    return RetrievalResult(index=index, score=score, matched=matched)


register_backend("cpp", is_available, retrieve_cpp)
