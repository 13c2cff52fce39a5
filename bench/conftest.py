"""Shared fixtures for the benchmarks: realistic (anisotropic) unit keys and two kinds of query."""
import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def anisotropic_keys(n: int, d: int) -> torch.Tensor:
    """float32 unit keys around one direction, pairwise cosine about 0.5, like MLP activations."""
    g = torch.Generator().manual_seed(n * 31 + d)
    mu = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    keys = torch.empty(n, d)
    for lo in range(0, n, 4096):  # in chunks, to bound temporary memory
        hi = min(n, lo + 4096)
        noise = torch.nn.functional.normalize(torch.randn(hi - lo, d, generator=g), dim=1)
        keys[lo:hi] = torch.nn.functional.normalize(0.5 ** 0.5 * mu + 0.5 ** 0.5 * noise, dim=1)
    return keys


@functools.lru_cache(maxsize=1)
def _keys(n: int, d: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return anisotropic_keys(n, d).to(device=device, dtype=dtype)


def make_keys(n: int, d: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return _keys(n, d, dtype, device)


def make_queries(keys: torch.Tensor, b: int, kind: str = "mixed") -> torch.Tensor:
    """Half paraphrase-like (a stored key plus noise, so they match), half unrelated."""
    g = torch.Generator().manual_seed(b)
    n, d = keys.shape
    idx = torch.randint(0, n, (b,), generator=g)
    near = keys[idx].float().cpu() + 0.25 * torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    far = torch.randn(b, d, generator=g)
    if kind == "near":
        q = near
    elif kind == "far":
        q = far
    else:
        q = torch.where((torch.arange(b) % 2 == 0)[:, None], near, far)
    return q.to(keys.device)


def fits_in_memory(n: int, d: int, dtype: torch.dtype, copies: int = 3) -> bool:
    """Whether n x d keys (and the baseline's temporaries) fit in the memory available now."""
    need = n * d * torch.tensor([], dtype=dtype).element_size() * copies
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return True
    return need < avail * 0.8


@pytest.fixture
def keys_factory():
    return make_keys
