"""A low-rank sketch of every key, for the part of HoReN's softmax that a prefilter leaves out.

At beta = 20 over tens of thousands of anisotropic keys, most of the Hopfield step's softmax mass
lies on keys far from the query, and an approximate index misses some of the keys near
it. The sketch keeps, for every key k_i, its coordinates y_i = P^T k_i in an r-dim basis P (the
top right singular vectors of a sample of the keys, uncentred, so the mean direction comes first;
r = 128 by default, stored in bfloat16: 256 bytes a key against 6144 for a float32 key of width
1536) and its residual energy e_i = 1 - ||y_i||^2 (keys are unit vectors).

For a unit query q, write q = P q_P + q_perp. Then q . k_i = q_P . y_i + q_perp . res_i.

- The tail. For keys unrelated to q the unknown second term is modelled as a Gaussian
  N(0, ||q_perp||^2 v_i), v_i = e_i / (d - r), the residual spread evenly over the d - r
  directions outside the basis. Its expectations give (Stein's lemma)

      w_i      ~= exp(beta q_P . y_i + beta^2 ||q_perp||^2 v_i / 2)
      w_i k_i  ~= w_i (P y_i + beta v_i q_perp)

  so the tail's weight and weighted key sum come from one pass over the sketch. The tail model
  uses only the first ``tail_rank`` (16) coordinates, with r, P, y_i, e_i and q_perp taken at
  that rank: the bulk of keys is what it models, and 16 coordinates describe the bulk (the
  decisions agree with exact retrieval as well as with 64, bench/RESULTS.md) at a quarter of the
  arithmetic.
- The near keys. The model is wrong for a key q is close to: there q_perp and res_i point the
  same way and q . k_i exceeds q_P . y_i by about (q . k_i) e_i. Such keys must be scored
  exactly. Cauchy-Schwarz bounds every key: q . k_i <= u_i = q_P . y_i + ||q_perp|| sqrt(e_i),
  and the same bound at a lower rank (the first 16 or 64 coordinates) is looser but cheaper,
  so a pass tests the cheap bounds first and reads a row's fine part only where they pass.
  ``scan`` also returns each row's ``nearest`` keys by u_i (they join the exact head and leave the
  tail), and ``rescue`` returns every key whose u_i reaches a floor (the best final cosine, or the
  threshold), to be rescored exactly: the final decision is then exact for the refined query.

Until the codebook holds ``fit_from`` keys the basis is the identity: the sketch holds the keys
themselves in float32 and the tail is exact. The basis is fitted then, and again each time the
codebook has grown 4x. Rows are indexed by the prefilter's labels; dead labels get no weight.

The passes are the ops "sketch_scan" and "sketch_rescue" of horen_fast/dispatch.py, and the exact
rescoring of flagged (query, key) pairs is the op "pair_dots" (``pair_dots`` below): the torch
functions here (``scan_torch``, ``rescue_torch``, ``pair_dots_torch``) are the reference and what
runs elsewhere (CUDA, float64, the identity basis, no compiled module); on the CPU with float32
queries and a fitted basis the C++ passes of horen_fast/native.py serve them (csrc/sketch: one
fused pass, blocks of 16 rows on AVX-512 or AVX2 (csrc/sketch/blocks.h) or a generic loop, OpenMP).

The tail is a model, not a bound: it is accurate where the keys' residuals look like noise (the
fitted SmolLM2 activations; see bench/RESULTS.md), and it is measured as decision agreement.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import dispatch, native  # noqa: F401  (native registers the C++ implementations)

__all__ = ["KeySketch", "SketchRows", "QueryParts", "pair_dots", "scan_torch", "rescue_torch",
           "pair_dots_torch"]

SCREEN_RANK = 32  # columns of rescue's first bound (most keys stop there)

# added to every bound: the rounding of float32 rows (the identity basis), or of bfloat16 rows and
# products (a fitted basis: relative error 2**-8 on each side of a cosine at most 1)
_SLACK = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


class SketchRows(NamedTuple):
    """The sketch's rows for labels [0, count), as the passes read them (views, no copies)."""
    coarse: torch.Tensor     # [count, bound_rank] the first basis coordinates
    fine: torch.Tensor       # [count, rank - bound_rank] the others
    energy: torch.Tensor     # [count] 1 - |y|^2
    energy_c: torch.Tensor   # [count] 1 - |y_c|^2 (the coarse part)
    energy_t: torch.Tensor   # [count] 1 - |first tail_rank values|^2
    energy_s: torch.Tensor   # [count] 1 - |first screen_rank values|^2
    alive: torch.Tensor      # [count] bool
    tail_rank: int
    screen_rank: int
    spread: float            # the tail model's residual variance per direction, per unit of e_t
    slack: float             # added to every bound


