"""A Codebook survives what used to corrupt it: failed growth, concurrent callers, crafted files,
coerced labels, NaN values, and tensors that require grad."""
import gc
import os
import textwrap
import subprocess
import sys
import threading
import weakref

from pathlib import Path

import numpy as np
import pytest
import torch

from horen_fast import Codebook
from horen_fast._files import HoReNFileError, load_tensors, save_tensors

# ---- a failed capacity doubling ------------------------------------------------------------

_GROWTH = r"""
import resource, sys, torch
torch.set_num_threads(1)
from horen_fast import Codebook

def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024

D = 1 << 20  # 4 MiB a value row: capacity 16 -> 64 MiB, 32 -> 128 MiB, 64 -> 256 MiB
cb = Codebook(8, D, backend="torch", threshold=0.5)
row = torch.ones(1, 1).expand(1, D)  # a view: adding it costs no memory beyond the codebook
keys = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
# room for growing 16 -> 32 (64 + 128 MiB held at once), not 32 -> 64 (128 + 256 MiB)
resource.setrlimit(resource.RLIMIT_AS, (vm() + 300 * 2**20, resource.RLIM_INFINITY))
for i in range(32):
    cb.add(keys[i], row * i)
assert len(cb) == 32 and cb.capacity == 32
try:
    cb.add(keys[32], row * 32)
except MemoryError as e:
    assert "from 32 to 64 entries" in str(e) and "unchanged" in str(e), e
    print("MemoryError:", str(e).splitlines()[0][:200])
else:
    sys.exit("no MemoryError")
# the codebook is whole: the same entries, retrievable, removable; later adds still fail cleanly
assert len(cb) == 32 and cb.ids == list(range(32)) and cb.capacity == 32
res = cb.retrieve(keys[:32])
assert res.index.tolist() == list(range(32)), res.index.tolist()
assert cb.get_values([7])[0, :3].tolist() == [7.0, 7.0, 7.0]
try:
    cb.add(keys[33], row)
except MemoryError:
    pass
else:
    sys.exit("the second add should fail too")
assert len(cb) == 32
cb.remove([0, 5])  # fully applied: the last entries moved into the holes
assert len(cb) == 30 and 0 not in cb and 5 not in cb
assert cb.retrieve(keys[31]).index.tolist() == [31] and cb.retrieve(keys[1]).index.tolist() == [1]
ids = cb.add(keys[34:36], row.expand(2, D) * 3)  # fits in the capacity left: no growth needed
assert ids.tolist() == [32, 33] and cb.retrieve(keys[35]).index.tolist() == [33]
assert cb.get_values([33])[0, 0].item() == 3.0
print("ok")
"""


def test_failed_growth_raises_memory_error_and_leaves_the_codebook_whole():
    """A real allocation failure (an address-space limit in a child process) while the values
    buffer doubles: MemoryError with the sizes, and the codebook stays usable (the old code had
    swapped the bigger keys buffer in; later adds stored nothing, retrieve/remove raised)."""
    out = subprocess.run([sys.executable, "-c", _GROWTH], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout[-2000:], out.stderr[-3000:])
    assert "bytes for keys [8], values [1048576]" in out.stdout


# ---- concurrent callers --------------------------------------------------------------------

@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up quickly
    yield
    sys.setswitchinterval(old)


