"""The fused Triton kernels (kernels/hopfield.py) against the float64 oracle, with small forced
tiles so that every path runs: several key splits, d not a multiple of the tile, query blocks of
both kinds (tl.dot for 16+ rows, broadcast sums below), the bounded final rescoring with many and
few candidates. Without CUDA they run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small."""
import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from horen_fast.backends import triton as triton_backend  # noqa: E402
from horen_fast.retrieval import check_params, retrieve  # noqa: E402
from oracle import anisotropic_keys, assert_agrees, mixed_queries, oracle_retrieve, unit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AVAILABLE = triton_backend.is_available(torch.device(DEVICE))
pytestmark = pytest.mark.skipif(not AVAILABLE, reason="the Triton backend needs CUDA or TRITON_INTERPRET=1")

if AVAILABLE:
    K = triton_backend._load_kernels()
    SMALL = K.TileConfig(block_n=16, block_d=16, splits1=3, splits2=4)
    SMALL_B16 = K.TileConfig(block_b=16, block_n=16, block_d=16, splits1=3, splits2=2)


def run(q, k, config=None, **kw):
    p = check_params(kw.get("beta", 20.0), kw.get("alpha", 0.1), kw.get("steps", 1),
                     kw.get("threshold", 0.85), kw.get("eps", 1e-5))
    return triton_backend.retrieve_triton(q.to(DEVICE), k.to(DEVICE), p, config=config)


def paraphrases(rng, k, b):
    """Even rows near a stored key (they match), odd rows unrelated (they do not), any norm."""
    n, d = k.shape
    q = unit(rng.standard_normal((b, d)))
    near = k[rng.integers(0, n, b)] + 0.25 * q
    q[::2] = near[::2]
    return q * rng.uniform(0.1, 10.0, (b, 1))


def check(rng, n, d, b, config=None, kdtype=torch.float32, queries="mixed", **kw):
    k = torch.tensor(anisotropic_keys(rng, n, d)).to(kdtype)
    make = mixed_queries if queries == "mixed" else lambda r, kk, bb, dd: paraphrases(r, kk, bb)
    q = torch.tensor(make(rng, k.double().numpy(), b, d), dtype=torch.float32)
    res = run(q, k, config, **kw)
    exp = oracle_retrieve(q.double().numpy(), k.double().numpy(), **kw)
    assert_agrees(res, exp, context=f"n={n} d={d} b={b} {kdtype} {kw}")
    return res, exp


def final_matrix(q, k, config=None, **kw):
    """The kernels' [B, N] final-cosine matrix (exact where it can win, -inf elsewhere)."""
    from horen_fast.backends.torch_ref import normalize_queries
    qn, valid = normalize_queries(q.to(DEVICE), torch.float32)
    args = dict(beta=20.0, alpha=0.1, steps=1, threshold=0.85, eps=1e-5) | kw
    return K.final_cosines(qn, valid, k.to(DEVICE), config=config, **args).cpu(), valid.cpu()


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
@pytest.mark.parametrize("b", [3, 7])  # broadcast path (block of 4 rows) and tl.dot path (block of 16)
@pytest.mark.parametrize("queries", ["mixed", "paraphrases"])
def test_odd_shapes_many_splits(steps, b, queries):
    res, exp = check(np.random.default_rng(steps * 10 + b), 203, 37, b, SMALL, queries=queries, steps=steps,
                     threshold=0.7)
    if queries == "paraphrases":
        assert exp.matched.any() and not exp.matched.all()


def test_more_query_rows_than_one_block():
    check(np.random.default_rng(1), 150, 45, 40, SMALL_B16, steps=2, threshold=0.6)


def test_default_tiles():
    check(np.random.default_rng(2), 700, 300, 20, None, steps=1)


