"""The FAISS prefilter: exact where it must be, consistent with the codebook through every change."""
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from horen_fast import Codebook  # noqa: E402
from horen_fast.prefilter import PrefilterConfig  # noqa: E402
from horen_fast.synthetic import ActivationModel  # noqa: E402
from oracle import anisotropic_keys, mixed_queries, oracle_retrieve  # noqa: E402

D = 64
DATA = Path(__file__).parent / "data"


def _book(n, seed=0, d=D, **kw):
    rng = np.random.default_rng(seed)
    keys = torch.tensor(anisotropic_keys(rng, n, d), dtype=torch.float32)
    cb = Codebook(d, 3, backend="torch", prefilter=PrefilterConfig(**kw))
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
    cb, q = _book(3000, seed=5, index="ivf", candidates=3000, nlist=8, nprobe=8)
    assert cb.prefilter.index.trained_at == 3000  # trained (39 * 8 <= 3000 keys), not a flat stand-in
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

    import horen_fast.approx as pf
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
    cb = Codebook(128, 2, backend="torch", prefilter=PrefilterConfig(index="flat", candidates=256))
    cb.add(keys, torch.zeros(4000, 2))
    q = torch.cat([model.paraphrases(keys[:200], seed=3), model.unrelated(200, seed=4)])
    a, e = cb.retrieve(q), cb.retrieve(q, exact=True)
    agree = ((a.index == e.index) & (a.matched == e.matched)).float().mean().item()
    assert e.matched[:200].float().mean() > 0.3 and agree >= 0.95, agree


def _check_consistent(cb):
    pf = cb.prefilter.index
    assert set(pf.live_ids()) == set(cb.ids) and pf.live == len(cb) == cb.prefilter.live
    alive = pf.ids_of(np.arange(pf.total))
    assert sorted(alive[alive >= 0].tolist()) == sorted(cb.ids)
    if cb.prefilter.sketch is not None:  # the sketch's rows follow the index labels
        assert cb.prefilter.sketch.count == pf.total
    if len(cb):  # every live key finds itself first, dead labels never come back
        ids = pf.search(cb.keys.numpy(), 1)[:, 0]
        assert (ids == np.array(cb.ids)).mean() >= (1.0 if pf.kind == "flat" else 0.95)
        got = pf.search(cb.keys[:50].numpy(), min(len(cb), 40))
        assert set(got[got >= 0].tolist()) <= set(cb.ids)


@pytest.mark.parametrize("index", ["flat", "ivf", "ivf_sq8", "hnsw"])
def test_index_follows_adds_removes_updates_and_files(index, tmp_path):
    rng = np.random.default_rng(11)
    opts = {"nlist": 4, "nprobe": 4} if index.startswith("ivf") else {}
    cb = Codebook(D, 2, backend="torch", prefilter=PrefilterConfig(index=index, candidates=16, **opts))
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
        assert cb.prefilter.index.trained_at > 0
        assert type(cb.prefilter.index.faiss_index).__name__ == ("IndexIVFFlat" if index == "ivf" else "IndexIVFScalarQuantizer")
    q = torch.cat([cb.keys[:20] + 0.05 * torch.randn(20, D), torch.randn(10, D)])
    before = cb.retrieve(q)
    cb.save(tmp_path / "cb.safetensors")
    back = Codebook.load(tmp_path / "cb.safetensors")
    assert back.prefilter is not None and back.prefilter.config == cb.prefilter.config
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
    with pytest.raises(TypeError, match="PrefilterConfig"):
        Codebook(8, 2, prefilter="faiss")
    with pytest.raises(TypeError, match=r"prefilter=PrefilterConfig\(candidates=\.\.\., index=\.\.\.\)"):
        Codebook(8, 2, index="hnsw", candidates=4)
    with pytest.raises(ValueError, match="index must be"):
        PrefilterConfig(index="pq")
    with pytest.raises(ValueError, match="safe=True needs"):
        PrefilterConfig(index="hnsw", safe=True)
    with pytest.raises(ValueError, match="candidates"):
        Codebook(8, 2, prefilter={"candidates": 0})
    with pytest.raises(ValueError, match="unknown prefilter option"):
        Codebook(8, 2, prefilter={"nprobes": 3})
    for bad in ({"hnsw_m": 0}, {"hnsw_m": -1}, {"hnsw_m": 1}, {"hnsw_m": 10**6}, {"ef_search": 0},
                {"ef_search": 10**9}, {"ef_construction": -5}, {"nlist": 0}, {"nprobe": 0},
                {"seed": -1}, {"seed": 2**40}, {"sketch_candidates": -1}, {"sketch_rank": 0},
                {"rebuild_fraction": 1.5}, {"tolerance": float("nan")}, {"candidates": 2.5},
                {"hnsw_m": True}, {"nlist": "8"}):
        with pytest.raises(ValueError, match=f"prefilter option {next(iter(bad))}"):
            PrefilterConfig(**bad)
    for bad in ({"rescue": "yes"}, {"safe": 1}):
        with pytest.raises(TypeError, match=f"prefilter option {next(iter(bad))}"):
            PrefilterConfig(**bad)


