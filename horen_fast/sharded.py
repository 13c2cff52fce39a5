"""A codebook split over the ranks of a torch.distributed process group.

Every rank holds a slice of the entries in its own ``Codebook``; entry ids form one space across
ranks. All methods are collective: every rank of the group calls them, in the same order, with the
same arguments (SPMD), as with any torch.distributed program.

Retrieval equals the single-codebook result up to float summation order, built on the
Hopfield ops of horen_fast/hopfield.py: for each step every rank computes the softmax partials of
its own keys (``softmax_partials``: row max m and exp-weighted key sum y); an all_reduce MAX of m,
``rescale_partials`` to it and one all_reduce SUM of y give the full softmax's retrieved pattern
(only these sums cross ranks), and ``damped_update`` takes the step. Final scoring: each rank
scores its keys with the refined query and takes its best under the tie rule (``exact_best``, robust to a GEMM's rounding); an
all_reduce MAX picks the best cosine, an all_reduce MIN over (rank, position) of the keys holding
it picks the winner, and one all_reduce MAX brings its id to every rank. The tie rule is the one
of a Codebook and every backend: the first key in storage order, which for a ShardedCodebook is
the lowest rank, then the lowest position in that rank.

Entries are checked (``Codebook.check_entries``) on EVERY rank before any rank stores anything,
and the ranks agree through one collective that all of them accepted them: a bad key raises the
same error on every rank instead of diverging the ranks' sizes (which would hang the next
collective).

Adds go to the least-loaded rank, key by key (ties: the lowest rank). ``save(directory)`` writes
one ``Codebook`` file per rank and a manifest (JSON: world size, counts, each shard file's sha256,
its own checksum; every write atomic); ``load`` checks all of it and fails clearly, on every rank,
when a rank's shard is missing, corrupted or of another world size.

Backends: gloo with CPU codebooks, NCCL with CUDA ones: ``dist.init_process_group("nccl")``,
``torch.cuda.set_device(local_rank)`` and ``device=f"cuda:{local_rank}"``; the collectives then run
on the GPU tensors. ``retrieve`` synchronizes with the host only to read the total entry count
(known to every rank), so it stays on the device otherwise.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ._files import HoReNFileError, atomic_path, file_sha256
from .codebook import Codebook
from .entries import check_ids
from .hopfield import damped_update, exact_best, normalize_queries, rescale_partials, select_match, \
    softmax_partials
from .retrieval import RetrievalResult, check_params, check_tensors, compute_dtype, empty_result

__all__ = ["ShardedCodebook"]

KIND = "horen_fast.ShardedCodebook"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_POSITION_BITS = 40  # the winner's (rank, position) packed as rank * 2**40 + position


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _json_checksum(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class ShardedCodebook:
    """``ShardedCodebook(key_dim, value_dim, group=None, **codebook_options)``: this rank's slice
    is ``.local`` (a Codebook); ``len()`` is the total over ranks."""

    def __init__(self, key_dim: int, value_dim: int, *, group=None, **options):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedCodebook needs an initialized torch.distributed process group "
                               "(dist.init_process_group('gloo' or 'nccl', ...))")
        if options.get("prefilter") is not None:
            raise ValueError("a ShardedCodebook retrieves exactly; prefilter is not supported here")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.local = Codebook(key_dim, value_dim, **options)
        self.key_dim, self.value_dim = key_dim, value_dim
        self.config = self.local.config
        self._sizes = [0] * self.world   # entries per rank (the same list on every rank)
        self._next_id = 0                # next global id (the same on every rank)

    @property
    def device(self) -> torch.device:
        return self.local.device

    def __len__(self) -> int:
        return sum(self._sizes)

    @property
    def sizes(self) -> list[int]:
        return list(self._sizes)

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def _agree(self, error: Exception | None, count: int, what: str) -> None:
        """Collective: every rank reports whether its own checks of a call's arguments failed
        (and how many entries it was given); if any rank failed, or the ranks were given different
        numbers, EVERY rank raises (a rank its own error, the others one naming the failed ranks)."""
        t = torch.zeros(self.world + 2, dtype=torch.long, device=self.device)
        t[self.rank] = int(error is not None)
        t[self.world], t[self.world + 1] = count, -count
        self._all_reduce(t, dist.ReduceOp.MAX)
        flags = t[: self.world].tolist()
        if error is not None:
            raise error
        bad = [r for r, f in enumerate(flags) if f]
        if bad:
            raise ValueError(f"{what}: rank(s) {bad} rejected the arguments (see the error raised "
                             f"there); nothing was changed on any rank")
        if int(t[self.world]) != -int(t[self.world + 1]):
            raise ValueError(f"{what}: the ranks were given different numbers of entries (from "
                             f"{-int(t[self.world + 1])} to {int(t[self.world])}); every rank must "
                             f"pass the same arguments")

    # ---- mutation (collective) ----------------------------------------------------------------
    def add(self, keys: torch.Tensor, values: torch.Tensor, labels=None) -> torch.Tensor:
        """Add entries (every rank passes the same ones); each goes to the least-loaded rank.
        Every rank checks every entry first, and all agree before any stores one. Returns the new
        global ids (LongTensor [n], CPU)."""
        error, n = None, 0
        try:
            keys, values, labels = self.local.check_entries(keys, values, labels)
            n = keys.shape[0]
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error, n, "ShardedCodebook.add")
        owner, sizes = [], list(self._sizes)
        for _ in range(n):
            r = min(range(self.world), key=lambda i: (sizes[i], i))
            owner.append(r)
            sizes[r] += 1
        ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.long)
        mine = [j for j, r in enumerate(owner) if r == self.rank]
        if mine:
            sel = torch.tensor(mine, dtype=torch.long, device=keys.device)
            self.local.add(keys[sel], values[sel], [labels[j] for j in mine], ids=ids[sel.cpu()])
        self._sizes, self._next_id = sizes, self._next_id + n
        return ids

    def remove(self, ids) -> None:
        """Remove entries by global id (every rank passes the same ids)."""
        error, mine, count = None, [], 0
        try:
            if isinstance(ids, int) and not isinstance(ids, bool):
                ids = [ids]
            ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
            count = len(ids)
            ids = check_ids(ids, count)
            mine = [i for i in ids if i in self.local]
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error, count, "ShardedCodebook.remove")
        found = torch.zeros(self.world + 1, dtype=torch.long, device=self.device)
        found[self.rank] = len(mine)
        found[self.world] = len(mine)
        self._all_reduce(found, dist.ReduceOp.SUM)
        if int(found[self.world]) != len(ids):
            raise KeyError(f"remove: {len(ids) - int(found[self.world])} of the ids are not in the "
                           f"codebook (never added or already removed); nothing was removed")
        if mine:
            self.local.remove(mine)
        self._sizes = [s - int(c) for s, c in zip(self._sizes, found[: self.world].tolist())]

    # ---- retrieval (collective) -------------------------------------------------------------------
    def retrieve(self, queries: torch.Tensor, **overrides) -> RetrievalResult:
        """HoReN retrieval over every rank's keys; ``.index`` holds global ids (-1: no match).
        Every rank passes the same queries and gets the same result. Ties: the lowest rank, then
        the lowest position in it (the first key in storage order)."""
        unknown = set(overrides) - set(self.config)
        if unknown:
            raise TypeError(f"unknown retrieve option(s) {sorted(unknown)}; known: {sorted(self.config)}")
        opts = {**self.config, **overrides}
        p = check_params(opts["beta"], opts["alpha"], opts["steps"], opts["threshold"], opts["eps"])
        if isinstance(queries, torch.Tensor):
            queries = (queries[None] if queries.dim() == 1 else queries).to(self.device)
        keys = self.local.keys
        check_tensors(queries, keys)
        dtype = compute_dtype(queries, keys)
        if len(self) == 0 or queries.shape[0] == 0:
            return empty_result(queries.shape[0], self.device, dtype)
        k = keys.to(dtype)
        q, valid = normalize_queries(queries, dtype)
        running = valid.clone()
        for _ in range(p.steps):  # only the softmax sums cross ranks (z cancels in r = y / |y|)
            m, _, y = softmax_partials(q, k, p.beta)
            top = self._all_reduce(m.clone(), dist.ReduceOp.MAX)
            _, y = rescale_partials(m, torch.zeros_like(m), y, top)
            y = self._all_reduce(y.contiguous(), dist.ReduceOp.SUM)
            q, running = damped_update(q, y, running, p.alpha, p.eps)
        best, pos = exact_best(q, k, q @ k.T)
        top = self._all_reduce(best.clone(), dist.ReduceOp.MAX)
        big = torch.iinfo(torch.long).max
        holds = (pos >= 0) & (best == top)
        key = torch.where(holds, self.rank * (1 << _POSITION_BITS) + pos, torch.full_like(pos, big))
        key = self._all_reduce(key, dist.ReduceOp.MIN)
        win_rank, win_pos = key >> _POSITION_BITS, key & ((1 << _POSITION_BITS) - 1)
        ids = self.local.slot_ids
        entry = torch.full_like(pos, -1)
        if k.shape[0]:
            mine = (key != big) & (win_rank == self.rank)
            entry = torch.where(mine, ids[win_pos.clamp(max=k.shape[0] - 1)], entry)
        entry = self._all_reduce(entry, dist.ReduceOp.MAX)
        return select_match(top, entry, valid, p.threshold)

    def value_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Values for retrieval results (global ids, -1: zeros), gathered from their ranks."""
        rows = self.local.value_rows(index.to(self.device))  # zeros for ids held elsewhere
        return self._all_reduce(rows.contiguous(), dist.ReduceOp.SUM)

    # ---- files (collective) -----------------------------------------------------------------------
    def save(self, directory) -> None:
        """Each rank writes its shard; rank 0 writes the manifest last (atomically), so a
        directory with a manifest always names complete shard files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shard = directory / _shard_name(self.rank, self.world)
        self.local.save(shard)
        digest = torch.tensor(list(bytes.fromhex(file_sha256(shard))), dtype=torch.long,
                              device=self.device)
        table = torch.zeros(self.world, 32, dtype=torch.long, device=self.device)
        table[self.rank] = digest
        self._all_reduce(table, dist.ReduceOp.SUM)
        if self.rank == 0:
            manifest = {
                "kind": KIND, "format_version": FORMAT_VERSION, "world_size": self.world,
                "key_dim": self.key_dim, "value_dim": self.value_dim, "next_id": self._next_id,
                "config": self.config,
                "shards": [{"rank": r, "file": _shard_name(r, self.world), "count": self._sizes[r],
                            "sha256": bytes(table[r].tolist()).hex()} for r in range(self.world)],
            }
            manifest["checksum"] = _json_checksum(manifest)
            with atomic_path(directory / MANIFEST) as tmp:
                with open(tmp, "w") as f:
                    json.dump(manifest, f, indent=1, sort_keys=True)
        dist.barrier(group=self.group)

    @classmethod
    def load(cls, directory, *, group=None, device=None) -> "ShardedCodebook":
        """Load this rank's shard; raises HoReNFileError on every rank if any rank's shard (or
        the manifest) is missing, corrupted, or saved with another number of ranks."""
        directory = Path(directory)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        error, out = None, None
        try:
            manifest = cls._read_manifest(directory / MANIFEST, world)
            entry = manifest["shards"][rank]
            path = directory / entry["file"]
            if not path.is_file():
                raise HoReNFileError(path, f"rank {rank}'s shard file is missing")
            if file_sha256(path) != entry["sha256"]:
                raise HoReNFileError(path, f"rank {rank}'s shard file is corrupted (its sha256 "
                                           f"differs from the manifest's)")
            local = Codebook.load(path, device=device)
            if len(local) != entry["count"]:
                raise HoReNFileError(path, f"rank {rank}'s shard holds {len(local)} entries, the "
                                           f"manifest says {entry['count']}")
            out = cls.__new__(cls)
            out.group, out.rank, out.world, out.local = group, rank, world, local
            out.key_dim, out.value_dim, out.config = local.key_dim, local.value_dim, local.config
            out._sizes = [int(s["count"]) for s in manifest["shards"]]
            out._next_id = int(manifest["next_id"])
        except HoReNFileError as exc:
            error = exc
        dev = torch.device(device) if device is not None else torch.device("cpu")
        failed = torch.zeros(world, dtype=torch.long, device=dev)
        failed[rank] = int(error is not None)
        dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=group)
        if error is not None:
            raise error
        bad = [r for r, f in enumerate(failed.tolist()) if f]
        if bad:
            raise HoReNFileError(directory, f"the shard(s) of rank(s) {bad} could not be loaded "
                                            f"(see the error on those ranks)")
        return out

    @staticmethod
    def _read_manifest(path: Path, world: int) -> dict:
        if not path.is_file():
            raise HoReNFileError(path, "no manifest (not a ShardedCodebook directory, or its save "
                                       "did not finish)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HoReNFileError(path, f"manifest is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise HoReNFileError(path, f"not a {KIND} manifest")
        stored = manifest.pop("checksum", None)
        if stored != _json_checksum(manifest):
            raise HoReNFileError(path, "manifest checksum mismatch: the manifest is corrupted")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise HoReNFileError(path, f"format version {manifest.get('format_version')!r} is not supported")
        if manifest.get("world_size") != world:
            raise HoReNFileError(path, f"saved with {manifest.get('world_size')} ranks, loading with "
                                       f"{world}; load with the same number of ranks")
        return manifest

    def __repr__(self) -> str:
        return (f"ShardedCodebook(entries={len(self)}, rank={self.rank}/{self.world}, "
                f"local={len(self.local)}, key_dim={self.key_dim}, value_dim={self.value_dim})")
