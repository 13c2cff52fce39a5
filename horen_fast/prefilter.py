"""The codebook's optional FAISS prefilter: its configuration and the object kept in step with it.

``Codebook(..., prefilter=PrefilterConfig(index="ivf_sq8", candidates=64))`` (or a dict of the same
fields) keeps a FAISS inner-product index over the unit keys (horen_fast/faiss_index.py) and, by
default, a low-rank sketch of every key (horen_fast/sketch.py) in step with every add, update and
remove; ``Codebook.retrieve`` then answers each row from its candidates plus, with the sketch, a
model of the other keys' softmax mass and an exact rescue of every key that might still win (the
strategies are in horen_fast/approx.py). It is an approximation, measured as decisions that agree
with exact retrieval (bench/bench_prefilter.py); ``safe=True`` certifies each row or answers it
exactly.

``PrefilterConfig`` is the one place its options live and are checked (FAISS aborts the process
on some bad arguments, and huge ones allocate until the process is killed, so every option is
validated before FAISS sees it, and k's are clamped to the live count at search time):

- ``index``: "flat" (exact search), "ivf", "ivf_sq8" (keys at one byte a coordinate) or "hnsw";
- ``candidates`` (256): keys taken from the index per query (clamped to the codebook's size);
- ``safe`` (False) and ``tolerance`` (1e-4): certify-or-exact mode (needs "flat" and tail "none");
- ``tail``: "sketch" (default) or "none" (the candidates alone; the default when ``safe``);
- the sketch: ``sketch_rank`` (128), ``tail_rank`` (16), ``bound_rank`` (64), ``sketch_from``
  (1024: the basis is the identity below this many keys), ``sketch_candidates`` (None: =
  ``candidates``; near keys the sketch adds to small batches), ``rescue`` (True);
- index tuning: ``nlist`` (None: sqrt N, 16..65536), ``nprobe`` (None: 1 with the sketch, else
  nlist / 16, at least 8; clamped to nlist), ``hnsw_m`` (32, 2..256), ``ef_search`` (None: 2k),
  ``ef_construction`` (80), ``rebuild_fraction`` (0.25: dead labels allowed before a rebuild),
  ``seed`` (1234).

A Codebook file stores the config as one field (``to_dict``); files written before it (a
``{"index", "candidates", "safe", "tolerance", "options": {...}}`` field) load through
``PrefilterConfig.from_dict`` too.

The index and the sketch are never saved: ``Codebook.load`` rebuilds them from the saved keys.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .faiss_index import INDEX_KINDS, FaissIndex
from .sketch import KeySketch

__all__ = ["PrefilterConfig", "Prefilter", "INDEX_KINDS", "TAILS"]

TAILS = ("sketch", "none")
_MAX_NLIST = 1 << 20
_MAX_EF = 1 << 16


def _int(name: str, value, lo: int, hi: int | None = None, *, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        extra = " or None (automatic)" if optional else ""
        raise ValueError(f"prefilter option {name} must be an integer {span}{extra}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PrefilterConfig:
    """The FAISS prefilter's options, validated on construction (see the module docstring)."""
    index: str = "flat"
    candidates: int = 256
    safe: bool = False
    tolerance: float = 1e-4
    tail: str | None = None
    sketch_rank: int = 128
    tail_rank: int = 16
    bound_rank: int = 64
    sketch_from: int = 1024
    sketch_candidates: int | None = None
    rescue: bool = True
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int | None = None
    ef_construction: int = 80
    rebuild_fraction: float = 0.25
    seed: int = 1234

    def __post_init__(self):
        if self.index not in INDEX_KINDS:
            raise ValueError(f"prefilter index must be one of {', '.join(map(repr, INDEX_KINDS))}, "
                             f"got {self.index!r}")
        for name in ("safe", "rescue"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"prefilter option {name} must be True or False, got {getattr(self, name)!r}")
        if self.safe and self.index != "flat":
            raise ValueError("safe=True needs an exact candidate search (index='flat'): with an "
                             "approximate index the k-th candidate does not bound the keys outside")
        tail = self.tail if self.tail is not None else ("none" if self.safe else "sketch")
        if tail not in TAILS:
            raise ValueError(f"prefilter option tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
        if self.safe and tail != "none":
            raise ValueError("safe=True certifies rows from the candidates alone; use tail='none' with it")
        object.__setattr__(self, "tail", tail)
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"prefilter option tolerance must be a finite number > 0 (outside softmax "
                             f"mass allowed in safe mode), got {t!r}")
        f = self.rebuild_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 <= f <= 1):
            raise ValueError(f"prefilter option rebuild_fraction must be a number in [0, 1] (dead "
                             f"labels allowed before a rebuild), got {f!r}")
        checked = dict(
            candidates=_int("candidates", self.candidates, 1),
            sketch_rank=_int("sketch_rank", self.sketch_rank, 1),
            tail_rank=_int("tail_rank", self.tail_rank, 1),
            bound_rank=_int("bound_rank", self.bound_rank, 1),
            sketch_from=_int("sketch_from", self.sketch_from, 0),
            sketch_candidates=_int("sketch_candidates", self.sketch_candidates, 0, optional=True),
            nlist=_int("nlist", self.nlist, 1, _MAX_NLIST, optional=True),
            nprobe=_int("nprobe", self.nprobe, 1, _MAX_NLIST, optional=True),
            hnsw_m=_int("hnsw_m", self.hnsw_m, 2, 256),
            ef_search=_int("ef_search", self.ef_search, 1, _MAX_EF, optional=True),
            ef_construction=_int("ef_construction", self.ef_construction, 1, _MAX_EF),
            seed=_int("seed", self.seed, 0, 2**31 - 1),
        )
        for name, value in checked.items():  # numpy ints become plain ints (JSON-ready)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "tolerance", float(t))
        object.__setattr__(self, "rebuild_fraction", float(f))

    def to_dict(self) -> dict:
        """Every field, JSON-ready (what a Codebook file stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrefilterConfig":
        """From ``to_dict``'s output, or from the field of files written before this config
        existed ({"index", "candidates", "safe", "tolerance", "options": {...}})."""
        if not isinstance(data, dict):
            raise TypeError(f"a prefilter config must be a dict of options, got {type(data).__name__}")
        data = dict(data)
        if isinstance(data.get("options"), dict):  # the old flat layout: options beside four fields
            data.update(data.pop("options"))
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown prefilter option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def coerce(cls, value) -> "PrefilterConfig | None":
        """None, a PrefilterConfig, or a dict of its fields -> a PrefilterConfig (or None)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, str):
            raise TypeError(f"prefilter={value!r}: pass prefilter=PrefilterConfig(index=..., "
                            f"candidates=...) (horen_fast.PrefilterConfig) or a dict of its options")
        raise TypeError(f"prefilter must be None, a PrefilterConfig or a dict of its options, got "
                        f"{type(value).__name__}")


