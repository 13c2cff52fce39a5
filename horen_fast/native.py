"""The compiled CPU kernels, behind one checked boundary.

This is the only module that imports the extensions built from csrc/ (setup.py):

- ``horen_fast._C``: the fused retrieval kernel (csrc/retrieve), used by horen_fast/backends/cpp.py
  as implementation "cpp" of the op "retrieve";
- ``horen_fast._sketch``: the key sketch's passes and the rescue's exact rescoring (csrc/sketch),
  registered here as implementation "cpp" of the ops "sketch_scan", "sketch_rescue" and
  "pair_dots" (horen_fast/dispatch.py; the torch references live in horen_fast/sketch.py).

Every entry point of the extensions takes torch tensors and checks their dtype, shape, strides,
device and index ranges itself (csrc/common/tensor_args.h), raising TypeError / ValueError that
name the argument; the reasons functions here say, before a call, why the C++ code cannot serve it
(not built, not on the CPU, a dtype it has no kernel for, an instruction set this CPU lacks).

``HOREN_FAST_CPU_ISA`` = ``auto`` (default) | ``avx512`` | ``avx512bf16`` | ``amx`` | ``avx2`` |
``scalar`` picks the instruction set of every native call; it is read here and nowhere else (at each
call, so that tests and comparisons can switch it). ``avx512bf16`` and ``amx`` are ``avx512`` with
the scores of the retrieval kernel's batched loops (8 or more query rows) split into bfloat16 hi/lo,
as AVX512_BF16 dot products (csrc/retrieve/bf16_split.h) or AMX-BF16 tile products
(csrc/retrieve/amx_scores.h). Whether that is faster depends on the CPU and the key dtype (on Zen 4
a 512-bit bfloat16 dot product issues at the rate of a 512-bit FMA: 2 of them per 32 elements for
bfloat16 keys beat the FMAs and their widening, 3 for float32 keys do not; a Sapphire Rapids Xeon
issues them at half that rate, and its AMX tiles at many times it), so ``auto`` measures it:
``split_speedup()`` times a batched pass (scores and weighted sums) each way on one L2-resident
tile per CPU, once per process at the first batched call, and ``auto`` takes the fastest split for
a key dtype where it is at least SPLIT_MIN_SPEEDUP[isa][dtype] faster. The split scores differ from the
FMA scores in their last bits, so pin ``HOREN_FAST_CPU_ISA`` where results must match bit for bit
across processes. Tile sizes and thread counts follow the machine (caches, instruction set:
csrc/common/machine.h); ``machine()`` shows them, ``set_tuning`` overrides them for experiments.
"""
from __future__ import annotations

import os

import torch

from . import dispatch

try:
    from . import _C as _retrieve_ext  # type: ignore[attr-defined]
except ImportError as exc:  # not built: the torch implementations serve every call
    _retrieve_ext, _retrieve_missing = None, str(exc)
else:
    _retrieve_missing = ""
try:
    from . import _sketch as _sketch_ext  # type: ignore[attr-defined]
except ImportError as exc:
    _sketch_ext, _sketch_missing = None, str(exc)
else:
    _sketch_missing = ""

__all__ = ["ISA_VARIABLE", "ISAS", "SPLIT_ISAS", "RETRIEVE_BUILT", "SKETCH_BUILT", "SPLIT_MIN_SPEEDUP",
           "best_isa", "supported_isas", "cpu_isa", "isa_reasons", "split_speedup", "retrieve_isa", "machine",
           "set_tuning", "retrieve", "retrieve_reasons", "sketch_scan", "sketch_rescue", "sketch_reasons",
           "pair_dots", "pair_dots_reasons"]

ISA_VARIABLE = "HOREN_FAST_CPU_ISA"
ISAS = ("auto", "avx512", "avx512bf16", "amx", "avx2", "scalar")
SPLIT_ISAS = ("avx512bf16", "amx")  # avx512 with the batched scores split into bfloat16 hi/lo
RETRIEVE_BUILT = _retrieve_ext is not None
SKETCH_BUILT = _sketch_ext is not None
_BUILD_HINT = "build it with `pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`"


