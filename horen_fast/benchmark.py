"""``horen-fast bench``: retrieval latency on the machine it runs on, against its limits.

Every figure is measured in the same run, side by side:
- the published algorithm written literally (``horen_fast.published``), the torch reference and
  every fast backend available here, round-robin over repetitions (medians reported);
- a bandwidth probe: a streaming read of a buffer larger than the last-level cache, and torch's own
  GEMV over each case's keys; every latency is also given as a multiple of "one read of the keys
  at the probed streaming rate" (the limit of a memory-bound retrieval).

The header names the CPU (model, ISA, cache sizes, threads), so a table says which machine it
describes. ``--json`` writes the rows for machines, ``--plot`` a PNG of latency against N.
The benchmarks under bench/ (pytest-benchmark) measure the same cases; this command needs only the
installed package.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .published import published_retrieve

__all__ = ["machine_info", "probe_bandwidth", "run_cases", "format_table", "DEFAULT_CASES"]

# (N, d, B, key dtype): the issue-13 goals plus a sweep of N at d = 1536
DEFAULT_CASES = [
    (1_000, 1536, 1, "float32"), (1_000, 1536, 16, "float32"),
    (10_000, 1536, 1, "float32"), (10_000, 1536, 16, "float32"),
    (50_000, 1536, 1, "float32"), (50_000, 1536, 16, "float32"),
    (50_000, 14336, 1, "float32"), (50_000, 14336, 1, "bfloat16"),
    (50_000, 14336, 16, "float32"), (50_000, 14336, 16, "bfloat16"),
]
QUICK_CASES = [(1_000, 256, 1, "float32"), (4_000, 256, 4, "float32"), (4_000, 256, 1, "bfloat16")]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _native_machine() -> dict:
    try:
        from . import native
    except ImportError:  # a build of horen-fast without horen_fast.native
        return {}
    return native.machine()


def _native_isa() -> str | None:
    from . import native
    return native.cpu_isa()


def _batched_isa() -> dict[str, str]:
    """What auto runs a batch of 16 float32 queries with, per key dtype (the measured split rule)."""
    from . import native
    q = torch.zeros(16, 8)
    return {name: native.retrieve_isa(q, torch.zeros(1, 8, dtype=dt))
            for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}


def caches() -> dict[str, int]:
    """Cache sizes in bytes ("L1d", "L2", "L3") as the C++ kernels detect them (horen_fast.native:
    sysfs, else sysconf, else cpuid); empty when the extension is not built."""
    m = _native_machine()
    return {name: m[key] for name, key in (("L1d", "l1d_bytes"), ("L2", "l2_bytes"), ("L3", "l3_bytes"))
            if m.get(key)}


def cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for line in info.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The instruction-set extensions that matter to the kernels, as this CPU reports them."""
    flags = set()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"]
    return " ".join(f for f in wanted if f in flags) or platform.machine()


def _split_speedup() -> dict:
    from . import native
    return native.split_speedup()


def _split_bar() -> dict:
    from . import native
    return native.SPLIT_MIN_SPEEDUP