class Prefilter:
    """The FAISS index and (with ``tail="sketch"``) the key sketch of one codebook, in step with
    its keys. The codebook calls ``add``/``remove``/``update`` on every change and ``rebuild`` when
    ``needs_rebuild`` says so; nothing else should mutate it. Sketch rows follow the index labels
    (a dead label gets no weight) and are rebuilt with the index."""

    def __init__(self, key_dim: int, config: PrefilterConfig, device: torch.device | str = "cpu"):
        if not isinstance(config, PrefilterConfig):
            raise TypeError(f"config must be a PrefilterConfig, got {type(config).__name__}")
        self.key_dim, self.config = key_dim, config
        self.device = torch.device(device)
        self.index = FaissIndex(key_dim, config, self.device)
        self.sketch = None
        if config.tail == "sketch":
            self.sketch = KeySketch(key_dim, config.sketch_rank, tail_rank=config.tail_rank,
                                    bound_rank=config.bound_rank, fit_from=config.sketch_from,
                                    device=self.device, seed=config.seed)

    # ---- description ------------------------------------------------------------------------
    @property
    def candidates(self) -> int:
        return self.config.candidates

    @property
    def sketch_candidates(self) -> int:
        sc = self.config.sketch_candidates
        return self.config.candidates if sc is None else sc

    @property
    def live(self) -> int:
        return self.index.live

    @property
    def dead(self) -> int:
        return self.index.dead

    @property
    def rebuilds(self) -> int:
        return self.index.rebuilds

    @property
    def needs_rebuild(self) -> bool:
        """Dead labels past the limit, an IVF index due for (re)training, or a sketch basis due."""
        if self.sketch is not None and self.sketch.due(self.live):
            return True
        return self.index.needs_rebuild(self.config.candidates)

    # ---- upkeep -----------------------------------------------------------------------------
    def rebuild(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Start over from the codebook's live keys [N, d] and their ids [N]."""
        if self.sketch is not None:
            if self.sketch.due(keys.shape[0]):
                self.sketch.fit(keys)  # drops every row
            else:
                self.sketch.clear()
        self.index.rebuild(keys, ids, probe_one=self.sketch is not None)
        if self.sketch is not None and keys.shape[0]:
            self.sketch.append(keys)

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Index new entries (unit keys [n, d], ids [n])."""
        self.index.add(ids, keys)
        if self.sketch is not None and keys.shape[0]:
            self.sketch.append(keys)

    def remove(self, ids) -> None:
        labels = self.index.remove(ids)
        if self.sketch is not None and labels:
            self.sketch.kill(labels)

    def update(self, entry_id: int, key: torch.Tensor) -> None:
        self.remove([entry_id])
        self.add(torch.tensor([entry_id]), key.reshape(1, -1))

    def __repr__(self) -> str:
        where = "gpu" if self.index.on_gpu else "cpu"
        return (f"Prefilter(index={self.config.index!r}, candidates={self.candidates}, "
                f"safe={self.config.safe}, tail={self.config.tail!r}, live={self.live}, "
                f"dead={self.dead}, {where})")
