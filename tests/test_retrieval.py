"""Every retrieval backend against the float64 oracle (tests/oracle.py), plus the API contract."""
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import horen_fast
from horen_fast import retrieve
from horen_fast.dispatch import NotSupportedError
from oracle import anisotropic_keys, assert_agrees, mixed_queries, oracle_retrieve, unit

BACKENDS = horen_fast.available_backends("cpu")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def run_case(backend, rng, n, d, b, dtype=torch.float32, qdtype=torch.float32, **kw):
    keys = torch.tensor(anisotropic_keys(rng, n, d)).to(dtype)
    queries = torch.tensor(mixed_queries(rng, keys.double().numpy(), b, d)).to(qdtype)
    if backend == "triton" and torch.float64 in (dtype, qdtype):  # refused, never handed off
        with pytest.raises(NotSupportedError, match="float64"):
            retrieve(queries, keys, backend=backend, **kw)
        pytest.skip("the triton backend refuses float64")
    res = retrieve(queries, keys, backend=backend, **kw)
    exp = oracle_retrieve(queries.double().numpy(), keys.double().numpy(), **kw)
    assert_agrees(res, exp, context=f"{backend} n={n} d={d} b={b} {dtype} {kw}")
    return res, exp


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(n=st.integers(0, 3000), d=st.integers(1, 1536), b=st.integers(1, 64), steps=st.integers(0, 4),
       beta=st.floats(0.5, 50.0), alpha=st.floats(0.01, 1.0), tau=st.floats(0.3, 0.99),
       seed=st.integers(0, 2**32 - 1))
def test_matches_oracle_property(backend, n, d, b, steps, beta, alpha, tau, seed):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter: small shapes
        n, d, b = n % 301, 1 + d % 128, 1 + b % 8
    run_case(backend, np.random.default_rng(seed), n, d, b, steps=steps, beta=beta, alpha=alpha,
             threshold=tau)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,b", [(1, 1, 1), (1, 7, 3), (2, 3, 5), (257, 129, 17), (1000, 1536, 16)])
def test_shapes_and_key_dtypes(backend, dtype, n, d, b):
    run_case(backend, np.random.default_rng(n * 1000 + d + b), n, d, b, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_setting_matches_paraphrases(backend):
    """Paraphrase-like queries near stored keys match them; that is what HoReN is for."""
    rng = np.random.default_rng(0)
    k = anisotropic_keys(rng, 500, 256)
    q = k[:50] + 0.3 * unit(rng.standard_normal((50, 256)))
    res = retrieve(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), backend=backend)
    exp = oracle_retrieve(q, k)
    assert_agrees(res, exp)
    assert exp.matched.sum() >= 25  # the case is not vacuous


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_codebook_and_empty_batch(backend):
    res = retrieve(torch.randn(4, 8), torch.empty(0, 8), backend=backend)
    assert res.index.tolist() == [-1] * 4 and not res.matched.any() and torch.isnan(res.score).all()
    res = retrieve(torch.empty(0, 8), torch.randn(3, 8), backend=backend)
    assert res.index.shape == (0,) and res.matched.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_nonfinite_queries_match_nothing(backend):
    k = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    q = torch.stack([torch.zeros(16), torch.full((16,), float("nan")), k[3] * float("inf"), k[3]])
    res = retrieve(q, k, backend=backend)
    assert res.matched.tolist() == [False, False, False, True]
    assert res.index.tolist() == [-1, -1, -1, 3]


@pytest.mark.parametrize("backend,device", [(b, "cpu") for b in BACKENDS] + [
    (b, "cuda") for b in (horen_fast.available_backends("cuda") if torch.cuda.is_available() else [])])
