"""The launch planner of the fused Triton retrieval: tile sizes, split counts and the modelled key
traffic, as a pure function of the shapes, the key dtype and the GPU target.

Two paths (kernels/hopfield.py has the kernels):

- ``small`` (B <= 4, the decode-time case): ONE read of the keys per Hopfield step. Each program
  owns a contiguous range of keys and walks it in tiles of ``block_n`` keys; a tile's scores and
  its softmax-weighted sum are formed in one visit (online softmax: a running max per row, the
  accumulator rescaled when it grows, which also keeps large beta from underflowing). When a whole
  key row fits the registers (``one_chunk``) the tile is loaded once and the accumulator [B, d]
  stays in registers; otherwise the tile is scored in d chunks, then re-read (from L2: ``block_n``
  is sized so that the keys streamed by all resident programs between the two visits fit in a
  quarter of L2) into an accumulator slice in global memory owned by the program.
- ``large`` (B > 4): per step one scores pass (tensor-core MMAs at float32 accuracy: for
  bfloat16 keys three bf16 MMAs on the query's three bf16 parts, for float32/float16 keys tf32x3)
  writing s [B, N] and the row max (an atomic max: reduced once), then one weighted-sum pass split
  over keys and d (the same MMAs). Keys are read twice per step per block of ``block_b`` query
  rows. float32-accurate scores keep a row's answer independent of its batch (the small path
  computes in float32 FMAs); the final decision is rescored exactly in any case.

Both then combine the split partials, take the damped step, bound every key's final cosine with
the tight bound of horen_fast/hopfield.py (``final_bound``), and rescore exactly (float32) only
the keys whose upper bound reaches the row's best lower bound and the threshold.

A ``Target`` describes the GPU (SM count, L2, register file, shared memory). ``target_for`` reads
it from a CUDA device; ``TARGETS`` has sm_80 (A100), sm_90 (H100) and sm_100 (B200) for the
static check (bench/gpu_static.py), which compiles what this planner chooses without a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

GRID_LIMITS = (2**31 - 1, 65535, 65535)
SMALL_B = 4                # the small (one read per step) path serves B <= SMALL_B
FINAL_FRACTION = 0.01      # modelled share of keys the final exact rescoring loads
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class Target:
    name: str              # "sm_90"; "interpreter" for Triton's CPU interpreter
    arch: int              # compute capability major*10 + minor (0: interpreter)
    sms: int
    l2_bytes: int
    smem_per_sm: int
    smem_per_block: int    # the opt-in maximum of one CTA
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32


TARGETS = {
    "sm_80": Target("sm_80", 80, 108, 40 << 20, 164 << 10, 163 << 10),            # A100 SXM
    "sm_90": Target("sm_90", 90, 132, 50 << 20, 228 << 10, 227 << 10),            # H100 SXM
    "sm_100": Target("sm_100", 100, 148, 126 << 20, 228 << 10, 227 << 10),        # B200
}
# The interpreter runs programs one after another: few, large programs are fastest there.
INTERPRETER = Target("interpreter", 0, 1, 1 << 20, 1 << 30, 1 << 30)


def target_for(device: torch.device) -> Target:
    """The Target of a CUDA device (read once per device), or INTERPRETER for the CPU."""
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_multiprocessor", 228 << 10)
    return Target(f"sm_{p.major}{p.minor}", p.major * 10 + p.minor, p.multi_processor_count,
                  int(getattr(p, "L2_cache_size", 50 << 20)), smem,
                  getattr(p, "shared_memory_per_block_optin", smem - (1 << 10)))


@dataclass(frozen=True)
class Plan:
    path: str              # "small" or "large"
    B: int
    N: int
    D: int
    key_bytes: int         # bytes per key element
    block_b: int           # query rows per program of the step kernels
    block_n: int           # keys per tile of the step kernels
    block_d: int           # d chunk of the step kernels (small: the padded row when one_chunk)
    one_chunk: bool        # small path: a whole key row per load, accumulator in registers
    splits: int            # key splits of the step kernels
    per_split: int         # keys per split (a multiple of block_n)
    wsum_block_d: int      # large path: d chunk of the weighted-sum pass
    wsum_splits: int       # large path: key splits of the weighted-sum pass
    wsum_per_split: int
    combine_block_d: int   # d chunk of the partials combination
    update_block_d: int    # d chunk of the per-row damped update
    final_block_b: int     # query rows per program of the bound and final passes
    final_block_n: int     # keys per program of the bound and final passes
    final_block_d: int     # d chunk of the exact rescoring
    num_warps: int
    num_stages: int
    score_error: float     # bound on |s - q.k| / ||k|| of the first pass (0: float32 FMA)

    @property
    def n_qblocks(self) -> int:
        return -(-self.B // self.block_b)

    @property
    def wsum_dchunks(self) -> int:
        return -(-self.D // self.wsum_block_d)

    def key_elements_loaded(self, steps: int) -> int:
        """Key elements the step kernels load per call (every visit, L2 hits included)."""
        nd = self.N * self.D
        if self.path == "small":
            per_step = nd if (self.one_chunk or steps == 0) else 2 * nd
            return max(steps, 1) * per_step
        return self.n_qblocks * nd * (2 * steps if steps else 1)

    def key_bytes_read(self, steps: int) -> int:
        """Modelled key bytes read from memory (HBM) per call: the step kernels' first visits
        (the small path's second visit of a tile is an L2 hit), plus FINAL_FRACTION of the keys
        for the exact rescoring."""
        nd = self.N * self.D
        if self.path == "small":
            first = max(steps, 1) * nd
        else:
            first = self.key_elements_loaded(steps)
        final = int(FINAL_FRACTION * self.N) * self.D * self.n_qblocks_final
        return (first + final) * self.key_bytes

    @property
    def n_qblocks_final(self) -> int:
        return -(-self.B // self.final_block_b)


OVERRIDES = {"path", "block_b", "block_n", "block_d", "one_chunk", "splits", "wsum_block_d", "wsum_splits",
             "final_block_n", "final_block_d", "num_warps", "num_stages"}


def _pow2_floor(x: float) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


def _pow2_ceil(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _splits(n_tiles: int, block_n: int, n: int, want: int) -> tuple[int, int]:
    """(splits, keys per split): about ``want`` splits of whole tiles, none empty."""
    splits = max(1, min(n_tiles, want))
    per = _cdiv(n_tiles, splits) * block_n
    return _cdiv(n, per), per


def plan(B: int, N: int, D: int, key_dtype: torch.dtype, target: Target, **overrides) -> Plan:
    """The launch plan for B queries against N keys of width D. ``overrides`` (any Plan field)
    force tile sizes, e.g. small tiles in tests; split counts are re-derived from them."""
    if overrides:
        return _plan(B, N, D, key_dtype, target, **overrides)
    return _cached_plan(B, N, D, key_dtype, target)


@functools.lru_cache(maxsize=1024)
def _cached_plan(B: int, N: int, D: int, key_dtype: torch.dtype, target: Target) -> Plan:
    return _plan(B, N, D, key_dtype, target)


def _plan(B: int, N: int, D: int, key_dtype: torch.dtype, target: Target, **overrides) -> Plan:
    if key_dtype not in DTYPE_BYTES:
        raise ValueError(f"keys must be float32, bfloat16 or float16 for the Triton kernels, got {key_dtype}")
    if min(B, N, D) < 1:
        raise ValueError(f"plan needs B, N, D >= 1, got B={B} N={N} D={D}")
    unknown = set(overrides) - OVERRIDES
    if unknown:
        raise ValueError(f"unknown plan overrides {sorted(unknown)}; choose from {sorted(OVERRIDES)}")
    gpu = target.arch > 0
    ebytes = DTYPE_BYTES[key_dtype]
    path = overrides.get("path", "small" if B <= SMALL_B else "large")
    if path not in ("small", "large") or (path == "small" and B > SMALL_B):
        raise ValueError(f"path must be 'large', or 'small' for B <= {SMALL_B}; got {path!r} with B={B}")
    num_warps = 4
    d_pad = _pow2_ceil(D)
    if path == "small":
        block_b = _pow2_ceil(B)
        if gpu:
            num_warps = 8
            threads = 32 * num_warps
            # whole rows when q, the accumulator, the key tile and their product come to at most
            # 96 values per thread and the key tile to 16 (the compiled kernels then stay within
            # 128 registers, two CTAs per SM, without spills: bench/gpu_static.py); the widest
            # such tile of 4, 2 or 1 keys
            fits = [bn for bn in (4, 2, 1) if bn * d_pad <= 16 * threads
                    and (2 * block_b + bn + block_b * bn) * d_pad <= 96 * threads]
            one_chunk = bool(fits)
            if one_chunk:
                block_n = fits[0]
                block_d = d_pad
            else:
                block_d = 256
                resident = target.sms * 2
                block_n = max(1, min(16, _pow2_floor(target.l2_bytes / 4 / (resident * D * ebytes))))
                while block_b * block_n * block_d > 32 * threads and block_d > 64:
                    block_d //= 2
            want = 2 * target.sms
        else:
            block_n, one_chunk = 16, d_pad <= 512
            block_d = d_pad if one_chunk else 128
            want = 2
        score_error = 0.0
    else:
        block_b = min(64, max(16, _pow2_ceil(B)))
        # 8 warps and narrower key / d tiles for 64-row blocks and tf32x3 (float32/float16
        # keys): otherwise ptxas spills (bench/gpu_static.py)
        wide = gpu and (block_b == 64 or key_dtype != torch.bfloat16)
        num_warps = 8 if wide else 4
        block_n = 32 if wide else 64
        block_d = 64 if gpu else min(128, max(16, d_pad))
        one_chunk = False
        want = 2 * target.sms if gpu else 2
        # bf16 keys: q in three bf16 parts (residual 2^-24); other keys: tf32x3 (dropped terms
        # about 2^-21); both plus the tensor cores' float32 accumulation: |s - q.k| <= 2^-18 ||k||
        score_error = 2.0**-18
    block_b = overrides.get("block_b", block_b)
    block_n = overrides.get("block_n", block_n)
    block_d = overrides.get("block_d", block_d)
    one_chunk = overrides.get("one_chunk", one_chunk and block_d >= D)
    if one_chunk and block_d < D:
        raise ValueError(f"one_chunk needs block_d >= D, got block_d={block_d} D={D}")
    n_qblocks = _cdiv(B, block_b)
    n_tiles = _cdiv(N, block_n)
    splits, per = _splits(n_tiles, block_n, N, overrides.get("splits") or _cdiv(want, n_qblocks))
    if path == "large":
        wsum_block_d = (64 if wide else 128) if gpu else min(256, max(16, d_pad))
    else:
        wsum_block_d = block_d
    wsum_block_d = overrides.get("wsum_block_d", wsum_block_d)
    dchunks = _cdiv(D, wsum_block_d)
    wsplits, wper = _splits(n_tiles, block_n, N,
                            overrides.get("wsum_splits") or _cdiv(want, n_qblocks * dchunks))
    final_block_b = min(block_b, 16) if path == "large" else block_b
    final_block_n = overrides.get("final_block_n", 64 if gpu else 32)
    if not gpu:
        final_block_d = min(128, d_pad)
    elif final_block_b >= 16:
        final_block_d = 16  # the exact rescoring's FMA dot holds a d chunk per thread
    else:  # broadcast products of at most 32 values per thread
        final_block_d = max(16, min(128, 4096 // (final_block_b * final_block_n)))
    p = Plan(path=path, B=B, N=N, D=D, key_bytes=ebytes, block_b=block_b, block_n=block_n,
             block_d=block_d, one_chunk=one_chunk, splits=splits, per_split=per,
             wsum_block_d=wsum_block_d, wsum_splits=wsplits, wsum_per_split=wper,
             combine_block_d=1024 if gpu else min(1024, d_pad), update_block_d=1024 if gpu else min(1024, d_pad),
             final_block_b=final_block_b, final_block_n=final_block_n,
             final_block_d=final_block_d,
             num_warps=overrides.get("num_warps", num_warps), num_stages=overrides.get("num_stages", 3),
             score_error=score_error)
    return replace(p, **{k: v for k, v in overrides.items() if k in ("final_block_d",)})
