"""The Hopfield ops (horen_fast/hopfield.py) against float64 numpy, the oracle, and each other."""
import numpy as np
import pytest
import torch

from horen_fast import hopfield as H
from oracle import anisotropic_keys, oracle_retrieve, unit


def f64(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


# ---------------------------------------------------------------- normalize_queries
@pytest.mark.parametrize("exponent", [-35, -30, -20, -10, 0, 10, 20, 30, 35])
def test_normalize_extreme_float32_rows(exponent):
    rng = np.random.default_rng(exponent + 100)
    x = rng.standard_normal((6, 96))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= 10.0 ** exponent                   # the row norm is 1e{exponent}
    x32 = torch.tensor(x, dtype=torch.float32)
    assert torch.isfinite(x32).all() and (x32 != 0).any(dim=1).all()
    q, valid = H.normalize_queries(x32, torch.float32)
    assert valid.all() and q.dtype == torch.float32
    want = unit(x32.double().numpy())
    np.testing.assert_allclose(q.double().numpy(), want, atol=2e-7, rtol=0)


def test_normalize_float64_whole_range_and_half_inputs():
    x = np.array([[1e300, -2e300, 3e299], [1e-300, 0.0, -1e-300], [3.0, 4.0, 0.0]])
    q, valid = H.normalize_queries(f64(x), torch.float64)
    assert valid.all()
    np.testing.assert_allclose(q.numpy(), x / np.abs(x).max(1, keepdims=True)
                               / np.linalg.norm(x / np.abs(x).max(1, keepdims=True), axis=1, keepdims=True),
                               rtol=1e-15, atol=0)
    assert q[2].tolist() == [0.6, 0.8, 0.0]
    for dt in (torch.bfloat16, torch.float16):
        h = torch.tensor([[3.0, 4.0], [1e-4, -1e-4]]).to(dt)
        q, valid = H.normalize_queries(h, torch.float32)
        assert valid.all() and q.dtype == torch.float32
        np.testing.assert_allclose(q.numpy(), unit(h.double().numpy()), atol=1e-7)


def test_normalize_unusable_rows_become_zero():
    x = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0], [-float("inf"), 0.0],
                      [1e-45, 0.0], [2.0, 0.0]])
    q, valid = H.normalize_queries(x, torch.float32)
    assert valid.tolist() == [False, False, False, False, True, True]
    assert (q[:4] == 0).all() and q[4].tolist() == [1.0, 0.0] and q[5].tolist() == [1.0, 0.0]


