"""The fused C++ CPU kernel (csrc/retrieve) against the float64 oracle, on every instruction set
this CPU has (HOREN_FAST_CPU_ISA), with shapes that hit every tail of its loops."""
import os

import numpy as np
import pytest
import torch

from horen_fast import native, retrieve
from horen_fast.backends import cpp
from horen_fast.dispatch import NotSupportedError
from oracle import anisotropic_keys, assert_agrees, mixed_queries, oracle_retrieve, unit

pytestmark = pytest.mark.skipif(not native.RETRIEVE_BUILT, reason="the C++ extension is not built")

ISAS = native.supported_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("HOREN_FAST_CPU_ISA", request.param)
    assert native.cpu_isa() == request.param
    return request.param


def check(keys, queries, context="", **kw):
    res = retrieve(queries, keys, backend="cpp", **kw)
    exp = oracle_retrieve(queries.double().numpy(), keys.double().numpy(), **kw)
    assert_agrees(res, exp, context=context)
    return res, exp


def case(seed, n, d, b, dtype=torch.float32, qdtype=torch.float32):
    rng = np.random.default_rng(seed)
    keys = torch.tensor(anisotropic_keys(rng, n, d)).to(dtype)
    queries = torch.tensor(mixed_queries(rng, keys.double().numpy(), b, d)).to(qdtype)
    return keys, queries


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,b", [
    (1, 1, 2), (5, 3, 4), (13, 17, 7), (37, 31, 5), (101, 33, 9), (70, 63, 3), (45, 65, 6),
    (9, 129, 5), (300, 97, 256), (19, 14336, 2), (150, 4099, 3),
])
def test_shapes_tails_and_dtypes(isa, dtype, n, d, b):
    """Odd widths (vector and pair tails), N not a multiple of any tile, B up to 256."""
    keys, queries = case(n * 7 + d + b, n, d, b, dtype)
    check(keys, queries, f"{isa} {dtype} n={n} d={d} b={b}")


@pytest.mark.parametrize("steps", [0, 1, 2, 4])
def test_steps_and_random_hyper_parameters(isa, steps):
    rng = np.random.default_rng(steps)
    for _ in range(3):
        n, d, b = int(rng.integers(1, 400)), int(rng.integers(1, 200)), int(rng.integers(1, 40))
        keys, queries = case(int(rng.integers(1 << 30)), n, d, b)
        kw = dict(steps=steps, beta=float(rng.uniform(0.5, 50)), alpha=float(rng.uniform(0.01, 1.0)),
                  threshold=float(rng.uniform(0.3, 0.99)))
        check(keys, queries, f"{isa} n={n} d={d} b={b} {kw}", **kw)


def test_query_dtypes_follow_compute_dtype(isa):
    for qdtype, kdtype, expected in [(torch.float64, torch.bfloat16, torch.float64),
                                     (torch.float16, torch.float16, torch.float32),
                                     (torch.bfloat16, torch.float64, torch.float64)]:
        keys, queries = case(5, 80, 40, 6, kdtype, qdtype)
        res, _ = check(keys, queries, f"{isa} q={qdtype} k={kdtype}")
        assert res.score.dtype == expected


def test_bound_scoring_with_many_candidates(isa):
    """A low threshold and clustered keys: nearly every key's bound clears the threshold, so the
    rescoring walks many candidates in bound order."""
    keys, queries = case(11, 600, 48, 16)
    for tau in (-1.0, 0.0, 0.3, 0.6):
        check(keys, queries, f"{isa} tau={tau}", threshold=tau)


def test_bound_scoring_with_few_candidates(isa):
    """Paraphrase queries against many unrelated keys: few candidates; unrelated queries: none."""
    rng = np.random.default_rng(12)
    k = unit(rng.standard_normal((2000, 64)))
    q = np.concatenate([k[:8] + 0.2 * unit(rng.standard_normal((8, 64))), rng.standard_normal((8, 64))])
    res, exp = check(torch.tensor(k, dtype=torch.float32), torch.tensor(q, dtype=torch.float32), isa,
                     threshold=0.8)
    assert exp.matched[:8].all() and not exp.matched[8:].any()
    assert res.index[:8].tolist() == list(range(8))


