"""The HoReN codebook: unit-norm keys, learned values, labels and stable integer ids.

Storage grows by capacity doubling (amortized O(1) adds, O(log N) reallocations over N adds); all
buffers are allocated before any is swapped in, so a failed growth raises MemoryError and leaves
the codebook as it was. Removal moves the last entry into the hole (O(1)). Entry ids never change
and are never reused. Retrieval runs over the live rows without a copy and maps positions to ids
on the device, with no host synchronization.

Every mutation, lookup and retrieval holds one re-entrant lock, so concurrent callers (threads)
see whole operations (bench/bench_lock.py measures its cost on the retrieve path). What an entry
may hold is checked by horen_fast/entries.py, the same way on add, update and load.
"""
from __future__ import annotations

import copy
import threading

import torch

from ._files import HoReNFileError, save_tensors
from .codebook_file import FORMAT_VERSION, KIND, dtype_name, read_codebook_file
from .entries import Label, check_ids, check_keys, check_label, check_labels, check_values
from .prefilter import Prefilter, PrefilterConfig
from .retrieval import RetrievalResult, check_params, check_tensors, retrieve

_MIN_CAPACITY = 16
_REMOVED = ("index", "candidates", "safe", "tolerance", "prefilter_options")


class Codebook:
    """Keys [N, key_dim] (normalized on add), values [N, value_dim], a label per entry, and ids.

    ``retrieve`` keyword defaults (beta, alpha, steps, threshold, eps, backend) are stored with the
    codebook and saved with it; any of them can be overridden per call.

    ``prefilter`` (a horen_fast.PrefilterConfig, or a dict of its fields) keeps a FAISS index (and
    by default a key sketch) in step with the keys; ``retrieve`` then answers from each query's
    candidates (an approximation, or certified-or-exact with ``safe=True``; see
    horen_fast/prefilter.py and horen_fast/approx.py; it synchronizes with the host). The index
    is not saved; ``load`` rebuilds it.
    """

    def __init__(self, key_dim: int, value_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", beta: float = 20.0, alpha: float = 0.1,
                 steps: int = 1, threshold: float = 0.85, eps: float = 1e-5, backend: str = "auto",
                 prefilter: PrefilterConfig | dict | None = None, **removed):
        if removed:
            old = sorted(set(removed) & set(_REMOVED))
            if old:
                raise TypeError(f"Codebook({', '.join(f'{k}=...' for k in old)}) is now "
                                f"Codebook(prefilter=PrefilterConfig({', '.join(f'{k}=...' for k in old)})) "
                                f"(prefilter_options' keys become PrefilterConfig fields)")
            raise TypeError(f"Codebook got unexpected keyword argument(s) {sorted(removed)}")
        for name, v in (("key_dim", key_dim), ("value_dim", value_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        dtype_name(dtype)
        check_params(beta, alpha, steps, threshold, eps)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string ('auto', 'torch', 'cpp', 'triton'), got {backend!r}")
        config = PrefilterConfig.coerce(prefilter)
        self.key_dim, self.value_dim, self.dtype = key_dim, value_dim, dtype
        self.device = torch.device(device)
        self.config = dict(beta=float(beta), alpha=float(alpha), steps=int(steps),
                           threshold=float(threshold), eps=float(eps), backend=backend)
        self._lock = threading.RLock()
        self._n = 0
        self._next_id = 0
        self._keys = torch.empty(0, key_dim, dtype=dtype, device=self.device)
        self._values = torch.empty(0, value_dim, dtype=dtype, device=self.device)
        self._slot_ids = torch.empty(0, dtype=torch.long, device=self.device)  # slot -> id (device)
        self._slot_of_id = torch.empty(0, dtype=torch.long, device=self.device)  # id -> slot, -1 gone
        self._slot_of: dict[int, int] = {}   # id -> slot
        self._ids: list[int] = []            # slot -> id (host mirror)
        self._labels: list[Label] = []       # slot -> label
        self.reallocations = 0               # how many times storage was reallocated
        self.prefilter = None if config is None else Prefilter(key_dim, config, self.device)

    def _sync_prefilter(self) -> None:
        """Rebuild the prefilter from the live keys when it asks for it (dead labels piled up, an
        IVF quantizer or a sketch basis due)."""
        if self.prefilter is not None and self.prefilter.needs_rebuild:
            self.prefilter.rebuild(self.keys, self.slot_ids)

    # ---- size and storage -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._keys.shape[0]

    @property
    def next_id(self) -> int:
        """The id the next entry added without explicit ids gets (ids are never reused)."""
        return self._next_id

    @property
    def keys(self) -> torch.Tensor:
        """The live keys [N, key_dim] (a view; row i belongs to ``ids[i]``)."""
        return self._keys[: self._n]

    @property
    def values(self) -> torch.Tensor:
        """The live values [N, value_dim] (a view; row i belongs to ``ids[i]``)."""
        return self._values[: self._n]

    @property
    def ids(self) -> list[int]:
        """Entry ids in storage order (the order of ``keys`` and ``values``)."""
        with self._lock:
            return list(self._ids)

    @property
    def slot_ids(self) -> torch.Tensor:
        """Entry ids in storage order, as a LongTensor on the codebook's device."""
        return self._slot_ids[: self._n]

    def __contains__(self, entry_id: int) -> bool:
        return int(entry_id) in self._slot_of

    def _grow(self, rows: int, table: int) -> None:
        """Capacity for ``rows`` entries and ids below ``table``. Every new buffer is allocated
        before any is swapped in: on failure (MemoryError) nothing has changed."""
        plan = {}
        if rows > self.capacity:
            cap = max(_MIN_CAPACITY, self.capacity * 2, rows)
            for name in ("_keys", "_values", "_slot_ids"):
                old = getattr(self, name)
                plan[name] = ((cap,) + tuple(old.shape[1:]), old.dtype, None)
        if table > self._slot_of_id.shape[0]:
            size = max(_MIN_CAPACITY, 2 * self._slot_of_id.shape[0], table)
            plan["_slot_of_id"] = ((size,), torch.long, -1)
        if not plan:
            return
        new = {}
        try:
            for name, (shape, dtype, fill) in plan.items():
                new[name] = (torch.empty(shape, dtype=dtype, device=self.device) if fill is None else
                             torch.full(shape, fill, dtype=dtype, device=self.device))
        except (RuntimeError, MemoryError) as exc:  # torch raises RuntimeError / OutOfMemoryError
            need = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size()
                       for s, d, _ in plan.values())
            raise MemoryError(
                f"could not grow the codebook from {self.capacity} to {plan.get('_keys', ((self.capacity,),))[0][0]} "
                f"entries ({need} bytes for keys [{self.key_dim}], values [{self.value_dim}] and ids on "
                f"{self.device}); the codebook is unchanged ({self._n} entries). Free memory, or "
                f"remove entries ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        for name, buf in new.items():  # cannot fail: copies into buffers that exist
            old = getattr(self, name)
            if name == "_slot_of_id":
                buf[: old.shape[0]] = old
            else:
                buf[: self._n] = old[: self._n]
            setattr(self, name, buf)
        self.reallocations += 1

    def _slots(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            if isinstance(i, (bool, float)) or not hasattr(i, "__index__"):
                raise TypeError(f"entry ids are integers, got {i!r} ({type(i).__name__})")
            slot = self._slot_of.get(int(i))
            if slot is None:
                raise KeyError(f"no codebook entry with id {int(i)} (it was never added or was "
                               f"removed); live ids: {len(self)} entries")
            out.append(slot)
        return out

    # ---- mutation ---------------------------------------------------------------------------
    def check_entries(self, keys: torch.Tensor, values: torch.Tensor, labels=None):
        """The checks ``add`` makes, without adding: returns (unit keys [n, key_dim], values
        [n, value_dim], labels) as this codebook would store them, or raises TypeError/ValueError
        saying what is wrong. (ShardedCodebook runs it on every rank before any collective.)"""
        k = check_keys(keys, self.key_dim, self.dtype, self.device)
        n = k.shape[0]
        return k, check_values(values, self.value_dim, self.dtype, self.device, n), check_labels(labels, n)

    def add(self, keys: torch.Tensor, values: torch.Tensor, labels=None, *, ids=None) -> torch.Tensor:
        """Add entries; returns their new ids (LongTensor [n], on the CPU).

        ``ids`` (optional) gives the new entries' ids instead of the next free ones: distinct,
        >= 0 and not in use (ShardedCodebook uses this to keep one id space across ranks). Either
        every entry is added or none is (a failed storage growth raises MemoryError)."""
        k, v, labs = self.check_entries(keys, values, labels)
        n = k.shape[0]
        with self._lock:
            if ids is None:
                new_ids = list(range(self._next_id, self._next_id + n))
            else:
                new_ids = check_ids(ids, n)
                taken = [i for i in new_ids if i in self._slot_of]
                if taken:
                    raise ValueError(f"ids {taken[:8]} are already in use in this codebook")
            top = max(new_ids) + 1 if new_ids else self._next_id
            self._grow(self._n + n, top)
            out = torch.tensor(new_ids, dtype=torch.long)
            if self.prefilter is not None:
                self.prefilter.add(out, k)
            lo, hi = self._n, self._n + n
            self._keys[lo:hi] = k
            self._values[lo:hi] = v
            new = out.to(self.device)
            self._slot_ids[lo:hi] = new
            self._slot_of_id[new] = torch.arange(lo, hi, device=self.device)
            for j, i in enumerate(new_ids):
                self._slot_of[i] = lo + j
            self._ids.extend(new_ids)
            self._labels.extend(labs)
            self._n = hi
            self._next_id = max(self._next_id, top)
            self._sync_prefilter()
            return out

    def remove(self, ids) -> None:
        """Remove entries by id (each O(1): the last entry moves into the hole). Every id is
        checked before anything is removed."""
        with self._lock:
            slots = self._slots(ids)
            if len(set(slots)) != len(slots):
                raise ValueError("remove: the same id is given twice")
            gone = [self._ids[s] for s in slots]
            if self.prefilter is not None:
                self.prefilter.remove(gone)
            for entry_id in gone:
                slot = self._slot_of.pop(entry_id)
                last = self._n - 1
                if slot != last:
                    moved = self._ids[last]
                    self._keys[slot] = self._keys[last]
                    self._values[slot] = self._values[last]
                    self._slot_ids[slot] = self._slot_ids[last]
                    self._ids[slot] = moved
                    self._labels[slot] = self._labels[last]
                    self._slot_of[moved] = slot
                    self._slot_of_id[moved] = slot
                self._slot_of_id[entry_id] = -1
                self._ids.pop()
                self._labels.pop()
                self._n = last
            self._sync_prefilter()

    def update(self, entry_id: int, *, key: torch.Tensor | None = None,
               value: torch.Tensor | None = None, label=...) -> None:
        """Overwrite one entry's key (normalized), value and/or label in place; its id stays.
        Each given part is checked (one row, finite) before anything changes."""
        k = None if key is None else check_keys(key, self.key_dim, self.dtype, self.device, n=1)[0]
        v = None if value is None else check_values(value, self.value_dim, self.dtype, self.device, 1)[0]
        lab = ... if label is ... else check_label(label)
        with self._lock:
            (slot,) = self._slots(entry_id)
            if k is not None:
                if self.prefilter is not None:
                    self.prefilter.update(int(entry_id), k)
                self._keys[slot] = k
            if v is not None:
                self._values[slot] = v
            if lab is not ...:
                self._labels[slot] = lab
            if k is not None:
                self._sync_prefilter()

    def clear(self) -> None:
        with self._lock:
            self.remove(list(self._ids))

    # ---- lookup -----------------------------------------------------------------------------
    def get_keys(self, ids) -> torch.Tensor:
        with self._lock:
            return self._keys[torch.tensor(self._slots(ids), dtype=torch.long, device=self.device)]

    def get_values(self, ids) -> torch.Tensor:
        with self._lock:
            return self._values[torch.tensor(self._slots(ids), dtype=torch.long, device=self.device)]

    def get_labels(self, ids) -> list[Label]:
        with self._lock:
            return [self._labels[s] for s in self._slots(ids)]

    def value_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Values for retrieval results: row b is the value of entry ``index[b]`` (an id), zeros
        where ``index[b] == -1`` or names no entry of this codebook. On the device, no host sync."""
        with self._lock:
            index = index.to(self.device)
            table = self._slot_of_id
            if self._n == 0 or table.shape[0] == 0:
                return torch.zeros(index.shape[0], self.value_dim, dtype=self.dtype, device=self.device)
            inside = (index >= 0) & (index < table.shape[0])
            slot = table[index.clamp(0, table.shape[0] - 1)]
            known = inside & (slot >= 0)
            rows = self._values[slot.clamp(min=0)]
            return torch.where(known[:, None], rows, torch.zeros_like(rows))

    # ---- retrieval --------------------------------------------------------------------------
    def retrieve(self, queries: torch.Tensor, *, exact: bool = False, **overrides) -> RetrievalResult:
        """HoReN retrieval against the live keys; ``.index`` holds entry ids (-1: no match).
        Ties go to the first key in storage order (horen_fast/hopfield.py).

        With a prefilter, runs over each row's candidates (see horen_fast/approx.py) unless
        ``exact=True``."""
        unknown = set(overrides) - set(self.config)
        if unknown:
            raise TypeError(f"unknown retrieve option(s) {sorted(unknown)}; known: {sorted(self.config)}")
        opts = {**self.config, **overrides}
        if isinstance(queries, torch.Tensor) and queries.dim() == 1:
            queries = queries[None]
        if isinstance(queries, torch.Tensor) and queries.device != self.device:
            queries = queries.to(self.device)
        with self._lock:
            keys = self.keys
            if self.prefilter is not None and not exact and self._n:
                from .approx import prefiltered_retrieve
                params = check_params(opts["beta"], opts["alpha"], opts["steps"], opts["threshold"], opts["eps"])
                check_tensors(queries, keys)
                res = prefiltered_retrieve(queries, keys, self._slot_of_id, self.prefilter, params,
                                           lambda q: retrieve(q, keys, **opts))
            else:
                res = retrieve(queries, keys, **opts)
            ids = self.slot_ids[res.index.clamp(min=0)] if self._n else res.index
            return RetrievalResult(index=torch.where(res.matched, ids, res.index), score=res.score,
                                   matched=res.matched)

    # ---- devices and files ------------------------------------------------------------------
    def __deepcopy__(self, memo) -> "Codebook":
        """A copy with its own storage and a fresh lock (a lock cannot be copied); a prefilter is
        rebuilt from the copied keys (a FAISS index cannot be copied either)."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        with self._lock:
            for name, value in self.__dict__.items():
                if name not in ("_lock", "prefilter"):
                    new.__dict__[name] = copy.deepcopy(value, memo)
            new._lock = threading.RLock()
            new.prefilter = None
            if self.prefilter is not None:
                new.prefilter = Prefilter(self.key_dim, self.prefilter.config, self.device)
                new.prefilter.rebuild(new._keys[: new._n], new._slot_ids[: new._n])
        return new

    def to(self, device) -> "Codebook":
        device = torch.device(device)
        with self._lock:
            moved = {name: getattr(self, name).to(device)
                     for name in ("_keys", "_values", "_slot_ids", "_slot_of_id")}
            prefilter = None
            if self.prefilter is not None:  # a GPU index where FAISS can, else CPU; rebuilt either way
                prefilter = Prefilter(self.key_dim, self.prefilter.config, device)
                prefilter.rebuild(moved["_keys"][: self._n], moved["_slot_ids"][: self._n])
            for name, t in moved.items():
                setattr(self, name, t)
            self.device, self.prefilter = device, prefilter
            return self

    def _tensors(self) -> dict[str, torch.Tensor]:
        lengths = [-1 if lab is None else len(lab) for lab in self._labels]
        flat = [t for lab in self._labels if lab is not None for t in lab]
        return {
            "keys": self.keys, "values": self.values,
            "ids": torch.tensor(self._ids, dtype=torch.long),
            "label_lengths": torch.tensor(lengths, dtype=torch.long),
            "label_tokens": torch.tensor(flat, dtype=torch.long),
        }

    def _metadata(self) -> dict:
        return {"kind": KIND, "format_version": FORMAT_VERSION, "count": self._n,
                "key_dim": self.key_dim, "value_dim": self.value_dim,
                "dtype": dtype_name(self.dtype), "next_id": self._next_id, "config": self.config,
                "prefilter": None if self.prefilter is None else self.prefilter.config.to_dict()}

    def save(self, path) -> None:
        """Save to one safetensors file (tensors + JSON metadata + checksum), atomically: a crash
        during the write leaves any previous file at ``path`` intact."""
        with self._lock:
            save_tensors(path, self._tensors(), self._metadata())

    @classmethod
    def load(cls, path, device=None) -> "Codebook":
        """Load a file written by ``save`` (format version 1 or 2). Its contents are checked as
        ``add`` checks them (unit finite keys, finite values, ids, labels, the prefilter config):
        a file that fails raises HoReNFileError naming the file and the problem."""
        saved = read_codebook_file(path, device or "cpu")
        try:
            cb = cls(saved.key_dim, saved.value_dim, dtype=saved.dtype, device=device or "cpu",
                     prefilter=saved.prefilter, **saved.config)
        except (TypeError, ValueError) as exc:
            raise HoReNFileError(path, f"metadata is invalid ({exc})") from None
        cb._restore(saved.keys, saved.values, saved.ids, saved.labels, saved.next_id)
        return cb

    def _restore(self, keys: torch.Tensor, values: torch.Tensor, ids: list[int], labels: list[Label],
                 next_id: int) -> None:
        """Fill an empty codebook with checked saved entries (used by load)."""
        n = keys.shape[0]
        with self._lock:
            self._grow(n, max(next_id, 1))
            self._keys[:n] = keys
            self._values[:n] = values
            self._slot_ids[:n] = torch.tensor(ids, dtype=torch.long, device=self.device)
            self._ids, self._labels, self._n = list(ids), list(labels), n
            self._slot_of = {i: s for s, i in enumerate(ids)}
            self._next_id = next_id
            self._slot_of_id[self.slot_ids] = torch.arange(n, device=self.device)
            self.reallocations = 0
            if self.prefilter is not None:  # the index is rebuilt from the saved keys, never stored
                self.prefilter.rebuild(self.keys, self.slot_ids)

    def __repr__(self) -> str:
        return (f"Codebook(entries={self._n}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"dtype={self.dtype}, device={self.device})")
