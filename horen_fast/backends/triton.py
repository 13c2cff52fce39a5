"""The fused Triton kernels (kernels/, installed as horen_fast.kernels) as the "retrieve"
implementation "triton" of horen_fast.dispatch: CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests).

The kernels compute in float32 with float32, bfloat16 or float16 keys; a float64 call is refused
with a reason (no silent hand-off to another backend). Queries are normalized by
horen_fast.hopfield.normalize_queries (scaled, so any finite non-zero row normalizes correctly)
before the kernels; the match follows the one tie rule (``best_match``: lowest position).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import dispatch
from ..hopfield import RetrievalResult, best_match, normalize_queries, select_match

try:  # kernels/ is installed as horen_fast.kernels (setup.py package_dir; editable installs too)
    from ..kernels import hopfield as kernels
    IMPORT_ERROR = None
except ImportError as exc:  # triton missing, or horen_fast installed without its kernels
    kernels = None
    IMPORT_ERROR = exc

KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_FOUND = importlib.util.find_spec("triton") is not None


def reasons(queries: torch.Tensor, keys: torch.Tensor, params=None) -> list[str]:
    """Why the Triton kernels cannot serve this call ([] = they can)."""
    why = []
    if not TRITON_FOUND:
        why.append("triton is not installed (pip install triton)")
    elif kernels is None:
        why.append(f"the Triton kernels failed to import ({IMPORT_ERROR}); reinstall horen_fast "
                   f"(pip install -e .) so that kernels/ is installed as horen_fast.kernels")
    dev = queries.device
    if dev.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            why.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton needs CUDA "
                       "tensors, or its interpreter for CPU tensors)")
        elif kernels is not None and not kernels.INTERPRETED:
            why.append("TRITON_INTERPRET=1 was set after the kernels were imported; set it before "
                       "importing horen_fast")
    elif dev.type != "cuda":
        why.append(f"tensors are on {dev}; the Triton kernels need CUDA tensors")
    elif kernels is not None and kernels.INTERPRETED:
        why.append("the kernels were imported under TRITON_INTERPRET=1 and cannot run on CUDA tensors")
    for name, t in (("queries", queries), ("keys", keys)):
        if t.dtype == torch.float64:
            why.append(f"{name} are float64; the Triton kernels compute in float32 (use "
                       f"backend='torch' or 'cpp' for float64, or convert with .float())")
    if keys.dtype not in KEY_DTYPES + (torch.float64,):
        why.append(f"keys are {keys.dtype}; the Triton kernels take float32, bfloat16 or float16 keys")
    if keys.dim() == 2 and keys.shape[0] >= 2**31 - 2**16:
        why.append(f"{keys.shape[0]} keys; the Triton kernels index keys with int32 (fewer than 2^31)")
    if queries.dim() == 2 and queries.shape[0] > 65535:
        why.append(f"batch of {queries.shape[0]} queries; the Triton kernels serve B <= 65535 per call "
                   f"(a CUDA grid dimension; split the batch)")
    return why


def final_cosines(queries: torch.Tensor, keys: torch.Tensor, params, plan=None, counts=None):
    """(c [B, N], valid [B]): the kernels' final-cosine matrix (exact float32 where a key can be
    the row's match, -inf elsewhere) for queries of any norm."""
    q, valid = normalize_queries(queries, torch.float32)
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    c = kernels.final_cosines(q, valid, keys, beta=params.beta, alpha=params.alpha, steps=params.steps,
                              threshold=params.threshold, eps=params.eps, plan=plan, counts=counts)
    return c, valid


def retrieve_triton(queries: torch.Tensor, keys: torch.Tensor, params, plan=None, counts=None) -> RetrievalResult:
    """SPEC 3 retrieval on the fused kernels. ``plan`` (horen_fast.kernels.plan.plan(...)) forces
    tile sizes; ``counts`` (int64 [4], zeroed) collects the key elements the kernels load."""
    c, valid = final_cosines(queries, keys, params, plan, counts)
    best, index = best_match(c)
    return select_match(best, index, valid, params.threshold)


dispatch.register("retrieve", "triton", reasons, retrieve_triton, priority=20, devices=("cuda",))
