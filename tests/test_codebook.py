"""Codebook: ids through add/remove/retrieve, growth, files (round trip, corruption, crash)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from horen_fast import Codebook
from horen_fast._files import HoReNFileError
from oracle import anisotropic_keys, assert_agrees, oracle_retrieve, unit

ROOT = Path(__file__).resolve().parents[1]


def filled(n=20, dk=16, dv=4, seed=0, **kw):
    rng = np.random.default_rng(seed)
    cb = Codebook(dk, dv, **kw)
    keys = torch.tensor(anisotropic_keys(rng, n, dk), dtype=torch.float32)
    ids = cb.add(keys, torch.randn(n, dv), labels=[[i, i + 1] for i in range(n)])
    return cb, keys, ids


def test_add_returns_stable_ids_and_normalizes_keys():
    cb = Codebook(8, 3)
    ids = cb.add(torch.randn(4, 8) * 5, torch.randn(4, 3))
    assert ids.tolist() == [0, 1, 2, 3] and len(cb) == 4
    torch.testing.assert_close(cb.keys.norm(dim=1), torch.ones(4))
    assert cb.add(torch.randn(8), torch.randn(3)).tolist() == [4]  # single entry, 1-D


def test_ids_survive_removal_and_are_never_reused():
    cb, keys, ids = filled()
    cb.remove([3, 7, 19])
    assert len(cb) == 17 and 3 not in cb and 4 in cb
    torch.testing.assert_close(cb.get_keys([4, 18]), keys[[4, 18]] / keys[[4, 18]].norm(dim=1, keepdim=True))
    assert cb.get_labels([18, 0]) == [(18, 19), (0, 1)]
    new = cb.add(torch.randn(2, 16), torch.randn(2, 4))
    assert new.tolist() == [20, 21]
    with pytest.raises(KeyError, match="id 3"):
        cb.remove([3])
    with pytest.raises(KeyError, match="id 99"):
        cb.get_values([99])


def test_retrieve_reports_ids_after_removals():
    cb, keys, ids = filled(n=50, dk=32)
    cb.remove(list(range(0, 50, 3)))
    live = cb.ids
    q = keys[live] + 0.01 * torch.randn(len(live), 32)
    res = cb.retrieve(q)
    exp = oracle_retrieve(q.double().numpy(), cb.keys.double().numpy())
    expected_ids = np.where(exp.matched, np.array(live)[np.maximum(exp.index, 0)], -1)
    ok = ~exp.knife
    assert (res.index.numpy()[ok] == expected_ids[ok]).all()
    assert exp.matched.sum() > 20


def test_retrieve_options_override_saved_defaults():
    cb, keys, _ = filled(threshold=0.99)
    q = keys[:5] + 0.3 * torch.randn(5, 16)
    strict = cb.retrieve(q)
    loose = cb.retrieve(q, threshold=-1.0)
    assert loose.matched.all() and strict.matched.sum() <= loose.matched.sum()
    with pytest.raises(TypeError, match="unknown retrieve option"):
        cb.retrieve(q, tau=0.5)


def test_value_rows_gathers_by_id_on_device():
    cb, _, _ = filled()
    cb.remove([0, 5])
    index = torch.tensor([7, -1, 19])
    rows = cb.value_rows(index)
    torch.testing.assert_close(rows[0], cb.get_values([7])[0])
    assert (rows[1] == 0).all()
    torch.testing.assert_close(rows[2], cb.get_values([19])[0])


def test_update_in_place_keeps_id():
    cb, _, _ = filled()
    k = torch.randn(16)
    cb.update(4, key=k, value=torch.ones(4), label=[9])
    torch.testing.assert_close(cb.get_keys([4])[0], k / k.norm())
    assert cb.get_values([4]).tolist() == [[1.0] * 4] and cb.get_labels([4]) == [(9,)]


def test_hundred_thousand_adds_reallocate_logarithmically():
    cb = Codebook(4, 2)
    k, v = torch.randn(1, 4), torch.randn(1, 2)
    for _ in range(100_000):
        cb.add(k, v)
    assert len(cb) == 100_000
    # storage doubling (keys, values and ids grow together) and the id table: about 2 log2(N)
    assert cb.reallocations <= 2 * (int(np.log2(100_000 / 16)) + 2)
    for _ in range(50_000):
        cb.remove([cb.ids[-1]])
    assert len(cb) == 50_000


@pytest.mark.parametrize("kwargs", [
    dict(key_dim=0, value_dim=2), dict(key_dim=4, value_dim=-1), dict(key_dim=4, value_dim=2, dtype=torch.int32),
    dict(key_dim=4, value_dim=2, beta=0.0), dict(key_dim=4, value_dim=2, alpha=2.0),
])
def test_bad_construction_is_rejected(kwargs):
    with pytest.raises((ValueError, TypeError)):
        Codebook(**kwargs)


def test_bad_adds_are_rejected():
    cb = Codebook(4, 2)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        cb.add(torch.randn(2, 5), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        cb.add(torch.randn(2, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match="zero or not finite"):
        cb.add(torch.zeros(1, 4), torch.randn(1, 2))
    with pytest.raises(ValueError, match="labels"):
        cb.add(torch.randn(2, 4), torch.randn(2, 2), labels=[[1]])
    with pytest.raises(TypeError):
        cb.add(torch.ones(1, 4, dtype=torch.long), torch.randn(1, 2))
    assert len(cb) == 0  # nothing half-added


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_save_load_round_trip(tmp_path, dtype):
    cb, keys, _ = filled(dtype=dtype, threshold=0.7, steps=2)
    cb.remove([2, 11])
    cb.update(5, label=None)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    back = Codebook.load(path)
    assert back.ids == cb.ids and back.dtype == dtype and back.config == cb.config
    assert torch.equal(back.keys, cb.keys) and torch.equal(back.values, cb.values)
    assert back.get_labels(back.ids) == cb.get_labels(cb.ids)
    assert back.add(torch.randn(1, 16), torch.randn(1, 4)).tolist() == [20]
    q = keys[:8] + 0.05 * torch.randn(8, 16)
    a, b = cb.retrieve(q), back.retrieve(q)
    assert torch.equal(a.index, b.index)


def test_empty_codebook_round_trip_and_retrieve(tmp_path):
    cb = Codebook(6, 3)
    res = cb.retrieve(torch.randn(2, 6))
    assert res.index.tolist() == [-1, -1]
    cb.save(tmp_path / "e.safetensors")
    assert len(Codebook.load(tmp_path / "e.safetensors")) == 0


def _corrupt(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_file_is_rejected(tmp_path):
    cb, _, _ = filled()
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    _corrupt(path)
    with pytest.raises(HoReNFileError, match="checksum") as err:
        Codebook.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep", [0, 5, 100, -40])
def test_truncated_file_is_rejected(tmp_path, keep):
    cb, _, _ = filled()
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(HoReNFileError) as err:
        Codebook.load(path)
    assert str(path) in str(err.value)


def _rewrite_metadata(path, change):
    """Rewrite the JSON metadata of a saved codebook (re-checksummed, so only the named check fires)."""
    from horen_fast._files import load_tensors, save_tensors
    tensors, meta = load_tensors(path, "horen_fast.Codebook")
    change(meta, tensors)
    save_tensors(path, tensors, meta)


def test_wrong_version_and_wrong_shape_are_rejected(tmp_path):
    cb, _, _ = filled()
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    _rewrite_metadata(path, lambda m, t: m.update(format_version=99))
    with pytest.raises(HoReNFileError, match="format version 99"):
        Codebook.load(path)
    cb.save(path)
    _rewrite_metadata(path, lambda m, t: m.update(key_dim=17))
    with pytest.raises(HoReNFileError, match="'keys' has shape"):
        Codebook.load(path)
    with pytest.raises(HoReNFileError, match="no such file"):
        Codebook.load(tmp_path / "missing.safetensors")
    (tmp_path / "other.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    with pytest.raises(HoReNFileError):
        Codebook.load(tmp_path / "other.safetensors")


def test_no_pickle_in_files(tmp_path):
    cb, _, _ = filled()
    cb.save(tmp_path / "cb.safetensors")
    header_len = int.from_bytes((tmp_path / "cb.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "cb.safetensors").read_bytes()[8:8 + header_len])
    assert "horen_fast" in header["__metadata__"]


def test_save_killed_midway_leaves_previous_file_loadable(tmp_path):
    """A process killed while writing a large codebook over an existing file leaves the old one."""
    path = tmp_path / "cb.safetensors"
    small, _, _ = filled(n=7)
    small.save(path)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from horen_fast import Codebook
        cb = Codebook(2048, 2048)
        cb.add(torch.randn(3000, 2048), torch.randn(3000, 2048))
        print("ready", flush=True)
        while True:
            cb.save({str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    loaded = Codebook.load(path)
    assert len(loaded) in (7, 3000)  # the old file, or a complete new one: never a torn file
    assert loaded.key_dim in (16, 2048)


def test_saved_files_follow_the_umask_and_killed_writers_leave_no_orphans(tmp_path):
    """A save gets the mode open() would give (0o666 less the umask), not mkstemp's 0o600; the
    temporary file a SIGKILLed writer left is removed by the next save of that file."""
    import os

    path = tmp_path / "cb.safetensors"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from horen_fast._files import atomic_path
        with atomic_path({str(path)!r}) as tmp:
            open(tmp, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    orphans = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(orphans) == 1 and not path.exists()
    cb, _, _ = filled(n=5)
    old = os.umask(0o027)
    try:
        cb.save(path)
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the orphan is gone
    assert (path.stat().st_mode & 0o777) == 0o640
    cb.save(path)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~old
    assert len(Codebook.load(path)) == 5


def test_deepcopy_has_its_own_storage_lock_and_prefilter():
    import copy
    pytest.importorskip("faiss")
    cb = Codebook(16, 3, prefilter={"index": "flat", "candidates": 4})
    keys = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    ids = cb.add(keys, torch.randn(20, 3), labels=[(i,) for i in range(20)])
    twin = copy.deepcopy(cb)
    assert twin.ids == cb.ids and torch.equal(twin.keys, cb.keys) and torch.equal(twin.values, cb.values)
    assert twin._lock is not cb._lock and twin.prefilter is not cb.prefilter
    assert torch.equal(twin.retrieve(keys[:5]).index, cb.retrieve(keys[:5]).index)
    twin.remove([int(ids[0])])
    assert len(twin) == 19 and len(cb) == 20 and int(ids[0]) in cb