def test_ties_after_a_step_pick_the_lowest_index(isa):
    """Exact duplicates among the best keys: the bound walk must still return the lowest index."""
    rng = np.random.default_rng(4)
    k = anisotropic_keys(rng, 300, 32)
    k[250] = k[40]
    k[120] = k[40]
    q = k[40] + 0.1 * unit(rng.standard_normal(32))
    for steps in (0, 1, 3):
        res = retrieve(torch.tensor(q[None]), torch.tensor(k), backend="cpp", steps=steps, threshold=0.5)
        assert res.index.item() == 40


def test_keys_that_are_not_unit_norm(isa):
    """The bound uses each key's norm, so keys of any norm are scored exactly like the oracle."""
    rng = np.random.default_rng(8)
    k = anisotropic_keys(rng, 400, 24) * rng.uniform(0.3, 1.5, (400, 1))
    q = mixed_queries(rng, k, 24, 24)
    for tau in (0.5, 0.85, 1.2):
        check(torch.tensor(k), torch.tensor(q, dtype=torch.float32).double(), f"{isa} tau={tau}", threshold=tau)


def test_stop_rule_extremes(isa):
    keys, queries = case(21, 200, 40, 12)
    check(keys, queries, "eps=10: every row stops at once", eps=10.0, steps=3)
    check(keys, queries, "eps=0: no row stops", eps=0.0, steps=3)


def test_strided_keys_are_read_in_place(isa):
    """A row-strided view (a slice of a wider buffer) goes to the kernel without a copy, and the
    padding columns beside it are never read (they hold NaN here)."""
    keys, queries = case(31, 150, 37, 8)
    for dtype in DTYPES:
        buf = torch.full((150, 50), float("nan"), dtype=dtype)
        buf[:, 5:42] = keys.to(dtype)
        view = buf[:, 5:42]
        assert not view.is_contiguous()
        assert cpp.kernel_keys(view, torch.float32).data_ptr() == view.data_ptr()
        res = retrieve(queries, view, backend="cpp")
        ref = retrieve(queries, keys.to(dtype).contiguous(), backend="cpp")
        assert torch.equal(res.index, ref.index)
        torch.testing.assert_close(res.score, ref.score, equal_nan=True, rtol=0, atol=0)
        check(view, queries, f"{isa} strided {dtype}")


def test_other_layouts_are_handled(isa):
    keys, queries = case(32, 120, 24, 10)
    transposed = keys.T.contiguous().T  # columns strided: copied once
    assert transposed.stride(1) != 1
    check(transposed, queries, "column-strided keys")
    check(keys, queries.T.contiguous().T, "column-strided queries")
    check(keys, torch.cat([queries, queries])[::2], "row-strided queries")
    one = keys[:1].expand(30, -1)  # row stride 0: 30 identical keys, ties -> index 0
    res = retrieve(keys[:1] * 3, one, backend="cpp")
    assert res.index.item() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_loops_agree_with_single_row_loops(isa, dtype):
    """Passes of 8 or more rows run the batched loops (csrc/retrieve/batched.h: blocks of 8 packed
    rows, d in chunks), fewer rows the single-row loops. Row counts around the blocks, d with
    several chunks and a partial last vector, tiny tiles on two threads (every tile edge and
    prefetch): each agrees with the oracle, and every row with the same row retrieved alone."""
    keys, queries = case(61, 150, 1029, 17, dtype)
    alone = [retrieve(queries[b:b + 1], keys, backend="cpp", threshold=0.5) for b in range(17)]
    before = torch.get_num_threads()
    try:
        for tiny in (False, True):
            if tiny:
                native.set_tuning(tile_bytes=1, work_per_thread=1)
                torch.set_num_threads(2)
            for rows in (8, 9, 15, 16, 17):
                res, exp = check(keys, queries[:rows], f"{isa} {dtype} rows={rows} tiny={tiny}", threshold=0.5)
                for b in np.flatnonzero(~exp.knife):
                    assert res.index[b] == alone[b].index[0], f"row {b} of {rows}"
                    assert abs(float(res.score[b]) - float(alone[b].score[0])) <= 1e-5 or (
                        res.score[b].isnan() and alone[b].score[0].isnan())
    finally:
        torch.set_num_threads(before)
        native.set_tuning()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_query_scan_in_groups(isa, dtype):
    """One query scans the keys in groups of 4 keys (2 when 4 do not fit in a tile), scoring
    each group in the sweep that adds the group before to the sums: N around the groups and the
    two threads' parts, widths with vector and pair tails, default and tiny tiles (groups of 2)."""
    before = torch.get_num_threads()
    try:
        for tiny in (False, True):
            if tiny:
                native.set_tuning(tile_bytes=1, work_per_thread=1)
                torch.set_num_threads(2)
            for n, d in [(1, 5), (3, 40), (4, 17), (7, 64), (9, 33), (13, 1029), (18, 48), (41, 65)]:
                keys, queries = case(n * 13 + d, n, d, 2, dtype)
                for b in range(2):
                    check(keys, queries[b:b + 1], f"{isa} {dtype} n={n} d={d} row={b} tiny={tiny}",
                          threshold=0.5)
    finally:
        torch.set_num_threads(before)
        native.set_tuning()


