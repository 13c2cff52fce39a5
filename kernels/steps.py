"""The Triton kernels of one fused retrieval (the plan and its reasons: kernels/plan.py).

Keys are loaded in their dtype (float32, bfloat16, float16) and widened to float32 in registers;
every offset that grows with N or N x d is int64. ``COUNT`` (the traffic-model test, under the
interpreter) adds the key elements each load touches to ``cnt_ptr``: [0] first visits, [1] the
small path's second visits, [2] the final pass's key rows, [3] its elements. Arguments that change
with every call (B, N and what follows from them) are not specialized (``do_not_specialize``), so a
growing codebook does not recompile the kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _count(cnt_ptr, slot, mask, COUNT: tl.constexpr):
    if COUNT:
        tl.atomic_add(cnt_ptr + slot, tl.sum(tl.sum(mask.to(tl.int64), axis=1), axis=0))


@triton.jit
def _online(s, cmask, m, beta_log2e):
    """(p, corr, m_new): softmax weights of a score tile relative to the new running max."""
    sm = tl.where(cmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(sm, axis=1))
    corr = tl.exp2((m - m_new) * beta_log2e)
    p = tl.exp2((sm - m_new[:, None]) * beta_log2e)
    return p, corr, m_new


@triton.jit(do_not_specialize=["B", "N", "stride_s", "per_split"])
def small_step_kernel(q_ptr, k_ptr, part_ptr, mpart_ptr, s_ptr, kk_ptr, cnt_ptr,
                      B, N, D, stride_k, stride_s, per_split, beta_log2e,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      ONE_CHUNK: tl.constexpr, WSUM: tl.constexpr, LAST: tl.constexpr,
                      COUNT: tl.constexpr):
    """B <= 4: scores and the softmax-weighted key sum of one key split in ONE visit of each key
    tile. Writes the split's partial sum part[split, b, :] and running max mpart[split, b]
    (relative to which the partial is taken); on the last pass also s [B, N] and ||k||^2."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    n_start = pid * per_split
    n_end = tl.minimum(n_start + per_split, N)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    part_rows = part_ptr + (pid * B + rows).to(tl.int64)[:, None] * D
    if ONE_CHUNK:
        dd = tl.arange(0, BLOCK_D)
        dmask = dd < D
        qt = tl.load(q_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        for n0 in range(n_start, n_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < n_end
            kmask = cmask[:, None] & dmask[None, :]
            kt = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_k + dd[None, :], mask=kmask,
                         other=0.0).to(tl.float32)
            _count(cnt_ptr, 0, kmask, COUNT)
            s = tl.sum(qt[:, None, :] * kt[None, :, :], axis=2)
            if LAST:
                tl.store(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], s,
                         mask=rmask[:, None] & cmask[None, :])
                tl.store(kk_ptr + cols, tl.sum(kt * kt, axis=1), mask=cmask)
            if WSUM:
                p, corr, m = _online(s, cmask, m, beta_log2e)
                acc = acc * corr[:, None] + tl.sum(p[:, :, None] * kt[None, :, :], axis=1)
        if WSUM:
            tl.store(part_rows + dd[None, :], acc, mask=rmask[:, None] & dmask[None, :])
    else:
        for n0 in range(n_start, n_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < n_end
            k_rows = k_ptr + cols.to(tl.int64)[:, None] * stride_k
            s = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
            ksq = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < D
                kmask = cmask[:, None] & dmask[None, :]
                qt = tl.load(q_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :],
                             other=0.0)
                kt = tl.load(k_rows + dd[None, :], mask=kmask, other=0.0).to(tl.float32)
                _count(cnt_ptr, 0, kmask, COUNT)
                s += tl.sum(qt[:, None, :] * kt[None, :, :], axis=2)
                if LAST:
                    ksq += tl.sum(kt * kt, axis=1)
            if LAST:
                tl.store(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], s,
                         mask=rmask[:, None] & cmask[None, :])
                tl.store(kk_ptr + cols, ksq, mask=cmask)
            if WSUM:
                p, corr, m = _online(s, cmask, m, beta_log2e)
                for d0 in range(0, D, BLOCK_D):  # second visit of the tile: from L2
                    dd = d0 + tl.arange(0, BLOCK_D)
                    dmask = dd < D
                    kmask = cmask[:, None] & dmask[None, :]
                    kt = tl.load(k_rows + dd[None, :], mask=kmask, other=0.0).to(tl.float32)
                    _count(cnt_ptr, 1, kmask, COUNT)
                    amask = rmask[:, None] & dmask[None, :]
                    later = (dd * 0 + n0) > n_start  # the first tile starts the accumulator
                    old = tl.load(part_rows + dd[None, :], mask=amask & later[None, :], other=0.0)
                    new = old * corr[:, None] + tl.sum(p[:, :, None] * kt[None, :, :], axis=1)
                    tl.store(part_rows + dd[None, :], new, mask=amask)
    if WSUM:
        tl.store(mpart_ptr + pid * B + rows, m, mask=rmask)