# ---- instruction sets (the CPU does not change: detected once) ---------------------------------
def _detect() -> tuple[str, tuple[str, ...]]:
    ext = _retrieve_ext if _retrieve_ext is not None else _sketch_ext
    if ext is None:
        return "scalar", ()
    return ext.best_isa(), tuple(isa for isa in ISAS[1:] if ext.isa_supported(isa))


_BEST, _SUPPORTED = _detect()


def best_isa() -> str:
    """The fastest instruction set this CPU runs the kernels with ('scalar' when nothing is built)."""
    return _BEST


def supported_isas() -> list[str]:
    """The instruction sets HOREN_FAST_CPU_ISA may force on this CPU, fastest first."""
    return list(_SUPPORTED)


def _requested() -> str:
    return os.environ.get(ISA_VARIABLE, "auto").strip().lower() or "auto"


def _isa_reasons(isa: str) -> list[str]:
    if isa not in ISAS:
        return [f"{ISA_VARIABLE}={isa!r} is not one of {', '.join(ISAS)}"]
    if isa != "auto" and isa not in _SUPPORTED:
        return [f"{ISA_VARIABLE}={isa} but this CPU does not support it (best available: {best_isa()})"]
    return []


def isa_reasons() -> list[str]:
    """Why HOREN_FAST_CPU_ISA keeps the native kernels from running ([] when it does not)."""
    return _isa_reasons(_requested())


def cpu_isa() -> str:
    """The instruction set the next native call uses: HOREN_FAST_CPU_ISA, or the best this CPU has
    (under ``auto`` a batched retrieval may take the split scores on top: retrieve_isa). Raises
    ValueError naming the variable when it asks for something this CPU cannot do."""
    return _resolved(_requested())


def _resolved(requested: str) -> str:
    why = _isa_reasons(requested)
    if why:
        raise ValueError(why[0])
    return _BEST if requested == "auto" else requested


def machine() -> dict:
    """The caches the kernels detected (l1d_bytes, l2_bytes of one core, l3_bytes, cpus,
    cache_source) and the tuning derived from them: tile_bytes (keys per tile of the retrieval
    kernel: half the L2) and work_per_thread (multiply-adds that pay for one more thread, at 16
    lanes; scaled by the lanes of the instruction set in use). Empty when nothing is built."""
    ext = _retrieve_ext if _retrieve_ext is not None else _sketch_ext
    return {} if ext is None else dict(ext.machine())


def set_tuning(*, tile_bytes: int = 0, work_per_thread: int = 0) -> None:
    """Override the tile size and the work per thread of every native kernel, for experiments
    (0: back to the detected value). Call it while no kernel runs."""
    for name, value in (("tile_bytes", tile_bytes), ("work_per_thread", work_per_thread)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: the detected value), got {value!r}")
    for ext in (_retrieve_ext, _sketch_ext):
        if ext is not None:
            ext.set_tuning(tile_bytes, work_per_thread)


def _built_reasons(ext, missing: str, what: str) -> list[str]:
    if ext is not None:
        return []
    return [f"the C++ {what} extension is not built ({missing}); {_BUILD_HINT}"]


def _cpu_reasons(**tensors) -> list[str]:
    return [f"{name} is on {t.device}, the C++ kernels run on the CPU"
            for name, t in tensors.items() if t.device.type != "cpu"]


# ---- the bfloat16 split of the batched scores, measured (csrc/retrieve/retrieve.h) ----------------
# The probe runs from L2; a real pass streams its keys. On Zen 4 (2026-12-02, bench/RESULTS.md) the
# avx512bf16 probe read 1.08-1.33x for bfloat16 keys, whose split never lost a whole retrieval
# (1.02-1.30x faster), and 1.03-1.09x for float32 keys, whose split lost every whole retrieval
# (0.86-0.92x): float32 keys need the margin that covers that bias (3 dot products per pair against
# 2 FMAs). On a Sapphire Rapids Xeon the amx probe read 1.13x for float32 keys whose whole
# retrievals ran 1.09-1.16x faster (its probe and its passes share the weighted sums' FMAs), and
# 1.45-1.8x for bfloat16 keys (1.65-1.77x): no such bias.
SPLIT_MIN_SPEEDUP = {"avx512bf16": {"bfloat16": 1.05, "float32": 1.25},
                     "amx": {"bfloat16": 1.05, "float32": 1.05}}
_split_measured: dict[str, dict[str, float]] | None = None


