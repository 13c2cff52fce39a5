"""The fused Triton kernels (kernels/) against the float64 oracle, on every path the planner has:
the small path (B <= 4: one visit per key tile, whole rows in registers or d chunks re-read), the
large path (MMA scores and weighted sums), the tight final bound and its exact rescoring, with
small forced tiles so that several key splits and ragged d chunks run. Without CUDA they run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small."""
import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from horen_fast import dispatch  # noqa: E402
from horen_fast.backends import triton as triton_backend  # noqa: E402
from horen_fast.retrieval import check_params, retrieve  # noqa: E402
from oracle import anisotropic_keys, assert_agrees, mixed_queries, oracle_retrieve, unit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBE = torch.zeros(1, 1, device=DEVICE)
AVAILABLE = not triton_backend.reasons(PROBE, PROBE)
pytestmark = pytest.mark.skipif(not AVAILABLE, reason="the Triton backend needs CUDA or TRITON_INTERPRET=1")

if AVAILABLE:
    from horen_fast.kernels import plan as planner
    TARGET = planner.target_for(torch.device(DEVICE))

# forced tiles: path, and for the small path whole rows (one_chunk) or d chunks of 16
TILES = {
    "small-chunks": dict(path="small", block_n=16, block_d=16, one_chunk=False, splits=3),
    "small-rows": dict(path="small", block_n=8, one_chunk=True, splits=3),
    "large": dict(path="large", block_b=16, block_n=16, block_d=16, wsum_block_d=16, splits=3,
                  wsum_splits=4, final_block_n=16),
}


def params(**kw):
    return check_params(kw.get("beta", 20.0), kw.get("alpha", 0.1), kw.get("steps", 1),
                        kw.get("threshold", 0.85), kw.get("eps", 1e-5))


def make_plan(b, n, d, kdtype, tiles):
    if tiles is None:
        return None
    t = dict(TILES[tiles])
    if t.get("one_chunk"):
        t["block_d"] = max(16, 1 << (d - 1).bit_length())
    if t["path"] == "small" and b > 4:
        raise ValueError("the small path serves B <= 4")
    return planner.plan(b, n, d, kdtype, TARGET, **t)


def run(q, k, tiles=None, counts=None, **kw):
    plan = make_plan(q.shape[0], k.shape[0], k.shape[1], k.dtype, tiles)
    return triton_backend.retrieve_triton(q.to(DEVICE), k.to(DEVICE), params(**kw), plan=plan, counts=counts)


def paraphrases(rng, k, b, noise=0.25):
    """Even rows near a stored key (they match), odd rows unrelated (they do not), any norm."""
    n, d = k.shape
    q = unit(rng.standard_normal((b, d)))
    near = k[rng.integers(0, n, b)] + noise * q
    q[::2] = near[::2]
    return q * rng.uniform(0.1, 10.0, (b, 1))


def check(rng, n, d, b, tiles=None, kdtype=torch.float32, queries="mixed", **kw):
    k = torch.tensor(anisotropic_keys(rng, n, d)).to(kdtype)
    make = mixed_queries if queries == "mixed" else lambda r, kk, bb, dd: paraphrases(r, kk, bb)
    q = torch.tensor(make(rng, k.double().numpy(), b, d), dtype=torch.float32)
    res = run(q, k, tiles, **kw)
    exp = oracle_retrieve(q.double().numpy(), k.double().numpy(), **kw)
    assert_agrees(res, exp, context=f"n={n} d={d} b={b} {tiles} {kdtype} {kw}")
    return res, exp


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
@pytest.mark.parametrize("tiles,b", [("small-chunks", 3), ("small-rows", 4), ("small-rows", 1), ("large", 7)])
@pytest.mark.parametrize("queries", ["mixed", "paraphrases"])
def test_odd_shapes_many_splits(steps, tiles, b, queries):
    res, exp = check(np.random.default_rng(steps * 10 + b), 203, 37, b, tiles, queries=queries,
                     steps=steps, threshold=0.7)
    if queries == "paraphrases" and b > 1:
        assert exp.matched.any() and not exp.matched.all()


