"""The FAISS prefilter: exact where it must be, consistent with the codebook through every change."""
import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from horen_fast import Codebook  # noqa: E402
from horen_fast.synthetic import ActivationModel  # noqa: E402
from oracle import anisotropic_keys, mixed_queries, oracle_retrieve  # noqa: E402

D = 64


def _book(n, seed=0, d=D, **kw):
    rng = np.random.default_rng(seed)
    keys = torch.tensor(anisotropic_keys(rng, n, d), dtype=torch.float32)
    cb = Codebook(d, 3, backend="torch", prefilter="faiss", **kw)
    cb.add(keys, torch.randn(n, 3))
    queries = torch.tensor(mixed_queries(rng, keys.double().numpy(), 64, d), dtype=torch.float32)
    return cb, queries


def _assert_exact(cb, queries, **kw):
    """Decisions equal exact retrieval and the float64 oracle on every non-knife-edge row."""
    got, exact = cb.retrieve(queries, **kw), cb.retrieve(queries, exact=True, **kw)
    params = {**cb.config, **kw}
    params.pop("backend")
    exp = oracle_retrieve(queries.double().numpy(), cb.keys.double().numpy(), **params)
    ids = np.array(cb.ids)
    exp_ids = np.where(exp.index >= 0, ids[np.maximum(exp.index, 0)], -1)
    ok = ~exp.knife
    assert np.array_equal(got.index.numpy()[ok], exp_ids[ok])
    assert np.array_equal(got.index.numpy()[ok], exact.index.numpy()[ok])
    assert torch.equal(got.matched, got.index >= 0)
    m = got.matched & exact.matched
    assert torch.allclose(got.score[m], exact.score[m], atol=1e-5)
    assert torch.isnan(got.score[~got.matched]).all()
    return got


@pytest.mark.parametrize("steps,beta", [(0, 20.0), (1, 20.0), (3, 5.0), (2, 60.0)])
def test_flat_covering_the_codebook_is_exact(steps, beta):
    cb, q = _book(500, seed=steps, index="flat", candidates=500)
    _assert_exact(cb, q, steps=steps, beta=beta)


def test_ivf_searching_every_list_and_covering_is_exact():
    cb, q = _book(3000, seed=5, index="ivf", candidates=3000, prefilter_options={"nlist": 8, "nprobe": 8})
    assert cb.prefilter._trained_at == 3000  # trained (39 * 8 <= 3000 keys), not a flat stand-in
    _assert_exact(cb, q)


@pytest.mark.parametrize("beta", [20.0, 200.0])
def test_safe_mode_is_exact(beta):
    cb, q = _book(2000, seed=7, index="flat", candidates=32, safe=True)
    q = torch.cat([q, cb.keys[:32] + 0.01 * torch.randn(32, D)])  # some rows the bound certifies
    _assert_exact(cb, q, beta=beta)


def test_safe_mode_certifies_when_the_tail_is_negligible():
    """At a large beta the candidates carry all the mass: no fallback for rows near a key; at
    beta = 20 with anisotropic keys the bound does not hold and rows go to exact retrieval."""
    cb, _ = _book(2000, seed=8, index="flat", candidates=32, safe=True)
    near = cb.keys[:16] + 0.01 * torch.randn(16, D)
    calls = []
    original = cb.prefilter

    import horen_fast.prefilter as pf
    real = pf.prefiltered_retrieve

    def spy(queries, keys, slot_of_id, prefilter, params, exact):
        return real(queries, keys, slot_of_id, prefilter, params, lambda x: calls.append(len(x)) or exact(x))

    pf.prefiltered_retrieve = spy
    try:
        cb.retrieve(near, beta=400.0)
        assert calls == []
        cb.retrieve(near, beta=20.0)
        assert calls and calls[0] > 0
    finally:
        pf.prefiltered_retrieve = real
    assert cb.prefilter is original


