"""Which build of the retrieval kernel is faster on this CPU? Builds called in alternation.

    python -m bench.ab_retrieve BUILD_A BUILD_B [...] [--cases 50000x14336x1:float32,1000x1536x1:float32]
                                [--calls 9] [--threads T]

A BUILD is a ``_C*.so`` file or a folder holding one (``python setup.py build_ext -b DIR`` puts it
in DIR/horen_fast/): e.g. this checkout's build and one of a ``git worktree`` of an older commit.
A Python process loads an extension module once: a second file of the same module name gives back
the first module. So each build runs in a worker process of its own, which loads that file as
``horen_fast._C`` (and checks that it did) and maps the keys and queries of each case from one
shared file. The workers take turns, one at a time: per case, each build in turn makes one untimed
call, then ``--burst`` (default 1) calls back to back, each timed inside its worker, until each has
made ``--calls`` timed calls; so a slow spell of a shared machine falls on all of them alike, and
each timed call finds its caches and threads as a program calling in a loop does. After each turn
the parent waits ``--gap`` ms: the OpenMP threads of a worker spin for about 10 ms after a parallel
region, and would otherwise take the cores of the next worker's calls. The keys and queries are those of
``horen-fast bench`` (half the queries near a key). The table gives medians, each build's speedup
over A (A's time over its time: above 1 is faster than A), A's read rate of the keys, and whether
every build's decisions (index, matched) equal A's. The instruction set is HOREN_FAST_CPU_ISA's, as
for a real call; the builds must share the binding's signature.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))
from bench.ab_sketch import _Variant, module_file  # noqa: E402  (imports no horen_fast module)

MODULE = "horen_fast._C"


def _worker(so: str) -> None:
    """One build: load ``so`` as horen_fast._C, then serve the parent's requests, a JSON line each
    on stdin ("case": map the keys and queries; "call": ``count`` timed calls back to back; "drop":
    unmap), one JSON line each on stdout."""
    sys.meta_path.insert(0, _Variant(so, MODULE))  # before anything imports horen_fast._C
    from horen_fast import native
    from horen_fast.benchmark import _DTYPES
    ext = native._retrieve_ext
    if ext is None or os.path.realpath(ext.__file__) != os.path.realpath(so):
        raise SystemExit(f"ab_retrieve: {so} was not loaded as {MODULE}")
    print(json.dumps({"file": ext.__file__}), flush=True)
    case = None
    for line in sys.stdin:
        ask = json.loads(line)
        if ask["op"] == "case":
            dtype = _DTYPES[ask["dtype"]]
            n, d, b = ask["n"], ask["d"], ask["b"]
            keys = torch.from_file(ask["keys"], shared=False, size=n * d, dtype=dtype).view(n, d)
            q = torch.from_file(ask["queries"], shared=False, size=b * d, dtype=torch.float32).view(b, d)
            case = (keys, q, ask["isa"], ask["threads"])
            reply = {}
        elif ask["op"] == "call":  # ask["count"] calls back to back, each timed
            keys, q, isa, threads = case
            b = q.shape[0]
            reply = {"seconds": []}
            for _ in range(ask["count"]):
                index, score = torch.empty(b, dtype=torch.long), torch.empty(b)
                matched = torch.empty(b, dtype=torch.bool)
                t0 = time.perf_counter()
                ext.retrieve(q, keys, index, score, matched, 20.0, 0.1, 1, 0.85, 1e-5, isa, threads)
                reply["seconds"].append(time.perf_counter() - t0)
            reply.update(index=index.tolist(), matched=matched.tolist())
        else:  # drop
            case = None
            reply = {}
        print(json.dumps(reply), flush=True)


class _Worker:
    def __init__(self, so: str):
        cmd = [sys.executable, "-m", "bench.ab_retrieve", "--worker", so]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.file = self._read()["file"]

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"ab_retrieve: a worker stopped (exit code {self.proc.wait()}); its error is above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def parse_cases(text: str) -> list[tuple[int, int, int, str]]:
    from horen_fast.benchmark import _DTYPES
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
    p.add_argument("builds", nargs="*")
    p.add_argument("--cases", default="50000x14336x1:float32,50000x14336x1:bfloat16,1000x1536x1:float32")
    p.add_argument("--calls", type=int, default=9, help="timed calls per build and case")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--burst", type=int, default=1, help="timed calls per turn of a build")
    p.add_argument("--gap", type=float, default=20.0,
                   help="ms to wait after each turn, so that the OpenMP threads of the worker that ran it stop "
                        "spinning before the next worker runs (they would take the next build's cores)")
    p.add_argument("--worker", metavar="SO", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return 0
    if len(a.builds) < 2:
        p.error("give at least two builds")
    if a.calls < 1 or a.burst < 1 or a.gap < 0:
        p.error("--calls must be >= 1, --burst must be >= 1 and --gap >= 0")
    cases = parse_cases(a.cases)
    files = [module_file(b, "_C", "ab_retrieve") for b in a.builds]
    from horen_fast import native
    from horen_fast.benchmark import _DTYPES, _keys, _queries, cpu_model
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workers = [_Worker(f) for f in files]
    try:
        print(f"CPU: {cpu_model()}; {a.threads} threads; median ms over {a.calls} calls, in alternation "
              f"(a worker process per build)")
        for i, (build, w) in enumerate(zip(a.builds, workers)):
            print(f"  {chr(65 + i)}: {build} ({w.file})")
        letters = [chr(65 + i) for i in range(len(workers))]
        print("\n| case | " + " | ".join(f"{x} ms" for x in letters) + " | "
              + " | ".join(f"{x} speedup" for x in letters[1:]) + " | GB/s of A | same decisions |")
        print("|---|" + "---:|" * (2 * len(workers)) + "---|")
        for n, d, b, dtype in cases:
            with tempfile.TemporaryDirectory(dir=shm) as tmp:
                keys = _keys(n, d, _DTYPES[dtype])
                q = _queries(keys, b).contiguous()
                isa = native.retrieve_isa(q, keys)
                key_bytes = keys.numel() * keys.element_size()
                paths = {"keys": os.path.join(tmp, "keys"), "queries": os.path.join(tmp, "queries")}
                keys.view(torch.uint8).numpy().tofile(paths["keys"])
                q.numpy().tofile(paths["queries"])
                del keys
                for w in workers:
                    w.ask(op="case", n=n, d=d, b=b, dtype=dtype, isa=isa, threads=a.threads, **paths)
                times, decisions = [[] for _ in workers], []
                for turn in range(-(-a.calls // a.burst)):
                    for i, w in enumerate(workers):
                        count = min(a.burst, a.calls - turn * a.burst)
                        r = w.ask(op="call", count=1 + count)  # the first call of a turn is not timed
                        time.sleep(a.gap / 1e3)
                        times[i].extend(r["seconds"][1:])
                        if turn == 0:
                            decisions.append((r["index"], r["matched"]))
                for w in workers:
                    w.ask(op="drop")
            meds = [statistics.median(t) * 1e3 for t in times]
            same = all(x == decisions[0] for x in decisions)
            gbs = key_bytes / meds[0] / 1e6
            print(f"| {n}x{d}x{b} {dtype} | " + " | ".join(f"{m:.3f}" for m in meds) + " | "
                  + " | ".join(f"{meds[0] / m:.2f}x" for m in meds[1:]) + f" | {gbs:.1f} | {'yes' if same else 'NO'} |",
                  flush=True)
    finally:
        for w in workers:
            w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