def test_more_query_rows_than_one_block():
    check(np.random.default_rng(1), 150, 45, 40, "large", steps=2, threshold=0.6)


@pytest.mark.parametrize("b", [2, 20])
def test_default_tiles(b):
    check(np.random.default_rng(2), 700, 300, b, None, steps=1)


@pytest.mark.parametrize("kdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tiles,b", [("small-chunks", 2), ("small-rows", 3), ("large", 9)])
def test_half_precision_keys(kdtype, tiles, b):
    check(np.random.default_rng(3), 120, 50, b, tiles, kdtype=kdtype, steps=1, threshold=0.6)


@pytest.mark.parametrize("tiles,b", [("small-chunks", 4), ("large", 6)])
def test_key_row_stride_is_honoured(tiles, b):
    rng = np.random.default_rng(4)
    wide = torch.tensor(anisotropic_keys(rng, 90, 64), dtype=torch.float32)
    k = wide[:, :40]  # row stride 64, unit stride in d
    k_unit = torch.nn.functional.normalize(k, dim=1).contiguous()
    wide[:, :40] = k_unit
    q = torch.tensor(mixed_queries(rng, k_unit.double().numpy(), b, 40), dtype=torch.float32)
    res = run(q, k, tiles, threshold=0.6)
    assert_agrees(res, oracle_retrieve(q.double().numpy(), k_unit.double().numpy(), threshold=0.6))


@pytest.mark.parametrize("tiles,b", [("small-chunks", 1), ("small-rows", 3), ("large", 5)])
def test_ties_pick_lowest_index(tiles, b):
    rng = np.random.default_rng(5)
    k = torch.tensor(anisotropic_keys(rng, 60, 24), dtype=torch.float32)
    k[41] = k[17]
    k[58] = k[17]
    q = (k[17:18] * 3).repeat(b, 1)
    for steps in (0, 1, 2):
        res = run(q, k, tiles, steps=steps, threshold=0.5)
        assert res.index.tolist() == [17] * b, steps


@pytest.mark.parametrize("tiles,b", [("small-rows", 4), ("large", 6)])
def test_zero_and_nonfinite_rows_match_nothing(tiles, b):
    rng = np.random.default_rng(6)
    k = torch.tensor(anisotropic_keys(rng, 40, 20), dtype=torch.float32)
    q = k[:b].clone() * 5
    q[0] = 0.0
    q[1, 3] = float("nan")
    q[2, 0] = float("inf")
    res = run(q, k, tiles, steps=2, threshold=0.5)
    assert res.index.tolist() == [-1, -1, -1] + list(range(3, b))
    assert torch.isnan(res.score[:3]).all()


@pytest.mark.parametrize("scale", [1e-35, 1e35])
def test_extreme_query_norms_agree_with_the_oracle(scale):
    """Scaled normalization (horen_fast.hopfield.normalize_queries): rows of norm 1e-35 or 1e35
    in float32 normalize like any other."""
    rng = np.random.default_rng(13)
    k = anisotropic_keys(rng, 64, 32)
    q = paraphrases(rng, k, 4)
    qt = torch.tensor(q / np.linalg.norm(q, axis=1, keepdims=True) * scale, dtype=torch.float32)
    res = run(qt, torch.tensor(k, dtype=torch.float32), "small-rows", threshold=0.6)
    assert_agrees(res, oracle_retrieve(q, k, threshold=0.6))
    assert res.matched.any()


@pytest.mark.parametrize("tiles,b", [("small-chunks", 3), ("large", 5)])
def test_rows_stop_independently(tiles, b):
    """One key: a query equal to it stops at step 1 while its neighbour keeps stepping."""
    rng = np.random.default_rng(7)
    k = anisotropic_keys(rng, 1, 30)
    rows = [k[0], unit(k[0] + 0.9 * unit(rng.standard_normal(30))), k[0]]
    q = np.stack((rows * 2)[:b])
    for tau in (0.2, 0.5, 0.8):
        res = run(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), tiles,
                  steps=3, threshold=tau, alpha=0.3)
        assert_agrees(res, oracle_retrieve(q, k, steps=3, threshold=tau, alpha=0.3))