def test_options_that_used_to_abort_or_exhaust_memory_raise_in_a_subprocess(tmp_path):
    """hnsw_m=0 was a FAISS assertion (the interpreter aborted), hnsw_m=-1 allocated until the
    process was killed: run each in a child so a regression fails this test instead of pytest."""
    import subprocess
    import sys

    code = ("import sys\nfrom horen_fast import Codebook\n"
            "for m in (0, -1):\n"
            "    try:\n"
            "        Codebook(8, 2, prefilter={'index': 'hnsw', 'hnsw_m': m})\n"
            "    except ValueError as e:\n"
            "        print('refused', m, e)\n"
            "    else:\n"
            "        sys.exit(3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.count("refused") == 2 and "hnsw_m must be an integer in [2, 256]" in out.stdout


def test_a_file_with_a_bad_prefilter_option_is_refused_not_aborted(tmp_path):
    """A crafted file (valid checksum) whose prefilter config says hnsw_m=0 fails to load with
    HoReNFileError before FAISS sees the option."""
    from horen_fast._files import HoReNFileError, load_tensors, save_tensors

    cb = Codebook(8, 2, prefilter=PrefilterConfig(index="hnsw", candidates=4))
    cb.add(torch.randn(5, 8), torch.randn(5, 2))
    cb.save(tmp_path / "good.safetensors")
    tensors, meta = load_tensors(tmp_path / "good.safetensors", "horen_fast.Codebook")
    meta["prefilter"]["hnsw_m"] = 0
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(HoReNFileError, match="hnsw_m"):
        Codebook.load(tmp_path / "bad.safetensors")


def test_huge_candidates_are_clamped_to_the_codebook():
    """candidates=10**9 (and as many sketch candidates) used to allocate B x 10**9 buffers; the
    search is clamped to the live keys, so the answer is the exact one."""
    cb, q = _book(300, seed=2, index="flat", candidates=10**9)
    got = _assert_exact(cb, q[:4])  # a small batch: the sketch's near keys are asked for too
    assert got.index.shape == (4,)
    cb2, q2 = _book(300, seed=2, index="hnsw", candidates=10**9, tail="none")
    _assert_exact(cb2, q2)


def test_config_is_one_field_and_old_files_migrate(tmp_path):
    """The file stores the PrefilterConfig as one flat field; a version-1 file (written by the
    code before the config existed: index/candidates/safe/tolerance beside an options dict) loads
    with the same settings."""
    from horen_fast._files import load_tensors

    cfg = PrefilterConfig(index="hnsw", candidates=4, hnsw_m=8, ef_search=16, tail="none")
    old = Codebook.load(DATA / "codebook_v1_hnsw.safetensors")
    assert old.prefilter.config == cfg
    assert old.ids == [0, 1, 5, 3, 4] and old.next_id == 6 and old.config["threshold"] == 0.8
    assert old.get_labels([5, 0]) == [(5, 6), (0, 1)]
    q = old.keys + 0.01 * torch.randn(5, 8)
    assert old.retrieve(q).index.tolist() == old.retrieve(q, exact=True).index.tolist()
    old.save(tmp_path / "new.safetensors")
    _, meta = load_tensors(tmp_path / "new.safetensors", "horen_fast.Codebook")
    assert meta["format_version"] == 2 and meta["prefilter"] == cfg.to_dict()
    assert "options" not in meta["prefilter"]
    back = Codebook.load(tmp_path / "new.safetensors")
    assert back.prefilter.config == cfg and torch.equal(back.keys, old.keys)
    before = old.prefilter
    assert old.to("cpu") is old and old.prefilter is not before  # rebuilt for the device
    assert old.prefilter.config == cfg and old.prefilter.live == 5 and old.prefilter.dead == 0
    assert old.retrieve(q).index.tolist() == old.retrieve(q, exact=True).index.tolist()
    plain = Codebook.load(DATA / "codebook_v1_plain.safetensors")
    assert plain.prefilter is None and len(plain) == 4
    assert plain.get_labels(plain.ids) == [(7,), None, (1, 2, 3), (4,)]


@pytest.mark.parametrize("config", [dict(index="flat", candidates=4), dict(index="flat", candidates=1),
                                    dict(index="hnsw", candidates=2, tail="none"),
                                    dict(index="flat", candidates=8, safe=True)])
def test_ties_go_to_the_first_key_in_storage_order(config):
    """Copies of one key: the prefiltered path, exact retrieval and every backend answer the copy
    stored first (not the lowest id: a removal moved the last entry into the hole). With one
    candidate the other copy comes from the sketch's rescue."""
    from horen_fast import available_backends

    g = torch.Generator().manual_seed(5)
    k = torch.nn.functional.normalize(torch.randn(1, D, generator=g), dim=1)
    keys = torch.cat([torch.randn(3, D, generator=g), k, torch.randn(4, D, generator=g), k])
    cb = Codebook(D, 2, steps=1, prefilter=PrefilterConfig(**config))
    cb.add(keys, torch.zeros(9, 2))
    cb.remove([1])  # id 8 (a copy of k) moves to position 1, before id 3
    assert cb.ids[:4] == [0, 8, 2, 3]
    q = torch.cat([k * 2.0, k + 1e-3 * torch.randn(3, D, generator=g)])
    assert cb.retrieve(q).index.tolist() == [8] * 4
    assert cb.retrieve(q, exact=True).index.tolist() == [8] * 4
    for backend in available_backends("cpu"):
        assert cb.retrieve(q, exact=True, backend=backend).index.tolist() == [8] * 4, backend
