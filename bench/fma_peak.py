"""The float32 FMA peak of this CPU: the arithmetic limit of batched retrieval (issue 13).

    python -m bench.fma_peak [--threads 2]

Batched retrieval (B >= 8) does 2 B N d multiply-adds per pass over one read of the keys, so on a
CPU without bfloat16 dot products or AMX its floor is that count over the FMA peak. This compiles
(with the system's cc) a loop of 12 independent 256-bit (AVX2) or 512-bit (AVX-512) vfmadd231ps,
written in inline assembly so that the compiler cannot fold it, runs one copy per thread at once,
and prints multiply-adds per second per thread and in all. x86-64 only.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SRC = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    const long n = 200000000L;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    __asm__ volatile(
        "vxorps %%REG1, %%REG1, %%REG1\n"
        "mov %0, %%rcx\n"
        "1:\n"
        FMAS
        "dec %%rcx\n"
        "jnz 1b\n" :: "r"(n) : "rcx", CLOBBER);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("%.4e\n", n * 12.0 * LANES / s);
    return 0;
}
"""


def _source(reg: str, lanes: int) -> str:
    fmas = "".join(f'"vfmadd231ps %%{reg}1, %%{reg}1, %%{reg}{i}\\n"\n' for i in range(2, 14))
    clobber = ", ".join(f'"xmm{i}"' for i in range(1, 14))
    return (_SRC.replace("REG1", f"{reg}1").replace("FMAS", fmas).replace("CLOBBER", clobber)
            .replace("LANES", str(lanes)))


def _has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("error: no C compiler (cc or gcc) on PATH; install one to measure the FMA peak", file=sys.stderr)
        return 2
    kinds = [("ymm", 8, "-mavx2 -mfma")] + ([("zmm", 16, "-mavx512f")] if _has("avx512f") else [])
    with tempfile.TemporaryDirectory() as tmp:
        for reg, lanes, flags in kinds:
            src, exe = Path(tmp) / f"{reg}.c", Path(tmp) / reg
            src.write_text(_source(reg, lanes))
            subprocess.run([cc, "-O2", *flags.split(), str(src), "-o", str(exe)], check=True)
            procs = [subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True) for _ in range(a.threads)]
            rates = [float(pr.communicate()[0]) for pr in procs]
            print(f"{reg} ({lanes} float32 lanes): {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} G multiply-adds/s "
                  f"per thread, {sum(rates) / 1e9:.1f} G in all ({a.threads} at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