@pytest.mark.parametrize("beta", [0.5, 200.0, 2000.0])
@pytest.mark.parametrize("tiles,b", [("small-chunks", 3), ("small-rows", 2), ("large", 5)])
def test_extreme_temperatures(beta, tiles, b):
    """beta 2000: exp(beta (s - 1)) underflows for every key but the nearest; the running max
    keeps the softmax exact."""
    check(np.random.default_rng(8), 80, 33, b, tiles, beta=beta, steps=2, threshold=0.5)


def _oracle_tight_candidates(q, k, margin=1e-4, **kw):
    """float64: final cosines, and the keys the tight bound keeps (|r.k - rho s| <= sigma
    sqrt(|k|^2 - s^2)) for rows still running at the last step, with a margin flag for keys within
    ``margin`` of either edge; stopped rows keep every key whose s can be the best."""
    kk = np.asarray(k, dtype=np.float64)
    k2 = (kk * kk).sum(1)
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
            x_prev, x = x, unit(u)
        c = kk @ x
        finals.append(c)
        if running:
            rho = r @ x_prev
            sigma = np.linalg.norm(r - rho * x_prev)
            perp = np.sqrt(np.maximum(k2 - s * s, 0))
            nrm = np.linalg.norm(u)
            hi = ((1 - a + a * rho) * s + a * sigma * perp) / nrm
            lo = ((1 - a + a * rho) * s - a * sigma * perp) / nrm
        else:
            hi = lo = c
        cands.append((hi >= lo.max()) & (hi > tau))
        margins.append((np.abs(hi - lo.max()) < margin) | (np.abs(hi - tau) < margin))
    return np.stack(finals), np.stack(cands), np.stack(margins)


@pytest.mark.parametrize("kind", ["many", "some", "few"])
@pytest.mark.parametrize("tiles,b", [("small-chunks", 4), ("large", 6)])
def test_candidate_rescoring_follows_the_tight_bound(kind, tiles, b):
    """The final matrix is finite exactly on the tight bound's candidate set (exact cosines
    there): nearly every key of a hair-thin cluster, part of a loose one, few of spread keys."""
    rng = np.random.default_rng(9)
    n, d = 150, 40
    if kind == "many":
        k = unit(unit(rng.standard_normal(d)) + 0.02 * unit(rng.standard_normal((n, d))))
        tau, noise = 0.5, 0.2
    elif kind == "some":
        k = anisotropic_keys(rng, n, d, cos=0.9)
        tau, noise = 0.5, 0.6
    else:
        k = unit(rng.standard_normal((n, d)))
        tau, noise = 0.3, 0.2
    q = k[rng.integers(0, n, b)] + noise * unit(rng.standard_normal((b, d)))
    kw = dict(beta=20.0, alpha=0.1, steps=2, threshold=tau, eps=1e-5)
    kt, qt = torch.tensor(k, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)
    plan = make_plan(b, n, d, kt.dtype, tiles)
    c, _ = triton_backend.final_cosines(qt.to(DEVICE), kt.to(DEVICE), params(**kw), plan)
    c = c.cpu()
    # the kernels widen the bound by their first-pass score error (MMAs) and rounding slack
    exact, cand, margin = _oracle_tight_candidates(q, k, margin=1e-4 + 4 * plan.score_error, **kw)
    finite = torch.isfinite(c).numpy()
    np.testing.assert_array_equal(finite[~margin], cand[~margin])
    np.testing.assert_allclose(c.numpy()[finite], exact[finite], atol=2e-5)
    per_row = finite.sum(1)
    if kind == "many":
        assert per_row.min() >= n // 2, per_row
    elif kind == "some":
        assert per_row.max() >= 2 and per_row.min() <= n // 2, per_row
    else:
        assert per_row.max() <= 3, per_row
    assert_agrees(run(qt, kt, tiles, **kw), oracle_retrieve(q, k, **kw))