@triton.jit
def _split_bf16(x):
    """x (float32) = hi + mid + lo, three bfloat16 parts: 24 mantissa bits, float32's own."""
    hi = x.to(tl.bfloat16)
    r = x - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    return hi, mid, (r - mid.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _mma(a, b, acc, KEY_BF16: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b at float32 accuracy on tensor cores, ``a`` float32 [M, K], ``b`` keys [K, N]."""
    if KEY_BF16:
        a_hi, a_mid, a_lo = _split_bf16(a)
        acc = _mma_bf16x3(a_hi, a_mid, a_lo, b, acc, EMULATE)
    elif EMULATE:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="tf32x3")
    return acc


@triton.jit
def _mma_bf16x3(a_hi, a_mid, a_lo, b, acc, EMULATE: tl.constexpr):
    """acc + (a_hi + a_mid + a_lo) @ b for bfloat16 keys ``b`` (exact in bfloat16): three bf16 MMAs
    with float32 accumulation, at float32 accuracy. ``EMULATE`` (the interpreter, whose bf16 dot
    is not numeric) runs the same parts in float32."""
    if EMULATE:
        bf = b.to(tl.float32)
        acc = tl.dot(a_hi.to(tl.float32), bf, acc, input_precision="ieee")
        acc = tl.dot(a_mid.to(tl.float32), bf, acc, input_precision="ieee")
        acc = tl.dot(a_lo.to(tl.float32), bf, acc, input_precision="ieee")
    else:
        acc = tl.dot(a_hi, b, acc)
        acc = tl.dot(a_mid, b, acc)
        acc = tl.dot(a_lo, b, acc)
    return acc


@triton.jit(do_not_specialize=["n"])
def split_kernel(q_ptr, qp_ptr, n, BLOCK: tl.constexpr):
    """q (float32) = qp[0] + qp[1] + qp[2] (bfloat16 [3, B, D]): the MMA operands of the scores
    pass for bfloat16 keys, made once per step."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(q_ptr + i, mask=i < n, other=0.0)
    hi, mid, lo = _split_bf16(x)
    tl.store(qp_ptr + i, hi, mask=i < n)
    tl.store(qp_ptr + n + i, mid, mask=i < n)
    tl.store(qp_ptr + 2 * n + i, lo, mask=i < n)


@triton.jit(do_not_specialize=["B", "N", "stride_s", "per_split"])
def large_scores_kernel(q_ptr, qp_ptr, k_ptr, s_ptr, mx_ptr, kk_ptr, cnt_ptr,
                        B, N, D, stride_k, stride_s, per_split,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        KEY_BF16: tl.constexpr, EMULATE: tl.constexpr, LAST: tl.constexpr,
                        COUNT: tl.constexpr):
    """B > 4: s = q @ K^T of one key split for one block of query rows on tensor cores at float32
    accuracy (bfloat16 keys: three bf16 MMAs on the parts qp of q; other keys: tf32x3), and the
    row max over all keys (atomic max into mx [B], reduced once for the weighted-sum pass)."""
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    n_start = pid_s * per_split
    n_end = tl.minimum(n_start + per_split, N)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        k_rows = k_ptr + cols.to(tl.int64)[:, None] * stride_k
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        ksq = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            kmask = cmask[:, None] & dmask[None, :]
            q_off = rows.to(tl.int64)[:, None] * D + dd[None, :]
            qmask = rmask[:, None] & dmask[None, :]
            kraw = tl.load(k_rows + dd[None, :], mask=kmask, other=0.0)
            _count(cnt_ptr, 0, kmask, COUNT)
            if KEY_BF16:
                BD = B * D
                q_hi = tl.load(qp_ptr + q_off, mask=qmask, other=0.0)
                q_mid = tl.load(qp_ptr + BD + q_off, mask=qmask, other=0.0)
                q_lo = tl.load(qp_ptr + 2 * BD + q_off, mask=qmask, other=0.0)
                acc = _mma_bf16x3(q_hi, q_mid, q_lo, tl.trans(kraw), acc, EMULATE)
            else:
                acc = _mma(tl.load(q_ptr + q_off, mask=qmask, other=0.0), tl.trans(kraw), acc, KEY_BF16, EMULATE)
            if LAST:
                kt = kraw.to(tl.float32)
                ksq += tl.sum(kt * kt, axis=1)
        tl.store(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], acc,
                 mask=rmask[:, None] & cmask[None, :])
        m = tl.maximum(m, tl.max(tl.where(cmask[None, :], acc, float("-inf")), axis=1))
        if LAST:
            tl.store(kk_ptr + cols, ksq, mask=cmask & ((cols * 0 + pid_b) == 0))
    tl.atomic_max(mx_ptr + rows, m, mask=rmask)


@triton.jit(do_not_specialize=["B", "N", "stride_s", "per_split", "n_dchunks"])
def large_wsum_kernel(k_ptr, s_ptr, mx_ptr, part_ptr, cnt_ptr,
                      B, N, D, stride_k, stride_s, per_split, n_dchunks, beta_log2e,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      KEY_BF16: tl.constexpr, EMULATE: tl.constexpr, COUNT: tl.constexpr):
    """B > 4: part[split, b, chunk] = sum_i exp(beta (s_bi - mx_b)) k_i[chunk] over one key split
    and one d chunk (MMAs at float32 accuracy, as in the scores pass)."""
    pid = tl.program_id(0)
    pid_s = pid // n_dchunks
    pid_d = pid % n_dchunks
    pid_b = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    mx = tl.load(mx_ptr + rows, mask=rmask, other=0.0)
    n_start = pid_s * per_split
    n_end = tl.minimum(n_start + per_split, N)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        sv = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=float("-inf"))
        p = tl.exp2((sv - mx[:, None]) * beta_log2e)
        kmask = cmask[:, None] & dmask[None, :]
        kraw = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_k + dd[None, :], mask=kmask, other=0.0)
        _count(cnt_ptr, 0, kmask, COUNT)
        acc = _mma(p, kraw, acc, KEY_BF16, EMULATE)
    tl.store(part_ptr + (pid_s * B + rows).to(tl.int64)[:, None] * D + dd[None, :], acc,
             mask=rmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["B", "NSPLIT"])
