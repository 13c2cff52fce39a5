"""How fast do the batched loops of the retrieval kernel run, on their own? (issue 13)

    python -m bench.loop_rate [--cases 40x1536,8x14336] [--isa avx2] [--source DIR] [--reps 200]

A pass of 8 or more queries (csrc/retrieve/batched.h) scores a tile of keys against blocks of 8
packed queries, then adds the weighted keys into the packed sums. A whole retrieval adds memory
traffic, threads and bookkeeping; this times the two loops alone, on one thread, in multiply-adds
per second, to set beside `python -m bench.fma_peak`:

- ``resident``: one tile of NJ keys x D (float32) read again and again (it stays in L2 or L3);
- ``stream``: tiles of NJ keys walked over 20,000 keys (or --stream-keys) from memory, the sums
  prefetching the next tile as a pass does.

It compiles (with the system's g++, the flags of setup.py) a small program that includes
``csrc/retrieve/kernel.cpp`` from ``--source`` (default: this checkout), so two versions of the
loops can be compared side by side: ``--source`` a ``git worktree`` of the older commit.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_MAIN = r"""
#include "retrieve/kernel.cpp"
#include <cstdio>
#include <cstdlib>
using namespace horen;
int main(int argc, char** argv) {
    const int nj = atoi(argv[1]);
    const int64_t d = atol(argv[2]), N = atol(argv[4]);
    const int reps = atoi(argv[3]), blocks = 2;  // 16 queries
    const Isa isa = static_cast<Isa>(atoi(argv[5]));
    const auto ks = kernels_for<float, float>(isa);
    const int64_t W = ks.lanes, dv = (d + W - 1) / W, qbsize = (dv + 1) / 2 * 2 * BR * W;
    const int64_t bsize = dv * BR * W, pb = static_cast<int64_t>(nj) * BR * W;
    std::vector<float> keys(static_cast<size_t>(N + nj) * d, 0.01f), q(blocks * qbsize, 0.01f);
    std::vector<float> part(blocks * pb + nj * W), w(blocks * BR * nj, 0.03f), acc(blocks * bsize);
    auto pass = [&](const float* kp, const float* next, int64_t& ts, int64_t& tm) {
        std::fill(part.begin(), part.end(), 0.0f);
        const int64_t a = now_ns();
        batched_scores(ks, kp, d, nj, q.data(), qbsize, blocks, d, part.data(), pb, part.data() + blocks * pb);
        const int64_t b = now_ns();
        batched_sums(ks, kp, d, nj, w.data(), nj, blocks, d, acc.data(), bsize, next, next ? nj : 0);
        const int64_t c = now_ns();
        ts = std::min(ts, b - a);
        tm = std::min(tm, c - b);
        return (b - a) + (c - b);
    };
    const double macs = 1.0 * blocks * BR * nj * d;
    int64_t ts = INT64_MAX, tm = INT64_MAX;
    for (int r = 0; r < reps; ++r) pass(keys.data(), nullptr, ts, tm);
    printf("resident %.2f %.2f\n", macs / ts, macs / tm);
    double best_s = 0, best_m = 0;
    for (int round = 0; round < 3; ++round) {
        int64_t ss = 0, sm = 0;
        for (int64_t j0 = 0; j0 + nj <= N; j0 += nj) {
            int64_t a = INT64_MAX, b = INT64_MAX;
            const float* kp = keys.data() + j0 * d;
            pass(kp, kp + nj * d, a, b);
            ss += a;
            sm += b;
        }
        const double all = 1.0 * blocks * BR * (N / nj * nj) * d;
        best_s = std::max(best_s, all / ss);
        best_m = std::max(best_m, all / sm);
    }
    printf("stream %.2f %.2f\n", best_s, best_m);
    return 0;
}
"""

_ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="40x1536,8x14336", help="NJxD,...: keys per tile x their width")
    p.add_argument("--isa", default="avx2", choices=sorted(_ISAS))
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[1]),
                   help="the checkout whose csrc/ is compiled (default: this one)")
    p.add_argument("--reps", type=int, default=200, help="passes over the resident tile (fastest kept)")
    p.add_argument("--stream-keys", type=int, default=20000)
    a = p.parse_args(argv)
    csrc = Path(a.source) / "csrc"
    if not (csrc / "retrieve" / "kernel.cpp").exists():
        print(f"error: {csrc}/retrieve/kernel.cpp not found; --source must be a horen-fast checkout",
              file=sys.stderr)
        return 2
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        print("error: no C++ compiler (g++) on PATH; install one to time the loops", file=sys.stderr)
        return 2
    try:
        cases = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",")]
        if any(len(c) != 2 or min(c) < 1 for c in cases):
            raise ValueError
    except ValueError:
        print(f"error: --cases must be NJxD,... with positive integers, got {a.cases!r}", file=sys.stderr)
        return 2
    if a.reps < 1 or a.stream_keys < max(nj for nj, _ in cases):
        print(f"error: --reps must be >= 1 and --stream-keys at least the largest NJ, got {a.reps} and "
              f"{a.stream_keys}", file=sys.stderr)
        return 2
    from horen_fast import native
    if a.isa not in native.supported_isas():
        print(f"error: this CPU does not run --isa {a.isa}; it runs {', '.join(native.supported_isas())}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "loops.cpp", Path(tmp) / "loops"
        src.write_text(_MAIN)
        subprocess.run([cxx, "-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only", "-std=c++17",
                        f"-I{csrc}", str(src), "-o", str(exe)], check=True)
        print(f"source {a.source}, isa {a.isa}, 16 queries, one thread; G multiply-adds/s")
        print("| NJ keys | d | resident scores | resident sums | stream scores | stream sums |")
        print("|---:|---:|---:|---:|---:|---:|")
        for nj, d in cases:
            out = subprocess.run([str(exe), str(nj), str(d), str(a.reps), str(a.stream_keys), str(_ISAS[a.isa])],
                                 check=True, capture_output=True, text=True).stdout.split("\n")
            res = dict((line.split()[0], line.split()[1:]) for line in out if line.strip())
            print(f"| {nj} | {d} | {float(res['resident'][0]):.1f} | {float(res['resident'][1]):.1f} | "
                  f"{float(res['stream'][0]):.1f} | {float(res['stream'][1]):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
