"""The fused C++ CPU kernel (csrc/horen_cpu.cpp), built at install time as horen_fast._C.

Not available when the extension was not built; retrieve(backend="auto") then falls back to torch.
"""
from __future__ import annotations

from ..retrieval import register_backend

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError:  # the extension was not built
    _C = None


def is_available(device) -> bool:
    return _C is not None and device.type == "cpu"


def retrieve_cpp(queries, keys, params):
    # Filled in by the kernels work (issue 5).
    raise RuntimeError("the C++ backend is not built in this version")


register_backend("cpp", is_available, retrieve_cpp)
