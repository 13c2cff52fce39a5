"""Fuzz: every backend agrees with the float64 oracle over extreme query magnitudes (row norms from
1e-35 to 1e35 in float32, rows mixing huge and tiny components) and NaN/inf components.

Knife-edge rows (the oracle flags them) are not compared. The Triton backend runs under the
interpreter on the CPU, so it gets small shapes and few examples.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from horen_fast import retrieve
from horen_fast.retrieval import available_backends
from oracle import anisotropic_keys, assert_agrees, mixed_queries, oracle_retrieve, unit

# (backend, device): the CPU backends, plus the CUDA ones where a GPU is present
BACKENDS = [(b, "cpu") for b in available_backends("cpu")] + \
    [(b, "cuda") for b in (available_backends("cuda") if torch.cuda.is_available() else [])]
FAST = [c for c in BACKENDS if c != ("triton", "cpu")]
INTERPRETED = [c for c in BACKENDS if c == ("triton", "cpu")]
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)  # reproducible


def extreme_queries(rng, keys, b, d, qdtype):
    """Paraphrase-like, exact-key and unrelated directions at row norms 10^e, e in [-35, 35];
    some rows mix a component near the float32 maximum scale with tiny ones; some carry NaN or
    +-inf, some are zero."""
    x = mixed_queries(rng, keys, b, d)
    x = np.nan_to_num(x, nan=1.0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.where(norms > 0, x / np.where(norms > 0, norms, 1), x)
    x *= 10.0 ** rng.uniform(-35, 35, (b, 1))
    for i in range(b):
        kind = rng.integers(0, 8)
        if kind == 0:    # one huge component and the rest tiny
            x[i] = rng.standard_normal(d) * 1e-30
            x[i, rng.integers(0, d)] = 1e34
        elif kind == 1:  # NaN or inf somewhere
            x[i, rng.integers(0, d)] = rng.choice([np.nan, np.inf, -np.inf])
        elif kind == 2:
            x[i] = 0.0
    return torch.tensor(x).to(qdtype)


@pytest.mark.parametrize("backend,device", FAST)
@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_extreme_magnitudes_agree_with_the_oracle(backend, device, data):
    fuzz_case(backend, device, data, small=False)


@pytest.mark.parametrize("backend,device", INTERPRETED)
@settings(max_examples=8, **FUZZ)
@given(data=st.data())
def test_extreme_magnitudes_agree_with_the_oracle_interpreted(backend, device, data):
    fuzz_case(backend, device, data, small=True)


def fuzz_case(backend, device, data, small):
    n = data.draw(st.integers(1, 40 if small else 400), label="n")
    d = data.draw(st.integers(1, 32 if small else 256), label="d")
    b = data.draw(st.integers(1, 6 if small else 24), label="b")
    steps = data.draw(st.integers(0, 3), label="steps")
    tau = data.draw(st.floats(0.3, 0.95), label="tau")
    no64 = backend == "triton"  # refused with a reason (tests/test_dispatch.py)
    kdtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16] if no64 else
                                       [torch.float32, torch.bfloat16, torch.float64]), label="keys")
    qdtype = data.draw(st.sampled_from([torch.float32, torch.float64] if kdtype == torch.float64 else
                                       [torch.float32, torch.bfloat16]), label="queries")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    keys = torch.tensor(anisotropic_keys(rng, n, d)).to(kdtype)
    queries = extreme_queries(rng, keys.double().numpy(), b, d, qdtype)
    res = retrieve(queries.to(device), keys.to(device), backend=backend, steps=steps, threshold=tau)
    exp = oracle_retrieve(queries.double().numpy(), keys.double().numpy(), steps=steps, threshold=tau)
    assert_agrees(res, exp, context=f"{backend} on {device} n={n} d={d} b={b} steps={steps} keys={kdtype} "
                                    f"queries={qdtype}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("exponent", [-35, -30, -20, 20, 30, 35])
def test_scaled_copies_of_a_query_give_the_same_answer(backend, device, exponent):
    """A query scaled by 10^e (float32, finite) matches exactly what the unscaled query matches."""
    rng = np.random.default_rng(exponent + 50)
    keys = torch.tensor(anisotropic_keys(rng, 30, 16), dtype=torch.float32).to(device)
    base = unit(keys[:4].double().numpy() + 0.2 * unit(rng.standard_normal((4, 16))))
    q = torch.tensor(base * 10.0 ** exponent, dtype=torch.float32).to(device)
    assert torch.isfinite(q).all() and (q != 0).any(dim=1).all()
    res = retrieve(q, keys, backend=backend, threshold=0.7)
    ref = retrieve(torch.tensor(base, dtype=torch.float32).to(device), keys, backend=backend, threshold=0.7)
    exp = oracle_retrieve(q.double().cpu().numpy(), keys.double().cpu().numpy(), threshold=0.7)
    assert exp.matched.sum() >= 2     # the case is not vacuous
    assert_agrees(res, exp, context=f"{backend} 1e{exponent}")
    assert res.index.tolist() == ref.index.tolist()


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKENDS if b != "triton"])
@pytest.mark.parametrize("exponent", [-300, -200, 200, 300])
def test_float64_queries_over_the_whole_float64_range(backend, device, exponent):
    rng = np.random.default_rng(exponent + 1000)
    keys = torch.tensor(anisotropic_keys(rng, 40, 24)).to(device)
    base = unit(keys[:5].cpu().numpy() + 0.1 * unit(rng.standard_normal((5, 24))))
    q = torch.tensor(base * 10.0 ** exponent).to(device)
    res = retrieve(q, keys, backend=backend, threshold=0.8)
    exp = oracle_retrieve(q.cpu().numpy(), keys.cpu().numpy(), threshold=0.8)
    assert exp.matched.sum() >= 3
    assert_agrees(res, exp, context=f"{backend} on {device} float64 1e{exponent}")
