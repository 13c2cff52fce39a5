"""The checked boundary of the compiled extensions (csrc/common/tensor_args.h): every entry point of
horen_fast._C and horen_fast._sketch is called with wrong kinds, dtypes, shapes, devices, layouts,
strides and index ranges, in a subprocess (a crash there cannot take pytest down), and each call
must raise TypeError / ValueError naming the argument, never end the process with a signal.

Run directly (``python tests/test_native_boundary.py ENTRY``), this file is that subprocess: it
prints one line per case."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from horen_fast import dispatch, native

ENTRIES = ["retrieve", "scan", "rescue", "pair_dots"]


# ---- the valid calls ---------------------------------------------------------------------------
def _valid(entry):
    """(function, keyword arguments of a valid call, names of the arguments that must be
    contiguous, names of the outputs)."""
    g = torch.Generator().manual_seed(0)
    if entry == "retrieve":
        from horen_fast import _C
        kw = dict(queries=torch.randn(3, 8, generator=g),
                  keys=torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1),
                  out_index=torch.empty(3, dtype=torch.long), out_score=torch.empty(3),
                  out_matched=torch.empty(3, dtype=torch.bool), beta=20.0, alpha=0.1, steps=1,
                  threshold=0.5, eps=1e-5, isa="auto", threads=1)
        return _C.retrieve, kw, ["queries", "out_index", "out_score", "out_matched"], \
            ["out_index", "out_score", "out_matched"]
    from horen_fast import _sketch
    if entry == "pair_dots":
        kw = dict(keys=torch.randn(10, 8, generator=g), q=torch.randn(3, 8, generator=g),
                  rows=torch.randint(0, 3, (20,), generator=g), slots=torch.randint(0, 10, (20,), generator=g),
                  out=torch.empty(20), isa="auto", threads=1)
        return _sketch.pair_dots, kw, ["q", "rows", "slots", "out"], ["out"]
    b, rc, rf, n = 2, 16, 16, 40
    common = dict(qc=torch.randn(b, rc, generator=g) * 0.2, qf=torch.randn(b, rf, generator=g) * 0.1,
                  perp_c=torch.full((b,), 0.5), perp=torch.full((b,), 0.3),
                  rows_c=(torch.randn(n, rc, generator=g) * 0.2).bfloat16(),
                  rows_f=(torch.randn(n, rf, generator=g) * 0.1).bfloat16(),
                  e_c=torch.full((n,), 0.4), e=torch.full((n,), 0.2), alive=torch.ones(n, dtype=torch.bool),
                  excl=torch.tensor([[1, 5, 9, 40], [0, 2, 40, 40]]), slack=0.01, isa="auto", threads=1)
    inputs = ["qc", "qf", "perp_c", "perp", "rows_c", "rows_f", "e_c", "e", "alive", "excl"]
    if entry == "scan":
        kw = dict(common, cvar=torch.full((b,), 0.1), e_t=torch.full((n,), 0.6), rt=8, nearest=3, beta=20.0,
                  out_max=torch.empty(b), out_z=torch.empty(b), out_y=torch.empty(b, 8), out_v=torch.empty(b),
                  near=torch.empty(b, 3, dtype=torch.long), near_u=torch.empty(b, 3))
        outs = ["out_max", "out_z", "out_y", "out_v", "near", "near_u"]
        return _sketch.scan, kw, inputs + ["cvar", "e_t"] + outs, outs
    kw = dict(common, perp_s=torch.full((b,), 0.6), e_s=torch.full((n,), 0.5), floor=torch.full((b,), 0.2), rs=8)
    return _sketch.rescue, kw, inputs + ["perp_s", "e_s", "floor"], []


def _wrong_dtype(t):
    return {torch.float32: torch.int32, torch.bfloat16: torch.float32, torch.int64: torch.int32,
            torch.bool: torch.float32}[t.dtype]


def _strided(t):
    """The same shape, not contiguous (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    return wide[..., ::2]


def _cases(entry):
    """(case name, keyword arguments, exception type, text the message must hold)."""
    fn, kw, contiguous, outputs = _valid(entry)
    yield "valid", kw, None, ""
    for name, t in kw.items():
        if not isinstance(t, torch.Tensor):
            continue
        bad = lambda v: {**kw, name: v}  # noqa: E731
        yield f"{name}: None", bad(None), TypeError, f"{name} must be a torch.Tensor"
        yield f"{name}: a list", bad(t.tolist()), TypeError, f"{name} must be a torch.Tensor"
        flipped = np.ascontiguousarray(t.float().numpy())[::-1]  # a negative stride
        yield f"{name}: numpy, negative stride", bad(flipped), TypeError, f"{name} must be a torch.Tensor"
        yield f"{name}: dtype", bad(t.to(_wrong_dtype(t))), TypeError, f"{name} must be"
        yield f"{name}: one more dim", bad(t.unsqueeze(0)), ValueError, f"{name} must have shape"
        yield f"{name}: on meta", bad(torch.empty(t.shape, dtype=t.dtype, device="meta")), ValueError, \
            f"{name} must be on the CPU"
        if t.dtype != torch.bool and t.dim() > 0:
            yield f"{name}: sparse", bad(t.to_sparse()), TypeError, f"{name} could not be read as a dense tensor"
        if name in contiguous and t.numel() > 1:
            yield f"{name}: strided", bad(_strided(t)), ValueError, f"{name} must be contiguous"
        if name in outputs and t.dim() == 1 and t.numel() > 1:
            yield f"{name}: expanded (overlapping)", bad(t[:1].expand(t.shape[0])), ValueError, \
                f"{name} must be contiguous"
    yield "isa: unknown", {**kw, "isa": "sse9"}, ValueError, "isa must be auto"
    yield "threads: 0", {**kw, "threads": 0}, ValueError, "threads must be >= 1"
    yield "threads: a float", {**kw, "threads": 1.5}, TypeError, ""
    missing = [isa for isa in ("avx512", "avx512bf16", "amx", "avx2") if isa not in native.supported_isas()]
    for isa in missing:
        yield f"isa: {isa} not on this CPU", {**kw, "isa": isa}, ValueError, "does not support"
    if entry == "retrieve":
        yield "keys float64, queries float32", {**kw, "keys": kw["keys"].double()}, TypeError, "float64 keys"
        yield "keys: columns strided", {**kw, "keys": kw["keys"].T.contiguous().T}, ValueError, \
            "keys must have contiguous columns"
        yield "keys: none", {**kw, "keys": kw["keys"][:0]}, ValueError, "number of keys N"
        yield "keys: width", {**kw, "keys": kw["keys"][:, :7]}, ValueError, "keys must have shape [N, d=8]"
        yield "out_score: dtype of the queries", {**kw, "queries": kw["queries"].double()}, TypeError, \
            "out_score must be torch.float64"
        yield "steps: -1", {**kw, "steps": -1}, ValueError, "steps must be >= 0"
        yield "alpha: 0", {**kw, "alpha": 0.0}, ValueError, "alpha must be in (0, 1]"
        yield "beta: nan", {**kw, "beta": float("nan")}, ValueError, "beta must be finite"
    if entry == "pair_dots":
        yield "rows: int32", {**kw, "rows": kw["rows"].int()}, TypeError, "rows must be torch.int64"
        yield "slots: past the keys", {**kw, "slots": kw["slots"] + 10}, ValueError, \
            "slots must hold indices in [0, 10)"
        yield "rows: negative", {**kw, "rows": kw["rows"] - 3}, ValueError, "rows must hold indices in [0, 3)"
        yield "slots: length", {**kw, "slots": kw["slots"][:5]}, ValueError, "slots must have shape [n=20]"
        yield "keys: columns strided", {**kw, "keys": kw["keys"].T.contiguous().T}, ValueError, \
            "keys must have contiguous columns"
    if entry in ("scan", "rescue"):
        yield "excl: unsorted", {**kw, "excl": kw["excl"].flip(1).contiguous()}, ValueError, "excl must be sorted"
        yield "excl: int32", {**kw, "excl": kw["excl"].int()}, TypeError, "excl must be torch.int64"
        yield "rows_f: fewer rows", {**kw, "rows_f": kw["rows_f"][:-1]}, ValueError, "rows_f must have shape [L=40"
        yield "qf: other width than rows_f", {**kw, "qf": kw["qf"][:, :8].contiguous()}, ValueError, \
            "rows_f must have shape"
        rank = "rt" if entry == "scan" else "rs"
        yield f"{rank}: past the coarse part", {**kw, rank: 17}, ValueError, f"{rank} must be in [0, rc=16]"
    if entry == "scan":
        yield "out_y: tail width", {**kw, "out_y": torch.empty(2, 7)}, ValueError, "out_y must have shape [B=2, rt=8]"
        yield "nearest: -1", {**kw, "nearest": -1}, ValueError, "nearest must be >= 0"


def _run_cases(entry):
    fn = _valid(entry)[0]
    for case, kw, exc, text in _cases(entry):
        try:
            fn(**kw)
        except Exception as e:  # noqa: BLE001
            ok = exc is not None and isinstance(e, exc) and text in str(e)
            print(("OK " if ok else "WRONG ") + f"{case} -> {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
        else:
            print(("OK " if exc is None else "NO ERROR ") + case, flush=True)


needs_ext = pytest.mark.skipif(not (native.RETRIEVE_BUILT and native.SKETCH_BUILT),
                               reason="the C++ extensions are not built")


@needs_ext
@pytest.mark.parametrize("entry", ENTRIES)
def test_every_bad_call_raises_instead_of_crashing(entry):
    proc = subprocess.run([sys.executable, __file__, entry], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"ended with {proc.returncode} after: {lines[-1:]}\n{proc.stderr[-2000:]}"
    expected = sum(1 for _ in _cases(entry))
    assert len(lines) == expected, proc.stdout + proc.stderr
    bad = [line for line in lines if not line.startswith("OK ")]
    assert not bad, "\n".join(bad)


@needs_ext
def test_errors_name_the_entry_point_and_the_argument():
    from horen_fast import _sketch

    g = torch.Generator().manual_seed(1)
    keys, q = torch.randn(10, 8, generator=g), torch.randn(3, 8, generator=g)
    rows = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"^horen_fast\._sketch\.pair_dots: rows must be torch\.int64, "
                                        r"got torch\.int32$"):
        _sketch.pair_dots(keys, q, rows, rows.long(), torch.empty(4), "auto", 1)


def test_the_reasons_say_why_the_native_code_cannot_serve():
    keys, q = torch.randn(10, 8, dtype=torch.float64), torch.randn(3, 8, device="meta")
    rows = torch.zeros(4, dtype=torch.long)
    why = "; ".join(native.pair_dots_reasons(keys, q, rows, rows))
    assert "keys is torch.float64" in why and "q is on meta" in why
    assert dispatch.reasons_for("pair_dots", keys, torch.randn(3, 8), rows, rows)["torch"] == []
    with pytest.raises(dispatch.NotSupportedError, match="keys is torch.float64"):
        dispatch.select("pair_dots", keys, q, rows, rows, impl="cpp")


def test_the_isa_variable_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv(native.ISA_VARIABLE, "scalar")
    assert native.cpu_isa() == "scalar" and native.isa_reasons() == []
    monkeypatch.setenv(native.ISA_VARIABLE, " AVX2 ")
    expect = "avx2" if "avx2" in native.supported_isas() else None
    if expect:
        assert native.cpu_isa() == "avx2"
    monkeypatch.setenv(native.ISA_VARIABLE, "neon")
    assert "is not one of auto, avx512, avx512bf16, amx, avx2, scalar" in native.isa_reasons()[0]
    with pytest.raises(ValueError, match="HOREN_FAST_CPU_ISA='neon'"):
        native.cpu_isa()
    monkeypatch.delenv(native.ISA_VARIABLE)
    assert native.cpu_isa() == native.best_isa()


if __name__ == "__main__":
    _run_cases(sys.argv[1])
