"""The GPU check of the fused Triton retrieval, for a person with one H100/H200 (at most ~6 min,
nothing to install beyond the torch and Triton already there):

    python -m bench.gpu_check [--json gpu_check.json] [--markdown gpu_check.md] [--skip-timing]
    python -m bench.gpu_check --interpret     # tiny shapes on the CPU (Triton's interpreter; CI)

1. Decisions against a float64 reference (written here, chunked over keys, on the GPU) on about
   30 shapes: every batch class (1, 2-4, 5-16, 17-64, > 64), odd d, float32/bfloat16/float16 keys,
   steps 0-3, dense (pairwise cosine 0.85) and spread keys, and N x d > 2^31 with the matched
   keys planted beyond element 2^31. Rows on a knife edge (top two final cosines or the best and
   the threshold within 1e-4) may differ; every other row must agree in index and match, and
   matched scores within 2e-4.
2. CUDA-graph capture of one retrieval and replays with fresh queries (equal to eager calls).
3. No host synchronization: a warm call under torch.cuda.set_sync_debug_mode("error").
4. Timing of the headline shapes (50K x 14336 bf16, 1K x 1536, 1M x 1536 at B = 1 and 16): ms
   (eager and CUDA graph), one-read GB/s (key bytes / time), its fraction of a measured
   device-to-device copy bandwidth, next to the eager torch reference (backend="torch").
Writes JSON and a markdown table; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PAPER = dict(beta=20.0, alpha=0.1, steps=1, threshold=0.85, eps=1e-5)
GAP = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    B: int
    N: int
    d: int
    dtype: str
    steps: int
    kind: str             # "dense" (pairwise cosine 0.85) or "spread"
    beyond_2_31: bool = False  # matched keys planted past element 2^31 of the key matrix


CASES = [
    Case(1, 1, 64, "fp32", 1, "spread"), Case(1, 7, 37, "bf16", 0, "dense"),
    Case(1, 50_000, 14336, "bf16", 1, "dense"), Case(1, 20_000, 1537, "fp16", 3, "dense"),
    Case(2, 10_000, 4099, "fp32", 2, "spread"), Case(3, 30_000, 1536, "bf16", 1, "dense"),
    Case(4, 5_000, 8960, "bf16", 0, "dense"), Case(4, 100_000, 1536, "fp32", 1, "dense"),
    Case(4, 1_000, 16384, "fp16", 2, "spread"), Case(5, 2_000, 999, "bf16", 1, "dense"),
    Case(8, 40_000, 1536, "fp16", 1, "dense"), Case(16, 50_000, 14336, "bf16", 1, "dense"),
    Case(16, 3_000, 37, "fp32", 3, "spread"), Case(17, 10_000, 2049, "bf16", 2, "dense"),
    Case(32, 60_000, 1536, "fp32", 0, "dense"), Case(64, 20_000, 4096, "bf16", 1, "dense"),
    Case(64, 5_000, 1536, "fp16", 3, "spread"), Case(100, 30_000, 1536, "bf16", 1, "dense"),
    Case(256, 8_000, 777, "fp32", 1, "dense"), Case(1024, 10_000, 1536, "bf16", 1, "dense"),
    Case(1024, 1_000, 64, "fp16", 2, "spread"), Case(3, 1_000_000, 1536, "bf16", 1, "dense"),
    Case(200, 1_000_000, 64, "bf16", 0, "dense"), Case(1, 250_000, 64, "fp32", 2, "spread"),
    Case(12, 150, 14336, "fp32", 1, "dense"), Case(2, 16_384, 1536, "bf16", 3, "dense"),
    Case(1, 151_000, 14336, "bf16", 1, "dense", True), Case(16, 151_000, 14336, "bf16", 1, "dense", True),
    Case(4, 1_500_000, 1537, "bf16", 0, "dense", True), Case(48, 1_500_000, 1537, "bf16", 1, "spread", True),
]
TINY_CASES = [  # under the interpreter: every path, small enough for a CPU
    Case(1, 50, 37, "fp32", 1, "dense"), Case(3, 70, 20, "bf16", 2, "spread"),
    Case(4, 40, 600, "fp16", 0, "dense"), Case(6, 60, 33, "bf16", 1, "dense"),
    Case(20, 45, 17, "fp32", 3, "spread"),
]
HEADLINE = [(50_000, 14336, "bf16", 1), (50_000, 14336, "bf16", 16), (1_000, 1536, "bf16", 1),
            (1_000, 1536, "bf16", 16), (1_000_000, 1536, "bf16", 1), (1_000_000, 1536, "bf16", 16)]


def make_keys(case: Case, device, gen: torch.Generator) -> torch.Tensor:
    """Unit keys in the case's dtype, made in chunks (bounded temporaries)."""
    keys = torch.empty(case.N, case.d, dtype=DTYPES[case.dtype], device=device)
    mu = torch.nn.functional.normalize(torch.randn(case.d, generator=gen, device=device), dim=0)
    step = max(1, (1 << 26) // case.d)
    for lo in range(0, case.N, step):
        hi = min(case.N, lo + step)
        noise = torch.nn.functional.normalize(torch.randn(hi - lo, case.d, generator=gen, device=device), dim=1)
        k = 0.85 ** 0.5 * mu + 0.15 ** 0.5 * noise if case.kind == "dense" else noise
        keys[lo:hi] = torch.nn.functional.normalize(k, dim=1).to(keys.dtype)
    return keys


def planted_range(case: Case) -> tuple[int, int]:
    """[lo, hi) of the keys that paraphrase queries are made from: all of them, or only those
    whose first element lies beyond element 2^31 of the key matrix."""
    lo = -(-2**31 // case.d) if case.beyond_2_31 else 0
    if lo >= case.N:
        raise ValueError(f"{case}: N x d must exceed 2^31 to plant matches beyond element 2^31")
    return lo, case.N


def make_queries(keys: torch.Tensor, case: Case, gen: torch.Generator) -> torch.Tensor:
    """Even rows: paraphrases of a key (beyond element 2^31 when the case plants them there);
    odd rows: unrelated. Any norm."""
    n, d = keys.shape
    idx = torch.randint(*planted_range(case), (case.B,), generator=gen, device=keys.device)
    noise = torch.nn.functional.normalize(torch.randn(case.B, d, generator=gen, device=keys.device), dim=1)
    near = keys[idx].float() + (0.15 if case.kind == "dense" else 0.4) * noise
    rows = torch.arange(case.B, device=keys.device)[:, None]
    q = torch.where(rows % 2 == 0, near, torch.randn(case.B, d, generator=gen, device=keys.device))
    return q * torch.rand(case.B, 1, generator=gen, device=keys.device).add(0.1) * 10


def reference(queries: torch.Tensor, keys: torch.Tensor, beta, alpha, steps, threshold, eps):
    """float64 SPEC 3, chunked over keys: (index, best, knife) per row; index -1 where unmatched."""
    x = queries.double()
    norm = x.norm(dim=1, keepdim=True)
    valid = torch.isfinite(norm[:, 0]) & (norm[:, 0] > 0)
    q = torch.where(valid[:, None], x / norm.clamp(min=1e-300), torch.zeros_like(x))
    step = max(1, (1 << 25) // keys.shape[1])
    chunks = [(lo, min(keys.shape[0], lo + step)) for lo in range(0, keys.shape[0], step)]
    running = valid.clone()
    knife = torch.zeros_like(valid)
    for _ in range(steps):
        m = torch.full((q.shape[0],), -math.inf, dtype=torch.float64, device=q.device)
        y = torch.zeros_like(q)
        for lo, hi in chunks:
            kc = keys[lo:hi].double()
            s = beta * (q @ kc.T)
            m_new = torch.maximum(m, s.max(dim=1).values)
            y = y * torch.exp(m - m_new)[:, None] + torch.exp(s - m_new[:, None]) @ kc
            m = m_new
        r = torch.nn.functional.normalize(y, dim=1)
        dist = (r - q).norm(dim=1)
        knife |= running & ((dist - eps).abs() <= 1e-6 * max(eps, 1e-12) + 1e-9)
        running = running & (dist >= eps)
        q = torch.where(running[:, None], torch.nn.functional.normalize((1 - alpha) * q + alpha * r, dim=1), q)
    top2 = torch.full((q.shape[0], 2), -math.inf, dtype=torch.float64, device=q.device)
    index = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    for lo, hi in chunks:
        c = q @ keys[lo:hi].double().T
        k = min(2, hi - lo)
        v, i = c.topk(k, dim=1)  # ties within a chunk: topk order is not the tie rule, fixed below
        best_c = c.max(dim=1).values
        first = (c == best_c[:, None]).int().argmax(dim=1)
        better = best_c > top2[:, 0]
        index = torch.where(better, first + lo, index)
        top2 = torch.cat([top2, v], dim=1).topk(2, dim=1).values
    best = top2[:, 0]
    knife |= valid & (((top2[:, 0] - top2[:, 1]) < GAP) | ((best - threshold).abs() < GAP))
    matched = valid & (best > threshold)
    return torch.where(matched, index, torch.full_like(index, -1)), best, knife


def check_case(case: Case, device, seed: int) -> dict:
    import horen_fast
    gen = torch.Generator(device=device).manual_seed(seed)
    keys = make_keys(case, device, gen)
    queries = make_queries(keys, case, gen)
    kw = dict(PAPER, steps=case.steps)
    t0 = time.perf_counter()
    got = horen_fast.retrieve(queries, keys, backend="triton", **kw)
    idx, best, knife = reference(queries, keys, **kw)
    ok = ~knife.cpu()
    gi, ei = got.index.cpu(), idx.cpu()
    wrong = (ok & (gi != ei)).nonzero()[:, 0].tolist()
    m = ok & (ei >= 0)
    err = (got.score.double().cpu()[m] - best.cpu()[m]).abs().max().item() if m.any() else 0.0
    beyond = int(((ei >= 0) & (ei * case.d >= 2**31)).sum()) if case.beyond_2_31 else 0
    passed = not wrong and err <= 2e-4 and (not case.beyond_2_31 or beyond > 0)
    return dict(asdict(case), passed=passed, wrong_rows=wrong[:8], matched=int((ei >= 0).sum()),
                knife_rows=int(knife.sum()), max_score_error=err, matched_beyond_2_31=beyond,
                seconds=round(time.perf_counter() - t0, 3))


def check_graph(device) -> dict:
    """Capture one retrieval per batch class in a CUDA graph; replays with fresh queries equal
    eager calls."""
    import horen_fast
    out = []
    for b, steps in ((1, 1), (4, 3), (16, 1), (100, 2)):
        case = Case(b, 20_000, 1536, "bf16", steps, "dense")
        gen = torch.Generator(device=device).manual_seed(b)
        keys = make_keys(case, device, gen)
        static_q = make_queries(keys, case, gen)
        kw = dict(PAPER, steps=steps)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            horen_fast.retrieve(static_q, keys, backend="triton", **kw)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = horen_fast.retrieve(static_q, keys, backend="triton", **kw)
        same = True
        for _ in range(3):
            static_q.copy_(make_queries(keys, case, gen))
            graph.replay()
            eager = horen_fast.retrieve(static_q, keys, backend="triton", **kw)
            same &= bool(torch.equal(res.index, eager.index)) and bool(
                torch.equal(res.score.nan_to_num(-9), eager.score.nan_to_num(-9)))
        out.append(dict(B=b, steps=steps, passed=same))
    return dict(passed=all(r["passed"] for r in out), cases=out)


def check_no_sync(device) -> dict:
    import horen_fast
    out = []
    for b in (1, 16):
        case = Case(b, 10_000, 1536, "bf16", 1, "dense")
        gen = torch.Generator(device=device).manual_seed(7)
        keys = make_keys(case, device, gen)
        q = make_queries(keys, case, gen)
        horen_fast.retrieve(q, keys, backend="triton", **PAPER)  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            horen_fast.retrieve(q, keys, backend="triton", **PAPER)
            out.append(dict(B=b, passed=True, error=None))
        except RuntimeError as exc:
            out.append(dict(B=b, passed=False, error=str(exc).splitlines()[0]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(passed=all(r["passed"] for r in out), cases=out)


def _median_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth, GB/s of bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / ms / 1e6


def time_headline(device, copy_gbps: float) -> list[dict]:
    import horen_fast
    rows = []
    for n, d, dt, b in HEADLINE:
        case = Case(b, n, d, dt, 1, "dense")
        gen = torch.Generator(device=device).manual_seed(n + b)
        keys = make_keys(case, device, gen)
        q = make_queries(keys, case, gen)
        nbytes = keys.numel() * keys.element_size()
        reps = 20 if nbytes < (1 << 30) else 10
        eager = _median_ms(lambda: horen_fast.retrieve(q, keys, backend="triton", **PAPER), reps)
        static_q = q.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            horen_fast.retrieve(static_q, keys, backend="triton", **PAPER)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            horen_fast.retrieve(static_q, keys, backend="triton", **PAPER)
        graphed = _median_ms(graph.replay, reps)
        ref = _median_ms(lambda: horen_fast.retrieve(q, keys, backend="torch", **PAPER), max(3, reps // 4))
        gbps = nbytes / graphed / 1e6
        rows.append(dict(N=n, d=d, dtype=dt, B=b, key_bytes=nbytes, triton_ms=eager, triton_graph_ms=graphed,
                         torch_ms=ref, one_read_GBps=gbps, copy_fraction=gbps / copy_gbps,
                         speedup_vs_torch=ref / graphed))
        del keys
        torch.cuda.empty_cache()
    return rows


def markdown(report: dict) -> str:
    lines = [f"GPU check on {report['device']}: {'PASS' if report['passed'] else 'FAIL'}", "",
             "| B | N | d | keys | steps | kind | > 2^31 | matched | knife rows | max score err | result |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["checks"]:
        lines.append(f"| {r['B']} | {r['N']} | {r['d']} | {r['dtype']} | {r['steps']} | {r['kind']} | "
                     f"{'yes' if r['beyond_2_31'] else ''} | {r['matched']} | {r['knife_rows']} | "
                     f"{r['max_score_error']:.1e} | {'ok' if r['passed'] else 'FAIL ' + str(r['wrong_rows'])} |")
    for name in ("graph", "no_sync"):
        if name in report:
            lines.append(f"\n{name}: {'ok' if report[name]['passed'] else 'FAIL'} {report[name]['cases']}")
    if report.get("timing"):
        lines += ["", f"device-to-device copy: {report['copy_GBps']:.0f} GB/s (read + write)", "",
                  "| N | d | keys | B | triton ms | triton graph ms | torch ms | one-read GB/s | of copy BW "
                  "| vs torch |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t in report["timing"]:
            lines.append(f"| {t['N']} | {t['d']} | {t['dtype']} | {t['B']} | {t['triton_ms']:.3f} | "
                         f"{t['triton_graph_ms']:.3f} | {t['torch_ms']:.3f} | {t['one_read_GBps']:.0f} | "
                         f"{t['copy_fraction']:.2f} | {t['speedup_vs_torch']:.1f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="gpu_check.json", help="where to write the JSON report")
    ap.add_argument("--markdown", default="gpu_check.md", help="where to write the markdown table")
    ap.add_argument("--interpret", action="store_true",
                    help="tiny shapes on the CPU under Triton's interpreter (no GPU; what CI runs)")
    ap.add_argument("--skip-timing", action="store_true", help="checks only, no timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.interpret and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or pass --interpret for the CPU check")
    if args.interpret and os.environ.get("TRITON_INTERPRET") not in (None, "1"):
        ap.error("--interpret needs TRITON_INTERPRET unset or 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    device = torch.device("cpu" if args.interpret else "cuda")
    report = dict(device="cpu (Triton interpreter)" if args.interpret else torch.cuda.get_device_name(),
                  checks=[check_case(c, device, args.seed + i)
                          for i, c in enumerate(TINY_CASES if args.interpret else CASES)])
    if not args.interpret:
        report["graph"] = check_graph(device)
        report["no_sync"] = check_no_sync(device)
        if not args.skip_timing:
            report["copy_GBps"] = copy_bandwidth(device)
            report["timing"] = time_headline(device, report["copy_GBps"])
    report["passed"] = all(c["passed"] for c in report["checks"]) and all(
        report[k]["passed"] for k in ("graph", "no_sync") if k in report)
    Path(args.json).write_text(json.dumps(report, indent=1))
    table = markdown(report)
    Path(args.markdown).write_text(table)
    print(table)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