def split_speedup() -> dict[str, dict[str, float]]:
    """How many times faster a batched pass of the retrieval kernel runs with its scores split into
    bfloat16 hi/lo (``avx512bf16``: AVX512_BF16 dot products; ``amx``: AMX-BF16 tiles) than with
    float32 FMA scores, on this CPU: {isa: {"bfloat16": x, "float32": y}} per key dtype, for the split
    instruction sets this CPU has, measured once per process (about 25 ms each) on a pass of 16
    queries (``amx`` splits each key once for all the queries, so it gains less at 8 to 15 rows);
    {} where it has none or the kernel is not built."""
    global _split_measured
    if _split_measured is None:
        isas = [i for i in SPLIT_ISAS if i in _SUPPORTED] if _retrieve_ext is not None else []
        _split_measured = {i: dict(_retrieve_ext.split_speedup(i)) for i in isas}
    return {i: dict(v) for i, v in _split_measured.items()}


_SPLIT_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def retrieve_isa(queries: torch.Tensor, keys: torch.Tensor) -> str:
    """The instruction set of a retrieval call: HOREN_FAST_CPU_ISA when it names one; under
    ``auto``, the best this CPU has, or for 8 or more float32 queries against keys of a split dtype
    the split instruction set whose measured split_speedup() for that dtype is the largest, where it
    reaches SPLIT_MIN_SPEEDUP[isa][dtype]."""
    requested = _requested()  # the variable is read once per call
    isa = _resolved(requested)
    if (requested == "auto" and isa == "avx512" and queries.dim() == 2 and queries.shape[0] >= 8
            and queries.dtype == torch.float32 and keys.dtype in _SPLIT_DTYPES):
        name = _SPLIT_DTYPES[keys.dtype]
        if _split_measured is None:
            split_speedup()
        cleared = {i: v[name] for i, v in _split_measured.items() if v[name] >= SPLIT_MIN_SPEEDUP[i][name]}
        if cleared:
            return max(cleared, key=cleared.get)
    return isa


# ---- retrieval (horen_fast/backends/cpp.py) -----------------------------------------------------
def retrieve_reasons(queries: torch.Tensor, keys: torch.Tensor) -> list[str]:
    """Why the fused retrieval kernel cannot take these tensors ([] = it can)."""
    return (_built_reasons(_retrieve_ext, _retrieve_missing, "retrieval (horen_fast._C)")
            + _cpu_reasons(queries=queries, keys=keys) + isa_reasons())


def retrieve(queries: torch.Tensor, keys: torch.Tensor, out_index: torch.Tensor, out_score: torch.Tensor,
             out_matched: torch.Tensor, params) -> None:
    """Run the fused kernel into the outputs. queries [B, d] float32/float64 contiguous (any norm;
    normalized inside), keys [N, d] float32/bfloat16/float16 (or float64 with float64 queries) with
    contiguous columns, out_index [B] int64, out_score [B] of the queries' dtype, out_matched [B]
    bool; ``params`` carries beta, alpha, steps, threshold and eps."""
    if _retrieve_ext is None:
        raise RuntimeError(_built_reasons(None, _retrieve_missing, "retrieval (horen_fast._C)")[0])
    _retrieve_ext.retrieve(queries, keys, out_index, out_score, out_matched, params.beta, params.alpha,
                           params.steps, params.threshold, params.eps, retrieve_isa(queries, keys),
                           torch.get_num_threads())


# ---- the key sketch's passes (horen_fast/sketch.py) ----------------------------------------------
def sketch_reasons(rows, parts) -> list[str]:
    """Why the C++ sketch passes cannot take these rows and query parts ([] = they can)."""
    why = _built_reasons(_sketch_ext, _sketch_missing, "sketch (horen_fast._sketch)")
    why += _cpu_reasons(queries=parts.qc, rows=rows.coarse)
    if parts.qc.dtype != torch.float32:
        why.append(f"the queries are {parts.qc.dtype}; the C++ passes take float32")
    if rows.coarse.dtype != torch.bfloat16:
        why.append(f"the sketch rows are {rows.coarse.dtype}; the C++ passes read bfloat16 rows "
                   f"(a fitted basis)")
    return why + isa_reasons()


