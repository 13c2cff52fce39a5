"""A low-rank sketch of every key, for the part of HoReN's softmax that a prefilter leaves out.

At beta = 20 over tens of thousands of anisotropic keys, most of the Hopfield step's softmax mass
lies on keys far from the query (SPEC 3), so the top-k candidates alone move the refined query
the wrong way. The sketch keeps, for every key k_i, its coordinates y_i = P^T k_i in an r-dim
basis P (the top right singular vectors of a sample of the keys, uncentred, so the mean
direction comes first) and its residual energy e_i = 1 - ||y_i||^2 (keys are unit vectors).

For a unit query q, write q = P q_P + q_perp. Then q . k_i = q_P . y_i + q_perp . res_i, and the
unknown second term is modelled as a Gaussian N(0, ||q_perp||^2 v_i), v_i = e_i / (d - r), the
residual spread evenly over the d - r directions outside the basis. Its expectations give
(Stein's lemma)

    w_i      ~= exp(beta q_P . y_i + beta^2 ||q_perp||^2 v_i / 2)
    w_i k_i  ~= w_i (P y_i + beta v_i q_perp)

so the tail's weight and weighted key sum come from one pass over the [L, r] sketch instead of
the [N, d] keys (r = 32 against d = 1536 is 48x less to read). The head (the candidates) is
always exact.

The Gaussian model holds for keys unrelated to q, not for a key q is close to: there q_perp and
res_i point the same way and q . k_i exceeds q_P . y_i by about (q . k_i) e_i. So the keys near q
must be in the head, scored exactly. Two exact facts make sure of that. Cauchy-Schwarz bounds every
key: q . k_i <= u_i = q_P . y_i + ||q_perp|| sqrt(e_i). ``nearest`` returns each row's top keys by
u_i outside the index's candidates (they join the head), and ``rescue`` returns every key whose
u_i reaches the best final cosine (or the threshold), which are then scored exactly, so the final
decision is exact for the refined query.

Until the codebook holds ``fit_from`` keys the basis is the identity: the sketch holds the keys
themselves and the tail is exact. The basis is fitted then, and again each time the codebook has
grown 4x. Rows are indexed by the prefilter's labels; dead labels get no weight.

This is a model, not a bound: it is accurate where the keys' residuals look like noise (the
fitted SmolLM2 activations; see bench/RESULTS.md), and it is measured as decision agreement.
"""
from __future__ import annotations

import torch

try:  # the fused CPU scan (csrc/sketch_cpu.cpp); the torch code below is its reference
    from . import _sketch as _native
except ImportError:  # not built: the torch code runs instead
    _native = None

__all__ = ["KeySketch"]

# added to every bound: the rounding of float32 rows (the identity basis), or of bfloat16 rows and
# products (a fitted basis: relative error 2**-8 on each side of a cosine at most 1)
_SLACK = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