def _unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _run_threads(*targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001  (reported below)
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors


def test_two_threads_adding_lose_nothing(fast_switching):
    d, per = 16, 1500
    cb = Codebook(d, 2, backend="torch")
    keys = [_unit(per, d, 1), _unit(per, d, 2)]
    got = [[], []]

    def adder(t):
        def run():
            for i in range(per):
                got[t].append(int(cb.add(keys[t][i], torch.full((2,), float(t)), [t, i])[0]))
        return run

    _run_threads(adder(0), adder(1))
    all_ids = got[0] + got[1]
    assert len(cb) == 2 * per and sorted(all_ids) == list(range(2 * per))  # no lost or doubled id
    assert sorted(cb.ids) == list(range(2 * per))
    for t in range(2):  # every entry holds what its add gave
        torch.testing.assert_close(cb.get_keys(got[t]), keys[t], rtol=0, atol=1e-6)
        assert cb.get_labels(got[t]) == [(t, i) for i in range(per)]
        assert bool((cb.get_values(got[t]) == float(t)).all())


def test_add_remove_and_retrieve_in_threads_stay_consistent(fast_switching):
    d, rounds = 16, 1500
    cb = Codebook(d, 2, backend="torch", threshold=0.99)
    base = _unit(200, d, 3)
    base_ids = cb.add(base, torch.zeros(200, 2)).tolist()
    extra = _unit(rounds, d, 4)
    wrong = []

    def churn():
        for i in range(rounds):
            (j,) = cb.add(extra[i], torch.ones(2)).tolist()
            cb.remove([j])

    def remove_half():
        for j in base_ids[::2]:
            cb.remove([j])

    def reader():
        for i in range(rounds):
            res = cb.retrieve(base[1::2][i % 100])
            if res.index.tolist() != [base_ids[1::2][i % 100]]:
                wrong.append(res.index.tolist())

    _run_threads(churn, remove_half, reader)
    assert not wrong, wrong[:5]
    assert sorted(cb.ids) == base_ids[1::2] and len(cb) == 100
    torch.testing.assert_close(cb.get_keys(base_ids[1::2]), base[1::2], rtol=0, atol=1e-6)
    assert cb.retrieve(base).index.tolist() == [-1 if i % 2 == 0 else base_ids[i] for i in range(200)]


# ---- crafted files -------------------------------------------------------------------------

def _saved(tmp_path, n=6, d=8):
    cb = Codebook(d, 3)
    cb.add(torch.randn(n, d), torch.randn(n, 3), [[i, i + 1] for i in range(n)])
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    return path


def _craft(path, tmp_path, change):
    """The same writer (valid checksum), with contents changed by ``change(tensors, meta)``."""
    tensors, meta = load_tensors(path, "horen_fast.Codebook")
    tensors = {k: v.clone() for k, v in tensors.items()}
    change(tensors, meta)
    out = tmp_path / "crafted.safetensors"
    save_tensors(out, tensors, meta)
    return out


def _resign(t, m):  # one key re-signed with norm 100: it used to match half of all queries
    t["keys"][2] *= 100.0


def _nan_key(t, m):
    t["keys"][1, 0] = float("nan")


def _nan_value(t, m):
    t["values"][4, 2] = float("nan")


def _dup_ids(t, m):
    t["ids"][3] = t["ids"][0]


def _id_past_next(t, m):
    t["ids"][0] = m["next_id"]


def _negative_token(t, m):
    t["label_tokens"][0] = -7


def _bad_length(t, m):
    t["label_lengths"][0] = -2
    t["label_lengths"][1] = 4


def _int32_ids(t, m):
    t["ids"] = t["ids"].to(torch.int32)


def _float_count(t, m):
    m["count"] = 6.0


@pytest.mark.parametrize("change,message", [
    (_resign, r"keys rows \[2\] are not unit norm"), (_nan_key, r"keys rows \[1\] are zero or not finite"),
    (_nan_value, r"values rows \[4\] are not finite"), (_dup_ids, "distinct"), (_id_past_next, "next_id"),
    (_negative_token, "out of range"), (_bad_length, "labels do not add up"), (_int32_ids, "int64"),
    (_float_count, "count must be an integer")])
def test_crafted_files_are_checked_like_adds(tmp_path, change, message):
    crafted = _craft(_saved(tmp_path), tmp_path, change)
    with pytest.raises(HoReNFileError, match=message):
        Codebook.load(crafted)


def test_a_non_unit_key_never_reaches_a_backend(tmp_path):
    """The issue's case: a key re-signed with norm 100 in a file matched 506 of 1,000 random
    queries. Now the file is refused; the original file answers as the float64 oracle does."""
    from oracle import oracle_retrieve

    path = _saved(tmp_path, n=50, d=16)
    with pytest.raises(HoReNFileError, match="not unit norm"):
        Codebook.load(_craft(path, tmp_path, _resign))
    cb = Codebook.load(path)
    q = torch.randn(1000, 16, generator=torch.Generator().manual_seed(9))
    exp = oracle_retrieve(q.double().numpy(), cb.keys.double().numpy(), threshold=0.5)
    got = cb.retrieve(q, threshold=0.5)
    ok = ~exp.knife
    ids = np.array(cb.ids)
    assert np.array_equal(got.index.numpy()[ok], np.where(exp.index >= 0, ids[np.maximum(exp.index, 0)], -1)[ok])


# ---- what add and update accept ------------------------------------------------------------

@pytest.mark.parametrize("label,kind,message", [
    (["42"], TypeError, "int token ids"), ("42", TypeError, "string"), ([1.7], TypeError, "int token ids"),
    ([2**70], ValueError, "out of range"), ([-1], ValueError, "out of range"), ([True], TypeError, "True"),
    (torch.tensor([1.0, 2.0]), TypeError, "tensor"), (np.array([1.5]), TypeError, "int token ids")])
def test_labels_are_not_coerced(label, kind, message):
    cb = Codebook(4, 2)
    with pytest.raises(kind, match=message):
        cb.add(torch.randn(1, 4), torch.randn(1, 2), [label])
    (i,) = cb.add(torch.randn(1, 4), torch.randn(1, 2), [[5]]).tolist()
    with pytest.raises(kind, match=message):
        cb.update(i, label=label)
    assert len(cb) == 1 and cb.get_labels([i]) == [(5,)]


def test_accepted_labels_round_trip(tmp_path):
    cb = Codebook(4, 2)
    labels = [[np.int64(3), 4], torch.tensor([5, 6]), (2**63 - 1,), [], None, 7]
    ids = cb.add(torch.randn(6, 4), torch.randn(6, 2), labels)
    expect = [(3, 4), (5, 6), (2**63 - 1,), (), None, (7,)]
    assert cb.get_labels(ids) == expect
    cb.save(tmp_path / "a.safetensors")  # a 2**70 label used to make every later save fail
    assert Codebook.load(tmp_path / "a.safetensors").get_labels(ids) == expect


def test_update_takes_exactly_one_row_and_finite_values():
    cb = Codebook(4, 2)
    (i,) = cb.add(torch.randn(1, 4), torch.ones(1, 2)).tolist()
    key = cb.get_keys([i]).clone()
    with pytest.raises(ValueError, match=r"keys must be \[1, 4\]"):
        cb.update(i, key=torch.randn(2, 4))  # used to take row 0 silently
    with pytest.raises(ValueError, match=r"values must be \[1, 2\]"):
        cb.update(i, value=torch.randn(3, 2))
    with pytest.raises(ValueError, match="not finite"):
        cb.update(i, value=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="not finite"):
        cb.update(i, key=torch.tensor([1.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="not finite"):
        cb.add(torch.randn(2, 4), torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))
    assert len(cb) == 1 and torch.equal(cb.get_keys([i]), key) and cb.get_values([i]).tolist() == [[1.0, 1.0]]


def test_ids_are_not_coerced():
    cb = Codebook(4, 2)
    cb.add(torch.randn(3, 4), torch.randn(3, 2))
    for bad in ([1.5], [True], ["1"], torch.tensor([1.0])):
        with pytest.raises(TypeError, match="integers"):
            cb.remove(bad)  # 1.5 used to remove entry 1
    with pytest.raises(TypeError, match="integers"):
        cb.add(torch.randn(1, 4), torch.randn(1, 2), ids=[7.0])
    assert cb.ids == [0, 1, 2]
    cb.remove(torch.tensor([1]))
    cb.remove([np.int64(2)])
    assert cb.ids == [0]


# ---- autograd ------------------------------------------------------------------------------

def test_tensors_that_require_grad_are_not_kept_alive():
    """add/update copy detached data: the codebook holds no autograd graph, so 1,000 add/remove
    cycles of tensors that require grad leave nothing behind (the old code kept every one alive
    through the graph of in-place copies into its buffers)."""
    cb = Codebook(64, 256, backend="torch")
    keep = cb.add(torch.randn(1, 64), torch.zeros(1, 256))
    refs = []
    for i in range(1000):
        k = torch.randn(1, 64, requires_grad=True)
        v = (torch.randn(1, 256, requires_grad=True) * 2.0)  # a non-leaf: it carries a graph
        refs.append(weakref.ref(v))
        (j,) = cb.add(k, v).tolist()
        cb.update(int(keep[0]), value=v[0], key=k[0])
        cb.remove([j])
        del k, v
    gc.collect()
    assert not cb.values.requires_grad and not cb.keys.requires_grad
    assert cb.values.grad_fn is None and cb.retrieve(torch.randn(2, 64)).score.grad_fn is None
    assert sum(r() is not None for r in refs) == 0


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to run a child as another user")
def test_an_unreadable_file_says_permission_denied_not_corrupted():
    """A mode-000 file, read by an unprivileged user (a child process that drops root)."""
    import shutil
    import tempfile
    tmp_path = Path(tempfile.mkdtemp(prefix="horen-mode000-", dir="/tmp"))
    path = tmp_path / "cb.safetensors"
    cb = Codebook(4, 2)
    cb.add(torch.eye(4)[:1], torch.zeros(1, 2))
    cb.save(path)
    os.chmod(path, 0)
    os.chmod(tmp_path, 0o755)
    code = textwrap.dedent(f"""
        import os, sys
        from horen_fast import Codebook
        from horen_fast._files import HoReNFileError
        os.setgid(65534); os.setuid(65534)     # everything is imported: now read as "nobody"
        try:
            Codebook.load({str(path)!r})
        except HoReNFileError as e:
            print(e)
        """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "permission denied (mode 000)" in out.stdout and "corrupted" not in out.stdout
