"""The C++ CPU kernel (backend "cpp") against the literal published algorithm (bench/published.py),
one pytest-benchmark group per case, both timed in the same run:

    pytest bench/test_bench_kernels_cpu.py --benchmark-json out.json
    python -m bench.report out.json

Cases (goals of issue 13 on the 2-core development CPU, 36.7 GB/s streaming; "one read" = the key
bytes at the probed streaming rate, `horen-fast bench` reports it):
  N=50K d=14336 B=1 float32 keys (2.9 GB): <= 1.15x one read (about 90 ms) and >= 4x published
  N=50K d=14336 B=1 bfloat16 keys (1.4 GB): <= 1.15x one read (about 45 ms)
  N=50K d=14336 B=16 float32 keys: <= 2.5x one read (about 200 ms; the batched loops,
      csrc/retrieve/batched.h)
  N=1K  d=1536  B=1 float32 keys: >= 4x published (keys in cache: threading and setup); B=16 too
Each case runs with queries near a stored key ("near", they match) and unrelated ones ("far").
`key_bytes` in extra_info gives the achieved bandwidth: one read of the keys / median time.
"""
import pytest
import torch

import horen_fast
from bench.conftest import anisotropic_keys, fits_in_memory, make_queries
from bench.published import published_retrieve

pytestmark = pytest.mark.skipif("cpp" not in horen_fast.available_backends("cpu"),
                                reason="the C++ extension is not built")

CASES = [  # (n, d, b, dtype)
    (50_000, 14336, 1, torch.float32),
    (50_000, 14336, 1, torch.bfloat16),
    (50_000, 14336, 16, torch.float32),
    (1_000, 1536, 1, torch.float32),
    (1_000, 1536, 16, torch.float32),
]


@pytest.fixture(scope="module")
def key_store():
    """Realistic keys (unit, anisotropic: pairwise cosine about 0.5), generated once per module;
    the bfloat16 copy of a size is made from its float32 keys."""
    store = {}

    def get(n, d, dtype):
        if (n, d, dtype) not in store:
            if (n, d, torch.float32) not in store:
                store[(n, d, torch.float32)] = anisotropic_keys(n, d)
            store[(n, d, dtype)] = store[(n, d, torch.float32)].to(dtype)
        return store[(n, d, dtype)]

    yield get
    store.clear()


@pytest.mark.parametrize("kind", ["near", "far"])
@pytest.mark.parametrize("n,d,b,dtype", CASES,
                         ids=[f"N{n}-d{d}-B{b}-{str(t).replace('torch.', '')}" for n, d, b, t in CASES])
@pytest.mark.parametrize("impl", ["published", "cpp"])
def test_cpu_kernel(benchmark, key_store, impl, n, d, b, dtype, kind):
    if not fits_in_memory(n, d, dtype, copies=2):
        pytest.skip(f"{n} x {d} {dtype} keys do not fit in the memory available now")
    keys = key_store(n, d, dtype)
    queries = make_queries(keys, b, kind)
    name = str(dtype).replace("torch.", "")
    benchmark.group = f"cpu N={n} d={d} B={b} {name} {kind}"
    benchmark.extra_info.update(n=n, d=d, b=b, impl=impl, dtype=name, kind=kind, device="cpu",
                                threads=torch.get_num_threads(),
                                key_bytes=keys.numel() * keys.element_size())
    if impl == "published":
        def run():
            return published_retrieve(queries, keys)
    else:
        def run():
            return horen_fast.retrieve(queries, keys, backend="cpp")
        ref = horen_fast.retrieve(queries, keys, backend="torch")  # a sanity check, not timed
        assert torch.equal(run().index, ref.index)
    big = n * d >= 10_000 * 14336
    benchmark.pedantic(run, rounds=7 if big else 50, warmup_rounds=1, iterations=1)