def test_thread_count_does_not_change_the_result():
    # large enough (2 N d B multiply-adds > 64M) for the kernel to split the keys across threads
    g = torch.Generator().manual_seed(41)
    keys = torch.nn.functional.normalize(torch.randn(40_000, 128, generator=g) + 2.0, dim=1)
    queries = torch.cat([keys[:4] + 0.1 * torch.randn(4, 128, generator=g), torch.randn(4, 128, generator=g)])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = retrieve(queries, keys, backend="cpp")
        torch.set_num_threads(max(2, before))
        many = retrieve(queries, keys, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.index, many.index)
    torch.testing.assert_close(one.score, many.score, equal_nan=True, atol=1e-6, rtol=0)


def test_isa_switch_errors(monkeypatch):
    """A bad or unsupported HOREN_FAST_CPU_ISA is a reason: a forced "cpp" refuses with it, "auto"
    falls back to torch and says why."""
    keys = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    queries = torch.randn(2, 8)
    monkeypatch.setenv("HOREN_FAST_CPU_ISA", "sse9")
    with pytest.raises(NotSupportedError, match="HOREN_FAST_CPU_ISA='sse9'"):
        retrieve(queries, keys, backend="cpp")
    with pytest.raises(ValueError, match="HOREN_FAST_CPU_ISA"):
        native.cpu_isa()
    with pytest.warns(RuntimeWarning, match="sse9"):
        res = retrieve(queries, keys, threshold=-1.0)
    ref = retrieve(queries, keys, backend="torch", threshold=-1.0)
    assert torch.equal(res.index, ref.index)
    for isa in ("avx512", "avx512bf16", "amx", "avx2"):
        if isa not in ISAS:
            monkeypatch.setenv("HOREN_FAST_CPU_ISA", isa)
            with pytest.raises(NotSupportedError, match="does not support"):
                retrieve(queries, keys, backend="cpp")


def _sysfs_l2_per_core():
    """One core's L2 in bytes from /sys (None off Linux), read independently of csrc/common/machine.h."""
    import glob
    import os

    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        read = lambda name: open(os.path.join(d, name)).read().strip()  # noqa: E731
        if read("level") == "2" and read("type") != "Instruction":
            size = read("size")
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
            sharing = 0
            for part in read("shared_cpu_list").split(","):
                lo, _, hi = part.partition("-")
                sharing += int(hi or lo) - int(lo) + 1
            return int(size.rstrip("KM")) * scale // max(sharing, 1)
    return None


def _fixed(m):
    return {k: v for k, v in m.items() if k != "threads_late"}


def test_the_work_per_thread_is_measured_on_this_machine():
    m = native.machine()
    assert m["fork_join_ns"] >= 0 and m["mac_rate"] > 1e8
    assert 64 << 10 <= m["measured_work_per_thread"] <= 4 << 20
    assert m["work_per_thread"] == m["measured_work_per_thread"]
    assert m["long_work"] >= 16 * m["work_per_thread"] and isinstance(m["threads_late"], bool)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("b", [1, 12])