@pytest.mark.parametrize("n,where", [(5, [0, 1, 2, 3, 4]), (300, [7, 8, 150, 299]), (700, [699, 3, 333, 64])])
@pytest.mark.parametrize("steps", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ties_pick_lowest_index(backend, device, n, where, steps, dtype):
    """THE tie rule (horen_fast/hopfield.py): exact duplicate keys -> the lowest position, for
    queries on, near and between the duplicates, whatever the key tile or GEMM block they fall in."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend refuses float64 (tests/test_dispatch.py)")
    rng = np.random.default_rng(n + steps)
    k = torch.tensor(anisotropic_keys(rng, n, 48, cos=0.3)).to(dtype)
    k[where] = k[where[0]].clone()
    dup = k[where[0]].double()
    noise = torch.tensor(unit(rng.standard_normal((2, 48))))
    q = torch.stack([dup * 2, dup + 0.02 * noise[0], dup * 1e-20, dup + 0.1 * noise[1]]).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    res = retrieve(q.to(device), k.to(device), backend=backend, steps=steps, threshold=0.5)
    exp = oracle_retrieve(q.double().numpy(), k.double().numpy(), steps=steps, threshold=0.5)
    hits = exp.matched & np.isin(exp.index, where)
    assert hits.sum() >= 3, exp.best
    assert res.index.cpu()[torch.from_numpy(hits)].tolist() == [min(where)] * int(hits.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_does_not_depend_on_its_batch(backend):
    """Each row alone and inside a batch of 6 or 16 gets the same answer (index exactly, score to
    float32 rounding; where auto runs a batch of 8 or more with the bfloat16 split scores of
    horen_fast.native, to the oracle's score tolerance: their error, about 1e-5 of a score, grows
    with beta over the steps). Regression: n=163, d=6, steps=3, beta=24, alpha=1, seed 49941."""
    from horen_fast import native

    rng = np.random.default_rng(49941)
    keys = torch.tensor(anisotropic_keys(rng, 163, 6)).float()
    queries = torch.tensor(mixed_queries(rng, keys.double().numpy(), 6, 6)).float()
    queries = torch.cat([queries, queries[:1] * 3, torch.tensor(unit(rng.standard_normal((9, 6)))).float()])
    kw = dict(steps=3, beta=24.0, alpha=1.0, threshold=0.5)
    split = backend == "cpp" and native.retrieve_isa(queries, keys) in native.SPLIT_ISAS
    atol = 2e-4 if split else 2e-6
    together = retrieve(queries, keys, backend=backend, **kw)
    for i in range(queries.shape[0]):
        alone = retrieve(queries[i:i + 1], keys, backend=backend, **kw)
        assert alone.index.item() == together.index[i].item(), i
        torch.testing.assert_close(alone.score[0], together.score[i], atol=atol, rtol=0, equal_nan=True)
    for b in (6, 16):
        part = retrieve(queries[:b], keys, backend=backend, **kw)
        assert torch.equal(part.index, together.index[:b])
        torch.testing.assert_close(part.score, together.score[:b], atol=atol, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_rule_is_per_row(backend):
    """A row already at a fixed point stops; its neighbour in the batch keeps stepping."""
    rng = np.random.default_rng(3)
    k = anisotropic_keys(rng, 1, 64)  # one key: r == k, so a query equal to k stops at once
    q = np.stack([k[0], unit(k[0] + 0.9 * unit(rng.standard_normal(64)))])
    for tau in (0.2, 0.5, 0.8):
        dtype = torch.float32 if backend == "triton" else torch.float64
        res = retrieve(torch.tensor(q, dtype=dtype), torch.tensor(k, dtype=dtype), backend=backend, steps=3,
                       threshold=tau, alpha=0.3)
        assert_agrees(res, oracle_retrieve(q, k, steps=3, threshold=tau, alpha=0.3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qdtype,kdtype", [(torch.float64, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.bfloat16), (torch.float16, torch.float64)])
def test_mixed_query_and_key_dtypes(backend, qdtype, kdtype):
    res, exp = run_case(backend, np.random.default_rng(7), 300, 96, 12, dtype=kdtype, qdtype=qdtype)
    expected = torch.float64 if torch.float64 in (qdtype, kdtype) else torch.float32
    assert res.score.dtype == expected


def test_result_types_and_unpacking():
    res = retrieve(torch.randn(3, 8), torch.nn.functional.normalize(torch.randn(5, 8), dim=1))
    assert res.index.dtype == torch.long and res.matched.dtype == torch.bool
    index, score, matched = res
    assert index.shape == score.shape == matched.shape == (3,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("inf")), "beta"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(steps=-1), "steps"),
    (dict(steps=1.5), "steps"), (dict(threshold=float("nan")), "threshold"), (dict(eps=-1.0), "eps"),
    (dict(beta=True), "beta"), (dict(alpha="0.1"), "alpha"), (dict(steps=np.float64(1.0)), "steps"),
    (dict(eps=float("nan")), "eps"), (dict(threshold=None), "threshold"),
    (dict(backend="nope"), "unknown retrieve implementation 'nope'"), (dict(backend=None), "backend must be"),
])
def test_bad_parameters_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        retrieve(torch.randn(2, 4), torch.randn(3, 4), **kwargs)


def test_numpy_scalars_are_accepted():
    k = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    a = retrieve(k[:2], k, beta=np.float32(20.0), alpha=np.float64(0.1), steps=np.int64(1),
                 threshold=np.float32(0.5), eps=np.float64(1e-5))
    b = retrieve(k[:2], k, threshold=0.5)
    assert a.index.tolist() == b.index.tolist() == [0, 1]


def test_one_entry_codebook():
    k = torch.nn.functional.normalize(torch.randn(1, 8), dim=1)
    for backend in BACKENDS:
        res = retrieve(torch.stack([k[0] * 5, -k[0]]), k, backend=backend)
        assert res.index.tolist() == [0, -1] and res.score[0].item() == pytest.approx(1.0, abs=1e-6)


def test_bad_tensors_are_rejected():
    k = torch.randn(3, 4)
    with pytest.raises(ValueError, match="width mismatch"):
        retrieve(torch.randn(2, 5), k)
    with pytest.raises(ValueError, match="2-D"):
        retrieve(torch.randn(4), k)
    with pytest.raises(ValueError, match="2-D"):
        retrieve(torch.randn(2, 4), torch.randn(3, 4, 1))
    with pytest.raises(TypeError, match="floating"):
        retrieve(torch.ones(2, 4, dtype=torch.long), k)
    with pytest.raises(TypeError, match="floating"):
        retrieve(torch.randn(2, 4), k.int())
    with pytest.raises(TypeError, match="torch.Tensor"):
        retrieve(np.zeros((2, 4)), k)
    with pytest.raises(ValueError, match="move them to one device"):
        retrieve(torch.randn(2, 4, device="meta"), k)
    with pytest.raises(TypeError, match="floating"):
        retrieve(torch.ones(2, 4, dtype=torch.bool), k)
    with pytest.raises(ValueError, match="width mismatch"):
        retrieve(torch.randn(2, 4), torch.empty(0, 5))


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    """A preferred backend that refuses a call is skipped with ONE warning that says why."""
    from horen_fast import dispatch, retrieval
    retrieval.available_backends()  # the built-ins are registered
    table = dict(dispatch._REGISTRY["retrieve"])  # restored by monkeypatch: the test's cpp refuses
    monkeypatch.setitem(dispatch._REGISTRY, "retrieve", table)
    dispatch.register("retrieve", "cpp", lambda q, k, p: ["the test says no"], lambda q, k, p: None, 10, devices=("cpu",))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = retrieve(torch.randn(2, 4), torch.randn(3, 4))
        b = retrieve(torch.randn(2, 4), torch.randn(3, 4))
    said = [str(w.message) for w in seen if "cannot serve" in str(w.message)]
    assert len(said) == 1 and "'torch'" in said[0] and "'cpp'" in said[0] and "the test says no" in said[0]
    assert a.index.shape == b.index.shape == (2,)
    with pytest.raises(NotSupportedError, match="the test says no"):
        retrieve(torch.randn(2, 4), torch.randn(3, 4), backend="cpp")


def test_final_scores_matches_oracle_best():
    rng = np.random.default_rng(11)
    k = anisotropic_keys(rng, 200, 48)
    q = mixed_queries(rng, k, 20, 48)
    c = horen_fast.final_scores(torch.tensor(q), torch.tensor(k))
    exp = oracle_retrieve(q, k)
    got = c.max(dim=1).values.numpy()
    np.testing.assert_allclose(got, exp.best, atol=1e-9, equal_nan=True)


def test_torch_backend_compiles_without_graph_breaks():
    """No host synchronization: the torch backend traces into one graph."""
    from horen_fast.backends.torch_ref import retrieve_torch
    from horen_fast.retrieval import check_params
    p = check_params(20.0, 0.1, 2, 0.85, 1e-5)
    k = torch.nn.functional.normalize(torch.randn(64, 32), dim=1)
    q = torch.randn(4, 32)
    explanation = torch._dynamo.explain(lambda a, b: retrieve_torch(a, b, p))(q, k)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_is_an_error_that_names_d(backend):
    with pytest.raises(ValueError, match="width d of queries and keys is 0"):
        retrieve(torch.randn(2, 0), torch.randn(3, 0), backend=backend)
