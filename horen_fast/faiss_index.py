"""FAISS index upkeep for the prefilter: an inner-product index over the codebook's unit keys.

The index holds its own labels (0, 1, 2, ... in insertion order) and a table from label to entry
id. Removing or re-keying an entry marks its label dead (HNSW cannot remove, and a FAISS GPU index
cannot either); searches skip dead labels (an ID selector on the CPU, a larger k on the GPU), and
the index is rebuilt from the codebook's live keys once dead labels pass ``rebuild_fraction`` of
the index (on the GPU: once they pass ``candidates``). ``ivf`` and ``ivf_sq8`` search a flat
index until the codebook holds ``max(256, 39 * nlist)`` keys, then train their coarse quantizer on
a sample of the keys, and train again whenever the codebook has grown 4x since. The index is never
saved: ``Codebook.load`` rebuilds it from the saved keys.

Devices: on a CUDA codebook, with a FAISS build that has GPU support, ``flat`` and ``ivf`` search
on the GPU through FAISS's GPU resources; ``hnsw`` (and everything when FAISS is CPU-only) runs on
the CPU. Either way a search is host code (the queries go to the host).

Every option reaching FAISS was validated by ``PrefilterConfig`` (horen_fast/prefilter.py), and
every k is clamped to the number of live keys: FAISS aborts the process on some bad arguments
instead of raising.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["FaissIndex", "INDEX_KINDS", "host_f32"]

INDEX_KINDS = ("flat", "ivf", "ivf_sq8", "hnsw")


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        raise ImportError("a FAISS prefilter needs FAISS: pip install faiss-cpu (or a faiss-gpu "
                          "build for CUDA codebooks)") from None
    return faiss


def _gpu_faiss(device: torch.device):
    faiss = _faiss()
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return None
    try:
        return faiss if faiss.get_num_gpus() > 0 else None
    except Exception:  # a GPU build on a machine without a usable GPU
        return None


def host_f32(x: torch.Tensor) -> np.ndarray:
    """A contiguous float32 numpy copy of ``x`` on the host (what FAISS reads)."""
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


class FaissIndex:
    """Labels, dead labels, training and search of one FAISS index (``config``: a PrefilterConfig).

    ``add(ids, keys)`` returns the labels it gave the new keys; ``remove(ids)`` returns the labels
    it marked dead; ``search_labels(queries, k)`` gives each row's k nearest live keys."""

    def __init__(self, key_dim: int, config, device: torch.device | str = "cpu"):
        self.faiss = _faiss()
        self.key_dim, self.config = key_dim, config
        self.kind = config.index
        self.device = torch.device(device)
        self._gpu = _gpu_faiss(self.device) if self.kind != "hnsw" else None
        self._res = self._gpu.StandardGpuResources() if self._gpu is not None else None
        self.rebuilds = 0
        self.trained_at = 0   # live count when the IVF quantizer was last trained (0: flat)
        self.reset()

    # ---- description ------------------------------------------------------------------------
    @property
    def is_ivf(self) -> bool:
        return self.kind in ("ivf", "ivf_sq8")

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def live(self) -> int:
        return len(self._label_of)

    @property
    def total(self) -> int:
        """Labels handed out since the last rebuild (live and dead)."""
        return self._ntotal

    @property
    def dead(self) -> int:
        return self._ntotal - self.live

    @property
    def faiss_index(self):
        """The FAISS index object itself (for inspection; mutate it only through this class)."""
        return self._index

    def ids_of(self, labels: np.ndarray) -> np.ndarray:
        """Entry ids of index labels (any shape; -1 for -1 and for dead labels)."""
        labels = np.asarray(labels, dtype=np.int64)
        return np.where(labels >= 0, self._label_id[np.maximum(labels, 0)], -1)

    def live_ids(self) -> list[int]:
        return list(self._label_of)

    def labels_of(self, ids) -> list[int]:
        """The index labels of live entry ids (KeyError for an id not indexed)."""
        return [self._label_of[int(i)] for i in ids]

    def needs_rebuild(self, extra_dead_limit: int) -> bool:
        """Dead labels past the limit, or an IVF index due for (re)training."""
        limit = extra_dead_limit if self.on_gpu else self.config.rebuild_fraction * max(self._ntotal, 1)
        if self.dead > max(limit, 0):
            return True
        return self.is_ivf and self._due_training(self.live, self.trained_at)

    def _nlist(self, n: int) -> int:
        return int(self.config.nlist or min(65536, max(16, round(math.sqrt(n)))))

    def _due_training(self, n: int, trained_at: int) -> bool:
        if trained_at == 0:
            return n >= max(256, 39 * self._nlist(n))
        return n >= 4 * trained_at

    # ---- building ---------------------------------------------------------------------------
    def reset(self) -> None:
        """An empty flat (or HNSW) index: every label dropped, the IVF training forgotten."""
        self._index = self._new_flat()
        self.trained_at = 0
        self._ntotal = 0
        self._label_id = np.empty(0, dtype=np.int64)   # label -> entry id, -1 dead
        self._label_of: dict[int, int] = {}             # entry id -> label
        self._bitmap = None                             # alive labels, packed (CPU searches)

    def _new_flat(self):
        f = self.faiss
        if self.kind == "hnsw":
            idx = f.IndexHNSWFlat(self.key_dim, int(self.config.hnsw_m), f.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = int(self.config.ef_construction)
            return idx
        if self._gpu is not None:
            return f.GpuIndexFlatIP(self._res, self.key_dim)
        return f.IndexFlatIP(self.key_dim)

    def _train_ivf(self, keys: np.ndarray, probe_one: bool):
        f = self.faiss
        n = keys.shape[0]
        nlist = self._nlist(n)
        quantizer = f.IndexFlatIP(self.key_dim)
        if self.kind == "ivf_sq8":  # one byte a coordinate: a quarter of the memory of "ivf"
            idx = f.IndexIVFScalarQuantizer(quantizer, self.key_dim, nlist, f.ScalarQuantizer.QT_8bit,
                                            f.METRIC_INNER_PRODUCT)
        else:
            idx = f.IndexIVFFlat(quantizer, self.key_dim, nlist, f.METRIC_INNER_PRODUCT)
        idx.cp.niter = 10
        idx.cp.seed = int(self.config.seed)
        sample = min(n, 64 * nlist)
        rng = np.random.default_rng(int(self.config.seed))
        rows = np.sort(rng.choice(n, sample, replace=False)) if sample < n else slice(None)
        idx.train(np.ascontiguousarray(keys[rows]))
        # with the sketch the index only supplies a few exact candidates (its misses are covered):
        # one list, as measured in bench/RESULTS.md; alone it must find the near keys itself
        nprobe = self.config.nprobe or (1 if probe_one else max(8, nlist // 16))
        idx.nprobe = int(min(nprobe, nlist))
        self.trained_at = n
        if self._gpu is not None:
            gpu = self._gpu.index_cpu_to_gpu(self._res, max(self.device.index or 0, 0), idx)
            gpu.nprobe = idx.nprobe
            return gpu
        return idx

    def rebuild(self, keys: torch.Tensor, ids: torch.Tensor, probe_one: bool = False) -> np.ndarray:
        """Start over from the codebook's live keys [N, d] and ids [N] (drops dead labels; trains
        or retrains an IVF quantizer when due). Returns the new labels (0..N-1)."""
        host = host_f32(keys)
        n = host.shape[0]
        trained_at, old = self.trained_at, self._index
        self.reset()
        if self.is_ivf and self._due_training(n, trained_at):
            del old  # free the previous index before training the next one
            self._index = self._train_ivf(host, probe_one)
        elif trained_at > 0:
            old.reset()  # keeps the trained quantizer, drops every vector
            self._index, self.trained_at = old, trained_at
        labels = self._append(host, ids.detach().cpu().numpy().astype(np.int64).reshape(-1))
        self.rebuilds += 1
        return labels

    def _append(self, host: np.ndarray, ids: np.ndarray) -> np.ndarray:
        n = host.shape[0]
        labels = np.arange(self._ntotal, self._ntotal + n, dtype=np.int64)
        if n == 0:
            return labels
        if self.is_ivf and self.trained_at > 0:
            self._index.add_with_ids(host, labels)
        else:
            self._index.add(host)  # flat and HNSW label by position
        self._label_id = np.concatenate([self._label_id, ids])
        for i, lab in zip(ids.tolist(), labels.tolist()):
            self._label_of[i] = lab
        self._ntotal += n
        self._bitmap = None
        return labels

    # ---- upkeep (called by the prefilter) ---------------------------------------------------
    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> np.ndarray:
        """Index new entries (unit keys [n, d], ids [n]); returns their labels."""
        ids = ids.detach().cpu().numpy().astype(np.int64).reshape(-1)
        taken = [i for i in ids.tolist() if i in self._label_of]
        if taken:
            raise ValueError(f"entry ids {taken[:8]} are already indexed; remove them first")
        return self._append(host_f32(keys), ids)

    def remove(self, ids) -> list[int]:
        """Mark entries dead (skipped until the next rebuild); returns their labels."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        missing = [int(i) for i in ids if int(i) not in self._label_of]
        if missing:
            raise KeyError(f"entry ids {missing[:8]} are not in the prefilter index")
        labels = [self._label_of.pop(int(i)) for i in ids]
        self._label_id[labels] = -1
        self._bitmap = None
        return labels

    # ---- search -----------------------------------------------------------------------------
    def _params(self, k: int):
        f = self.faiss
        if self.kind == "hnsw":
            params = f.SearchParametersHNSW()
            params.efSearch = max(k, int(self.config.ef_search or 2 * k))
        elif self.is_ivf and self.trained_at > 0:
            params = f.SearchParametersIVF()
            params.nprobe = self._index.nprobe
        else:
            params = f.SearchParameters()
        if self.dead:
            if self._bitmap is None:  # one bit per label, set where alive
                self._bitmap = np.packbits(self._label_id >= 0, bitorder="little")
            sel = f.IDSelectorBitmap(self._ntotal, f.swig_ptr(self._bitmap))
            params.sel = sel
            return params, sel  # the caller keeps the selector alive through the search
        return params, None

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Entry ids [B, min(k, live)] of the nearest live keys by inner product (-1 padding)."""
        return self.search_labels(queries, k)[0]

    def search_labels(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(entry ids, index labels), both [B, min(k, live)] with -1 padding, of the nearest live
        keys (k is clamped to the live count before FAISS sees it)."""
        k = max(0, min(int(k), self.live))
        b = queries.shape[0]
        if k == 0 or b == 0:
            empty = np.full((b, k), -1, dtype=np.int64)
            return empty, empty.copy()
        if self.on_gpu:
            kk = min(self._ntotal, k + self.dead)  # a GPU index cannot skip labels: ask for more
            _, labels = self._index.search(queries, kk)
        else:
            params, _keep = self._params(k)
            _, labels = self._index.search(queries, k, params=params)
            kk = k
        ids = self.ids_of(labels)
        labels = np.where(ids >= 0, labels, -1)
        if kk != k:  # drop dead labels, keep the order, then cut to k
            order = np.argsort(ids < 0, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)[:, :k]
            labels = np.take_along_axis(labels, order, axis=1)[:, :k]
        return ids, labels

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return f"FaissIndex({self.kind!r}, live={self.live}, dead={self.dead}, {where})"