def test_normalize_rejects_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        H.normalize_queries(torch.ones(2, 3, dtype=torch.long), torch.float32)
    with pytest.raises(TypeError, match="floating"):
        H.normalize_queries(torch.ones(2, 3), torch.int32)
    with pytest.raises(ValueError, match="2-D"):
        H.normalize_queries(torch.ones(3), torch.float32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        H.normalize_queries(np.ones((2, 3)), torch.float32)
    q, valid = H.normalize_queries(torch.ones(0, 3), torch.float32)
    assert q.shape == (0, 3) and valid.shape == (0,)


# ---------------------------------------------------------------- softmax partials
def _full(q, k, beta):
    s = beta * (q @ k.T)
    m = s.max(1).values
    e = torch.exp(s - m[:, None])
    return m, e.sum(1), e @ k


def test_partials_of_splits_combine_to_the_full_softmax():
    rng = np.random.default_rng(1)
    k = f64(anisotropic_keys(rng, 300, 40, cos=0.85))
    q = f64(unit(rng.standard_normal((7, 40))))
    m, z, y = _full(q, k, 20.0)
    cuts = [0, 1, 90, 90, 250, 300]  # includes an empty split
    parts = [H.softmax_partials(q, k[a:b], 20.0) for a, b in zip(cuts, cuts[1:])]
    assert torch.isneginf(parts[2][0]).all() and (parts[2][1] == 0).all() and (parts[2][2] == 0).all()
    mc, zc, yc = H.combine_partials(*zip(*parts))
    torch.testing.assert_close(mc, m, rtol=1e-14, atol=0)
    torch.testing.assert_close(zc, z, rtol=1e-12, atol=0)
    torch.testing.assert_close(yc, y, rtol=1e-12, atol=1e-14)


def test_all_reduce_pattern_max_rescale_sum():
    """What a ShardedCodebook does: MAX-reduce m, rescale each rank's (z, y) to it, SUM-reduce."""
    rng = np.random.default_rng(2)
    k = f64(anisotropic_keys(rng, 120, 16))
    q = f64(unit(rng.standard_normal((3, 16))))
    ranks = [H.softmax_partials(q, k[i::4], 35.0) for i in range(4)]
    m_all = torch.stack([p[0] for p in ranks]).max(0).values
    scaled = [H.rescale_partials(m, z, y, m_all) for m, z, y in ranks]
    z_all = sum(s[0] for s in scaled)
    y_all = sum(s[1] for s in scaled)
    m, z, y = _full(q, k, 35.0)
    torch.testing.assert_close(m_all, m, rtol=1e-14, atol=0)
    torch.testing.assert_close(z_all, z, rtol=1e-12, atol=0)
    torch.testing.assert_close(y_all, y, rtol=1e-12, atol=1e-14)


def test_candidate_subsets_with_mask_and_a_modelled_tail():
    """Per-row candidates [B, k, d] with absent slots, plus the rest entering as a tail partial
    (log mass L, mean key mu) = (L, 1, mu): together they give the full softmax."""
    rng = np.random.default_rng(3)
    n, d, b = 200, 24, 5
    k = f64(anisotropic_keys(rng, n, d, cos=0.85))
    q = f64(unit(rng.standard_normal((b, d))))
    cand = torch.stack([torch.tensor(rng.choice(n, 30, replace=False)) for _ in range(b)])
    present = torch.ones(b, 30, dtype=torch.bool)
    present[:, -3:] = False  # padding slots: pointing anywhere, they must add nothing
    head = H.softmax_partials(q, k[cand], 20.0, present)
    inside = torch.zeros(b, n, dtype=torch.bool)
    inside[torch.arange(b)[:, None].expand(b, 27), cand[:, :27]] = True
    tm, tz, ty = H.softmax_partials(q, k, 20.0, ~inside)
    tail = (tm + torch.log(tz), torch.ones_like(tz), ty / tz[:, None])   # as a sketch models it
    mc, zc, yc = H.combine_partials([head[0], tail[0]], [head[1], tail[1]], [head[2], tail[2]])
    m, z, y = _full(q, k, 20.0)
    torch.testing.assert_close(torch.nn.functional.normalize(yc, dim=1),
                               torch.nn.functional.normalize(y, dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(zc * torch.exp(mc - m), z, rtol=1e-12, atol=0)
    none = H.softmax_partials(q, k[cand], 20.0, torch.zeros(b, 30, dtype=torch.bool))
    assert torch.isneginf(none[0]).all() and (none[2] == 0).all()


def test_combine_partials_rejects_mismatched_lists():
    m, z, y = H.softmax_partials(torch.ones(1, 2), torch.ones(1, 2), 1.0)
    with pytest.raises(ValueError, match="equally many"):
        H.combine_partials([m, m], [z], [y])
    with pytest.raises(ValueError, match="at least one"):
        H.combine_partials([], [], [])


# ---------------------------------------------------------------- damped update and stop rule
@pytest.mark.parametrize("steps,alpha", [(1, 0.1), (3, 0.3), (4, 1.0)])
def test_damped_steps_follow_the_oracle(steps, alpha):
    rng = np.random.default_rng(steps)
    kn = anisotropic_keys(rng, 150, 32)
    qn = np.concatenate([kn[:1], unit(kn[1:6] + 0.4 * unit(rng.standard_normal((5, 32))))])
    k = f64(kn)
    q, valid = H.normalize_queries(f64(qn), torch.float64)
    running = valid.clone()
    for _ in range(steps):
        _, _, y = H.softmax_partials(q, k, 20.0)
        q, running = H.damped_update(q, y, running, alpha, 1e-5)
    best, index = H.best_match(q @ k.T)
    exp = oracle_retrieve(qn, kn, beta=20.0, alpha=alpha, steps=steps, threshold=-2.0)
    np.testing.assert_allclose(best.numpy(), exp.best, atol=1e-12)
    assert index.tolist() == exp.index.tolist()


def test_stop_rule_is_per_row_and_stopped_rows_stay():
    k = f64(unit(np.array([[1.0, 0.0, 0.0]])))
    q = f64(unit(np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])))
    _, _, y = H.softmax_partials(q, k, 20.0)
    running = torch.tensor([True, True, False])
    q2, running2 = H.damped_update(q, y, running, 0.5, 1e-5)
    assert running2.tolist() == [False, True, False]     # row 0 sits on its key: ||r - q|| = 0
    assert torch.equal(q2[0], q[0]) and torch.equal(q2[2], q[2])
    torch.testing.assert_close(q2[1], torch.nn.functional.normalize(0.5 * q[1] + 0.5 * k[0], dim=0))
    # a weighted sum that vanishes (r = 0) leaves q where it is
    q3, r3 = H.damped_update(q[1:2], torch.zeros(1, 3, dtype=torch.float64), torch.tensor([True]), 0.1, 1e-5)
    torch.testing.assert_close(q3, q[1:2])


# ---------------------------------------------------------------- tie rule and match selection
def test_best_match_ties_go_to_the_lowest_position():
    c = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2], [-float("inf")] * 4])
    best, index = H.best_match(c)
    assert index.tolist() == [1, 0, 0] and best[:2].tolist() == pytest.approx([0.9, 0.2])
    pos = torch.tensor([[9, 7, 3, 0], [5, 6, 1, 2], [1, 2, 3, 4]])   # storage positions of the columns
    best, index = H.best_match(c, pos)
    assert index[:2].tolist() == [3, 1]
    best, index = H.best_match(torch.empty(2, 0))
    assert index.tolist() == [-1, -1] and torch.isneginf(best).all()


