"""A FAISS prefilter for the codebook: top-k candidates by cosine, then HoReN over the candidates.

``Codebook(..., prefilter="faiss", index="flat" | "ivf" | "ivf_sq8" | "hnsw", candidates=k)``
keeps a FAISS inner-product index over its unit keys in step with every add, update and remove
(``ivf_sq8`` stores the keys at one byte a coordinate: candidates are rescored from the codebook's
own keys anyway). Retrieval then
asks the index for each query's k nearest keys, and runs the damped Hopfield step(s) and the final
scoring over those k keys only (with the keys' exact values from the codebook, not the index's
approximate scores).

The candidates alone are a poor approximation (SPEC 3): the exact softmax runs over every key, and
with anisotropic keys at beta = 20 the keys outside the top k carry most of its mass; an IVF index
also misses some of the keys nearest the query. So by default (``tail="sketch"``) the prefilter
keeps a low-rank sketch of every key (horen_fast/sketch.py) and, in one pass over it per step:
- adds each row's ``sketch_candidates`` keys of highest Cauchy-Schwarz bound to its exact set
  (the keys the index may have missed; for batches of fewer than 8 queries, where the pass is
  bound by memory and these are nearly free: a batch relies on the rescue below instead);
- models the softmax mass of every other key (log weight and weighted mean key) and adds it to
  the exact candidates' part of the Hopfield step;
- after the step, rescores exactly every key whose bound can still beat the best final cosine or
  pass the threshold (``rescue``, on by default), so the final decision is exact for the refined
  query. The scan also bounds every key left outside the exact set (its ``sketch_candidates``-th
  bound); carried through the steps like safe mode's bound below, it lets most rows skip this
  second pass.
``tail="none"`` is the candidates alone. Either way it is an approximation: measure it as
decisions (matched, index) that agree with exact retrieval (bench/bench_prefilter.py), not as
recall. The rescue is what keeps decisions exact, and its cost grows with the number of keys whose
bound reaches the floor: with a low threshold in a dense codebook (many keys within about 0.1 of a
row's best cosine) it rescores thousands of keys a row (bench/RESULTS.md: tau 0.735 at 1M keys,
5x faster than exact at B=64 instead of 12x).

Options (``prefilter_options``): ``tail`` ("sketch" or "none"), ``sketch_rank`` (128),
``tail_rank`` (16: the sketch coordinates the tail model reads), ``bound_rank`` (64: the coarse
part every pass reads for its first bound), ``sketch_candidates`` (= ``candidates``),
``sketch_from`` (1024: the basis is the identity, and the tail exact, below this many keys),
``rescue`` (True); index tuning: ``nlist`` (sqrt N), ``nprobe`` (1 with the sketch, else
nlist / 16, at least 8), ``hnsw_m``, ``ef_search``, ``ef_construction``, ``rebuild_fraction``,
``seed``.

``safe=True`` (which takes ``tail="none"``) certifies each row or answers it exactly. It needs an
exact candidate search (``index="flat"``), so that the k-th candidate's cosine s_k bounds every key outside the
candidates. A row is kept when, at every Hopfield step t, the softmax mass outside the candidates,
relative to the largest term, is at most ``(N - k) * exp(beta * (u_t - m_t)) <= tolerance`` (u_t:
a bound on every outside cosine with q_t, m_t: the best candidate cosine with q_t), and when the
final winner is certain: no outside key can beat the best candidate's final cosine, or none can
pass the threshold while no candidate does. The bound on outside cosines is carried through each
step with q_t = ((1 - alpha) q_{t-1} + alpha r_t) / n_t and r_t . k <= 1, so
u_t = ((1 - alpha) u_{t-1} + alpha) / n_t. Other rows go to exact retrieval (the codebook's
backend). A row whose candidates cover the whole codebook is exact by construction. At realistic
sizes (tens of thousands of anisotropic keys, beta = 20) the bound is rarely small, so safe mode
mostly falls back: that is the cost of the guarantee, and the reason the fast mode is measured.

Index upkeep. The index holds its own labels (0, 1, 2, ... in insertion order) and a table from
label to entry id. Removing or re-keying an entry marks its label dead (HNSW cannot remove, and a
FAISS GPU index cannot either); searches skip dead labels (an ID selector on the CPU, a larger k
on the GPU), and the index is rebuilt from the codebook's live keys once dead labels pass
``rebuild_fraction`` of the index (on the GPU: once they pass ``candidates``). ``ivf`` searches a
flat index until the codebook holds ``max(256, 39 * nlist)`` keys, then trains its coarse
quantizer on a sample of the keys, and trains again whenever the codebook has grown 4x since.
The index is never saved: ``Codebook.load`` rebuilds it from the saved keys. The sketch's rows
follow the same labels (a dead label gets no weight) and are rebuilt with the index.

Devices. On a CUDA codebook, with a FAISS build that has GPU support, ``flat`` and ``ivf`` search on
the GPU through FAISS's GPU resources; ``hnsw`` (and everything when FAISS is CPU-only) runs on the
CPU. Either way the search is host code: the prefiltered path copies the queries to the host and
synchronizes, unlike exact retrieval. Use exact retrieval where a host sync is not allowed (CUDA
graphs).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .backends.torch_ref import normalize_queries
from .retrieval import RetrievalParams, RetrievalResult, compute_dtype
from . import sketch as _sketch
from .sketch import KeySketch

__all__ = ["FaissPrefilter", "INDEX_KINDS", "prefiltered_retrieve"]

INDEX_KINDS = ("flat", "ivf", "ivf_sq8", "hnsw")
_OPTIONS = {"nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "rebuild_fraction", "seed",
            "tail", "sketch_rank", "tail_rank", "bound_rank", "sketch_from", "sketch_candidates", "rescue"}
TAILS = ("sketch", "none")
# batches from this size skip the sketch's near keys: their scan is compute-bound there, and one
# rescue pass after the step costs less than testing every key against every row's near-key heap
NEAR_KEYS_BELOW = 8


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        raise ImportError("prefilter='faiss' needs FAISS: pip install faiss-cpu (or a faiss-gpu "
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


def _host_f32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


class FaissPrefilter:
    """A FAISS inner-product index over unit keys, labelled by codebook entry id.

    ``search(queries, k)`` returns, per row, up to k entry ids of the nearest live keys (-1 where
    fewer exist). The codebook calls ``add``/``remove`` on every change and ``rebuild`` when
    ``needs_rebuild`` says so; nothing else should mutate it.
    """

    def __init__(self, key_dim: int, *, index: str = "flat", candidates: int = 256, safe: bool = False,
                 tolerance: float = 1e-4, device: torch.device | str = "cpu", options: dict | None = None):
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(map(repr, INDEX_KINDS))}, got {index!r}")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be a positive integer (keys kept per query), got {candidates!r}")
        if not isinstance(safe, bool):
            raise TypeError(f"safe must be True or False, got {safe!r}")
        if safe and index != "flat":
            raise ValueError("safe=True needs an exact candidate search (index='flat'): with an "
                             "approximate index the k-th candidate does not bound the keys outside")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise ValueError(f"tolerance must be a number > 0 (outside softmax mass allowed in safe "
                             f"mode), got {tolerance!r}")
        options = dict(options or {})
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown prefilter option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        self.faiss = _faiss()
        self.key_dim, self.kind, self.candidates = key_dim, index, candidates
        self.safe, self.tolerance = safe, float(tolerance)
        self.options = options
        self.rebuild_fraction = float(options.get("rebuild_fraction", 0.25))
        tail = options.get("tail", "none" if safe else "sketch")
        if tail not in TAILS:
            raise ValueError(f"prefilter option tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
        if safe and tail != "none":
            raise ValueError("safe=True certifies rows from the candidates alone; use tail='none' with it")
        self.device = torch.device(device)
        self._gpu = _gpu_faiss(self.device) if index != "hnsw" else None
        self._res = self._gpu.StandardGpuResources() if self._gpu is not None else None
        self.rebuilds = 0
        self._trained_at = 0        # live count when the IVF quantizer was last trained (0: flat)
        self.sketch = None          # the tail model (horen_fast/sketch.py), labels as rows
        if tail == "sketch":
            self.sketch_candidates = options.get("sketch_candidates", candidates)
            if isinstance(self.sketch_candidates, bool) or not isinstance(self.sketch_candidates, int) \
                    or self.sketch_candidates < 0:
                raise ValueError(f"sketch_candidates must be an integer >= 0 (keys the sketch adds to "
                                 f"each row's candidates), got {self.sketch_candidates!r}")
            self.rescue = options.get("rescue", True)
            if not isinstance(self.rescue, bool):
                raise TypeError(f"prefilter option rescue must be True or False, got {self.rescue!r}")
            self.sketch = KeySketch(key_dim, options.get("sketch_rank", 128),
                                    tail_rank=options.get("tail_rank", 16),
                                    bound_rank=options.get("bound_rank", 64),
                                    fit_from=int(options.get("sketch_from", 1024)), device=self.device,
                                    seed=int(options.get("seed", 1234)))
        self._reset()

    # ---- description ------------------------------------------------------------------------
    def settings(self) -> dict:
        """What the codebook saves to recreate this prefilter (the index itself is not saved)."""
        return {"index": self.kind, "candidates": self.candidates, "safe": self.safe,
                "tolerance": self.tolerance, "options": dict(self.options)}

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
    def dead(self) -> int:
        return self._ntotal - self.live

    @property
    def needs_rebuild(self) -> bool:
        """Dead labels past the limit, or an IVF index due for (re)training."""
        limit = self.candidates if self.on_gpu else self.rebuild_fraction * max(self._ntotal, 1)
        if self.dead > max(limit, 0):
            return True
        if self.sketch is not None and self.sketch.due(self.live):
            return True
        return self.is_ivf and self._due_training(self.live, self._trained_at)

    def _nlist(self, n: int) -> int:
        return int(self.options.get("nlist") or min(65536, max(16, round(math.sqrt(n)))))

    def _due_training(self, n: int, trained_at: int) -> bool:
        if trained_at == 0:
            return n >= max(256, 39 * self._nlist(n))
        return n >= 4 * trained_at

    # ---- building -----------------------------------------------------------------------------
    def _reset(self) -> None:
        self._index = self._new_flat()
        self._trained_at = 0
        self._ntotal = 0
        self._label_id = np.empty(0, dtype=np.int64)   # label -> entry id, -1 dead
        self._label_of: dict[int, int] = {}             # entry id -> label
        self._bitmap = None                             # alive labels, packed (CPU searches)
        if getattr(self, "sketch", None) is not None:
            self.sketch.clear()

    def _new_flat(self):
        f = self.faiss
        if self.kind == "hnsw":
            idx = f.IndexHNSWFlat(self.key_dim, int(self.options.get("hnsw_m", 32)), f.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = int(self.options.get("ef_construction", 80))
            return idx
        if self._gpu is not None:
            return f.GpuIndexFlatIP(self._res, self.key_dim)
        return f.IndexFlatIP(self.key_dim)

    def _train_ivf(self, keys: np.ndarray):
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
        idx.cp.seed = int(self.options.get("seed", 1234))
        sample = min(n, 64 * nlist)
        rng = np.random.default_rng(int(self.options.get("seed", 1234)))
        rows = np.sort(rng.choice(n, sample, replace=False)) if sample < n else slice(None)
        idx.train(np.ascontiguousarray(keys[rows]))
        # with the sketch the index only supplies a few exact candidates (its misses are covered):
        # one list, as measured in bench/RESULTS.md; alone it must find the near keys itself
        idx.nprobe = int(self.options.get("nprobe") or (1 if self.sketch is not None else max(8, nlist // 16)))
        self._trained_at = n
        if self._gpu is not None:
            gpu = self._gpu.index_cpu_to_gpu(self._res, max(self.device.index or 0, 0), idx)
            gpu.nprobe = idx.nprobe
            return gpu
        return idx

    def rebuild(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Start over from the codebook's live keys [N, d] and their ids [N] (drops dead labels;
        trains or retrains an IVF quantizer, and fits the sketch's basis, when due)."""
        if self.sketch is not None and self.sketch.due(keys.shape[0]):
            self.sketch.fit(keys)
        host = _host_f32(keys)
        n = host.shape[0]
        trained_at, old = self._trained_at, self._index
        self._reset()
        if self.is_ivf and self._due_training(n, trained_at):
            del old  # free the previous index before training the next one
            self._index = self._train_ivf(host)
        elif trained_at > 0:
            old.reset()  # keeps the trained quantizer, drops every vector
            self._index, self._trained_at = old, trained_at
        self._append(host, ids.detach().cpu().numpy().astype(np.int64).reshape(-1), keys)
        self.rebuilds += 1

    def _append(self, host: np.ndarray, ids: np.ndarray, keys: torch.Tensor) -> None:
        n = host.shape[0]
        if n == 0:
            return
        if self.sketch is not None:
            self.sketch.append(keys)
        labels = np.arange(self._ntotal, self._ntotal + n, dtype=np.int64)
        if self.is_ivf and self._trained_at > 0:
            self._index.add_with_ids(host, labels)
        else:
            self._index.add(host)  # flat and HNSW label by position
        self._label_id = np.concatenate([self._label_id, ids])
        for i, lab in zip(ids.tolist(), labels.tolist()):
            self._label_of[i] = lab
        self._ntotal += n
        self._bitmap = None

    # ---- upkeep (called by the codebook) ------------------------------------------------------
    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Index new entries (unit keys [n, d], ids [n])."""
        ids = ids.detach().cpu().numpy().astype(np.int64).reshape(-1)
        for i in ids.tolist():
            if i in self._label_of:
                raise ValueError(f"entry id {i} is already indexed; remove it first")
        self._append(_host_f32(keys), ids, keys)

    def remove(self, ids) -> None:
        """Mark entries dead (their labels are skipped until the next rebuild)."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        for i in ids:
            lab = self._label_of.pop(int(i), None)
            if lab is None:
                raise KeyError(f"entry id {int(i)} is not in the prefilter index")
            self._label_id[lab] = -1
            self._bitmap = None
            if self.sketch is not None:
                self.sketch.kill([lab])

    def update(self, entry_id: int, key: torch.Tensor) -> None:
        self.remove([entry_id])
        self.add(torch.tensor([entry_id]), key.reshape(1, -1))

    # ---- search -------------------------------------------------------------------------------
    def _params(self, k: int):
        f = self.faiss
        if self.kind == "hnsw":
            params = f.SearchParametersHNSW()
            params.efSearch = max(k, int(self.options.get("ef_search", 0) or 2 * k))
        elif self.is_ivf and self._trained_at > 0:
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
        """Entry ids [B, k] of the nearest live keys by inner product (-1 padding)."""
        return self.search_labels(queries, k)[0]

    def search_labels(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(entry ids, index labels), both [B, k] with -1 padding, of the nearest live keys."""
        k = min(k, self.live)
        b = queries.shape[0]
        if k == 0 or b == 0:
            empty = np.full((b, max(k, 0)), -1, dtype=np.int64)
            return empty, empty.copy()
        if self.on_gpu:
            kk = min(self._ntotal, k + self.dead)  # a GPU index cannot skip labels: ask for more
            _, labels = self._index.search(queries, kk)
        else:
            params, _keep = self._params(k)
            _, labels = self._index.search(queries, k, params=params)
            kk = k
        ids = np.where(labels >= 0, self._label_id[np.maximum(labels, 0)], -1)
        labels = np.where(ids >= 0, labels, -1)
        if kk != k:  # drop dead labels, keep the order, then cut to k
            order = np.argsort(ids < 0, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)[:, :k]
            labels = np.take_along_axis(labels, order, axis=1)[:, :k]
        return ids, labels

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return (f"FaissPrefilter(index={self.kind!r}, candidates={self.candidates}, safe={self.safe}, "
                f"live={self.live}, dead={self.dead}, {where})")


def prefiltered_retrieve(queries: torch.Tensor, keys: torch.Tensor, slot_of_id: torch.Tensor,
                         prefilter: FaissPrefilter, params: RetrievalParams,
                         exact) -> RetrievalResult:
    """HoReN retrieval over each row's candidates, plus the sketch's model of the rest when the
    prefilter has one. Returns slots (positions in ``keys``) in ``index``, like ``retrieve``;
    ``exact(queries_subset)`` answers rows safe mode rejects."""
    n = keys.shape[0]
    dtype = compute_dtype(queries, keys)
    q, valid = normalize_queries(queries, dtype)
    ids, labels = prefilter.search_labels(_host_f32(q), prefilter.candidates)
    sketch = prefilter.sketch
    labels_t = torch.from_numpy(labels).to(keys.device)
    first_tail = beyond = None
    if sketch is not None:  # the tail at q_0, and the keys the index may have missed
        near = prefilter.sketch_candidates if q.shape[0] < NEAR_KEYS_BELOW else 0
        *first_tail, more, beyond = sketch.scan(q, params.beta, labels_t, near)
        more = more.cpu().numpy()
        more_ids = np.where(more >= 0, prefilter._label_id[np.maximum(more, 0)], -1)
        ids, labels = np.concatenate([ids, more_ids], 1), np.concatenate([labels, more], 1)
        labels_t = torch.from_numpy(labels).to(keys.device)
    k = ids.shape[1]
    ids_t = torch.from_numpy(ids).to(keys.device)
    slots = torch.where(ids_t >= 0, slot_of_id[ids_t.clamp(min=0)], torch.full_like(ids_t, -1))
    present = slots >= 0
    kc = keys[slots.clamp(min=0).reshape(-1)].to(dtype).reshape(q.shape[0], k, -1)  # [B, k, d]
    neg = torch.tensor(float("-inf"), dtype=dtype, device=q.device)

    def cos(vec):  # [B, k] cosines of each row's candidates, -inf where absent
        return torch.where(present, torch.bmm(kc, vec[:, :, None])[:, :, 0], neg)

    covered = present.sum(1) >= n            # the candidates are the whole codebook
    certain = valid.clone()
    inf = torch.tensor(float("inf"), dtype=dtype, device=q.device)
    # s_k, the k-th candidate's cosine, bounds every outside cosine (exact search, all k present)
    bound = torch.where(present.all(dim=1), cos(q).min(dim=1).values, inf) if prefilter.safe else None
    outside = float(n - k)
    running = valid.clone()
    for step_no in range(params.steps):
        s = cos(q)
        if prefilter.safe:
            top = s.max(dim=1).values
            certain &= outside * torch.exp(params.beta * (bound - top)) <= prefilter.tolerance
        logits = params.beta * s
        head_max = logits.max(dim=1).values
        if sketch is not None:  # the keys outside the candidates, from the sketch
            tail_log, tail_mean = (first_tail if step_no == 0 else
                                   sketch.scan(q, params.beta, labels_t)[:2])
            top = torch.maximum(head_max, tail_log)
        else:
            top = head_max
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.where(present, torch.exp(logits - top[:, None]), torch.zeros_like(logits))
        total = torch.bmm(w[:, None, :], kc)[:, 0]
        if sketch is not None:
            total = total + torch.exp(tail_log - top)[:, None] * tail_mean
        r = torch.nn.functional.normalize(total, dim=1, eps=1e-30)
        running = running & ((r - q).norm(dim=1) >= params.eps)
        raw = (1 - params.alpha) * q + params.alpha * r
        norm = raw.norm(dim=1)
        step = raw / norm.clamp(min=1e-30)[:, None]
        if prefilter.safe:
            bound = torch.where(running, ((1 - params.alpha) * bound + params.alpha) / norm.clamp(min=1e-30),
                                bound)
        if beyond is not None:  # keys outside the exact set had q_0 . k <= beyond: carry it the same way
            beyond = torch.where(running, ((1 - params.alpha) * beyond + params.alpha) / norm.clamp(min=1e-30),
                                 beyond)
        q = torch.where(running[:, None], step, q)
    c = cos(q)
    best = c.max(dim=1).values
    big = torch.iinfo(torch.long).max
    slot = torch.where(present & (c == best[:, None]), slots, torch.full_like(slots, big)).min(dim=1).values
    if sketch is not None and prefilter.rescue:
        best, slot = _rescue(q, valid, best, slot, keys, slot_of_id, prefilter, labels_t, params.threshold,
                             beyond)
    matched = valid & (best > params.threshold) & (slot != big)
    index = torch.where(matched, slot, torch.full_like(slot, -1))
    score = torch.where(matched, best, torch.full_like(best, float("nan")))
    if prefilter.safe:
        certain &= (bound < best) | ((bound <= params.threshold) & (best <= params.threshold))
        redo = valid & ~(certain | covered)
        if bool(redo.any()):  # host sync: the rows to answer exactly
            rows = redo.nonzero()[:, 0]
            sub = exact(queries[rows])
            index = index.clone(); score = score.clone(); matched = matched.clone()
            index[rows], score[rows], matched[rows] = sub.index, sub.score.to(score.dtype), sub.matched
    return RetrievalResult(index=index, score=score, matched=matched)


def pair_dots(keys: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q[rows[i]] . keys[slots[i]] for every i, in q's dtype: in C++ without copying the keys when
    both are float32 on the CPU (keys rows contiguous), else in torch in bounded chunks."""
    native = _sketch._native
    if (native is not None and keys.device.type == "cpu" and keys.dtype == torch.float32
            and q.dtype == torch.float32 and keys.stride(1) == 1 and rows.numel()):
        qc = q.contiguous()
        rows, slots = rows.contiguous(), slots.contiguous()
        out = torch.empty(rows.numel(), dtype=torch.float32)
        native.pair_dots(keys.data_ptr(), keys.stride(0), qc.data_ptr(), qc.shape[1], rows.data_ptr(),
                         slots.data_ptr(), rows.numel(), out.data_ptr(), torch.get_num_threads())
        return out
    return torch.cat([(keys[slots[i: i + 32768]].to(q.dtype) * q[rows[i: i + 32768]]).sum(1)
                      for i in range(0, slots.numel(), 32768)] or [q.new_empty(0)])


def _rescue(q, valid, best, slot, keys, slot_of_id, prefilter, labels, threshold, beyond):
    """Score exactly the keys outside the exact set whose bound says they might beat the best
    final cosine (and the threshold); return the updated (best cosine, slot) per row. Rows whose
    carried bound ``beyond`` already rules every outside key out skip the pass."""
    sketch = prefilter.sketch
    floor = torch.where(valid, torch.clamp(best, min=threshold), torch.full_like(best, float("inf")))
    need = (beyond + sketch.slack > floor).nonzero()[:, 0]
    if need.numel() == 0:  # host sync: which rows need the pass
        return best, slot
    sub_rows, lab = sketch.rescue(q[need], floor[need], labels[need])
    rows = need[sub_rows.to(need.device)]
    if rows.numel() == 0:  # host sync: how many keys to rescore
        return best, slot
    ids = torch.from_numpy(prefilter._label_id[lab.cpu().numpy()]).to(keys.device)
    s = slot_of_id[ids]
    val = pair_dots(keys, q, rows, s)
    new_best = best.scatter_reduce(0, rows, val, "amax")
    big = torch.iinfo(torch.long).max
    kept = torch.where(new_best == best, slot, torch.full_like(slot, big))  # a candidate still ties
    at_best = torch.where(val == new_best[rows], s, torch.full_like(s, big))
    return new_best, torch.minimum(kept, torch.full_like(slot, big).scatter_reduce(0, rows, at_best, "amin"))
