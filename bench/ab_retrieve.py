"""Which build of the retrieval kernel is faster on this CPU? Builds called in alternation.

    python -m bench.ab_retrieve BUILD_A BUILD_B [...] [--cases 50000x14336x1:float32,1000x1536x1:float32]
                                [--calls 9] [--threads T]

A BUILD is a ``_C*.so`` file or a folder holding one (``python setup.py build_ext -b DIR`` puts it
in DIR/horen_fast/): e.g. this checkout's build and one of a ``git worktree`` of an older commit.
Every build is loaded into this one process (each file is its own extension module) and, per case,
the builds' ``retrieve`` are called in turn, ``--calls`` times each after one warm-up: a slow spell
of a shared machine falls on all of them alike. The keys and queries are those of ``horen-fast
bench`` (half the queries near a key). The table gives medians, each build's speedup over A (A's
time over its time: above 1 is faster than A), A's read rate of the keys, and whether every
build's decisions (index, matched) equal A's. The instruction set is
HOREN_FAST_CPU_ISA's, as for a real call; the builds must share the binding's signature.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ab_sketch import module_file  # noqa: E402
from horen_fast import native  # noqa: E402
from horen_fast.benchmark import _DTYPES, _keys, _queries, cpu_model  # noqa: E402


def load(path: str):
    """The extension module in ``path``, loaded beside any other build (not into sys.modules)."""
    name = "horen_fast._C"  # the name its PyInit function is built for
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_cases(text: str) -> list[tuple[int, int, int, str]]:
    cases = []
    for item in text.split(","):
        try:
            shape, dtype = item.split(":") if ":" in item else (item, "float32")
            n, d, b = (int(x) for x in shape.split("x"))
        except ValueError:
            raise SystemExit(f"ab_retrieve: bad case {item!r}; write NxDxB[:dtype], e.g. 50000x14336x1:bfloat16")
        if dtype not in _DTYPES or min(n, d, b) < 1:
            raise SystemExit(f"ab_retrieve: bad case {item!r}; N, D, B >= 1 and dtype one of {', '.join(_DTYPES)}")
        cases.append((n, d, b, dtype))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs="+")
    p.add_argument("--cases", default="50000x14336x1:float32,50000x14336x1:bfloat16,1000x1536x1:float32")
    p.add_argument("--calls", type=int, default=9, help="timed calls per build and case")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    if len(a.builds) < 2:
        p.error("give at least two builds")
    cases = parse_cases(a.cases)
    modules = [load(module_file(b, "_C", "ab_retrieve")) for b in a.builds]
    print(f"CPU: {cpu_model()}; {a.threads} threads; median ms over {a.calls} calls, in alternation")
    for i, build in enumerate(a.builds):
        print(f"  {chr(65 + i)}: {build}")
    letters = [chr(65 + i) for i in range(len(modules))]
    print("\n| case | " + " | ".join(f"{x} ms" for x in letters) + " | " + " | ".join(f"{x} speedup" for x in letters[1:])
          + " | GB/s of A | same decisions |")
    print("|---|" + "---:|" * (2 * len(modules)) + "---|")
    for n, d, b, dtype in cases:
        keys = _keys(n, d, _DTYPES[dtype])
        q = _queries(keys, b)
        isa = native.retrieve_isa(q, keys)
        times, decisions = [[] for _ in modules], []
        for rep in range(a.calls + 1):
            for i, m in enumerate(modules):
                index, score = torch.empty(b, dtype=torch.long), torch.empty(b)
                matched = torch.empty(b, dtype=torch.bool)
                t0 = time.perf_counter()
                m.retrieve(q, keys, index, score, matched, 20.0, 0.1, 1, 0.85, 1e-5, isa, a.threads)
                if rep:
                    times[i].append(time.perf_counter() - t0)
                else:
                    decisions.append((index, matched))
        meds = [statistics.median(t) * 1e3 for t in times]
        same = all(torch.equal(x[0], decisions[0][0]) and torch.equal(x[1], decisions[0][1]) for x in decisions)
        gbs = keys.numel() * keys.element_size() / meds[0] / 1e6
        print(f"| {n}x{d}x{b} {dtype} | " + " | ".join(f"{m:.3f}" for m in meds) + " | "
              + " | ".join(f"{meds[0] / m:.2f}x" for m in meds[1:]) + f" | {gbs:.1f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