@pytest.mark.parametrize("n,where", [(5, [0, 1, 2, 3, 4]), (300, [7, 8, 150, 299]), (1000, [999, 3, 500])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_best_duplicate_keys_lowest_index(n, where, dtype):
    """Exact duplicates of the best key score one ulp apart in a GEMM; the tie still goes to the
    lowest position."""
    rng = np.random.default_rng(n)
    k = torch.tensor(unit(rng.standard_normal((n, 64)))).to(dtype)
    k[where] = k[where[0]].clone()
    q, _ = H.normalize_queries(k[where[:1]].repeat(4, 1) + 1e-3 * torch.randn(4, 64, dtype=dtype), dtype)
    best, index = H.exact_best(q, k, q @ k.T)
    assert index.tolist() == [min(where)] * 4 and best.dtype == dtype
    per_row = k[None].expand(4, n, 64)        # the same through per-row candidates and positions
    pos = torch.arange(n).flip(0)             # column j is storage position n - 1 - j
    best2, index2 = H.exact_best(q, per_row, q @ k.T, pos)
    assert index2.tolist() == [n - 1 - max(where)] * 4
    torch.testing.assert_close(best, best2, rtol=0, atol=0)


def test_select_match_contract():
    best = torch.tensor([0.9, 0.5, 0.95, float("nan"), 0.99])
    index = torch.tensor([3, 1, 2, 0, -1])
    valid = torch.tensor([True, True, False, True, True])
    res = H.select_match(best, index, valid, 0.85)
    assert res.index.tolist() == [3, -1, -1, -1, -1] and res.matched.tolist() == [True] + [False] * 4
    assert res.score[0].item() == pytest.approx(0.9) and torch.isnan(res.score[1:]).all()


# ---------------------------------------------------------------- the final-score bound
def _bound_case(seed, n, d, cos, alpha, scale_norms=False):
    rng = np.random.default_rng(seed)
    kn = anisotropic_keys(rng, n, d, cos=cos)
    if scale_norms:
        kn = kn * rng.uniform(0.5, 1.5, (n, 1))
    src = rng.integers(0, n, 24)
    qn = kn[src] + rng.uniform(0.1, 0.5, (24, 1)) * unit(rng.standard_normal((24, d)))  # paraphrases
    k = f64(kn)
    q, _ = H.normalize_queries(f64(qn), torch.float64)
    s = q @ k.T
    _, _, y = H.softmax_partials(q, k, 20.0)
    r = torch.nn.functional.normalize(y, dim=1)
    u = (1 - alpha) * q + alpha * r
    exact = (u @ k.T) / u.norm(dim=1, keepdim=True)
    lo, hi = H.final_bound(q, y, s, alpha, (k * k).sum(1))
    nrm = u.norm(dim=1, keepdim=True)
    loose_hi = ((1 - alpha) * s + alpha * k.norm(dim=1)[None]) / nrm
    loose_lo = ((1 - alpha) * s - alpha * k.norm(dim=1)[None]) / nrm
    return exact, lo, hi, loose_lo, loose_hi


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("cos,scale_norms", [(0.85, False), (0.5, False), (0.85, True), (0.0, False)])
def test_final_bound_is_never_violated(alpha, cos, scale_norms):
    exact, lo, hi, _, _ = _bound_case(int(alpha * 10) + int(cos * 100), 2000, 64, cos, alpha, scale_norms)
    slack = 1e-12
    assert (lo <= exact + slack).all() and (exact <= hi + slack).all()
    cand = H.bound_candidates(lo, hi, -2.0)
    truth = exact.argmax(dim=1)
    assert cand[torch.arange(exact.shape[0]), truth].all()   # the true best is always a candidate


@pytest.mark.parametrize("tau", [0.85, 0.735])
def test_final_bound_leaves_far_fewer_candidates_than_the_loose_bound(tau):
    """Clustered keys (pairwise cosine ~0.85) and paraphrase queries, the paper's setting."""
    exact, lo, hi, loose_lo, loose_hi = _bound_case(7, 4000, 128, 0.85, 0.1)
    tight = H.bound_candidates(lo, hi, tau).sum().item()
    loose = H.bound_candidates(loose_lo, loose_hi, tau).sum().item()
    assert loose >= 10 * max(tight, 1), (tight, loose)
    assert tight <= 4 * exact.shape[0], tight     # a few keys per row, not thousands


def test_final_bound_rows_with_nothing_retrieved():
    q = f64(unit(np.array([[1.0, 2.0, 2.0]])))
    k = f64(unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])))
    lo, hi = H.final_bound(q, torch.zeros(1, 3, dtype=torch.float64), q @ k.T, 0.1)
    torch.testing.assert_close(lo, q @ k.T)
    torch.testing.assert_close(hi, q @ k.T)
