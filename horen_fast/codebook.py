"""The HoReN codebook: unit-norm keys, learned values, labels and stable integer ids.

Storage grows by capacity doubling (amortized O(1) adds, O(log N) reallocations over N adds);
removal moves the last entry into the hole (O(1)). Entry ids never change and are never reused.
Retrieval runs over the live rows without a copy and maps positions to ids on the device, with no
host synchronization.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from ._files import HoReNFileError, load_tensors, save_tensors
from .retrieval import RetrievalResult, _check_tensors, check_params, retrieve

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
_MIN_CAPACITY = 16

Label = tuple[int, ...] | None


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise TypeError(f"unsupported codebook dtype {dtype}; use one of {', '.join(_DTYPES)}")


def _as_label(label) -> Label:
    if label is None:
        return None
    if isinstance(label, torch.Tensor):
        if label.dtype.is_floating_point or label.dim() > 1:
            raise TypeError(f"a label must be a 1-D sequence of token ids, got a tensor {label.dtype} "
                            f"of shape {tuple(label.shape)}")
        return tuple(int(x) for x in label.tolist())
    if isinstance(label, int) and not isinstance(label, bool):
        return (label,)
    try:
        return tuple(int(x) for x in label)
    except TypeError:
        raise TypeError(f"a label must be None or a sequence of ints (token ids), got {label!r}") from None


class Codebook:
    """Keys [N, key_dim] (normalized on add), values [N, value_dim], a label per entry, and ids.

    ``retrieve`` keyword defaults (beta, alpha, steps, threshold, eps, backend) are stored with the
    codebook and saved with it; any of them can be overridden per call.

    ``prefilter="faiss"`` keeps a FAISS index (``index`` "flat", "ivf", "ivf_sq8" or "hnsw") in step with the
    keys, and ``retrieve`` then runs over each query's ``candidates`` nearest keys only (an
    approximation, or certified-or-exact with ``safe=True``; see horen_fast/prefilter.py; it
    synchronizes with the host). ``prefilter_options`` tunes the index (nlist, nprobe, hnsw_m,
    ef_search, ef_construction, rebuild_fraction, seed). The index is not saved; ``load`` rebuilds it.
    """

    def __init__(self, key_dim: int, value_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", beta: float = 20.0, alpha: float = 0.1,
                 steps: int = 1, threshold: float = 0.85, eps: float = 1e-5, backend: str = "auto",
                 prefilter: str | None = None, index: str = "flat", candidates: int = 256,
                 safe: bool = False, tolerance: float = 1e-4, prefilter_options: dict | None = None):
        for name, v in (("key_dim", key_dim), ("value_dim", value_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        _dtype_name(dtype)
        check_params(beta, alpha, steps, threshold, eps)
        self.key_dim, self.value_dim, self.dtype = key_dim, value_dim, dtype
        self.device = torch.device(device)
        self.config = dict(beta=float(beta), alpha=float(alpha), steps=int(steps),
                           threshold=float(threshold), eps=float(eps), backend=backend)
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
        if prefilter not in (None, "faiss"):
            raise ValueError(f"prefilter must be None or 'faiss', got {prefilter!r}")
        self.prefilter = None
        if prefilter == "faiss":
            from .prefilter import FaissPrefilter
            self.prefilter = FaissPrefilter(key_dim, index=index, candidates=candidates, safe=safe,
                                            tolerance=tolerance, device=self.device,
                                            options=prefilter_options)

    def _sync_prefilter(self) -> None:
        """Rebuild the prefilter index from the live keys when it asks for it (dead labels piled
        up, or an IVF quantizer due for training)."""
        if self.prefilter is not None and self.prefilter.needs_rebuild:
            self.prefilter.rebuild(self.keys, self.slot_ids)

    # ---- size and storage -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._keys.shape[0]

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
        return list(self._ids)

    @property
    def slot_ids(self) -> torch.Tensor:
        """Entry ids in storage order, as a LongTensor on the codebook's device."""
        return self._slot_ids[: self._n]

    def __contains__(self, entry_id: int) -> bool:
        return int(entry_id) in self._slot_of

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(_MIN_CAPACITY, self.capacity * 2, needed)
        for name in ("_keys", "_values", "_slot_ids"):
            old = getattr(self, name)
            new = torch.empty((cap,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)
        self.reallocations += 1

    def _slots(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            slot = self._slot_of.get(int(i))
            if slot is None:
                raise KeyError(f"no codebook entry with id {int(i)} (it was never added or was "
                               f"removed); live ids: {len(self)} entries")
            out.append(slot)
        return out

    # ---- mutation ---------------------------------------------------------------------------
    def _normalized_keys(self, keys: torch.Tensor) -> torch.Tensor:
        if not isinstance(keys, torch.Tensor) or not keys.dtype.is_floating_point:
            raise TypeError(f"keys must be a floating-point torch.Tensor, got "
                            f"{getattr(keys, 'dtype', type(keys).__name__)}")
        if keys.dim() == 1:
            keys = keys[None]
        if keys.dim() != 2 or keys.shape[1] != self.key_dim:
            raise ValueError(f"keys must be [n, {self.key_dim}] (the codebook's key_dim), got "
                             f"shape {tuple(keys.shape)}")
        k = keys.to(self.device, torch.float64 if self.dtype == torch.float64 else torch.float32)
        norm = k.norm(dim=1, keepdim=True)
        bad = ~(torch.isfinite(norm) & (norm > 0))
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0].tolist()[:5]
            raise ValueError(f"keys rows {rows} are zero or not finite; a key must be a non-zero "
                             f"finite activation")
        return (k / norm).to(self.dtype)

    def _checked_values(self, values: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
            raise TypeError(f"values must be a floating-point torch.Tensor, got "
                            f"{getattr(values, 'dtype', type(values).__name__)}")
        if values.dim() == 1:
            values = values[None]
        if values.shape != (n, self.value_dim):
            raise ValueError(f"values must be [{n}, {self.value_dim}] (one row per key, the "
                             f"codebook's value_dim), got shape {tuple(values.shape)}")
        return values.to(self.device, self.dtype)

    def _checked_labels(self, labels, n: int) -> list[Label]:
        if labels is None:
            return [None] * n
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            labels = list(labels)
        labels = list(labels)
        if n == 1 and labels and not isinstance(labels[0], (list, tuple, torch.Tensor, type(None))):
            labels = [labels]  # a single label given as a flat list of token ids
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} keys; give one label per key or None")
        return [_as_label(lab) for lab in labels]

    def add(self, keys: torch.Tensor, values: torch.Tensor, labels=None, *, ids=None) -> torch.Tensor:
        """Add entries; returns their new ids (LongTensor [n], on the CPU).

        ``ids`` (optional) gives the new entries' ids instead of the next free ones: distinct,
        >= 0 and not in use (ShardedCodebook uses this to keep one id space across ranks)."""
        k = self._normalized_keys(keys)
        n = k.shape[0]
        v = self._checked_values(values, n)
        labs = self._checked_labels(labels, n)
        if ids is None:
            new_ids = list(range(self._next_id, self._next_id + n))
        else:
            new_ids = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
            if len(new_ids) != n or len(set(new_ids)) != n or any(i < 0 for i in new_ids):
                raise ValueError(f"ids must be {n} distinct integers >= 0 (one per key), got {new_ids[:8]}")
            taken = [i for i in new_ids if i in self._slot_of]
            if taken:
                raise ValueError(f"ids {taken[:8]} are already in use in this codebook")
        top = max(new_ids) + 1 if new_ids else self._next_id
        self._reserve(self._n + n)
        lo, hi = self._n, self._n + n
        self._keys[lo:hi] = k
        self._values[lo:hi] = v
        new = torch.tensor(new_ids, dtype=torch.long, device=self.device)
        self._slot_ids[lo:hi] = new
        if self._slot_of_id.shape[0] < top:
            cap = max(_MIN_CAPACITY, 2 * self._slot_of_id.shape[0], top)
            table = torch.full((cap,), -1, dtype=torch.long, device=self.device)
            table[: self._slot_of_id.shape[0]] = self._slot_of_id
            self._slot_of_id = table
            self.reallocations += 1
        self._slot_of_id[new] = torch.arange(lo, hi, device=self.device)
        for j, i in enumerate(new_ids):
            self._slot_of[i] = lo + j
        self._ids.extend(new_ids)
        self._labels.extend(labs)
        self._n = hi
        self._next_id = max(self._next_id, top)
        out = torch.tensor(new_ids, dtype=torch.long)
        if self.prefilter is not None:
            self.prefilter.add(out, k)
            self._sync_prefilter()
        return out

    def remove(self, ids) -> None:
        """Remove entries by id (each O(1): the last entry moves into the hole)."""
        slots = self._slots(ids)
        if len(set(slots)) != len(slots):
            raise ValueError("remove: the same id is given twice")
        if self.prefilter is not None:
            self.prefilter.remove([self._ids[s] for s in slots])
        for entry_id in [self._ids[s] for s in slots]:
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
            self._slot_of_id[entry_id] = -1
            if slot != last:
                self._slot_of_id[moved] = slot
            self._ids.pop()
            self._labels.pop()
            self._n = last
        self._sync_prefilter()

    def update(self, entry_id: int, *, key: torch.Tensor | None = None,
               value: torch.Tensor | None = None, label=...) -> None:
        """Overwrite one entry's key (normalized), value and/or label in place; its id stays."""
        (slot,) = self._slots(entry_id)
        if key is not None:
            self._keys[slot] = self._normalized_keys(key)[0]
            if self.prefilter is not None:
                self.prefilter.update(int(entry_id), self._keys[slot])
                self._sync_prefilter()
        if value is not None:
            self._values[slot] = self._checked_values(value, 1)[0]
        if label is not ...:
            self._labels[slot] = _as_label(label)

    def clear(self) -> None:
        self.remove(list(self._ids))

    # ---- lookup -----------------------------------------------------------------------------
    def get_keys(self, ids) -> torch.Tensor:
        return self._keys[torch.tensor(self._slots(ids), device=self.device)]

    def get_values(self, ids) -> torch.Tensor:
        return self._values[torch.tensor(self._slots(ids), device=self.device)]

    def get_labels(self, ids) -> list[Label]:
        return [self._labels[s] for s in self._slots(ids)]

    def value_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Values for retrieval results: row b is the value of entry ``index[b]`` (an id), zeros
        where ``index[b] == -1``. Stays on the device with no host sync."""
        slot = self._slot_of_id[index.clamp(min=0)]
        rows = self._values[slot.clamp(min=0)]
        return torch.where((index >= 0)[:, None], rows, torch.zeros_like(rows))

    # ---- retrieval --------------------------------------------------------------------------
    def retrieve(self, queries: torch.Tensor, *, exact: bool = False, **overrides) -> RetrievalResult:
        """HoReN retrieval against the live keys; ``.index`` holds entry ids (-1: no match).

        With a prefilter, runs over each row's candidates (see horen_fast/prefilter.py) unless
        ``exact=True``."""
        unknown = set(overrides) - set(self.config)
        if unknown:
            raise TypeError(f"unknown retrieve option(s) {sorted(unknown)}; known: {sorted(self.config)}")
        opts = {**self.config, **overrides}
        if isinstance(queries, torch.Tensor) and queries.dim() == 1:
            queries = queries[None]
        if isinstance(queries, torch.Tensor) and queries.device != self.device:
            queries = queries.to(self.device)
        if self.prefilter is not None and not exact and self._n:
            from .prefilter import prefiltered_retrieve
            params = check_params(opts["beta"], opts["alpha"], opts["steps"], opts["threshold"], opts["eps"])
            _check_tensors(queries, self.keys)
            res = prefiltered_retrieve(queries, self.keys, self._slot_of_id, self.prefilter, params,
                                       lambda q: retrieve(q, self.keys, **opts))
        else:
            res = retrieve(queries, self.keys, **opts)
        ids = self.slot_ids[res.index.clamp(min=0)] if self._n else res.index
        return RetrievalResult(index=torch.where(res.matched, ids, res.index), score=res.score,
                               matched=res.matched)

    # ---- devices and files ------------------------------------------------------------------
    def to(self, device) -> "Codebook":
        device = torch.device(device)
        for name in ("_keys", "_values", "_slot_ids", "_slot_of_id"):
            setattr(self, name, getattr(self, name).to(device))
        self.device = device
        if self.prefilter is not None:  # a GPU index where FAISS can, else CPU; rebuilt either way
            from .prefilter import FaissPrefilter
            self.prefilter = FaissPrefilter(self.key_dim, device=device, **self.prefilter.settings())
            self.prefilter.rebuild(self.keys, self.slot_ids)
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
        return {"kind": "horen_fast.Codebook", "format_version": FORMAT_VERSION, "count": self._n,
                "key_dim": self.key_dim, "value_dim": self.value_dim,
                "dtype": _dtype_name(self.dtype), "next_id": self._next_id, "config": self.config,
                **({"prefilter": self.prefilter.settings()} if self.prefilter is not None else {})}

    def save(self, path) -> None:
        """Save to one safetensors file (tensors + JSON metadata + checksum), atomically: a crash
        during the write leaves any previous file at ``path`` intact."""
        save_tensors(path, self._tensors(), self._metadata())

    @classmethod
    def load(cls, path, device=None) -> "Codebook":
        tensors, meta = load_tensors(path, "horen_fast.Codebook")
        return cls._from_saved(path, tensors, meta, device)

    @classmethod
    def _from_saved(cls, path, tensors, meta, device) -> "Codebook":
        if meta.get("format_version") != FORMAT_VERSION:
            raise HoReNFileError(path, f"format version {meta.get('format_version')!r} is not "
                                       f"supported (this horen-fast reads version {FORMAT_VERSION})")
        try:
            n, dk, dv = int(meta["count"]), int(meta["key_dim"]), int(meta["value_dim"])
            dtype = _DTYPES[meta["dtype"]]
            pf = meta.get("prefilter")
            extra = {} if pf is None else dict(prefilter="faiss", index=pf["index"],
                                                candidates=pf["candidates"], safe=pf["safe"],
                                                tolerance=pf["tolerance"], prefilter_options=pf["options"])
            cb = cls(dk, dv, dtype=dtype, device=device or "cpu", **meta["config"], **extra)
        except (KeyError, TypeError, ValueError) as exc:
            raise HoReNFileError(path, f"metadata is incomplete or invalid ({exc})") from None
        expected = {"keys": (n, dk), "values": (n, dv), "ids": (n,), "label_lengths": (n,)}
        for name, shape in expected.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape:
                raise HoReNFileError(path, f"tensor {name!r} has shape "
                                           f"{None if t is None else tuple(t.shape)}, expected {shape}")
        lengths = tensors["label_lengths"].tolist()
        tokens = tensors.get("label_tokens", torch.empty(0, dtype=torch.long)).tolist()
        if sum(max(x, 0) for x in lengths) != len(tokens):
            raise HoReNFileError(path, "labels do not add up to the stored label tokens")
        ids = tensors["ids"].tolist()
        if len(set(ids)) != n or (n and (min(ids) < 0 or max(ids) >= int(meta["next_id"]))):
            raise HoReNFileError(path, "entry ids are duplicated or out of range")
        labels, pos = [], 0
        for ln in lengths:
            labels.append(None if ln < 0 else tuple(tokens[pos: pos + ln]))
            pos += max(ln, 0)
        cb._reserve(n)
        cb._keys[:n] = tensors["keys"].to(cb.device, dtype)
        cb._values[:n] = tensors["values"].to(cb.device, dtype)
        cb._slot_ids[:n] = tensors["ids"].to(cb.device)
        cb._ids, cb._labels, cb._n = ids, labels, n
        cb._slot_of = {i: s for s, i in enumerate(ids)}
        cb._next_id = int(meta["next_id"])
        cb._slot_of_id = torch.full((max(cb._next_id, 1),), -1, dtype=torch.long, device=cb.device)
        cb._slot_of_id[cb.slot_ids] = torch.arange(n, device=cb.device)
        cb.reallocations = 0
        if cb.prefilter is not None:  # the index is rebuilt from the saved keys, never stored
            cb.prefilter.rebuild(cb.keys, cb.slot_ids)
        return cb

    def __repr__(self) -> str:
        return (f"Codebook(entries={self._n}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"dtype={self.dtype}, device={self.device})")