def test_how_many_threads_run_the_parts_does_not_change_a_bit(b):
    """The keys are split into parts fixed by the threads asked for (and the CPUs and N); one
    thread or two running them (the work per thread, or the late-worker guard, decides) give the
    same bits."""
    keys, queries = case(77, 3001, 96, b)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        native.set_tuning(work_per_thread=1)
        two = retrieve(queries, keys, backend="cpp", threshold=0.2)
        native.set_tuning(work_per_thread=1 << 40)
        one = retrieve(queries, keys, backend="cpp", threshold=0.2)
    finally:
        torch.set_num_threads(before)
        native.set_tuning()
    assert torch.equal(one.index, two.index) and torch.equal(one.matched, two.matched)
    torch.testing.assert_close(one.score, two.score, rtol=0, atol=0, equal_nan=True)   # bit for bit
    assert bool(one.matched.any())


def test_tuning_follows_the_machine_and_can_be_overridden():
    m = native.machine()
    l2 = _sysfs_l2_per_core()
    if l2 is not None:
        assert m["cache_source"] == "sysfs" and m["l2_bytes"] == l2
    assert m["l2_bytes"] > 0 and m["tile_bytes"] == m["l2_bytes"] // 4 and m["work_per_thread"] > 0
    keys, queries = case(51, 700, 48, 12)
    before = torch.get_num_threads()
    default = retrieve(queries, keys, backend="cpp", threshold=0.3)
    try:  # tiles of 8 keys, a thread for any work: every tail and split of the loops
        native.set_tuning(tile_bytes=1, work_per_thread=1)
        assert native.machine()["tile_bytes"] == 1
        torch.set_num_threads(2)
        res, _ = check(keys, queries, "tiny tiles, threads for any work", threshold=0.3)
        assert torch.equal(res.index, default.index)
    finally:
        torch.set_num_threads(before)
        native.set_tuning()
    assert _fixed(native.machine()) == _fixed(m)
    with pytest.raises(ValueError, match="tile_bytes"):
        native.set_tuning(tile_bytes=-1)


# ---- auto's choice of the bfloat16 split scores (horen_fast.native.retrieve_isa) -------------------
@pytest.mark.skipif("avx512bf16" not in ISAS, reason="this CPU lacks AVX512_BF16")
def test_the_split_speedup_is_measured_per_split_isa_and_key_dtype():
    s = native.split_speedup()
    assert set(s) == {i for i in native.SPLIT_ISAS if i in ISAS}
    for per_dtype in s.values():
        assert set(per_dtype) == {"bfloat16", "float32"}
        assert all(0.05 < v < 50 for v in per_dtype.values()), s
    assert native.split_speedup() == s  # measured once per process
    with pytest.raises(ValueError, match="avx512bf16' or 'amx'"):
        native._retrieve_ext.split_speedup("avx2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_takes_the_split_only_where_it_measured_faster(dtype, monkeypatch):
    monkeypatch.delenv("HOREN_FAST_CPU_ISA", raising=False)
    keys, queries = case(41, 300, 200, 16, dtype)
    got = native.retrieve_isa(queries, keys)
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    cleared = {isa: v[name] for isa, v in native.split_speedup().items()
               if v[name] >= native.SPLIT_MIN_SPEEDUP[isa][name]}
    assert got == (max(cleared, key=cleared.get) if cleared else native.best_isa())
    assert native.retrieve_isa(queries[:7], keys) == native.best_isa()  # fewer than 8 rows: no batched loops
    assert native.retrieve_isa(queries.double(), keys.double()) == native.best_isa()
    auto = retrieve(queries, keys, backend="cpp")
    assert_agrees(auto, oracle_retrieve(queries.double().numpy(), keys.double().numpy()), context=f"auto {dtype}")
    monkeypatch.setenv("HOREN_FAST_CPU_ISA", got)  # auto ran exactly the path it names
    pinned = retrieve(queries, keys, backend="cpp")
    assert torch.equal(auto.index, pinned.index)
    assert torch.equal(auto.score.nan_to_num(-9), pinned.score.nan_to_num(-9))


def test_a_pinned_isa_is_never_changed_by_the_split_rule(monkeypatch):
    keys, queries = case(42, 100, 64, 16, torch.bfloat16)
    for isa in ISAS:
        monkeypatch.setenv("HOREN_FAST_CPU_ISA", isa)
        assert native.retrieve_isa(queries, keys) == isa
