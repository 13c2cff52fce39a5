"""A ShardedCodebook's ranks never diverge: bad entries raise the same error on every rank before
any rank stores them (real gloo process groups; collective and test timeouts, so a regression
fails instead of hanging)."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, fn, *args) -> None:
    """Run fn(rank, world, *args) in ``world`` gloo processes; fail (and kill them) after TIMEOUT_S."""
    port = _free_port()
    ctx = mp.start_processes(_worker, args=(world, port, fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _bad_entries_raise_everywhere(rank: int, world: int) -> None:
    from horen_fast.sharded import ShardedCodebook

    g = torch.Generator().manual_seed(0)
    cb = ShardedCodebook(8, 3, backend="torch")
    cb.add(torch.randn(5, 8, generator=g), torch.randn(5, 3, generator=g))
    sizes = cb.sizes
    keys = torch.randn(4, 8, generator=g)
    keys[3, 2] = float("nan")  # the 4th new key would go to one rank only
    bad_values = torch.randn(4, 3, generator=g)
    bad_values[1, 0] = float("inf")
    cases = [(dict(keys=keys, values=torch.randn(4, 3)), ValueError, r"keys rows \[3\] are zero or not finite"),
             (dict(keys=keys.nan_to_num(), values=bad_values), ValueError, r"values rows \[1\] are not finite"),
             (dict(keys=keys.nan_to_num(), values=torch.randn(4, 3), labels=[[1], ["2"], [3], [4]]),
              TypeError, "int token ids"),
             (dict(keys=keys.nan_to_num(), values=torch.randn(4, 2)), ValueError, r"values must be \[4, 3\]")]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            cb.add(**kwargs)
        assert cb.sizes == sizes and len(cb.local) == sizes[rank]  # nothing stored anywhere
    # the ranks still agree: collectives work and the answer is the same everywhere
    q = torch.randn(3, 8, generator=g)
    res = cb.retrieve(q, threshold=-1.0)
    idx = res.index.clone()
    dist.all_reduce(idx, op=dist.ReduceOp.MAX)
    assert torch.equal(idx, res.index) and bool(res.matched.all())
    assert cb.add(keys.nan_to_num(), torch.randn(4, 3)).tolist() == [5, 6, 7, 8]
    with pytest.raises(TypeError, match="ids must be integers"):
        cb.remove([1.5])
    with pytest.raises(KeyError, match="not in the codebook"):
        cb.remove([1, 99])
    assert len(cb) == 9


def _ranks_given_different_entries(rank: int, world: int) -> None:
    """Not SPMD: only the last rank is given a NaN key. It raises its own error; every other rank
    raises one naming it, and nothing is stored."""
    from horen_fast.sharded import ShardedCodebook

    cb = ShardedCodebook(8, 3, backend="torch")
    keys = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    if rank == world - 1:
        keys[0, 0] = float("nan")
    with pytest.raises(ValueError, match="zero or not finite" if rank == world - 1
                       else rf"rank\(s\) \[{world - 1}\] rejected"):
        cb.add(keys, torch.zeros(4, 3))
    assert len(cb) == 0 and len(cb.local) == 0
    n = 3 if rank == 0 else 4  # different counts: every rank refuses
    with pytest.raises(ValueError, match="different numbers of entries"):
        cb.add(keys[:n].nan_to_num(), torch.zeros(n, 3))
    assert cb.add(keys.nan_to_num(), torch.zeros(4, 3)).tolist() == [0, 1, 2, 3]
    assert cb.retrieve(keys.nan_to_num()).index.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("world", [2, 3])
def test_bad_entries_raise_the_same_error_on_every_rank(world):
    _run(world, _bad_entries_raise_everywhere)


def test_ranks_given_different_entries_all_refuse():
    _run(2, _ranks_given_different_entries)