def machine_info() -> dict:
    m = _native_machine()
    return {
        "cpu": cpu_model(), "flags": cpu_flags(), "kernel_isa": _native_isa() if m else None,
        "split_speedup": _split_speedup() if m else {},
        "batched_isa": _batched_isa() if m else {},
        "caches": caches(), "tile_bytes": m.get("tile_bytes"), "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe_bandwidth(nbytes: int | None = None, reps: int = 5) -> dict:
    """Streaming read rate (bytes/s): the best median of two full reads by torch (a sum and a dot
    product, over all its threads) of a float32 buffer far larger than the last-level cache
    (2 GiB, or an eighth of the memory available, at least 4x the LLC). On virtual machines the
    rate grows with the buffer (seen here: 40 GB/s at 256 MiB, 50 GB/s at 2.9 GB), so a small
    probe would understate the limit."""
    llc = max(caches().values(), default=32 << 20)
    avail = _mem_available() or (16 << 30)
    nbytes = nbytes or max(4 * llc, min(2 << 30, avail // 8))
    buf = torch.ones(nbytes // 4)
    buf.sum()  # fault the pages in
    t = min(_median_time(buf.sum, reps), _median_time(lambda: torch.dot(buf, buf), reps))
    return {"bytes": buf.numel() * 4, "seconds": t, "rate": buf.numel() * 4 / t}


def _keys(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Unit keys around one direction, pairwise cosine about 0.5 (like MLP activations)."""
    g = torch.Generator().manual_seed(seed + n * 31 + d)
    mu = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    out = torch.empty(n, d, dtype=dtype)
    for lo in range(0, n, 4096):
        hi = min(n, lo + 4096)
        noise = torch.nn.functional.normalize(torch.randn(hi - lo, d, generator=g), dim=1)
        out[lo:hi] = torch.nn.functional.normalize(0.5 ** 0.5 * mu + 0.5 ** 0.5 * noise, dim=1).to(dtype)
    return out


def _queries(keys: torch.Tensor, b: int) -> torch.Tensor:
    """Half paraphrase-like (a stored key plus noise: they match), half unrelated."""
    g = torch.Generator().manual_seed(b)
    n, d = keys.shape
    near = keys[torch.randint(0, n, (b,), generator=g)].float()
    near = near + 0.25 * torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    far = torch.randn(b, d, generator=g)
    return torch.where((torch.arange(b) % 2 == 0)[:, None], near, far)


def _impls(device: str) -> list[str]:
    from .retrieval import available_backends
    return ["published"] + [b for b in available_backends(device) if b != "triton" or device == "cuda"]


# seconds of timed calls per implementation and case: an implementation whose one call takes
# longer than BUDGET_S / reps (the published algorithm or torch on bfloat16 keys without native
# bfloat16 arithmetic, 100+ s a call on some CPUs) is timed fewer times, at least once
BUDGET_S = 30.0


def run_cases(cases, *, reps: int = 7, rate: float, device: str = "cpu", progress=None) -> list[dict]:
    """Time every implementation on every case (round-robin over ``reps`` repetitions, fewer for
    an implementation whose calls would take more than BUDGET_S; each row says how many)."""
    from .retrieval import retrieve
    rows = []
    for n, d, b, dtype_name in cases:
        dtype = _DTYPES[dtype_name]
        need = n * d * torch.tensor([], dtype=dtype).element_size() * 2.5
        avail = _mem_available()
        if avail is not None and need > 0.8 * avail:
            print(f"skipping N={n} d={d} {dtype_name}: needs about {need / 2**30:.1f} GiB", file=sys.stderr)
            continue
        keys = _keys(n, d, dtype).to(device)
        q = _queries(keys, b).to(device)
        key_bytes = keys.numel() * keys.element_size()
        runs = {"published": lambda: published_retrieve(q, keys)}
        for name in _impls(device)[1:]:
            runs[name] = (lambda name=name: retrieve(q, keys, backend=name))
        ref = retrieve(q, keys, backend="torch").index
        qv = q[0].to(dtype)
        runs["torch GEMV"] = lambda: keys @ qv
        count, times = {}, {}
        for name, fn in runs.items():  # warm-up, and a sanity check of the decisions
            t0 = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            # a call longer than the whole budget: its warm-up is its one measurement
            count[name] = 0 if warm >= BUDGET_S else max(1, min(reps, int(BUDGET_S / max(warm, 1e-9))))
            times[name] = [] if count[name] else [warm]
            if name not in ("published", "torch GEMV") and not torch.equal(out.index, ref):
                print(f"warning: {name} disagrees with torch on N={n} d={d} B={b} {dtype_name}", file=sys.stderr)
        for i in range(reps):
            for name, fn in runs.items():
                if i >= count[name]:
                    continue
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["published"])
        one_read = key_bytes / rate
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"N": n, "d": d, "B": b, "dtype": dtype_name, "impl": name, "median_ms": med * 1e3,
                         "vs_published": base / med, "x_one_read": med / one_read,
                         "key_gbps": key_bytes / med / 1e9, "key_bytes": key_bytes, "reps": len(ts)})
        if progress:
            progress(rows[-len(times):])
        del keys, q
    return rows


def _mem_available() -> int | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return None


def format_table(info: dict, probe: dict, rows: list[dict]) -> str:
    c = ", ".join(f"{k} {v >> 10} KiB" if v < (4 << 20) else f"{k} {v >> 20} MiB" for k, v in info["caches"].items())
    head = [f"CPU: {info['cpu']} ({info['cores']} cores, {info['threads']} torch threads); "
            f"flags: {info['flags']}; C++ kernel ISA: {info['kernel_isa']} (16 queries: "
            + (", ".join(f"{v} for {k} keys" for k, v in info.get("batched_isa", {}).items()) or "-")
            + f"), tile {info['tile_bytes']} bytes",
            f"caches: {c}; torch {info['torch']}; {info['date']}; load average {info['loadavg_1min']:.2f}",
            "bf16 split of the batched scores, measured: " + ("; ".join(
                f"{isa}: " + ", ".join(f"{k} keys {v:.2f}x (bar {_split_bar()[isa][k]}x)" for k, v in per.items())
                for isa, per in info.get("split_speedup", {}).items()) or "not available"),
            f"probed streaming read: {probe['rate'] / 1e9:.1f} GB/s ({probe['bytes'] >> 20} MiB buffer)",
            "", "| N | d | B | keys | impl | median ms | vs published | x one read | key GB/s |",
            "|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        head.append(f"| {r['N']} | {r['d']} | {r['B']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.3f} | "
                    f"{r['vs_published']:.2f}x | {r['x_one_read']:.2f} | {r['key_gbps']:.1f} |")
    most = max((r["reps"] for r in rows), default=0)
    fewer = [f"{r['impl']} at {r['N']}x{r['d']}x{r['B']} {r['dtype']}: {r['reps']}" for r in rows if r["reps"] < most]
    if fewer:
        head += ["", f"timed fewer than {most} times (a budget of {BUDGET_S:.0f} s per implementation and case): "
                 + "; ".join(fewer)]
    return "\n".join(head)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict[tuple, dict[str, list]] = {}
    for r in rows:
        series.setdefault((r["d"], r["B"], r["dtype"]), {}).setdefault(r["impl"], []).append((r["N"], r["median_ms"]))
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.8), squeeze=False)
    for ax, (key, impls) in zip(axes[0], sorted(series.items())):
        for impl, pts in sorted(impls.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="N (keys)", ylabel="median ms",
               title=f"d={key[0]} B={key[1]} {key[2]}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_cases(text: str) -> list[tuple]:
    """"NxDxB:dtype,..." e.g. "50000x14336x1:bfloat16,1000x1536x16"."""
    cases = []
    for part in text.split(","):
        shape, _, dtype = part.strip().partition(":")
        try:
            n, d, b = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"horen-fast bench: bad case {part!r}; write NxDxB[:dtype], e.g. 1000x1536x1:float32") from None
        dtype = dtype or "float32"
        if dtype not in _DTYPES or min(n, d, b) < 1:
            raise SystemExit(f"horen-fast bench: bad case {part!r}; sizes must be >= 1 and the dtype one of {sorted(_DTYPES)}")
        cases.append((n, d, b, dtype))
    return cases


def _cmd_bench(args) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("horen-fast bench: --plot needs matplotlib; pip install 'horen-fast[plot]'", file=sys.stderr)
            return 2
    cases = _parse_cases(args.cases) if args.cases else (QUICK_CASES if args.quick else DEFAULT_CASES)
    info = machine_info()
    probe = probe_bandwidth(64 << 20 if args.quick else None)
    rows = run_cases(cases, reps=args.reps or (3 if args.quick else 7), rate=probe["rate"])
    table = format_table(info, probe, rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "probe": probe, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot, f"{info['cpu']}, {info['threads']} threads")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time retrieval on this machine against its limits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help="NxDxB[:dtype],... (default: the standard grid)")
    p.add_argument("--quick", action="store_true", help="a few small cases (a smoke test)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per case (median; default 7)")
    p.add_argument("--json", help="write machine info, probe and rows as JSON here")
    p.add_argument("--plot", help="write a PNG of latency against N here (needs matplotlib)")
    p.set_defaults(func=_cmd_bench)