@pytest.mark.parametrize("kdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [2, 9])
def test_half_precision_keys(kdtype, b):
    check(np.random.default_rng(3), 120, 50, b, SMALL, kdtype=kdtype, steps=1, threshold=0.6)


def test_key_row_stride_is_honoured():
    rng = np.random.default_rng(4)
    wide = torch.tensor(anisotropic_keys(rng, 90, 64), dtype=torch.float32)
    k = wide[:, :40]  # row stride 64, unit stride in d
    k_unit = torch.nn.functional.normalize(k, dim=1).contiguous()
    wide[:, :40] = k_unit
    q = torch.tensor(mixed_queries(rng, k_unit.double().numpy(), 6, 40), dtype=torch.float32)
    res = run(q, k, SMALL, threshold=0.6)
    assert_agrees(res, oracle_retrieve(q.double().numpy(), k_unit.double().numpy(), threshold=0.6))


@pytest.mark.parametrize("b", [1, 5])
def test_ties_pick_lowest_index(b):
    rng = np.random.default_rng(5)
    k = torch.tensor(anisotropic_keys(rng, 60, 24), dtype=torch.float32)
    k[41] = k[17]
    k[58] = k[17]
    q = (k[17:18] * 3).repeat(b, 1)
    for steps in (0, 1, 2):
        res = run(q, k, SMALL, steps=steps, threshold=0.5)
        assert res.index.tolist() == [17] * b, steps


@pytest.mark.parametrize("b", [4, 6])
def test_zero_and_nonfinite_rows_match_nothing(b):
    rng = np.random.default_rng(6)
    k = torch.tensor(anisotropic_keys(rng, 40, 20), dtype=torch.float32)
    q = k[:b].clone() * 5
    q[0] = 0.0
    q[1, 3] = float("nan")
    q[2, 0] = float("inf")
    res = run(q, k, SMALL, steps=2, threshold=0.5)
    assert res.index.tolist() == [-1, -1, -1] + list(range(3, b))
    assert torch.isnan(res.score[:3]).all()


def test_rows_stop_independently():
    """One key: a query equal to it stops at step 1 while its neighbour keeps stepping."""
    rng = np.random.default_rng(7)
    k = anisotropic_keys(rng, 1, 30)
    q = np.stack([k[0], unit(k[0] + 0.9 * unit(rng.standard_normal(30))), k[0]])
    for tau in (0.2, 0.5, 0.8):
        res = run(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), SMALL,
                  steps=3, threshold=tau, alpha=0.3)
        assert_agrees(res, oracle_retrieve(q, k, steps=3, threshold=tau, alpha=0.3))


@pytest.mark.parametrize("beta", [0.5, 200.0])
def test_extreme_temperatures(beta):
    check(np.random.default_rng(8), 80, 33, 5, SMALL, beta=beta, steps=2, threshold=0.5)


def _oracle_bounds(q, k, **kw):
    """float64: final cosines q_M @ K^T, and the candidate set the kernels must keep: for rows
    still running at the last step, keys whose upper bound reaches the row's best lower bound and
    exceeds the threshold (with a margin flag for keys within 1e-4 of either edge)."""
    kk = np.asarray(k, dtype=np.float64)
    kn = np.linalg.norm(kk, axis=1)
    a, tau = kw["alpha"], kw["threshold"]
    finals, cands, margins = [], [], []
    for x in unit(np.asarray(q, dtype=np.float64)):
        running = True
        for _ in range(kw["steps"]):
            s = kk @ x
            p = np.exp(kw["beta"] * (s - s.max()))
            r = unit(p @ kk)
            if np.linalg.norm(r - x) < kw["eps"]:
                running = False
                break
            u = (1 - a) * x + a * r
            x = unit(u)
        finals.append(kk @ x)
        if running:
            nrm = np.linalg.norm(u)
            hi, lo = ((1 - a) * s + a * kn) / nrm, ((1 - a) * s - a * kn) / nrm
            cands.append((hi >= lo.max()) & (hi > tau))
            margins.append((np.abs(hi - lo.max()) < 1e-4) | (np.abs(hi - tau) < 1e-4))
        else:
            cands.append(np.ones(len(kk), bool))
            margins.append(np.zeros(len(kk), bool))
    return np.stack(finals), np.stack(cands), np.stack(margins)


