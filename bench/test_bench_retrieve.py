"""Retrieval latency: every available backend vs the published algorithm, in one run.

    pytest bench/test_bench_retrieve.py --benchmark-json out.json
    python -m bench.report out.json          # table + plot

Each (N, d, B) is one benchmark group; the literal published algorithm (bench/published.py) is
timed in the same group, so ratios come from one run on one machine.
"""
import pytest
import torch

import horen_fast
from bench.conftest import fits_in_memory, make_keys, make_queries
from bench.published import published_retrieve

SIZES = [(1_000, 1536), (10_000, 1536), (50_000, 1536), (1_000, 14336), (10_000, 14336), (50_000, 14336)]
BATCHES = [1, 16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in horen_fast.available_backends(DEVICE)
            if not (b == "triton" and DEVICE == "cpu")]  # the Triton interpreter is not a benchmark
DTYPE = torch.float32


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("b", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("n,d", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["published"] + BACKENDS)
def test_retrieve(benchmark, impl, n, d, b):
    if not fits_in_memory(n, d, DTYPE):
        pytest.skip(f"{n} x {d} keys do not fit in the memory available now")
    keys = make_keys(n, d, DTYPE, DEVICE)
    queries = make_queries(keys, b)
    benchmark.group = f"retrieve N={n} d={d} B={b} {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update(n=n, d=d, b=b, impl=impl, dtype=str(DTYPE), device=DEVICE,
                                key_bytes=keys.numel() * keys.element_size())
    if impl == "published":
        def run():
            out = published_retrieve(queries, keys)
            _sync()
            return out
    else:
        def run():
            out = horen_fast.retrieve(queries, keys, backend=impl)
            _sync()
            return out
    benchmark.pedantic(run, rounds=7 if n * d >= 10_000 * 14336 else 20, warmup_rounds=1, iterations=1)
