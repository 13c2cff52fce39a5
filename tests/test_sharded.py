"""ShardedCodebook over gloo with 2 and 3 processes: equal to one Codebook, files, bad shards."""
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(world: int, tmp: str) -> None:
    sys.path.insert(0, HERE)
    from oracle import anisotropic_keys, mixed_queries, oracle_retrieve

    from horen_fast import Codebook
    from horen_fast._files import HoReNFileError
    from horen_fast.sharded import ShardedCodebook, _shard_name

    rank = dist.get_rank()
    # random cases: sizes below the world size (empty shards), several steps, betas, batches
    for case, (n, d, b, steps, beta) in enumerate([(1, 5, 3, 1, 20.0), (2, 16, 4, 2, 5.0),
                                                  (300, 64, 33, 1, 20.0), (700, 96, 17, 3, 40.0)]):
        rng = np.random.default_rng(1000 * world + case)
        keys = torch.tensor(anisotropic_keys(rng, n, d), dtype=torch.float32)
        values = torch.randn(n, 4, generator=torch.Generator().manual_seed(case))
        queries = torch.tensor(mixed_queries(rng, keys.double().numpy(), b, d), dtype=torch.float32)
        single = Codebook(d, 4, steps=steps, beta=beta, backend="torch")
        sharded = ShardedCodebook(d, 4, steps=steps, beta=beta, backend="torch")
        cut = n // 2  # two batches of adds
        for lo, hi in ((0, cut), (cut, n)):
            assert single.add(keys[lo:hi], values[lo:hi]).tolist() == \
                sharded.add(keys[lo:hi], values[lo:hi]).tolist()
        assert len(sharded) == n and max(sharded.sizes) - min(sharded.sizes) <= 1, sharded.sizes
        assert len(sharded.local) == sharded.sizes[rank]
        if n > 10:  # removals (the same ids on every rank)
            gone = list(range(0, n, 7))
            single.remove(gone)
            sharded.remove(gone)
            assert len(sharded) == len(single)
        a, e = sharded.retrieve(queries), single.retrieve(queries)
        live = np.array(single.ids)
        exp = oracle_retrieve(queries.double().numpy(), single.keys.double().numpy(), beta=beta, steps=steps)
        ok = ~exp.knife
        exp_ids = np.where(exp.index >= 0, live[np.maximum(exp.index, 0)], -1)
        assert np.array_equal(a.index.numpy()[ok], exp_ids[ok]), (world, case)
        assert np.array_equal(a.index.numpy()[ok], e.index.numpy()[ok]), (world, case)
        assert torch.allclose(a.score[a.matched], e.score[a.matched], atol=1e-5)
        # the values of the winners come from their ranks
        assert torch.equal(sharded.value_rows(a.index), single.value_rows(a.index))
        # every rank got the same answer
        idx = a.index.clone()
        dist.all_reduce(idx, op=dist.ReduceOp.MAX)
        assert torch.equal(idx, a.index)

    _ties(world, rank)

    # save and load with a manifest
    path = os.path.join(tmp, "sharded")
    sharded.save(path)
    back = ShardedCodebook.load(path)
    assert back.sizes == sharded.sizes and torch.equal(back.local.keys, sharded.local.keys)
    assert torch.equal(back.retrieve(queries).index, a.index)
    assert back.add(keys[:1], values[:1]).tolist() == [n]  # ids continue

    # a rank's shard corrupted, then missing: every rank fails clearly
    victim = os.path.join(path, _shard_name(world - 1, world))
    dist.barrier()
    if rank == 0:
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) - 3)
            f.write(b"\x00\x01\x02")
    dist.barrier()
    with pytest.raises(HoReNFileError, match="corrupted|rank"):
        ShardedCodebook.load(path)
    dist.barrier()
    if rank == 0:
        os.remove(victim)
    dist.barrier()
    with pytest.raises(HoReNFileError, match="missing" if rank == world - 1 else "rank"):
        ShardedCodebook.load(path)
    dist.barrier()
    if rank == 0:  # a manifest that says another number of ranks (with a valid checksum)
        import json

        from horen_fast.sharded import _json_checksum
        mpath = os.path.join(path, "manifest.json")
        m = json.load(open(mpath))
        m.pop("checksum")
        m["world_size"] = world + 1
        m["checksum"] = _json_checksum(m)
        json.dump(m, open(mpath, "w"))
    dist.barrier()
    with pytest.raises(HoReNFileError, match=f"saved with {world + 1} ranks"):
        ShardedCodebook.load(path)
    dist.barrier()


def _ties(world: int, rank: int) -> None:
    """THE tie rule: the first key in storage order; for a ShardedCodebook the lowest rank, then
    the lowest position in it. A Codebook holding the shards' keys in that order (rank 0's, then
    rank 1's...) and every backend available here pick the same entry."""
    from horen_fast import Codebook, available_backends
    from horen_fast.sharded import ShardedCodebook

    g = torch.Generator().manual_seed(3)
    k = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=1)
    other = torch.randn(4, 8, generator=g)
    # ids 0..7 go to ranks round-robin; copies of k[0] at ids 1 and 2, of k[1] at 4 and 6. After
    # removing id 0, rank 0 holds [6, 2, 4] (2 ranks) or [6, 3] (3 ranks): the first copy in
    # storage order is not the lowest id (2 ranks: 2 and 6; 3 ranks: 1 and 6)
    keys = torch.cat([other[:1], k[:1], k[:1], other[1:2], k[1:], other[2:3], k[1:], other[3:]])
    for steps in (0, 1, 2):
        tie = ShardedCodebook(8, 2, steps=steps, backend="torch")
        tie.add(keys, torch.arange(16.0).reshape(8, 2))
        tie.remove([0])  # a removal moves a rank's last entry into the hole: storage order changes
        got = tie.retrieve(k * 3.0)
        parts = [None] * world
        dist.all_gather_object(parts, (tie.local.keys.clone(), tie.local.ids))
        order_keys = torch.cat([p[0] for p in parts])
        order_ids = [i for p in parts for i in p[1]]
        first = []
        for row in range(2):  # the first copy of k[row] in storage order
            same = [j for j, key in enumerate(order_keys) if torch.allclose(key, k[row], atol=1e-6)]
            first.append(order_ids[same[0]])
        assert got.index.tolist() == first == ([2, 6] if world == 2 else [1, 6]), (steps, got, order_ids)
        for backend in available_backends("cpu"):
            single = Codebook(8, 2, steps=steps, backend=backend)
            single.add(order_keys, torch.zeros(len(order_ids), 2))
            res = single.retrieve(k * 3.0)
            assert [order_ids[i] for i in res.index.tolist()] == first, (backend, steps)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _cases(world, tmp)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)


def test_needs_a_process_group():
    from horen_fast.sharded import ShardedCodebook

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedCodebook(8, 2)