@pytest.mark.parametrize("kind", ["many", "some", "few"])
def test_candidate_rescoring(kind):
    """The final matrix is finite exactly on the candidate set of the bound (exact cosines there),
    which keeps few keys for well separated keys and many for a tight cluster."""
    rng = np.random.default_rng(9)
    n, d, b = 150, 40, 6
    if kind == "many":  # keys within a hair of each other: the bounds cannot separate them
        k = unit(unit(rng.standard_normal(d)) + 0.02 * unit(rng.standard_normal((n, d))))
        tau = 0.5
    elif kind == "some":  # a cluster with pairwise cosine about 0.7: part of it survives pruning
        k = anisotropic_keys(rng, n, d, cos=0.7)
        tau = 0.5
    else:
        k = unit(rng.standard_normal((n, d)))
        tau = 0.3
    q = k[rng.integers(0, n, b)] + 0.2 * unit(rng.standard_normal((b, d)))
    kw = dict(beta=20.0, alpha=0.1, steps=2, threshold=tau, eps=1e-5)
    kt = torch.tensor(k, dtype=torch.float32)
    c, _ = final_matrix(torch.tensor(q, dtype=torch.float32), kt, SMALL, **kw)
    exact, cand, margin = _oracle_bounds(q, k, **kw)
    finite = torch.isfinite(c).numpy()
    np.testing.assert_array_equal(finite[~margin], cand[~margin])
    np.testing.assert_allclose(c.numpy()[finite], exact[finite], atol=2e-5)
    per_row = finite.sum(1)
    if kind == "many":
        assert per_row.min() >= n // 2, per_row
    elif kind == "some":
        assert 3 <= per_row.max() and per_row.min() <= n // 2, per_row
    else:
        assert per_row.max() <= 5, per_row
    res = run(torch.tensor(q, dtype=torch.float32), kt, SMALL, **kw)
    assert_agrees(res, oracle_retrieve(q, k, **kw))


def test_no_candidates_above_threshold():
    """A threshold no key can reach leaves every running row without candidates."""
    rng = np.random.default_rng(10)
    k = torch.tensor(unit(rng.standard_normal((64, 24))), dtype=torch.float32)
    q = torch.tensor(unit(rng.standard_normal((5, 24))), dtype=torch.float32)
    c, _ = final_matrix(q, k, SMALL, threshold=0.99)
    assert torch.isneginf(c).all()
    res = run(q, k, SMALL, threshold=0.99)
    assert res.index.tolist() == [-1] * 5 and not res.matched.any()


def test_float64_inputs_use_the_reference_path():
    rng = np.random.default_rng(11)
    k = torch.tensor(anisotropic_keys(rng, 30, 12))
    q = torch.tensor(mixed_queries(rng, k.numpy(), 4, 12))
    res = retrieve(q.to(DEVICE), k.to(DEVICE), backend="triton")
    assert res.score.dtype == torch.float64
    assert_agrees(res, oracle_retrieve(q.numpy(), k.numpy()))


def test_availability_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_backend.is_available(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_backend.is_available(torch.device("cpu"))


def test_keys_that_are_not_unit_norm():
    """The final-scoring bound uses each key's own norm, so unnormalized keys stay exact."""
    rng = np.random.default_rng(12)
    k = anisotropic_keys(rng, 100, 26) * rng.uniform(0.5, 2.0, (100, 1))
    q = paraphrases(rng, k, 7)
    for steps in (1, 2):
        res = run(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), SMALL,
                  steps=steps, threshold=0.9)
        assert_agrees(res, oracle_retrieve(q, k, steps=steps, threshold=0.9))
