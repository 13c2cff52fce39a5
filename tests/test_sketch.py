"""The prefilter's key sketch: its tail model against float64 sums, its bounds, its upkeep."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from horen_fast import native
from horen_fast.sketch import KeySketch, pair_dots
from horen_fast.dispatch import NotSupportedError
from horen_fast.synthetic import ActivationModel

faiss = pytest.importorskip("faiss")

from horen_fast import Codebook  # noqa: E402


def _exact_tail(q, keys, beta, exclude):
    """float64 (log sum of weights, weighted mean key) over the keys not in ``exclude`` per row."""
    q, keys = q.double(), keys.double()
    logits = beta * q @ keys.T
    for b in range(q.shape[0]):
        logits[b, exclude[b][exclude[b] >= 0]] = float("-inf")
    log_z = torch.logsumexp(logits, dim=1)
    return log_z, torch.softmax(logits, dim=1) @ keys


def _model_keys(n, d=256, rank=16, seed=0):
    model = ActivationModel.anisotropic(d=d, rank=rank, seed=seed)
    return model, model.keys(n, seed=seed + 1)


def _rows(sk):
    """The full sketch rows [count, width] (coarse and fine parts side by side)."""
    rows = sk.rows()
    return torch.cat([rows.coarse, rows.fine], 1)


def _filled(keys, rank, fit=True, tail_rank=32, bound_rank=64):
    sk = KeySketch(keys.shape[1], rank, tail_rank=tail_rank, bound_rank=bound_rank,
                   fit_from=1 if fit else 10**9)
    if fit:
        sk.fit(keys)
    sk.append(keys)
    return sk


def test_identity_basis_gives_the_exact_tail():
    _, keys = _model_keys(600, d=64)
    sk = _filled(keys, 8, fit=False)
    assert sk.basis is None
    q = torch.nn.functional.normalize(torch.randn(5, 64), dim=1)
    exclude = torch.stack([torch.randperm(600)[:7] for _ in range(5)])
    exclude[0, :3] = -1
    log_z, mean = sk.scan(q.double(), 20.0, exclude)[:2]
    want_z, want_mean = _exact_tail(q, keys, 20.0, exclude)
    torch.testing.assert_close(log_z, want_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", [5.0, 20.0])
def test_fitted_tail_models_the_bulk(beta):
    """Keys drawn as mean + low rank + noise: the rank-32 sketch's tail (candidates excluded)
    points where the exact tail does and weighs about as much."""
    model, keys = _model_keys(20000)
    sk = _filled(keys, 32)
    q = torch.cat([model.paraphrases(keys[:20], seed=3), model.unrelated(20, seed=4)])
    exclude = (q @ keys.T).topk(64, dim=1).indices
    log_z, mean = sk.scan(q, beta, exclude)[:2]
    want_z, want_mean = _exact_tail(q, keys, beta, exclude)
    cos = torch.nn.functional.cosine_similarity(mean.double(), want_mean, dim=1)
    assert cos.min() > 0.999, cos.min()
    assert ((log_z.double() - want_z).abs() < 0.1).all(), (log_z.double() - want_z).abs().max()
    assert (mean.norm(dim=1).double() / want_mean.norm(dim=1) - 1).abs().max() < 0.02


def test_a_plain_low_rank_tail_is_not_enough():
    """Without the residual terms (Stein's lemma) the same sketch is measurably worse: the
    corrections are doing work, not decoration."""
    model, keys = _model_keys(20000)
    sk = _filled(keys, 24)
    q = model.unrelated(20, seed=5)
    exclude = torch.full((20, 1), -1)
    log_z, mean = sk.scan(q, 20.0, exclude)[:2]
    want_z, want = _exact_tail(q, keys, 20.0, exclude)
    energy, sk._energy_t = sk._energy_t, torch.zeros_like(sk._energy_t)
    plain_z, plain = sk.scan(q, 20.0, exclude)[:2]
    sk._energy_t = energy
    err = lambda m: (1 - torch.nn.functional.cosine_similarity(m.double(), want, dim=1)).mean()  # noqa: E731
    assert err(mean) < 0.75 * err(plain), (err(mean), err(plain))
    z_err = lambda z: (z.double() - want_z).abs().max()  # noqa: E731
    assert z_err(log_z) < 0.5 * z_err(plain_z), (z_err(log_z), z_err(plain_z))


def test_rescue_returns_every_key_that_can_pass_the_floor():
    model, keys = _model_keys(5000)
    sk = _filled(keys, 16)
    q = torch.cat([model.paraphrases(keys[:30], seed=6), model.unrelated(10, seed=7)])
    exclude = torch.full((40, 2), -1)
    exclude[:30, 0] = torch.arange(30)           # each paraphrase's own key is a candidate
    cos = q @ keys.T
    floor = cos.topk(4, dim=1).values[:, 3] - 0.01
    rows, labels = sk.rescue(q, floor, exclude)
    got = set(zip(rows.tolist(), labels.tolist()))
    for b in range(40):
        need = (cos[b] > floor[b]).nonzero()[:, 0].tolist()
        for j in need:
            assert (b, j) in got or j in exclude[b].tolist()
    assert all(j not in exclude[b].tolist() for b, j in got)


def test_nearest_skips_excluded_and_dead_labels():
    _, keys = _model_keys(3000)
    sk = _filled(keys, 16)
    q = keys[:4].clone()
    sk.kill([1])
    near = sk.scan(q, 20.0, torch.tensor([[0], [-1], [-1], [-1]]), 5)[2]
    assert near.shape == (4, 5)
    assert 0 not in near[0].tolist() and 1 not in near[1].tolist()
    assert near[2, 0].item() == 2 and near[3, 0].item() == 3  # a key bounds itself highest
    few = _filled(keys[:3], 16, fit=False)
    assert few.scan(q, 20.0, torch.full((4, 1), -1), 5)[2][0].tolist()[3:] == [-1, -1]


def test_near_keys_leave_the_tail():
    """With the identity basis the tail is exact, so taking the near keys out of it must give the
    exact tail over everything else."""
    _, keys = _model_keys(700, d=64)
    sk = _filled(keys, 8, fit=False)
    q = torch.nn.functional.normalize(keys[:6] + 0.3 * torch.randn(6, 64), dim=1).double()
    exclude = torch.stack([torch.randperm(700)[:4] for _ in range(6)])
    log_z, mean, near, beyond = sk.scan(q, 20.0, exclude, 10)
    assert near.shape == (6, 10) and (near >= 0).all()
    assert all(not set(near[b].tolist()) & set(exclude[b].tolist()) for b in range(6))
    cos = q @ keys.double().T
    for b in range(6):  # the near keys are the best outside ``exclude`` (u = cosine here)
        cos[b, exclude[b]] = -2
        assert set(near[b].tolist()) == set(cos[b].topk(10).indices.tolist())
    for b in range(6):  # beyond bounds every key left outside (here: the 11th best cosine)
        cos[b, near[b]] = -2
        assert cos[b].max() <= beyond[b] + 1e-12
    want_z, want_mean = _exact_tail(q, keys, 20.0, torch.cat([exclude, near], 1))
    torch.testing.assert_close(log_z, want_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6)


def test_rows_grow_in_place_and_follow_the_basis():
    _, keys = _model_keys(3000)
    sk = KeySketch(256, 16, fit_from=2000)
    assert sk.fit_from == 2000 and not sk.due(1999) and sk.due(2000)
    caps = set()
    for lo in range(0, 1500, 100):
        sk.append(keys[lo: lo + 100])
        caps.add(sk._alive.shape[0])
    assert sk.count == 1500 and len(caps) <= 2  # doubling, not a copy per append
    torch.testing.assert_close(_rows(sk), keys[:1500])  # identity basis: the keys
    sk.fit(keys)
    sk.clear()
    sk.append(keys)
    assert sk._coarse.dtype == torch.bfloat16  # a fitted basis stores rows in half the bytes
    assert sk._coarse.shape[1] == 16 and sk._fine.shape[1] == 0  # bound_rank 64 > rank 16
    torch.testing.assert_close(_rows(sk).float(), keys @ sk.basis, rtol=1e-2, atol=4e-3)
    assert not sk.due(11999) and sk.due(12000)
    with pytest.raises(ValueError, match="sketch_rank"):
        KeySketch(8, 0)


def _codebook_with(keys, **options):
    cb = Codebook(keys.shape[1], 1, backend="torch",
                  prefilter={"index": "ivf", "candidates": 16, "nlist": 64, "nprobe": 1, **options})
    cb.add(keys, torch.zeros(keys.shape[0], 1))
    return cb


def test_sketch_fixes_what_a_poor_index_gets_wrong():
    """An IVF index probing 1 list of 64 with 16 candidates: alone it misses; with the sketch's
    tail, nearest keys and rescue, decisions agree with exact retrieval."""
    model = ActivationModel.anisotropic(d=128, rank=16, seed=2)
    keys = model.keys(8000, seed=3)
    q = torch.cat([model.paraphrases(keys[:300], seed=4), model.unrelated(100, seed=5)])
    cb = _codebook_with(keys)
    exact = cb.retrieve(q, exact=True, threshold=0.8)
    assert exact.matched[:300].float().mean() > 0.3
    agree = (cb.retrieve(q, threshold=0.8).index == exact.index).float().mean().item()
    bare = _codebook_with(keys, tail="none")
    alone = (bare.retrieve(q, threshold=0.8).index == exact.index).float().mean().item()
    assert agree >= 0.99 and alone < 0.95, (agree, alone)
    # one query at a time: the near keys join the exact set and most rows skip the rescue pass
    rows = list(range(0, 300, 10)) + list(range(300, 400, 10))
    one = torch.cat([cb.retrieve(q[i: i + 1], threshold=0.8).index for i in rows])
    assert (one == exact.index[rows]).float().mean().item() >= 0.97


def test_sketch_rows_follow_adds_removes_updates_and_files(tmp_path):
    model = ActivationModel.anisotropic(d=64, rank=8, seed=6)
    pool = model.keys(3000, seed=7)
    cb = Codebook(64, 1, backend="torch",
                  prefilter={"index": "flat", "candidates": 8, "sketch_from": 500, "sketch_rank": 8})
    rng = np.random.default_rng(0)
    used = 0
    for _ in range(10):
        n = int(rng.integers(50, 300))
        cb.add(pool[used: used + n], torch.zeros(n, 1))
        used += n
        gone = rng.choice(cb.ids, size=len(cb) // 5, replace=False)
        cb.remove(gone.tolist())
        cb.update(cb.ids[0], key=torch.randn(64))
        _check_sketch(cb)
    assert cb.prefilter.sketch.basis is not None
    cb.save(tmp_path / "cb.safetensors")
    back = Codebook.load(tmp_path / "cb.safetensors")
    assert back.prefilter.config == cb.prefilter.config
    _check_sketch(back)


def _check_sketch(cb):
    index, sk = cb.prefilter.index, cb.prefilter.sketch
    assert sk.count == index.total
    alive = sk.rows().alive.numpy()
    assert np.array_equal(alive, index.ids_of(np.arange(sk.count)) >= 0)
    labels = torch.tensor(index.labels_of(cb.ids))
    want = cb.keys if sk.basis is None else cb.keys @ sk.basis
    tol = 1e-5 if sk.basis is None else 4e-3
    torch.testing.assert_close(_rows(sk)[labels].float(), want, rtol=tol, atol=tol)


def test_bad_tail_options_are_rejected():
    with pytest.raises(ValueError, match="tail must be"):
        Codebook(8, 2, prefilter={"tail": "gauss"})
    with pytest.raises(ValueError, match="safe=True"):
        Codebook(8, 2, prefilter={"safe": True, "tail": "sketch"})
    assert Codebook(8, 2, prefilter={"safe": True}).prefilter.sketch is None
    with pytest.raises(ValueError, match="sketch_candidates"):
        Codebook(8, 2, prefilter={"sketch_candidates": -1})
    with pytest.raises(TypeError, match="rescue"):
        Codebook(8, 2, prefilter={"rescue": "yes"})
    with pytest.raises(ValueError, match="sketch_rank"):
        Codebook(8, 2, prefilter={"sketch_rank": 0})


def test_importing_the_prefilter_first_keeps_the_cpp_backend():
    """prefilter.py imports the torch reference, which registers itself; the registry must still
    load the compiled backend afterwards."""
    code = ("import horen_fast.prefilter\nfrom horen_fast.retrieval import available_backends\n"
            "from horen_fast import native\nprint(('cpp' in available_backends()) == native.RETRIEVE_BUILT)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


@pytest.fixture(params=native.supported_isas())
def isa(request, monkeypatch):
    """Every instruction set this CPU has, forced through the one switch (HOREN_FAST_CPU_ISA)."""
    monkeypatch.setenv("HOREN_FAST_CPU_ISA", request.param)
    assert native.cpu_isa() == request.param
    return request.param


@pytest.mark.skipif(not native.SKETCH_BUILT, reason="the C++ sketch scan (horen_fast._sketch) is not built")
@pytest.mark.parametrize("b,nearest,rank,tail_rank,bound_rank", [
    (1, 0, 32, 32, 32), (1, 16, 128, 16, 64), (7, 5, 64, 16, 32), (64, 32, 128, 32, 64),
    (64, 0, 128, 16, 64), (9, 3, 128, 64, 64), (3, 4, 40, 8, 24)])
def test_native_scan_equals_the_torch_scan(b, nearest, rank, tail_rank, bound_rank, isa):
    """The C++ passes against the torch reference on every instruction set: the blocks of 16 rows
    (AVX-512 or AVX2; one query, groups of queries from 8) and the generic loop (scalar, and
    widths 8 and 24)."""
    model, keys = _model_keys(6000, seed=b)
    sk = _filled(keys, rank, tail_rank=tail_rank, bound_rank=bound_rank)
    sk.kill(range(0, 6000, 97))
    q = torch.cat([model.paraphrases(keys[: (b + 1) // 2], seed=8), model.unrelated(b // 2, seed=9)])
    exclude = (q @ keys.T).topk(8, dim=1).indices
    exclude[:, -2:] = -1
    assert native.sketch_reasons(sk.rows(), sk.query_parts(q)) == []
    log_z, mean, near, beyond = sk.scan(q, 20.0, exclude, nearest, impl="cpp")
    t_z, t_mean, t_near, t_beyond = sk.scan(q, 20.0, exclude, nearest, impl="torch")
    torch.testing.assert_close(beyond, t_beyond, rtol=0, atol=2e-3)
    cos = q @ keys.T
    alive = sk.rows().alive
    for i in range(b):  # beyond bounds every key outside exclude and near (up to the slack)
        cos[i, exclude[i][exclude[i] >= 0]] = -2
        cos[i, near[i][near[i] >= 0]] = -2
        cos[i, ~alive] = -2
        assert cos[i].max() <= beyond[i] + sk.slack
    if b >= 8 and nearest == 0:  # many queries: bfloat16 products where the CPU has them (q rounded)
        torch.testing.assert_close(log_z, t_z, rtol=0, atol=0.05)
        assert torch.nn.functional.cosine_similarity(mean, t_mean, dim=1).min() > 0.9999
    else:
        torch.testing.assert_close(log_z, t_z, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(mean, t_mean, rtol=1e-3, atol=1e-4)
    for i in range(b):  # the same near keys, up to ties in bfloat16 products
        assert len(set(near[i].tolist()) ^ set(t_near[i].tolist())) <= 2
    floor = torch.full((b,), 0.6)
    found = set(zip(*(t.tolist() for t in sk.rescue(q, floor, exclude, impl="cpp"))))
    reference = set(zip(*(t.tolist() for t in sk.rescue(q, floor, exclude, impl="torch"))))
    assert len(found ^ reference) <= max(2, len(reference) // 100)


def test_the_passes_pick_their_implementation():
    """auto takes C++ for float32 queries on a fitted basis, torch for the identity basis (no
    warning: it has no C++ pass) and for float64 queries (saying why); a forced "cpp" that
    cannot serve refuses with every reason."""
    model, keys = _model_keys(3000)
    exclude = torch.full((2, 1), -1)
    q = model.unrelated(2, seed=3)
    identity = _filled(keys[:500], 16, fit=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        identity.scan(q, 20.0, exclude, 2)
    with pytest.raises(NotSupportedError, match="float32"):
        identity.scan(q, 20.0, exclude, 2, impl="cpp")
    fitted = _filled(keys, 64, bound_rank=32)
    with pytest.raises(NotSupportedError, match="float64"):
        fitted.rescue(q.double(), torch.zeros(2, dtype=torch.float64), exclude, impl="cpp")
    if native.SKETCH_BUILT:
        with pytest.warns(RuntimeWarning, match="float64"):
            fitted.scan(q.double(), 20.0, exclude, 2)


def test_pair_dots_equal_the_plain_products(isa):
    g = torch.Generator().manual_seed(3)
    store = torch.randn(50, 200, generator=g)
    q = torch.randn(7, 37, generator=g)
    rows = torch.randint(0, 7, (300,), generator=g)
    slots = torch.randint(0, 50, (300,), generator=g)
    impls = ["torch"] + (["cpp"] if native.SKETCH_BUILT else [])
    for keys in (store[:, :37], store[:, 5:42].contiguous()):  # a strided view and a plain tensor
        want = (keys[slots] * q[rows]).sum(1)
        for impl in impls:
            torch.testing.assert_close(pair_dots(keys, q, rows, slots, impl=impl), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pair_dots(keys, q, rows.int(), slots.int(), impl=impl), want,
                                       rtol=1e-5, atol=1e-5)
            assert pair_dots(keys, q, rows[:0], slots[:0], impl=impl).shape == (0,)
    half = store[:, :37].bfloat16()  # other dtypes take the torch path
    want = (half[slots].float() * q[rows]).sum(1)
    torch.testing.assert_close(pair_dots(half, q, rows, slots, impl="torch"), want, rtol=1e-5, atol=1e-5)
    if native.SKETCH_BUILT:
        with pytest.raises(NotSupportedError, match="bfloat16"):
            pair_dots(half, q, rows, slots, impl="cpp")
        with pytest.raises(ValueError, match="slots must hold indices in \\[0, 50\\)"):
            pair_dots(store[:, :37], q, rows, slots + 1, impl="cpp")