class KeySketch:
    """Label-aligned sketch rows [L, r] with residual energies [L] and an alive mask.

    Rows are float32 while the basis is the identity and bfloat16 once it is fitted (half the
    bytes per pass; the bounds carry the rounding in ``slack``)."""

    def __init__(self, key_dim: int, rank: int = 128, *, fit_from: int = 1024,
                 device: torch.device | str = "cpu", seed: int = 1234):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"sketch_rank must be a positive integer, got {rank!r}")
        self.key_dim, self.rank = key_dim, min(rank, key_dim)
        self.fit_from = max(int(fit_from), 4 * self.rank)
        self.device, self.seed = torch.device(device), seed
        self.basis: torch.Tensor | None = None   # [d, r]; None: identity (rows are the keys)
        self.fitted_at = 0
        self.clear()

    def clear(self) -> None:
        """Drop every row (the basis is kept)."""
        width = self.key_dim if self.basis is None else self.rank
        dtype = torch.float32 if self.basis is None else torch.bfloat16
        self._rows = torch.empty(0, width, dtype=dtype, device=self.device)
        self.slack = _SLACK[dtype]
        self._energy = torch.empty(0, device=self.device)
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
    def _project(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = keys.to(self.device, torch.float32)
        if self.basis is None:
            return k, torch.zeros(k.shape[0], device=self.device)
        y = k @ self.basis
        return y, (1.0 - (y * y).sum(1)).clamp(min=0.0)

    def append(self, keys: torch.Tensor) -> None:
        """Rows for the next labels (count, count + 1, ...), from unit keys [n, d]."""
        n = keys.shape[0]
        if self.count + n > self._rows.shape[0]:  # grow by doubling: O(1) amortized per key
            cap = max(1024, 2 * self._rows.shape[0], self.count + n)
            for name in ("_rows", "_energy", "_alive"):
                old = getattr(self, name)
                new = torch.zeros((cap,) + tuple(old.shape[1:]), dtype=old.dtype, device=self.device)
                new[: self.count] = old[: self.count]
                setattr(self, name, new)
        y, e = self._project(keys)
        self._rows[self.count: self.count + n] = y
        self._energy[self.count: self.count + n] = e
        self._alive[self.count: self.count + n] = True
        self.count += n

    def kill(self, labels) -> None:
        idx = torch.as_tensor(list(labels), dtype=torch.long, device=self.device)
        self._alive[idx] = False

    # ---- the two passes -----------------------------------------------------------------------
    def _split(self, q: torch.Tensor):
        """(q in sketch coordinates [B, r], q_perp [B, d] or None, ||q_perp||^2 [B])."""
        if self.basis is None:
            return q, None, torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)
        p = self.basis.to(q.dtype)
        qp = q @ p
        perp = q - qp @ p.T
        return qp, perp, (perp * perp).sum(1)

    def _chunks(self, batch: int):
        step = max(16384, (1 << 22) // max(batch, 1))
        for lo in range(0, self.count, step):
            yield lo, min(self.count, lo + step)

    def _excluded(self, lo: int, hi: int, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Set logits [B, hi - lo] to -inf at dead labels and at each row's own ``labels``."""
        logits = logits.masked_fill(~self._alive[lo:hi][None, :], float("-inf"))
        inside = (labels >= lo) & (labels < hi)
        rows, cols = inside.nonzero(as_tuple=True)
        logits[rows, labels[rows, cols] - lo] = float("-inf")
        return logits

    def _native_ok(self, q: torch.Tensor) -> bool:
        return (_native is not None and q.device.type == "cpu" and q.dtype == torch.float32
                and self._rows.dtype == torch.bfloat16)

    def _native_args(self, q: torch.Tensor, exclude: torch.Tensor):
        qp, perp, perp2 = self._split(q)
        excl = torch.where(exclude >= 0, exclude, self.count).sort(dim=1).values.contiguous()
        return qp.contiguous(), perp, perp2, excl

    def scan(self, q: torch.Tensor, beta: float, exclude: torch.Tensor,
             nearest: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over the rows for unit queries q [B, d] (float32 or float64).

        Returns (log_z [B], mean [B, d], near [B, nearest]): ``near`` holds, per row, the labels of
        the ``nearest`` alive keys outside ``exclude`` (labels [B, k], -1 ignored) with the largest
        bounds u_i (-1 where there are fewer); ``log_z`` and ``mean`` are the log of the summed
        softmax weight and the weighted mean key of every other alive key (outside ``exclude`` and
        ``near``); a row with nothing left gets (-inf, 0)."""
        if self._native_ok(q):
            return self._scan_native(q, beta, exclude, nearest)
        return self._scan_torch(q, beta, exclude, nearest)

    def _finish(self, q, perp, beta, run_max, run_z, run_y, run_v):
        """(log_z, mean) from the tail's sums (weights relative to exp(run_max))."""
        dtype = q.dtype
        z = run_z.clamp(min=torch.finfo(dtype).tiny)
        mean = run_y / z[:, None]
        if self.basis is not None:
            spread = 1.0 / max(self.key_dim - self.rank, 1)
            mean = mean @ self.basis.to(dtype).T + beta * (spread * run_v / z)[:, None] * perp
        log_z = torch.where(run_z > 0, run_max + torch.log(z), torch.full_like(z, float("-inf")))
        return log_z, mean

    def _scan_native(self, q, beta, exclude, nearest):
        qp, perp, perp2, excl = self._native_args(q, exclude)
        b, r, n = q.shape[0], self._rows.shape[1], self.count
        spread = 1.0 / max(self.key_dim - self.rank, 1)
        cvar = (0.5 * beta * beta * spread * perp2).contiguous()
        norm = perp2.sqrt().contiguous()
        run_max, run_z, run_v = (torch.empty(b) for _ in range(3))
        run_y = torch.empty(b, r)
        near = torch.empty(b, nearest, dtype=torch.long)
        near_u = torch.empty(b, nearest)
        _native.scan(qp.data_ptr(), norm.data_ptr(), cvar.data_ptr(), self._rows.data_ptr(),
                     self._energy.data_ptr(), self._alive.data_ptr(), excl.data_ptr(), b, r, n,
                     excl.shape[1], nearest, float(beta), torch.get_num_threads(), run_max.data_ptr(),
                     run_z.data_ptr(), run_y.data_ptr(), run_v.data_ptr(), near.data_ptr(), near_u.data_ptr())
        return (*self._finish(q, perp, beta, run_max, run_z, run_y, run_v), near)

    def _scan_torch(self, q, beta, exclude, nearest):
        qp, perp, perp2 = self._split(q)
        b, dtype = q.shape[0], q.dtype
        run_max = torch.full((b,), float("-inf"), dtype=dtype, device=q.device)
        run_z = torch.zeros(b, dtype=dtype, device=q.device)
        run_y = torch.zeros_like(qp)
        run_v = torch.zeros(b, dtype=dtype, device=q.device)
        top_u = torch.full((b, 0), float("-inf"), dtype=dtype, device=q.device)
        near = torch.empty(b, 0, dtype=torch.long, device=q.device)
        half = 0.5 * beta * beta * perp2[:, None]
        spread = 1.0 / max(self.key_dim - self.rank, 1)  # per direction outside the basis
        for lo, hi in self._chunks(b):  # rows widened to the queries' dtype: exact products
            y = self._rows[lo:hi].to(dtype)
            e = self._energy[lo:hi].to(dtype)
            s = qp @ y.T
            logits = self._excluded(lo, hi, exclude, beta * s + half * (e * spread)[None, :])
            if nearest:
                upper = torch.where(torch.isfinite(logits), s + perp2.sqrt()[:, None] * e.sqrt()[None, :],
                                    logits)
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
            y = self._rows[near.clamp(min=0)].to(dtype)                         # [B, k, r]
            e = self._energy[near.clamp(min=0)].to(dtype)
            s = torch.bmm(qp[:, None, :], y.transpose(1, 2))[:, 0]
            shift = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
            w = torch.where(got, torch.exp(beta * s + half * spread * e - shift[:, None]), torch.zeros_like(s))
            run_z = (run_z - w.sum(1)).clamp(min=0.0)
            run_y = run_y - torch.bmm(w[:, None, :], y)[:, 0]
            run_v = run_v - (w * e).sum(1)
        if near.shape[1] < nearest:
            near = torch.cat([near, near.new_full((b, nearest - near.shape[1]), -1)], 1)
        return (*self._finish(q, perp, beta, run_max, run_z, run_y, run_v), near)

    def _upper(self, lo: int, hi: int, qp: torch.Tensor, perp: torch.Tensor, exclude: torch.Tensor):
        """Cauchy-Schwarz bounds u_i on q . k_i [B, hi - lo], -inf at dead and excluded labels."""
        y = self._rows[lo:hi].to(qp.dtype)
        upper = qp @ y.T + perp[:, None] * self._energy[lo:hi].to(qp.dtype).sqrt()[None, :]
        return self._excluded(lo, hi, exclude, upper + self.slack)

    def rescue(self, q: torch.Tensor, floor: torch.Tensor, exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, label) pairs of every alive key outside ``exclude`` whose cosine with q might
        exceed ``floor`` [B]: u_i > floor."""
        if self._native_ok(q):
            qp, _, perp2, excl = self._native_args(q, exclude)
            norm, floor = perp2.sqrt().contiguous(), floor.float().contiguous()
            rows, labels = _native.rescue(qp.data_ptr(), norm.data_ptr(), self._rows.data_ptr(),
                                          self._energy.data_ptr(), self._alive.data_ptr(), excl.data_ptr(),
                                          floor.data_ptr(), q.shape[0], self._rows.shape[1], self.count,
                                          excl.shape[1], self.slack, torch.get_num_threads())
            return torch.from_numpy(rows), torch.from_numpy(labels)
        qp, _, perp2 = self._split(q)
        perp = perp2.sqrt()
        rows, labels = [], []
        for lo, hi in self._chunks(q.shape[0]):
            r, c = (self._upper(lo, hi, qp, perp, exclude) > floor[:, None]).nonzero(as_tuple=True)
            rows.append(r)
            labels.append(c + lo)
        if not rows:
            empty = torch.empty(0, dtype=torch.long, device=q.device)
            return empty, empty
        return torch.cat(rows), torch.cat(labels)

    def nbytes(self) -> int:
        return self.count * (self._rows.shape[1] * self._rows.element_size() + 5)

    def __repr__(self) -> str:
        basis = "identity" if self.basis is None else f"rank {self.rank}, fitted at {self.fitted_at}"
        return f"KeySketch({basis}, rows={self.count})"

