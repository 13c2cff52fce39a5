"""Fused Triton kernels for HoReN retrieval (SPEC section 3).

One Hopfield step reads the keys twice and nothing else of size N x d:

1. ``_scores_kernel`` (split over N, flash-decoding style): cosines s = q @ K^T for a block of
   queries against each key tile (d looped in chunks), written to ``s`` [B, N], plus the per-split
   running max of s (for a softmax without overflow) and, on the last step, the key norms and the
   per-split max of the lower bound used by the final scoring.
2. ``_wsum_kernel`` (split over N and d): acc = sum_i exp(beta (s_i - max)) k_i for one d chunk of
   one key split, written as a partial [splits, B, d]. The softmax denominator is not needed:
   r = normalize(acc) cancels it.
3. ``_update_kernel`` (one program per query row): sums the partials, r = normalize(acc), the per-row
   stop rule ||r - q|| < eps, q <- normalize((1 - alpha) q + alpha r) for rows still running, and
   ||(1 - alpha) q + alpha r|| for the final bound.

Final scoring without another full read: with u = (1 - a) q_{M-1} + a r_M and nrm = ||u||, the final
cosine of key i is c_i = ((1 - a) s_i + a r.k_i) / nrm, and |r.k_i| <= ||k_i||, so c_i lies in
[((1 - a) s_i - a ||k_i||) / nrm, ((1 - a) s_i + a ||k_i||) / nrm]. ``_final_kernel`` computes the
exact cosine only for keys whose upper bound reaches the best lower bound of the row and exceeds
the threshold (a key tile with no candidate loads no key row); rows that stopped, or steps == 0,
already have exact final cosines in s. Everything else is -inf, and argmax over the row picks the
answer (first index on ties).

Dot products go through ``tl.dot`` on tensor cores at about float32 accuracy when the query block
has 16 rows or more (bfloat16 keys: the float32 operand split into two bfloat16 parts; other keys:
``input_precision="tf32x3"``), and through broadcast multiply-sum for 1 to 4 query rows. Keys are
loaded in their dtype (float32, bfloat16, float16) and widened to float32. No host synchronization
anywhere: the launch sequence is capturable in a CUDA graph.

Why two reads per step and not one fused pass with an online softmax: the running weighted sum is
B x d float32 per key split (16 x 14336 x 4 bytes = 0.9 MB), which cannot stay on chip, so a
single pass would round-trip it through memory for every key tile, costing more than reading the
keys again. Splitting the weighted sum over d chunks keeps each accumulator in registers.
GPU performance of these kernels is not measured yet (bench/test_bench_kernels_gpu.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels are interpreted; remember which it was.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BOUND_SLACK = 1e-5  # cosine units: covers float32 rounding in s, the norms and r.k <= ||k||


@triton.jit
def _split_bf16(x):
    """x (float32) = hi + lo with both parts in bfloat16, to about 16 mantissa bits."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _mma(a, b, acc, DOT_BF16: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b for a float32 ``a`` and ``b`` in the key dtype, at about float32 accuracy.

    bfloat16 keys are exact in bfloat16, so a is split into two bfloat16 parts: two bf16 MMAs with
    float32 accumulation (error below 2^-16 of sum |a b|). Other keys use tf32x3 (three TF32 MMAs).
    ``EMULATE`` (Triton's interpreter, whose bf16 dot is not numeric) runs the same split in float32.
    """
    if DOT_BF16:
        hi, lo = _split_bf16(a)
        if EMULATE:
            bf = b.to(tl.float32)
            acc = tl.dot(hi.to(tl.float32), bf, acc, input_precision="ieee")
            acc = tl.dot(lo.to(tl.float32), bf, acc, input_precision="ieee")
        else:
            acc = tl.dot(hi, b, acc)
            acc = tl.dot(lo, b, acc)
    else:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="tf32x3")
    return acc


@triton.jit
def _scores_kernel(q_ptr, k_ptr, s_ptr, mpart_ptr, knorm_ptr, lpart_ptr,
                   B, N, D, stride_q, stride_k, stride_s, keys_per_split, alpha,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   USE_DOT: tl.constexpr, DOT_BF16: tl.constexpr, EMULATE: tl.constexpr,
                   LAST: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    n_start = pid_s * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    low = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        k_rows = k_ptr + cols.to(tl.int64)[:, None] * stride_k
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        ksq = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            qt = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :],
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            kraw = tl.load(k_rows + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            kt = kraw.to(tl.float32)
            if USE_DOT:
                acc = _mma(qt, tl.trans(kraw), acc, DOT_BF16, EMULATE)
            else:
                acc += tl.sum(qt[:, None, :] * kt[None, :, :], axis=2)
            if LAST:
                ksq += tl.sum(kt * kt, axis=1)
        tile_mask = rmask[:, None] & cmask[None, :]
        tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :], acc, mask=tile_mask)
        m = tl.maximum(m, tl.max(tl.where(cmask[None, :], acc, float("-inf")), axis=1))
        if LAST:
            kn = tl.sqrt(ksq)
            tl.store(knorm_ptr + cols, kn, mask=cmask & ((cols * 0 + pid_b) == 0))
            lo = (1.0 - alpha) * acc - alpha * kn[None, :]
            low = tl.maximum(low, tl.max(tl.where(cmask[None, :], lo, float("-inf")), axis=1))
    tl.store(mpart_ptr + pid_s * B + rows, m, mask=rmask)
    if LAST:
        tl.store(lpart_ptr + pid_s * B + rows, low, mask=rmask)


@triton.jit
def _row_max_over_splits(part_ptr, rows, rmask, B, NSPLIT, NSPLIT_PAD: tl.constexpr):
    """max over the split axis of a [NSPLIT, B] partial, for the given rows."""
    sp = tl.arange(0, NSPLIT_PAD)
    vals = tl.load(part_ptr + sp[:, None] * B + rows[None, :],
                   mask=(sp[:, None] < NSPLIT) & rmask[None, :], other=float("-inf"))
    return tl.max(vals, axis=0)


@triton.jit
def _wsum_kernel(k_ptr, s_ptr, mpart_ptr, part_ptr,
                 B, N, D, stride_k, stride_s, keys_per_split, NSPLIT1, beta_log2e,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 NSPLIT1_PAD: tl.constexpr, USE_DOT: tl.constexpr, DOT_BF16: tl.constexpr,
                 EMULATE: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    mx = _row_max_over_splits(mpart_ptr, rows, rmask, B, NSPLIT1, NSPLIT1_PAD)
    mx = tl.where(rmask, mx, 0.0)
    n_start = pid_s * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        sv = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=float("-inf"))
        p = tl.exp2((sv - mx[:, None]) * beta_log2e)
        kraw = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_k + dd[None, :],
                       mask=cmask[:, None] & dmask[None, :], other=0.0)
        if USE_DOT:
            acc = _mma(p, kraw, acc, DOT_BF16, EMULATE)
        else:
            acc += tl.sum(p[:, :, None] * kraw.to(tl.float32)[None, :, :], axis=1)
    tl.store(part_ptr + (pid_s * B + rows)[:, None] * D + dd[None, :], acc,
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _update_kernel(q_ptr, part_ptr, u_ptr, running_ptr, nrm_ptr,
                   B, D, stride_q, NSPLIT2, alpha, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    # pass 1: acc = sum of the split partials, and ||acc||^2
    asq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (dd < D)[None, :]
        a = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for j in range(0, NSPLIT2):
            a += tl.load(part_ptr + (j * B + rows)[:, None] * D + dd[None, :], mask=mask, other=0.0)
        tl.store(u_ptr + rows[:, None] * D + dd[None, :], a, mask=mask)
        asq += a * a
    inv_a = 1.0 / tl.maximum(tl.sqrt(tl.sum(asq, axis=1)), 1e-30)
    # pass 2: r = acc / ||acc||, ||r - q||^2, u = (1 - alpha) q + alpha r, ||u||^2
    dsq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    usq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (dd < D)[None, :]
        r = tl.load(u_ptr + rows[:, None] * D + dd[None, :], mask=mask, other=0.0) * inv_a[:, None]
        qv = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :], mask=mask, other=0.0)
        diff = r - qv
        dsq += diff * diff
        u = (1.0 - alpha) * qv + alpha * r
        usq += u * u
        tl.store(u_ptr + rows[:, None] * D + dd[None, :], u, mask=mask)
    unorm = tl.sqrt(tl.sum(usq, axis=1))
    run = (tl.load(running_ptr + rows, mask=rmask, other=0) != 0) & (tl.sqrt(tl.sum(dsq, axis=1)) >= eps)
    tl.store(running_ptr + rows, run.to(tl.int32), mask=rmask)
    tl.store(nrm_ptr + rows, unorm, mask=rmask)
    # pass 3: rows still running move to q_t = u / ||u||; stopped rows keep q
    inv_u = 1.0 / tl.maximum(unorm, 1e-30)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = (rmask & run)[:, None] & (dd < D)[None, :]
        u = tl.load(u_ptr + rows[:, None] * D + dd[None, :], mask=mask, other=0.0)
        tl.store(q_ptr + rows[:, None] * stride_q + dd[None, :], u * inv_u[:, None], mask=mask)


@triton.jit
def _final_kernel(q_ptr, k_ptr, s_ptr, knorm_ptr, lpart_ptr, nrm_ptr, running_ptr,
                  B, N, D, stride_q, stride_k, stride_s, NSPLIT1, alpha, threshold, slack,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  NSPLIT1_PAD: tl.constexpr, USE_DOT: tl.constexpr, DOT_BF16: tl.constexpr,
                  EMULATE: tl.constexpr):
    """In place: s[b, i] <- exact final cosine where it can win, s where already exact, else -inf."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    tile_mask = rmask[:, None] & cmask[None, :]
    s_tile = s_ptr + rows[:, None] * stride_s + cols[None, :]
    sv = tl.load(s_tile, mask=tile_mask, other=0.0)
    kn = tl.load(knorm_ptr + cols, mask=cmask, other=0.0)
    nrm = tl.maximum(tl.load(nrm_ptr + rows, mask=rmask, other=1.0), 1e-30)
    running = tl.load(running_ptr + rows, mask=rmask, other=0) != 0
    best_low = _row_max_over_splits(lpart_ptr, rows, rmask, B, NSPLIT1, NSPLIT1_PAD) / nrm - slack
    high = ((1.0 - alpha) * sv + alpha * kn[None, :]) / nrm[:, None] + slack
    cand = tile_mask & running[:, None] & (high >= best_low[:, None]) & (high > threshold)
    out = tl.where(running[:, None], float("-inf"), sv)
    key_wanted = tl.max(cand.to(tl.int32), axis=0) > 0
    if tl.max(key_wanted.to(tl.int32), axis=0) > 0:
        k_rows = k_ptr + cols.to(tl.int64)[:, None] * stride_k
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            qt = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :],
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            kraw = tl.load(k_rows + dd[None, :], mask=key_wanted[:, None] & dmask[None, :], other=0.0)
            if USE_DOT:
                acc = _mma(qt, tl.trans(kraw), acc, DOT_BF16, EMULATE)
            else:
                acc += tl.sum(qt[:, None, :] * kraw.to(tl.float32)[None, :, :], axis=2)
        out = tl.where(cand, acc, out)
    tl.store(s_tile, out, mask=tile_mask)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and split counts. ``None`` fields are chosen from the shapes and the device."""
    block_b: int | None = None
    block_n: int | None = None
    block_d: int | None = None
    splits1: int | None = None   # key splits of the scores pass
    splits2: int | None = None   # key splits of the weighted-sum pass
    num_warps: int = 4


_SM_COUNT: dict[int, int] = {}


def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter runs programs one after another: few, large ones
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def _plan(B: int, N: int, D: int, device: torch.device, cfg: TileConfig):
    gpu = device.type == "cuda"
    if cfg.block_b is not None:
        block_b = cfg.block_b
    elif B <= 4:
        block_b = triton.next_power_of_2(B)
    else:
        block_b = min(64, max(16, triton.next_power_of_2(B)))
    use_dot = block_b >= 16
    if cfg.block_d is not None:
        block_d = cfg.block_d
    elif gpu:
        block_d = 64 if use_dot else 128
    else:
        block_d = min(512, max(16, triton.next_power_of_2(D)))
    if cfg.block_n is not None:
        block_n = cfg.block_n
    elif gpu:
        block_n = 64 if use_dot else max(16, 64 // block_b)
        # few keys: smaller key tiles, so that the scores pass still spreads over the SMs
        while block_n > 16 and triton.cdiv(N, block_n) * triton.cdiv(B, block_b) < _programs_wanted(device):
            block_n //= 2
    else:
        block_n = 128 if use_dot else max(16, 256 // block_b)
    n_qblocks = triton.cdiv(B, block_b)
    n_tiles = triton.cdiv(N, block_n)
    want = _programs_wanted(device)
    splits1 = cfg.splits1 or max(1, min(n_tiles, triton.cdiv(want, n_qblocks)))
    per1 = triton.cdiv(n_tiles, splits1) * block_n
    splits1 = triton.cdiv(N, per1)
    n_dchunks = triton.cdiv(D, block_d)
    splits2 = cfg.splits2 or max(1, min(n_tiles, triton.cdiv(want, n_qblocks * n_dchunks)))
    per2 = triton.cdiv(n_tiles, splits2) * block_n
    splits2 = triton.cdiv(N, per2)
    # the update pass is per row on a GPU (B programs stream the partials); the interpreter
    # prefers a few large programs
    block_r = 1 if gpu else min(16, triton.next_power_of_2(B))
    block_du = 1024 if gpu else min(1024, max(16, triton.next_power_of_2(D)))
    return dict(block_r=block_r, block_du=block_du, block_b=block_b, block_n=block_n, block_d=block_d,
                use_dot=use_dot, n_qblocks=n_qblocks, splits1=splits1, per1=per1, n_dchunks=n_dchunks,
                splits2=splits2, per2=per2)


def final_cosines(q: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor, *, beta: float, alpha: float,
                  steps: int, threshold: float, eps: float, config: TileConfig | None = None) -> torch.Tensor:
    """[B, N] float32: the exact final cosine wherever it can be the row's match, -inf elsewhere.

    ``q`` [B, d] float32 unit rows (zero rows for unusable queries, flagged False in ``valid``);
    ``keys`` [N, d] float32/bfloat16/float16 with unit stride in d. ``q`` is not modified.
    """
    cfg = config or TileConfig()
    B, D = q.shape
    N = keys.shape[0]
    dev = q.device
    plan = _plan(B, N, D, dev, cfg)
    bb, bn, bd, use_dot = plan["block_b"], plan["block_n"], plan["block_d"], plan["use_dot"]
    nqb, ns1, ns2 = plan["n_qblocks"], plan["splits1"], plan["splits2"]
    ns1_pad = max(2, triton.next_power_of_2(ns1))
    nw = cfg.num_warps
    dot_bf16 = keys.dtype == torch.bfloat16

    q = q.contiguous().clone()
    s = torch.empty(B, N, device=dev, dtype=torch.float32)
    mpart = torch.empty(ns1, B, device=dev, dtype=torch.float32)
    lpart = torch.empty(ns1, B, device=dev, dtype=torch.float32)
    knorm = torch.empty(N, device=dev, dtype=torch.float32)
    if steps > 0:
        part = torch.empty(ns2, B, D, device=dev, dtype=torch.float32)
        ubuf = torch.empty(B, D, device=dev, dtype=torch.float32)
        nrm = torch.empty(B, device=dev, dtype=torch.float32)
        running = valid.to(torch.int32).contiguous()
    for t in range(max(steps, 1)):
        last = t == steps - 1
        _scores_kernel[(nqb, ns1)](
            q, keys, s, mpart, knorm, lpart, B, N, D, q.stride(0), keys.stride(0), s.stride(0),
            plan["per1"], float(alpha), BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, USE_DOT=use_dot,
            DOT_BF16=dot_bf16, EMULATE=INTERPRETED, LAST=last, num_warps=nw)
        if steps == 0:
            break
        _wsum_kernel[(nqb, plan["n_dchunks"], ns2)](
            keys, s, mpart, part, B, N, D, keys.stride(0), s.stride(0), plan["per2"], ns1,
            float(beta) * math.log2(math.e), BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd,
            NSPLIT1_PAD=ns1_pad, USE_DOT=use_dot, DOT_BF16=dot_bf16, EMULATE=INTERPRETED, num_warps=nw)
        _update_kernel[(triton.cdiv(B, plan["block_r"]),)](
            q, part, ubuf, running, nrm, B, D, q.stride(0), ns2, float(alpha), float(eps),
            BLOCK_R=plan["block_r"], BLOCK_D=plan["block_du"], num_warps=nw)
    if steps > 0:
        _final_kernel[(nqb, triton.cdiv(N, bn))](
            q, keys, s, knorm, lpart, nrm, running, B, N, D, q.stride(0), keys.stride(0), s.stride(0),
            ns1, float(alpha), float(threshold), BOUND_SLACK, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd,
            NSPLIT1_PAD=ns1_pad, USE_DOT=use_dot, DOT_BF16=dot_bf16, EMULATE=INTERPRETED, num_warps=nw)
    return s


def retrieve_fused(q: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor, *, beta: float, alpha: float,
                   steps: int, threshold: float, eps: float, config: TileConfig | None = None):
    """(index, score, matched) per SPEC 3 for unit float32 queries ``q`` against ``keys``."""
    c = final_cosines(q, valid, keys, beta=beta, alpha=alpha, steps=steps, threshold=threshold, eps=eps,
                      config=config)
    index = c.argmax(dim=1)  # first maximal index on ties
    best = c.gather(1, index[:, None])[:, 0]
    matched = valid & (best > threshold)
    return (torch.where(matched, index, torch.full_like(index, -1)),
            torch.where(matched, best, torch.full_like(best, float("nan"))),
            matched)