def _sorted_exclusions(exclude: torch.Tensor, count: int) -> torch.Tensor:
    """exclude [B, K] (-1 ignored) as the kernels read it: ascending per row, -1 -> count."""
    exclude = exclude.long()
    return torch.where(exclude >= 0, exclude, count).sort(dim=1).values.contiguous()


def sketch_scan(rows, parts, beta: float, exclude: torch.Tensor, nearest: int):
    """Implementation "cpp" of the op "sketch_scan" (the contract: horen_fast.sketch.scan_torch)."""
    b, count, rt = parts.qc.shape[0], rows.coarse.shape[0], rows.tail_rank
    cvar = (0.5 * beta * beta * rows.spread * parts.perp2_t).float().contiguous()
    run_max, run_z, run_v = (torch.empty(b) for _ in range(3))
    run_y = torch.empty(b, rt)
    near = torch.empty(b, nearest, dtype=torch.long)
    near_u = torch.empty(b, nearest)
    _sketch_ext.scan(parts.qc, parts.qf, parts.perp2_c.sqrt().contiguous(), parts.perp2.sqrt().contiguous(), cvar,
                     rows.coarse, rows.fine, rows.energy_t, rows.energy_c, rows.energy, rows.alive,
                     _sorted_exclusions(exclude, count), rt, nearest, float(beta), float(rows.slack), cpu_isa(),
                     torch.get_num_threads(), run_max, run_z, run_y, run_v, near, near_u)
    return run_max, run_z, run_y, run_v, near, near_u


def sketch_rescue(rows, parts, floor: torch.Tensor, exclude: torch.Tensor):
    """Implementation "cpp" of the op "sketch_rescue" (the contract: horen_fast.sketch.rescue_torch)."""
    rs = rows.screen_rank  # the first bound reads rs columns, then the coarse part, then all
    perp_s = (parts.perp2_c + (parts.qc[:, rs:] ** 2).sum(1)).sqrt().contiguous()
    found = _sketch_ext.rescue(parts.qc, parts.qf, perp_s, parts.perp2_c.sqrt().contiguous(),
                               parts.perp2.sqrt().contiguous(), rows.coarse, rows.fine, rows.energy_s,
                               rows.energy_c, rows.energy, rows.alive,
                               _sorted_exclusions(exclude, rows.coarse.shape[0]), floor.float().contiguous(), rs,
                               float(rows.slack), cpu_isa(), torch.get_num_threads())
    return torch.from_numpy(found[0]), torch.from_numpy(found[1])


# ---- exact rescoring of (query, key) pairs ----------------------------------------------------------
def pair_dots_reasons(keys: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> list[str]:
    """Why the C++ pair_dots cannot take these tensors ([] = it can)."""
    why = _built_reasons(_sketch_ext, _sketch_missing, "sketch (horen_fast._sketch)")
    why += _cpu_reasons(keys=keys, q=q, rows=rows, slots=slots)
    why += [f"{name} is {t.dtype}; the C++ pair_dots takes float32"
            for name, t in (("keys", keys), ("q", q)) if t.dtype != torch.float32]
    if keys.dim() == 2 and keys.shape[1] > 1 and keys.stride(1) != 1:
        why.append("the columns of keys are strided; the C++ pair_dots reads rows with contiguous columns")
    return why + isa_reasons()


def pair_dots(keys: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Implementation "cpp" of the op "pair_dots": q[rows[i]] . keys[slots[i]] in float32, reading
    the keys in place (any row stride). Indices of any integer dtype; out of range: ValueError."""
    out = torch.empty(rows.numel(), dtype=torch.float32)
    _sketch_ext.pair_dots(keys, q.contiguous(), rows.long().contiguous(), slots.long().contiguous(), out, cpu_isa(),
                          torch.get_num_threads())
    return out


_CPP = dict(priority=10, devices=("cpu",))
dispatch.register("sketch_scan", "cpp", lambda rows, parts, beta, exclude, nearest: sketch_reasons(rows, parts),
                  sketch_scan, **_CPP)
dispatch.register("sketch_rescue", "cpp", lambda rows, parts, floor, exclude: sketch_reasons(rows, parts),
                  sketch_rescue, **_CPP)
dispatch.register("pair_dots", "cpp", pair_dots_reasons, pair_dots, **_CPP)