def combine_kernel(part_ptr, mpart_ptr, y_ptr, B, D, NSPLIT, beta_log2e,
                   BLOCK_D: tl.constexpr, SCALED: tl.constexpr):
    """y[b, chunk] = sum_j w_j part[j, b, chunk]; w_j = exp(beta (m_j - max_j m_j)) when the
    partials are relative to their own split maxima (SCALED), else 1."""
    pid_d = tl.program_id(0)
    row = tl.program_id(1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    top = tl.load(mpart_ptr + row)
    if SCALED:
        for j in range(1, NSPLIT):
            top = tl.maximum(top, tl.load(mpart_ptr + j * B + row))
    y = tl.zeros([BLOCK_D], tl.float32)
    for j in range(0, NSPLIT):
        w = 1.0
        if SCALED:
            w = tl.exp2((tl.load(mpart_ptr + j * B + row) - top) * beta_log2e)
        v = tl.load(part_ptr + (j * B + row).to(tl.int64) * D + dd, mask=dmask, other=0.0)
        y += tl.where(w > 0, w * v, 0.0)
    tl.store(y_ptr + row.to(tl.int64) * D + dd, y, mask=dmask)


@triton.jit(do_not_specialize=["B"])
def update_kernel(q_ptr, y_ptr, run_ptr, rowp_ptr, B, D, alpha, eps, BLOCK_D: tl.constexpr):
    """One row: r = y / ||y||, the stop rule ||r - q|| < eps, q <- normalize((1 - a) q + a r) for
    rows still running, and the final-bound constants of the row: rowp[0, b] = (1 - a) + a rho,
    rowp[1, b] = a sigma, rowp[2, b] = ||(1 - a) q + a r|| (rho = r.q, sigma = ||r - rho q||)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * D
    ysq = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        y = tl.load(y_ptr + base + dd, mask=dd < D, other=0.0)
        ysq += y * y
    inv_y = 1.0 / tl.maximum(tl.sqrt(tl.sum(ysq, axis=0)), 1e-30)
    dsq = tl.zeros([BLOCK_D], tl.float32)
    usq = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        r = tl.load(y_ptr + base + dd, mask=dmask, other=0.0) * inv_y
        qv = tl.load(q_ptr + base + dd, mask=dmask, other=0.0)
        diff = r - qv
        dsq += diff * diff
        u = (1.0 - alpha) * qv + alpha * r
        usq += u * u
        tl.store(y_ptr + base + dd, u, mask=dmask)
    dist2 = tl.sum(dsq, axis=0)
    unorm = tl.sqrt(tl.sum(usq, axis=0))
    # for unit r and q: rho = 1 - |r - q|^2 / 2 and sigma^2 = 1 - rho^2 = |r - q|^2 (1 - |r - q|^2 / 4)
    rho = 1.0 - 0.5 * dist2
    sigma = tl.sqrt(tl.maximum(dist2 * (1.0 - 0.25 * dist2), 0.0))
    run = (tl.load(run_ptr + row) != 0) & (tl.sqrt(dist2) >= eps)
    tl.store(run_ptr + row, run.to(tl.int32))
    tl.store(rowp_ptr + row, (1.0 - alpha) + alpha * rho)
    tl.store(rowp_ptr + B + row, alpha * sigma)
    tl.store(rowp_ptr + 2 * B + row, unorm)
    if run:
        inv_u = 1.0 / tl.maximum(unorm, 1e-30)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            u = tl.load(y_ptr + base + dd, mask=dmask, other=0.0)
            tl.store(q_ptr + base + dd, u * inv_u, mask=dmask)


@triton.jit
def _bounds(s, kk, rowp_ptr, run_ptr, rows, rmask, B, score_error, slack):
    """(lower, upper) of the final cosines of a [rows, keys] tile of last-pass cosines ``s``.
    Running rows: the tight bound of horen_fast/hopfield.py (final_bound) with s known to within
    score_error ||k||; stopped rows: s itself, to within the same error."""
    c1 = tl.load(rowp_ptr + rows, mask=rmask, other=1.0)
    c2 = tl.load(rowp_ptr + B + rows, mask=rmask, other=0.0)
    nrm = tl.maximum(tl.load(rowp_ptr + 2 * B + rows, mask=rmask, other=1.0), 1e-30)
    running = tl.load(run_ptr + rows, mask=rmask, other=0) != 0
    err = score_error * tl.sqrt(kk)[None, :]
    small = tl.maximum(tl.abs(s) - err, 0.0)
    perp = tl.sqrt(tl.maximum(kk[None, :] - small * small, 0.0))
    mid = c1[:, None] * s
    half = tl.abs(c1)[:, None] * err + c2[:, None] * perp
    lo_run = (mid - half) / nrm[:, None] - slack
    hi_run = (mid + half) / nrm[:, None] + slack
    lo = tl.where(running[:, None], lo_run, s - err - slack)
    hi = tl.where(running[:, None], hi_run, s + err + slack)
    return lo, hi


@triton.jit(do_not_specialize=["B", "N", "stride_s"])
def bound_kernel(s_ptr, kk_ptr, rowp_ptr, run_ptr, valid_ptr, best_ptr, B, N, stride_s,
                 score_error, slack, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """best[b] = max over keys of the lower bound of the final cosine (atomic max)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = (rows < B) & (tl.load(valid_ptr + rows, mask=rows < B, other=0) != 0)
    cmask = cols < N
    s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0)
    kk = tl.load(kk_ptr + cols, mask=cmask, other=0.0)
    lo, _ = _bounds(s, kk, rowp_ptr, run_ptr, rows, rmask, B, score_error, slack)
    lo = tl.where(cmask[None, :], lo, float("-inf"))
    tl.atomic_max(best_ptr + rows, tl.max(lo, axis=1), mask=rmask)