def test_no_candidates_above_threshold():
    """A threshold no key can reach leaves every row without candidates."""
    rng = np.random.default_rng(10)
    k = torch.tensor(unit(rng.standard_normal((64, 24))), dtype=torch.float32)
    q = torch.tensor(unit(rng.standard_normal((5, 24))), dtype=torch.float32)
    c, _ = triton_backend.final_cosines(q.to(DEVICE), k.to(DEVICE), params(threshold=0.99),
                                        make_plan(5, 64, 24, k.dtype, "large"))
    assert torch.isneginf(c).all()
    res = run(q, k, "large", threshold=0.99)
    assert res.index.tolist() == [-1] * 5 and not res.matched.any()


@pytest.mark.parametrize("tiles,b", [("small-chunks", 3), ("small-rows", 4), ("large", 6)])
@pytest.mark.parametrize("steps", [0, 1, 2])
def test_key_loads_match_the_traffic_model(tiles, b, steps):
    """The key elements the step kernels load equal the planner's model exactly (one visit per
    step on the small path with whole rows, two with d chunks, two per query block on the large
    path), and the final pass loads only key rows it rescores."""
    rng = np.random.default_rng(14)
    n, d = 97, 37
    k = torch.tensor(anisotropic_keys(rng, n, d), dtype=torch.float32)
    q = torch.tensor(mixed_queries(rng, k.double().numpy(), b, d), dtype=torch.float32)
    counts = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    res = run(q, k, tiles, counts=counts, steps=steps, threshold=0.6)
    plan = make_plan(b, n, d, k.dtype, tiles)
    first, second, final_rows, final_elems = counts.tolist()
    assert first + second == plan.key_elements_loaded(steps)
    assert second == (plan.N * plan.D * steps if tiles == "small-chunks" else 0)
    assert final_elems == final_rows * d and final_rows <= n * plan.n_qblocks_final
    assert_agrees(res, oracle_retrieve(q.numpy(), k.double().numpy(), steps=steps, threshold=0.6))


def test_final_pass_touches_at_most_one_percent_of_clustered_keys():
    """Keys with pairwise cosine 0.85, paraphrase queries: the tight bound leaves at most 1% of
    the keys for the exact rescoring (the loose |r.k| <= |k| would leave most of them)."""
    rng = np.random.default_rng(15)
    n, d, b = 4000, 64, 4
    k = anisotropic_keys(rng, n, d, cos=0.85)
    q = unit(k[rng.integers(0, n, b)] + 0.2 * unit(rng.standard_normal((b, d))))
    counts = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    res = run(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), counts=counts)
    assert_agrees(res, oracle_retrieve(q, k))
    assert res.matched.all()
    assert counts[2].item() <= 0.01 * n, counts.tolist()


def test_float64_is_refused_with_a_reason():
    rng = np.random.default_rng(11)
    k = torch.tensor(anisotropic_keys(rng, 30, 12))
    q = torch.tensor(mixed_queries(rng, k.numpy(), 4, 12))
    with pytest.raises(dispatch.NotSupportedError, match="float64"):
        retrieve(q.to(DEVICE), k.to(DEVICE), backend="triton")
    why = dispatch.reasons_for("retrieve", q.to(DEVICE), k.to(DEVICE), params())["triton"]
    assert any("queries are float64" in w for w in why) and any("keys are float64" in w for w in why)


def test_reasons_name_the_missing_interpreter_on_cpu(monkeypatch):
    cpu = torch.zeros(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET=1" in w for w in triton_backend.reasons(cpu, cpu))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert any("TRITON_INTERPRET=1" in w for w in triton_backend.reasons(cpu, cpu))
    assert any("keys are float64" in w for w in triton_backend.reasons(cpu, cpu.to(torch.float64)))


def test_keys_that_are_not_unit_norm():
    """The final-score bound uses each key's own norm, so unnormalized keys stay exact."""
    rng = np.random.default_rng(12)
    k = anisotropic_keys(rng, 100, 26) * rng.uniform(0.5, 2.0, (100, 1))
    q = paraphrases(rng, k, 7)
    for tiles, b in (("small-rows", 3), ("large", 7)):
        for steps in (1, 2):
            res = run(torch.tensor(q[:b], dtype=torch.float32), torch.tensor(k, dtype=torch.float32), tiles,
                      steps=steps, threshold=0.9)
            assert_agrees(res, oracle_retrieve(q[:b], k, steps=steps, threshold=0.9))
