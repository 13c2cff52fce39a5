"""Static check of the Triton kernels, no GPU needed:

    python -m bench.gpu_static [--json PATH] [--markdown PATH] [--reduced] [--targets sm_90,...]

For every GPU target (sm_80, sm_90, sm_100) and every shape of a grid (B 1..1024, N 1K..16M,
d 64..16K, float32/bfloat16/float16 keys), it builds the launch sequence the planner chooses
(kernels/hopfield.py ``launches`` on meta tensors: no memory), compiles each distinct kernel
configuration ahead of time with the ptxas inside the triton wheel, reads registers, spill (stack
and local) bytes and shared memory from the cubin (cuobjdump --dump-resource-usage, also in the
wheel), and derives CTAs per SM. One row per shape and launch: kernel, target, path, B, N, d,
dtype, steps, registers, spill_bytes, shared_bytes, ctas_per_sm, grid, key_bytes_read (the
planner's model, per call). Exit status 1 on a spill or an over-limit grid in the small path, an
over-limit grid anywhere, or a configuration that cannot be resident (0 CTAs per SM).

Must run without TRITON_INTERPRET=1 (the kernels are then compiled, not interpreted). Identical
configurations compile once per process; Triton's on-disk cache keeps them across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

SHAPES_B = (1, 2, 3, 4, 8, 16, 64, 256, 1024)
SHAPES_N = (1_000, 50_000, 1_000_000, 16_000_000)
SHAPES_D = (64, 1536, 4096, 8960, 14336, 16384)
REDUCED_B = (1, 4, 16, 1024)
REDUCED_N = (1_000, 16_000_000)
REDUCED_D = (64, 1536, 14336)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = (0, 2)  # 0: scores only; 2: both the intermediate and the last-step variants
PAPER = dict(beta=20.0, alpha=0.1, threshold=0.85, eps=1e-5)


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} not found: the triton wheel ships {name} there (pip install triton)")
    return str(path)


class Compiler:
    """Compiles launches for GPU targets and reads their resource usage, once per configuration."""

    def __init__(self):
        self.cache: dict = {}
        self.cuobjdump = _tool("cuobjdump")

    def usage(self, launch, target) -> dict:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        sig, const, attrs = launch.signature()
        key = (launch.name, target.name, tuple(sorted(sig.items())), tuple(sorted(const.items())),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), launch.num_warps, launch.num_stages)
        if key not in self.cache:
            src = ASTSource(fn=launch.kernel, signature=sig, constexprs=const, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", target.arch, 32),
                                      options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
            res = self._resources(compiled.asm["cubin"], launch.kernel.__name__)
            res["shared_bytes"] = max(res["shared_bytes"], int(compiled.metadata.shared))
            self.cache[key] = res
        return self.cache[key]

    def _resources(self, cubin: bytes, fn_name: str) -> dict:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"horen_static_{os.getpid()}.cubin"
        tmp.write_bytes(cubin)
        try:
            text = subprocess.run([self.cuobjdump, "--dump-resource-usage", str(tmp)], check=True,
                                  capture_output=True, text=True).stdout
        finally:
            tmp.unlink(missing_ok=True)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
        if m is None:
            raise RuntimeError(f"cuobjdump gave no resource usage for {fn_name}:\n{text}")
        reg, stack, shared, local = map(int, m.groups())
        return dict(registers=reg, spill_bytes=stack + local, shared_bytes=shared)


def ctas_per_sm(registers: int, shared: int, num_warps: int, target) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory (plus
    the 1 KB the driver reserves per CTA), threads and the CTA limit."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // num_warps
    if shared > target.smem_per_block:
        return 0
    by_smem = target.smem_per_sm // (shared + 1024) if shared else target.max_ctas_per_sm
    by_threads = target.max_threads_per_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, target.max_ctas_per_sm))


def rows_for(compiler: Compiler, target, B: int, N: int, D: int, dtype_name: str) -> list[dict]:
    from horen_fast.kernels import hopfield, plan as planner
    dtype = DTYPES[dtype_name]
    p = planner.plan(B, N, D, dtype, target)
    q = torch.empty(B, D, device="meta", dtype=torch.float32)
    valid = torch.empty(B, device="meta", dtype=torch.bool)
    keys = torch.empty(N, D, device="meta", dtype=dtype)
    rows, seen = [], set()
    for steps in STEPS:
        seq, _ = hopfield.launches(q, valid, keys, steps=steps, plan=p, **PAPER)
        for launch in seq:
            res = compiler.usage(launch, target)
            sig = (launch.name, launch.grid, tuple(sorted(launch.signature()[1].items())))
            if sig in seen:
                continue
            seen.add(sig)
            rows.append(dict(kernel=launch.name, target=target.name, path=p.path, B=B, N=N, d=D,
                             dtype=dtype_name, steps=steps, **res,
                             ctas_per_sm=ctas_per_sm(res["registers"], res["shared_bytes"], launch.num_warps, target),
                             grid=list(launch.grid), grid_ok=launch.grid_problem() is None,
                             key_bytes_read=p.key_bytes_read(1)))
    return rows


def failures(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['target']} {r['kernel']} B={r['B']} N={r['N']} d={r['d']} {r['dtype']} steps={r['steps']}"
        if not r["grid_ok"]:
            out.append(f"{where}: grid {r['grid']} over the limit")
        if r["path"] == "small" and r["spill_bytes"]:
            out.append(f"{where}: {r['spill_bytes']} bytes spilled in the small path")
        if r["ctas_per_sm"] < 1:
            out.append(f"{where}: cannot be resident ({r['registers']} registers, {r['shared_bytes']} B shared)")
    return out


def markdown(rows: list[dict]) -> str:
    """One line per target, path and kernel: the extremes over every shape of the grid."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["target"], r["path"], r["kernel"])].append(r)
    lines = ["| target | path | kernel | shapes | registers (max) | spill bytes (max) | shared bytes (max) "
             "| CTAs/SM (min) | grid max (x, y, z) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (t, path, k), rs in sorted(groups.items()):
        gmax = [max(r["grid"][i] for r in rs) for i in range(3)]
        lines.append(f"| {t} | {path} | {k} | {len(rs)} | {max(r['registers'] for r in rs)} | "
                     f"{max(r['spill_bytes'] for r in rs)} | {max(r['shared_bytes'] for r in rs)} | "
                     f"{min(r['ctas_per_sm'] for r in rs)} | {tuple(gmax)} |")
    heads = sorted({(r["target"], r["B"], r["N"], r["d"], r["dtype"], r["path"], r["key_bytes_read"]) for r in rows
                    if r["target"] == "sm_90" and r["dtype"] == "bf16" and r["B"] in (1, 4, 16, 64, 1024)
                    and (r["N"], r["d"]) in {(50_000, 14336), (1_000, 1536), (1_000_000, 1536)}})
    if heads:
        lines += ["", "| target | B | N | d | keys | path | modelled key bytes per call (M=1) | key bytes |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t, b, n, d, dt, path, kb in heads:
            nbytes = n * d * DTYPES[dt].itemsize
            lines.append(f"| {t} | {b} | {n} | {d} | {dt} | {path} | {kb:,} | {nbytes:,} ({kb / nbytes:.2f}x) |")
    return "\n".join(lines) + "\n"


def run_one(tname: str, dt: str, shapes_b, shapes_n, shapes_d) -> list[dict]:
    """The rows of one target and key dtype, compiled in this process."""
    from horen_fast.kernels import plan as planner
    compiler = Compiler()
    target = planner.TARGETS[tname]
    rows = [r for d in shapes_d for n in shapes_n for b in shapes_b for r in rows_for(compiler, target, b, n, d, dt)]
    print(f"{tname} {dt}: {len(compiler.cache)} configurations compiled", file=sys.stderr)
    return rows


def run(targets, shapes_b, shapes_n, shapes_d, dtypes) -> list[dict]:
    """All rows; each target and dtype compiles in a child process (``--worker``): a long-lived
    process that compiles hundreds of kernels can crash in Triton's teardown, and children keep
    that from losing the results."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.gpu_static compiles the kernels: run it without TRITON_INTERPRET=1")
    from horen_fast.kernels import plan as planner
    for tname in targets:
        if tname not in planner.TARGETS:
            raise SystemExit(f"unknown target {tname!r}; choose from {', '.join(planner.TARGETS)}")
    rows = []
    root = Path(__file__).resolve().parents[1]
    for tname in targets:
        for dt in dtypes:
            out = Path(os.environ.get("TMPDIR", "/tmp")) / f"horen_static_{os.getpid()}_{tname}_{dt}.json"
            cmd = [sys.executable, "-m", "bench.gpu_static", "--worker", str(out), "--targets", tname,
                   "--dtypes", dt, *(f"--{flag}={','.join(map(str, v))}" for flag, v in
                                     (("batch", shapes_b), ("keys", shapes_n), ("width", shapes_d)))]
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            lines = proc.stderr.splitlines()
            sys.stderr.write(proc.stderr[-2000:] if not out.exists() else (lines[-1] if lines else "") + "\n")
            if not out.exists():
                raise SystemExit(f"compiling for {tname} {dt} failed (exit status {proc.returncode})")
            rows += json.loads(out.read_text())
            out.unlink()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_static", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write one row per shape and kernel launch to this file")
    ap.add_argument("--markdown", help="also write the markdown table to this file")
    ap.add_argument("--reduced", action="store_true", help="a representative reduced grid (the CI test)")
    ap.add_argument("--targets", default="sm_80,sm_90,sm_100", help="comma-separated, e.g. sm_90")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated key dtypes")
    ap.add_argument("--batch", help="comma-separated B values instead of the grid's")
    ap.add_argument("--keys", help="comma-separated N values instead of the grid's")
    ap.add_argument("--width", help="comma-separated d values instead of the grid's")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one target and dtype, rows to this file
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    for dt in dtypes:
        if dt not in DTYPES:
            ap.error(f"unknown dtype {dt!r}; choose from {', '.join(DTYPES)}")
    shapes = list((REDUCED_B, REDUCED_N, REDUCED_D) if args.reduced else (SHAPES_B, SHAPES_N, SHAPES_D))
    for i, (flag, value) in enumerate((("--batch", args.batch), ("--keys", args.keys), ("--width", args.width))):
        if value:
            try:
                shapes[i] = tuple(int(v) for v in value.split(","))
            except ValueError:
                ap.error(f"{flag} takes comma-separated integers, got {value!r}")
            if min(shapes[i]) < 1:
                ap.error(f"{flag} values must be >= 1, got {value!r}")
    if args.worker:
        rows = run_one(args.targets, dtypes[0], *shapes)
        tmp = Path(args.worker + ".part")
        tmp.write_text(json.dumps(rows))
        tmp.rename(args.worker)
        sys.stderr.flush()
        os._exit(0)  # skip interpreter teardown (see run)
    rows = run(args.targets.split(","), *shapes, dtypes)
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    bad = failures(rows)
    for line in bad[:50]:
        print("FAIL", line, file=sys.stderr)
    print(f"{len(rows)} rows, {len(bad)} failures", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