@triton.jit(do_not_specialize=["B", "N", "stride_s"])
def final_kernel(q_ptr, k_ptr, s_ptr, kk_ptr, rowp_ptr, run_ptr, valid_ptr, best_ptr, cnt_ptr,
                 B, N, D, stride_k, stride_s, threshold, score_error, slack,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 COUNT: tl.constexpr):
    """In place: s[b, i] <- the exact (float32) final cosine of every key that can still be the
    row's match (upper bound >= the row's best lower bound and > threshold), -inf elsewhere. Only
    those keys' rows are loaded; a tile without any loads none."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = (rows < B) & (tl.load(valid_ptr + rows, mask=rows < B, other=0) != 0)
    cmask = cols < N
    s_tile = s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :]
    s = tl.load(s_tile, mask=rmask[:, None] & cmask[None, :], other=0.0)
    kk = tl.load(kk_ptr + cols, mask=cmask, other=0.0)
    _, hi = _bounds(s, kk, rowp_ptr, run_ptr, rows, rmask, B, score_error, slack)
    best = tl.load(best_ptr + rows, mask=rmask, other=float("inf"))
    cand = rmask[:, None] & cmask[None, :] & (hi >= best[:, None]) & (hi > threshold)
    out = tl.full([BLOCK_B, BLOCK_N], float("-inf"), tl.float32)
    wanted = tl.max(cand.to(tl.int32), axis=0) > 0
    if tl.max(wanted.to(tl.int32), axis=0) > 0:
        if COUNT:
            tl.atomic_add(cnt_ptr + 2, tl.sum(wanted.to(tl.int64), axis=0))
        k_rows = k_ptr + cols.to(tl.int64)[:, None] * stride_k
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            qt = tl.load(q_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :],
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            kmask = wanted[:, None] & dmask[None, :]
            kt = tl.load(k_rows + dd[None, :], mask=kmask, other=0.0).to(tl.float32)
            _count(cnt_ptr, 3, kmask, COUNT)
            if BLOCK_B >= 16:
                acc = tl.dot(qt, tl.trans(kt), acc, input_precision="ieee")
            else:
                acc += tl.sum(qt[:, None, :] * kt[None, :, :], axis=2)
        out = tl.where(cand, acc, out)
    tl.store(s_tile, out, mask=(rows < B)[:, None] & cmask[None, :])
