"""Implementation "cpp" of the op "retrieve": the fused C++ CPU kernel (csrc/retrieve, reached
through horen_fast/native.py).

The kernel reads the keys in place (their data and row stride; rows must have contiguous columns,
otherwise one contiguous copy is made). Queries are converted to the compute dtype (small,
[B, d]); the result tensors are allocated here and filled by the kernel, which releases the GIL
while it runs. The instruction set follows HOREN_FAST_CPU_ISA (horen_fast/native.py).
"""
from __future__ import annotations

import torch

from .. import dispatch, native
from ..hopfield import RetrievalResult, normalize_queries
from ..retrieval import RetrievalParams, compute_dtype

# the key dtypes the kernel reads as they are; others (e.g. float8) are widened once
KEY_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def reasons(queries: torch.Tensor, keys: torch.Tensor, params: RetrievalParams) -> list[str]:
    return native.retrieve_reasons(queries, keys)


def kernel_keys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The keys as the kernel reads them: the same memory whenever the rows have contiguous
    columns (any row stride, any of the four KEY_DTYPES); a copy only otherwise."""
    k = keys.detach()
    if k.dtype not in KEY_DTYPES:
        k = k.to(dtype)
    if k.shape[1] > 1 and k.stride(1) != 1:
        k = k.contiguous()
    return k


def retrieve_cpp(queries: torch.Tensor, keys: torch.Tensor, params: RetrievalParams) -> RetrievalResult:
    dtype = compute_dtype(queries, keys)
    if dtype == torch.float64:  # the kernel squares float64 rows unscaled: normalize them here
        q = normalize_queries(queries.detach(), dtype)[0].contiguous()
    else:
        q = queries.detach().to(dtype).contiguous()
    k = kernel_keys(keys, dtype)
    b = q.shape[0]
    index = torch.empty(b, dtype=torch.long)
    score = torch.empty(b, dtype=dtype)
    matched = torch.empty(b, dtype=torch.bool)
    native.retrieve(q, k, index, score, matched, params)
    return RetrievalResult(index=index, score=score, matched=matched)


dispatch.register("retrieve", "cpp", reasons, retrieve_cpp, priority=10, devices=("cpu",))
