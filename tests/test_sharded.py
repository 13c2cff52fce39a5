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

    # ties: two equal keys on different ranks -> the lowest id wins
    k = torch.nn.functional.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    tie = ShardedCodebook(8, 2, steps=0, backend="torch")
    tie.add(torch.cat([torch.randn(1, 8), k, k]), torch.zeros(3, 2))
    assert tie.retrieve(k).index.tolist() == [1]

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