class QueryParts(NamedTuple):
    """Unit queries q [B, d] in the sketch's basis."""
    qc: torch.Tensor              # [B, bound_rank] the coarse coordinates
    qf: torch.Tensor              # [B, rank - bound_rank] the fine ones
    outside_t: torch.Tensor | None  # [B, d] q outside the tail's directions (None: identity basis)
    perp2: torch.Tensor           # [B] |q|^2 outside the basis
    perp2_c: torch.Tensor         # [B] ... outside the coarse directions
    perp2_t: torch.Tensor         # [B] ... outside the tail's directions


class KeySketch:
    """Label-aligned sketch rows with residual energies and an alive mask.

    A row is kept in two parts: the coarse part (the first ``bound_rank`` basis coordinates, 64 by
    default), which every pass reads for every key, and the fine part (the other
    ``rank - bound_rank``), read only for keys whose coarse bound can still matter (``u <= u_c``:
    Cauchy-Schwarz over the coordinates outside the coarse part). The tail model reads the first
    ``tail_rank`` (16) coordinates of the coarse part. Rows are float32 while the basis is the
    identity (everything coarse: exact) and bfloat16 once it is fitted (the bounds carry the
    rounding in ``slack``)."""

    def __init__(self, key_dim: int, rank: int = 128, *, tail_rank: int = 16, bound_rank: int = 64,
                 fit_from: int = 1024, device: torch.device | str = "cpu", seed: int = 1234):
        for name, value in (("sketch_rank", rank), ("tail_rank", tail_rank), ("bound_rank", bound_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.key_dim, self.rank = key_dim, min(rank, key_dim)
        self.fitted_bound_rank = min(bound_rank, self.rank)
        self.fitted_tail_rank = min(tail_rank, self.fitted_bound_rank)
        self.fitted_screen_rank = min(SCREEN_RANK, self.fitted_bound_rank)
        self.fit_from = max(int(fit_from), 4 * self.rank)
        self.device, self.seed = torch.device(device), seed
        self.basis: torch.Tensor | None = None   # [d, r]; None: identity (rows are the keys)
        self.fitted_at = 0
        self.clear()

    @property
    def tail_rank(self) -> int:
        return self.key_dim if self.basis is None else self.fitted_tail_rank

    @property
    def screen_rank(self) -> int:
        """Columns of rescue's first, cheapest bound."""
        return self.key_dim if self.basis is None else self.fitted_screen_rank

    @property
    def bound_rank(self) -> int:
        return self.key_dim if self.basis is None else self.fitted_bound_rank

    def clear(self) -> None:
        """Drop every row (the basis is kept)."""
        width = self.key_dim if self.basis is None else self.rank
        dtype = torch.float32 if self.basis is None else torch.bfloat16
        self._coarse = torch.empty(0, self.bound_rank, dtype=dtype, device=self.device)
        self._fine = torch.empty(0, width - self.bound_rank, dtype=dtype, device=self.device)
        self.slack = _SLACK[dtype]
        self._energy = torch.empty(0, device=self.device)     # 1 - |y|^2
        self._energy_c = torch.empty(0, device=self.device)   # 1 - |y_c|^2 (the coarse part)
        self._energy_t = torch.empty(0, device=self.device)   # 1 - |first tail_rank values|^2
        self._energy_s = torch.empty(0, device=self.device)   # 1 - |first screen_rank values|^2
        self._alive = torch.empty(0, dtype=torch.bool, device=self.device)
        self.count = 0

    # ---- basis --------------------------------------------------------------------------------
    def due(self, live: int) -> bool:
        """Whether the basis should be (re)fitted for a codebook of ``live`` keys."""
        if self.basis is None:
            return live >= self.fit_from
        return live >= 4 * self.fitted_at

    def fit(self, keys: torch.Tensor) -> None:
        """Fit the basis to (a sample of) unit keys [n, d]. Drops every row: re-add them after."""
        n = keys.shape[0]
        g = torch.Generator().manual_seed(self.seed)
        take = min(n, max(8192, 8 * self.rank))
        rows = torch.randperm(n, generator=g)[:take].to(keys.device) if take < n else slice(None)
        sample = keys[rows].to("cpu", torch.float32)  # small; fitted on the host
        with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator
            torch.manual_seed(self.seed)
            _, _, v = torch.svd_lowrank(sample, q=min(self.rank + 16, *sample.shape), niter=4)
        self.basis = v[:, : self.rank].contiguous().to(self.device)
        self.fitted_at = n
        self.clear()

    # ---- rows ---------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor) -> None:
        """Rows for the next labels (count, count + 1, ...), from unit keys [n, d]."""
        n = keys.shape[0]
        if self.count + n > self._alive.shape[0]:  # grow by doubling: O(1) amortized per key
            cap = max(1024, 2 * self._alive.shape[0], self.count + n)
            for name in ("_coarse", "_fine", "_energy", "_energy_c", "_energy_t", "_energy_s", "_alive"):
                old = getattr(self, name)
                new = torch.zeros((cap,) + tuple(old.shape[1:]), dtype=old.dtype, device=self.device)
                new[: self.count] = old[: self.count]
                setattr(self, name, new)
        k = keys.to(self.device, torch.float32)
        y = k if self.basis is None else k @ self.basis
        rc, rt, at = self.bound_rank, self.tail_rank, slice(self.count, self.count + n)
        self._coarse[at] = y[:, :rc]
        self._fine[at] = y[:, rc:]
        widths = (("_energy", y.shape[1]), ("_energy_c", rc), ("_energy_t", rt), ("_energy_s", self.screen_rank))
        for name, width in widths:
            part = y[:, :width]
            getattr(self, name)[at] = 0.0 if self.basis is None else (1.0 - (part * part).sum(1)).clamp(min=0.0)
        self._alive[at] = True
        self.count += n

    def kill(self, labels) -> None:
        idx = torch.as_tensor(list(labels), dtype=torch.long, device=self.device)
        self._alive[idx] = False

    def rows(self) -> SketchRows:
        """The rows of labels [0, count) (views of the sketch's buffers)."""
        n = self.count
        return SketchRows(self._coarse[:n], self._fine[:n], self._energy[:n], self._energy_c[:n],
                          self._energy_t[:n], self._energy_s[:n], self._alive[:n], self.tail_rank,
                          self.screen_rank, 1.0 / max(self.key_dim - self.tail_rank, 1), self.slack)

    def query_parts(self, q: torch.Tensor) -> QueryParts:
        """Unit queries q [B, d] split as the passes read them."""
        b = q.shape[0]
        if self.basis is None:
            zero = torch.zeros(b, dtype=q.dtype, device=q.device)
            return QueryParts(q, q[:, :0], None, zero, zero, zero)
        p = self.basis.to(q.dtype)
        rc, rt = self.bound_rank, self.tail_rank
        qp = q @ p
        qc, qf = qp[:, :rc], qp[:, rc:]
        outside_t = q - qp[:, :rt] @ p[:, :rt].T
        perp2_t = (outside_t * outside_t).sum(1)
        perp2_c = (perp2_t - (qp[:, rt:rc] ** 2).sum(1)).clamp(min=0.0)
        perp2 = (perp2_c - (qf * qf).sum(1)).clamp(min=0.0)
        return QueryParts(qc.contiguous(), qf.contiguous(), outside_t, perp2, perp2_c, perp2_t)

    # ---- the passes ---------------------------------------------------------------------------
    def _impl(self, impl: str) -> str:
        # the identity basis (float32 rows, an exact tail) has no C++ pass: torch, without a warning
        return "torch" if impl == "auto" and self.basis is None else impl

    def scan(self, q: torch.Tensor, beta: float, exclude: torch.Tensor, nearest: int = 0, *,
             impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over the rows for unit queries q [B, d] (float32 or float64).

        Returns (log_z [B], mean [B, d], near [B, nearest], beyond [B]): ``near`` holds, per row,
        the labels of the ``nearest`` alive keys outside ``exclude`` (labels [B, k], -1 ignored)
        with the largest bounds u_i (-1 where there are fewer); ``log_z`` and ``mean`` are the log
        of the summed softmax weight and the weighted mean key of every other alive key (outside
        ``exclude`` and ``near``), modelled from the coarse part (a row with nothing left gets
        (-inf, 0)); ``beyond`` bounds q . k for every such other key (up to ``slack``): the
        nearest-th largest u_i, -inf when no key is left, +inf when ``nearest`` is 0. ``impl``:
        the implementation of the op "sketch_scan" (horen_fast/dispatch.py)."""
        rows, parts = self.rows(), self.query_parts(q)
        run = dispatch.select("sketch_scan", rows, parts, beta, exclude, nearest, impl=self._impl(impl))
        run_max, run_z, run_y, run_v, near, near_u = run(rows, parts, beta, exclude, nearest)
        z = run_z.clamp(min=torch.finfo(run_y.dtype).tiny)
        mean = run_y / z[:, None]
        if self.basis is not None:
            dtype = run_y.dtype
            mean = (mean @ self.basis[:, : self.tail_rank].to(dtype).T
                    + beta * (rows.spread * run_v / z)[:, None] * parts.outside_t.to(dtype))
        log_z = torch.where(run_z > 0, run_max + torch.log(z), torch.full_like(z, float("-inf")))
        if nearest == 0:
            beyond = torch.full((q.shape[0],), float("inf"), dtype=q.dtype, device=q.device)
        else:
            beyond = near_u[:, nearest - 1].to(q.dtype)
        return log_z, mean, near, beyond

    def rescue(self, q: torch.Tensor, floor: torch.Tensor, exclude: torch.Tensor, *,
               impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """(row, label) pairs of every alive key outside ``exclude`` whose cosine with q might
        exceed ``floor`` [B]: u_i + slack > floor. ``impl``: the implementation of the op
        "sketch_rescue" (horen_fast/dispatch.py)."""
        rows, parts = self.rows(), self.query_parts(q)
        run = dispatch.select("sketch_rescue", rows, parts, floor, exclude, impl=self._impl(impl))
        return run(rows, parts, floor, exclude)

    def __repr__(self) -> str:
        basis = ("identity" if self.basis is None else
                 f"rank {self.rank} (bounds from {self.bound_rank}, tail from {self.tail_rank}), "
                 f"fitted at {self.fitted_at}")
        return f"KeySketch({basis}, rows={self.count})"


# ---- the torch reference of the ops (dispatch implementations "torch") -------------------------------
def _chunks(count: int, batch: int):
    step = max(16384, (1 << 22) // max(batch, 1))
    for lo in range(0, count, step):
        yield lo, min(count, lo + step)


def _excluded(rows: SketchRows, lo: int, hi: int, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Set logits [B, hi - lo] to -inf at dead labels and at each row's own ``labels``."""
    logits = logits.masked_fill(~rows.alive[lo:hi][None, :], float("-inf"))
    inside = (labels >= lo) & (labels < hi)
    r, c = inside.nonzero(as_tuple=True)
    logits[r, labels[r, c] - lo] = float("-inf")
    return logits


def _bounds(rows: SketchRows, lo: int, hi: int, parts: QueryParts) -> torch.Tensor:
    """Full Cauchy-Schwarz bounds u_i on q . k_i for labels [lo, hi): [B, hi - lo]."""
    dtype = parts.qc.dtype
    s = parts.qc @ rows.coarse[lo:hi].to(dtype).T + parts.qf @ rows.fine[lo:hi].to(dtype).T
    return s + parts.perp2.sqrt()[:, None] * rows.energy[lo:hi].to(dtype).sqrt()[None, :]


def scan_torch(rows: SketchRows, parts: QueryParts, beta: float, exclude: torch.Tensor, nearest: int):
    """The op "sketch_scan": (run_max, run_z, run_y, run_v, near, near_u) for every query row: the
    tail's weights relative to exp(run_max) (their sum, their weighted first ``tail_rank`` coarse
    coordinates, their weighted e_t) over the alive labels outside ``exclude`` [B, K] (-1 ignored)
    and outside ``near`` [B, nearest] (the labels of largest full bound u, -1 padding; near_u
    those bounds, -inf padding)."""
    qc = parts.qc
    b, dtype, rt = qc.shape[0], qc.dtype, rows.tail_rank
    qt = qc[:, :rt]
    run_max = torch.full((b,), float("-inf"), dtype=dtype, device=qc.device)
    run_z = torch.zeros(b, dtype=dtype, device=qc.device)
    run_y = torch.zeros_like(qt)
    run_v = torch.zeros(b, dtype=dtype, device=qc.device)
    top_u = torch.full((b, 0), float("-inf"), dtype=dtype, device=qc.device)
    near = torch.empty(b, 0, dtype=torch.long, device=qc.device)
    half = (0.5 * beta * beta * rows.spread * parts.perp2_t)[:, None]
    for lo, hi in _chunks(rows.coarse.shape[0], b):  # rows widened to the queries' dtype: exact products
        y = rows.coarse[lo:hi, :rt].to(dtype)
        e = rows.energy_t[lo:hi].to(dtype)
        logits = _excluded(rows, lo, hi, exclude, beta * (qt @ y.T) + half * e[None, :])
        if nearest:
            upper = torch.where(torch.isfinite(logits), _bounds(rows, lo, hi, parts), logits)
            val, col = upper.topk(min(nearest, hi - lo), dim=1)
            top_u, pick = torch.cat([top_u, val], 1).topk(min(nearest, top_u.shape[1] + val.shape[1]), dim=1)
            near = torch.cat([near, col + lo], 1).gather(1, pick)
        m = torch.maximum(run_max, logits.max(1).values)
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(logits - shift[:, None])
        keep = torch.exp(run_max - shift)  # rescale what came before to the new maximum
        run_z = run_z * keep + w.sum(1)
        run_y = run_y * keep[:, None] + w @ y
        run_v = run_v * keep + w @ e
        run_max = m
    near = torch.where(torch.isfinite(top_u), near, torch.full_like(near, -1))
    if near.shape[1]:  # take the near keys' terms back out: they join the exact head
        got = near >= 0
        y = rows.coarse[near.clamp(min=0), :rt].to(dtype)                  # [B, k, rt]
        e = rows.energy_t[near.clamp(min=0)].to(dtype)
        s = torch.bmm(qt[:, None, :], y.transpose(1, 2))[:, 0]
        shift = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
        w = torch.where(got, torch.exp(beta * s + half * e - shift[:, None]), torch.zeros_like(s))
        run_z = (run_z - w.sum(1)).clamp(min=0.0)
        run_y = run_y - torch.bmm(w[:, None, :], y)[:, 0]
        run_v = run_v - (w * e).sum(1)
    if near.shape[1] < nearest:
        near = torch.cat([near, near.new_full((b, nearest - near.shape[1]), -1)], 1)
        top_u = torch.cat([top_u, top_u.new_full((b, nearest - top_u.shape[1]), float("-inf"))], 1)
    return run_max, run_z, run_y, run_v, near, top_u


def rescue_torch(rows: SketchRows, parts: QueryParts, floor: torch.Tensor, exclude: torch.Tensor):
    """The op "sketch_rescue": (row, label) pairs of every alive label outside ``exclude`` whose
    full bound reaches ``floor`` [B]: u_i + slack > floor."""
    found_rows, labels = [], []
    for lo, hi in _chunks(rows.coarse.shape[0], parts.qc.shape[0]):
        upper = _excluded(rows, lo, hi, exclude, _bounds(rows, lo, hi, parts) + rows.slack)
        r, c = (upper > floor[:, None]).nonzero(as_tuple=True)
        found_rows.append(r)
        labels.append(c + lo)
    if not found_rows:
        empty = torch.empty(0, dtype=torch.long, device=parts.qc.device)
        return empty, empty
    return torch.cat(found_rows), torch.cat(labels)


def pair_dots_torch(keys: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The op "pair_dots": q[rows[i]] . keys[slots[i]] for every i, in q's dtype (bounded chunks)."""
    return torch.cat([(keys[slots[i: i + 32768]].to(q.dtype) * q[rows[i: i + 32768]]).sum(1)
                      for i in range(0, slots.numel(), 32768)] or [q.new_empty(0)])


def pair_dots(keys: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, *,
              impl: str = "auto") -> torch.Tensor:
    """q[rows[i]] . keys[slots[i]] for every i (keys [S, d] of any row stride, q [B, d], rows and
    slots [n] integer indices): the rescue's exact rescoring. In C++ without copying the keys when
    both are float32 on the CPU, else in torch (q's dtype)."""
    return dispatch.select("pair_dots", keys, q, rows, slots, impl=impl)(keys, q, rows, slots)


def _serves_all(*args) -> list[str]:
    return []


dispatch.register("sketch_scan", "torch", _serves_all, scan_torch)
dispatch.register("sketch_rescue", "torch", _serves_all, rescue_torch)
dispatch.register("pair_dots", "torch", _serves_all, pair_dots_torch)