def test_fast_mode_agrees_on_realistic_keys():
    model = ActivationModel.anisotropic(d=128, rank=16)
    keys = model.keys(4000, seed=1)
    cb = Codebook(128, 2, backend="torch", prefilter="faiss", index="flat", candidates=256)
    cb.add(keys, torch.zeros(4000, 2))
    q = torch.cat([model.paraphrases(keys[:200], seed=3), model.unrelated(200, seed=4)])
    a, e = cb.retrieve(q), cb.retrieve(q, exact=True)
    agree = ((a.index == e.index) & (a.matched == e.matched)).float().mean().item()
    assert e.matched[:200].float().mean() > 0.3 and agree >= 0.95, agree


def _check_consistent(cb):
    pf = cb.prefilter
    assert set(pf._label_of) == set(cb.ids) and pf.live == len(cb)
    alive = pf._label_id[pf._label_id >= 0]
    assert sorted(alive.tolist()) == sorted(cb.ids)
    if len(cb):  # every live key finds itself first, dead labels never come back
        ids = pf.search(cb.keys.numpy(), 1)[:, 0]
        assert (ids == np.array(cb.ids)).mean() >= (1.0 if pf.kind == "flat" else 0.95)
        got = pf.search(cb.keys[:50].numpy(), min(len(cb), 40))
        assert set(got[got >= 0].tolist()) <= set(cb.ids)


@pytest.mark.parametrize("index", ["flat", "ivf", "ivf_sq8", "hnsw"])
def test_index_follows_adds_removes_updates_and_files(index, tmp_path):
    rng = np.random.default_rng(11)
    opts = {"nlist": 4, "nprobe": 4} if index.startswith("ivf") else {}
    cb = Codebook(D, 2, backend="torch", prefilter="faiss", index=index, candidates=16,
                  prefilter_options=opts)
    pool = torch.tensor(anisotropic_keys(rng, 1200, D), dtype=torch.float32)
    used = 0
    for step in range(12):
        n = int(rng.integers(1, 120))
        cb.add(pool[used: used + n], torch.randn(n, 2))
        used += n
        if len(cb) > 10:
            live = cb.ids
            gone = rng.choice(live, size=int(rng.integers(1, len(live) // 3 + 1)), replace=False)
            cb.remove(gone.tolist())
        if len(cb):
            victim = cb.ids[int(rng.integers(0, len(cb)))]
            cb.update(victim, key=torch.randn(D))
        _check_consistent(cb)
    assert cb.prefilter.rebuilds >= 1  # dead labels were compacted at least once
    if index.startswith("ivf"):
        assert cb.prefilter._trained_at > 0
        assert type(cb.prefilter._index).__name__ == ("IndexIVFFlat" if index == "ivf" else "IndexIVFScalarQuantizer")
    q = torch.cat([cb.keys[:20] + 0.05 * torch.randn(20, D), torch.randn(10, D)])
    before = cb.retrieve(q)
    cb.save(tmp_path / "cb.safetensors")
    back = Codebook.load(tmp_path / "cb.safetensors")
    assert back.prefilter is not None and back.prefilter.settings() == cb.prefilter.settings()
    assert back.prefilter.dead == 0 and back.prefilter.live == len(cb)  # rebuilt from the keys
    _check_consistent(back)
    if index == "flat":
        assert torch.equal(back.retrieve(q).index, before.index)
    cb.clear()
    _check_consistent(cb)
    assert cb.retrieve(q).index.tolist() == [-1] * 30


def test_file_without_prefilter_loads_as_before(tmp_path):
    cb = Codebook(8, 2)
    cb.add(torch.randn(5, 8), torch.randn(5, 2))
    cb.save(tmp_path / "a.safetensors")
    assert Codebook.load(tmp_path / "a.safetensors").prefilter is None


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="prefilter must be"):
        Codebook(8, 2, prefilter="annoy")
    with pytest.raises(ValueError, match="index must be"):
        Codebook(8, 2, prefilter="faiss", index="pq")
    with pytest.raises(ValueError, match="safe=True needs"):
        Codebook(8, 2, prefilter="faiss", index="hnsw", safe=True)
    with pytest.raises(ValueError, match="candidates"):
        Codebook(8, 2, prefilter="faiss", candidates=0)
    with pytest.raises(ValueError, match="unknown prefilter option"):
        Codebook(8, 2, prefilter="faiss", prefilter_options={"nprobes": 3})
