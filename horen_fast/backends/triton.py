"""The fused Triton kernels (kernels/, installed as horen_fast.kernels), for CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests).

float64 inputs are computed by the torch reference inside this backend: the kernels work in
float32 (half-precision keys are widened to float32 as they are loaded).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from ..retrieval import RetrievalParams, RetrievalResult, compute_dtype, register_backend
from .torch_ref import normalize_queries, retrieve_torch

_kernels = None


def _load_kernels():
    """horen_fast.kernels.hopfield, also when running from a source tree that is not installed
    (there the kernels live in <repo>/kernels, which setup.py maps to horen_fast.kernels)."""
    global _kernels
    if _kernels is None:
        try:
            pkg = importlib.import_module("horen_fast.kernels")
        except ModuleNotFoundError as exc:
            if exc.name != "horen_fast.kernels":
                raise
            kdir = Path(__file__).resolve().parents[2] / "kernels"
            spec = importlib.util.spec_from_file_location(
                "horen_fast.kernels", kdir / "__init__.py", submodule_search_locations=[str(kdir)])
            if spec is None or not (kdir / "hopfield.py").exists():
                raise
            pkg = importlib.util.module_from_spec(spec)
            sys.modules["horen_fast.kernels"] = pkg
            spec.loader.exec_module(pkg)
        _kernels = importlib.import_module("horen_fast.kernels.hopfield")
    return _kernels


def is_available(device) -> bool:
    device = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (device.type == "cuda" or (device.type == "cpu" and interpret)):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        kernels = _load_kernels()
    except ImportError:
        return False
    # the kernels were compiled for one mode when first imported; CPU tensors need the interpreter
    return device.type == "cuda" or kernels.INTERPRETED


def retrieve_triton(queries: torch.Tensor, keys: torch.Tensor, params: RetrievalParams,
                    config=None) -> RetrievalResult:
    if compute_dtype(queries, keys) == torch.float64:
        return retrieve_torch(queries, keys, params)  # the kernels are float32-only
    kernels = _load_kernels()
    if keys.dtype not in kernels.KEY_DTYPES:
        keys = keys.float()
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    q, valid = normalize_queries(queries, torch.float32)
    index, score, matched = kernels.retrieve_fused(
        q, valid, keys, beta=params.beta, alpha=params.alpha, steps=params.steps,
        threshold=params.threshold, eps=params.eps, config=config)
    return RetrievalResult(index=index, score=score, matched=matched)


register_backend("triton", is_available, retrieve_triton)
