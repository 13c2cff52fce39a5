"""The prefilter's sketch passes and the rescue's exact rescoring on every instruction set here.

    python -m bench.bench_sketch [--sizes 200000 1000000] [--batches 1 64] [--reps 7] [--tau 0.735]

Times the three C++ ops of horen_fast/sketch.py ("sketch_scan", "sketch_rescue", "pair_dots") with
each instruction set this CPU has forced through HOREN_FAST_CPU_ISA (the blocks of 16 rows of
csrc/sketch/blocks.h on AVX-512 or AVX2; ``scalar`` is the generic loop), next to their torch
references, round-robin over the repetitions (medians). Keys: horen_fast.synthetic.ActivationModel
(fitted to SmolLM2 activations), the default sketch (rank 128, bfloat16). Queries: half
paraphrase-like, half unrelated. The rescue's floor is ``--tau``; pair_dots rescores the pairs it
flags. Run it on a quiet machine: the table names the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from horen_fast import native  # noqa: E402
from horen_fast.benchmark import cpu_model  # noqa: E402
from horen_fast.sketch import KeySketch, pair_dots  # noqa: E402
from horen_fast.synthetic import ActivationModel  # noqa: E402


def _sketch(model: ActivationModel, n: int) -> tuple[KeySketch, torch.Tensor]:
    keys = torch.cat([block for _, block in model.iter_keys(n, seed=n, chunk=50_000)])
    sk = KeySketch(keys.shape[1], 128, fit_from=1)
    sk.fit(keys[:20_000])
    sk.append(keys)
    return sk, keys


def sketch_isas() -> list[str]:
    """The ISAs with their own sketch code here (the split ISAs run the avx512 blocks)."""
    return [i for i in native.supported_isas() if i in ("avx512", "avx2", "scalar")] if native.SKETCH_BUILT else []


def run(sizes, batches, reps: int, tau: float) -> list[dict]:
    model = ActivationModel.load()
    isas = sketch_isas()
    rows = []
    for n in sizes:
        sk, keys = _sketch(model, n)
        for b in batches:
            q = torch.cat([model.paraphrases(keys[: b - b // 2], seed=3), model.unrelated(b // 2, seed=4)])
            exclude = torch.full((b, 8), -1)
            nearest = 8 if b < 8 else 0
            floor = torch.full((b,), tau)
            found = sk.rescue(q, floor, exclude, impl="torch")
            ops = {
                "sketch_scan": lambda impl: sk.scan(q, 20.0, exclude, nearest, impl=impl),
                "sketch_rescue": lambda impl: sk.rescue(q, floor, exclude, impl=impl),
                "pair_dots": lambda impl: pair_dots(keys, q, found[0], found[1], impl=impl),
            }
            impls = [("torch", None)] + [("cpp", isa) for isa in isas]
            for op, fn in ops.items():
                times = {(impl, isa): [] for impl, isa in impls}
                for i in range(reps + 1):  # the first round is a warm-up
                    for impl, isa in impls:
                        if isa is not None:
                            os.environ["HOREN_FAST_CPU_ISA"] = isa
                        t0 = time.perf_counter()
                        fn(impl)
                        if i:
                            times[(impl, isa)].append(time.perf_counter() - t0)
                os.environ.pop("HOREN_FAST_CPU_ISA", None)
                base = statistics.median(times[("torch", None)])
                for (impl, isa), ts in times.items():
                    med = statistics.median(ts)
                    rows.append({"N": n, "B": b, "op": op, "impl": impl if isa is None else f"cpp {isa}",
                                 "median_ms": med * 1e3, "vs_torch": base / med, "pairs": int(found[0].numel())})
        del sk, keys
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tau", type=float, default=0.735, help="the rescue's floor")
    a = p.parse_args(argv)
    rows = run(a.sizes, a.batches, a.reps, a.tau)
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; ISAs here: {', '.join(native.supported_isas())}; "
          f"median ms over {a.reps} rounds; rescue floor {a.tau}")
    print("\n| N | B | op | impl | median ms | vs torch | pairs flagged |\n|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['N']} | {r['B']} | {r['op']} | {r['impl']} | {r['median_ms']:.2f} | {r['vs_torch']:.2f}x | "
              f"{r['pairs']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
