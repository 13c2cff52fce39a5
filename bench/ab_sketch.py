"""Which build of the sketch module is faster on this CPU? Builds timed in alternation.

    python -m bench.ab_sketch BUILD_A BUILD_B [...] [--n 1000000] [--batches 1 64] [--rounds 5] [--calls 3]

A BUILD is a ``_sketch*.so`` file or a directory holding one (``python setup.py build_ext -b DIR``
puts it in DIR/horen_fast/). Each round runs every build in a fresh process of its own, which
loads that module as ``horen_fast._sketch`` and times ``--calls`` calls of the C++ sketch_scan and
sketch_rescue per batch size on one saved sketch (the keys of bench/bench_sketch.py, built once and
kept in ``--cache``); the table gives the median over all rounds. Alternating whole processes
spreads a noisy machine's slow spells over every build; one process per build is needed because a
Python process loads an extension module once. HOREN_FAST_CPU_ISA passes through to the children.
"""
from __future__ import annotations

import argparse
import glob
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODULE = "horen_fast._sketch"


def module_file(build: str, stem: str = "_sketch", tool: str = "ab_sketch") -> str:
    """The extension file ``stem*.so`` of BUILD: the file itself, or the one in the folder or in
    its horen_fast/ subfolder (where ``python setup.py build_ext -b DIR`` puts it)."""
    path = Path(build)
    if path.is_file():
        return str(path)
    found = sorted(glob.glob(str(path / f"{stem}*.so")) + glob.glob(str(path / "horen_fast" / f"{stem}*.so")))
    if not found:
        raise SystemExit(f"{tool}: no {stem}*.so in {build}; give the module file or the folder of a build")
    return found[0]


class _Variant(importlib.abc.MetaPathFinder):
    """Resolves the extension module ``module`` (horen_fast._sketch unless told) to the given file."""

    def __init__(self, path: str, module: str = MODULE):
        self.path, self.module = path, module

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        loader = importlib.machinery.ExtensionFileLoader(self.module, self.path)
        return importlib.util.spec_from_file_location(self.module, self.path, loader=loader)


def _child(so: str, cache: str, calls: int, batches: list[int]) -> None:
    sys.meta_path.insert(0, _Variant(so))
    sys.path.insert(0, str(ROOT))
    from horen_fast import native
    if native._sketch_ext is None or os.path.realpath(native._sketch_ext.__file__) != os.path.realpath(so):
        raise SystemExit(f"ab_sketch: {so} was not loaded as {MODULE}")
    saved = torch.load(cache, weights_only=False)
    sk, out = saved["sketch"], {}
    for b in batches:
        q = saved["queries"][b]
        exclude = torch.full((b, 8), -1)
        nearest = 8 if b < 8 else 0
        floor = torch.full((b,), 0.735)
        for op, fn in (("sketch_scan", lambda: sk.scan(q, 20.0, exclude, nearest, impl="cpp")),
                       ("sketch_rescue", lambda: sk.rescue(q, floor, exclude, impl="cpp"))):
            fn()
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[f"{b} {op}"] = times
    print(json.dumps(out))


def _save(n: int, batches: list[int], cache: str) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.bench_sketch import _sketch
    from horen_fast.synthetic import ActivationModel
    model = ActivationModel.load()
    sk, keys = _sketch(model, n)
    queries = {b: torch.cat([model.paraphrases(keys[: b - b // 2], seed=3), model.unrelated(b // 2, seed=4)])
               for b in batches}
    torch.save({"sketch": sk, "queries": queries}, cache)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs="*")
    p.add_argument("--n", type=int, default=1_000_000, help="keys in the sketch")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="timed calls per op, batch and round")
    p.add_argument("--cache", default=None, help="the saved sketch (default: in the temp folder)")
    p.add_argument("--child", nargs=2, metavar=("SO", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child[0], a.child[1], a.calls, a.batches)
        return 0
    if len(a.builds) < 2:
        p.error("give at least two builds")
    files = [module_file(b) for b in a.builds]
    cache = a.cache or os.path.join(tempfile.gettempdir(), f"horen_ab_sketch_{a.n}_{'_'.join(map(str, a.batches))}.pt")
    if not os.path.exists(cache):
        _save(a.n, a.batches, cache)
    times: dict[str, dict[str, list[float]]] = {f: {} for f in files}
    for _ in range(a.rounds):
        for f in files:
            cmd = [sys.executable, "-m", "bench.ab_sketch", "--child", f, cache, "--calls", str(a.calls),
                   "--batches", *map(str, a.batches)]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            for key, ts in json.loads(done.stdout.strip().splitlines()[-1]).items():
                times[f].setdefault(key, []).extend(ts)
    from horen_fast.benchmark import cpu_model
    isa = os.environ.get("HOREN_FAST_CPU_ISA", "auto")
    print(f"CPU: {cpu_model()}; HOREN_FAST_CPU_ISA={isa}; {a.n} keys; median ms over {a.rounds} rounds x {a.calls} calls")
    for i, (build, f) in enumerate(zip(a.builds, files)):
        print(f"  {chr(65 + i)}: {build}")
    print("\n| B | op | " + " | ".join(chr(65 + i) for i in range(len(files))) + " | A / last |")
    print("|---:|---|" + "---:|" * (len(files) + 1))
    for key in times[files[0]]:
        b, op = key.split()
        meds = [statistics.median(times[f][key]) * 1e3 for f in files]
        print(f"| {b} | {op} | " + " | ".join(f"{m:.2f}" for m in meds) + f" | {meds[0] / meds[-1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
