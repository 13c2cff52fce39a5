"""``horen-fast bench``: machine header, bandwidth probe, every backend next to the published
algorithm, JSON rows (a smoke run of the --quick grid)."""
import json
import subprocess
import sys

import pytest


def test_bench_quick_writes_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "horen_fast.cli", "bench", "--quick", "--reps", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("CPU: ") and "probed streaming read" in p.stdout
    data = json.loads(out.read_text())
    assert data["probe"]["rate"] > 0 and data["machine"]["cpu"]
    impls = {r["impl"] for r in data["rows"]}
    assert {"published", "torch", "torch GEMV"} <= impls
    for r in data["rows"]:
        assert r["median_ms"] > 0 and r["x_one_read"] > 0
        assert r["vs_published"] == pytest.approx(
            next(x["median_ms"] for x in data["rows"] if x["impl"] == "published" and
                 (x["N"], x["d"], x["B"], x["dtype"]) == (r["N"], r["d"], r["B"], r["dtype"])) / r["median_ms"])


def test_bench_rejects_a_bad_case():
    p = subprocess.run([sys.executable, "-m", "horen_fast.cli", "bench", "--cases", "10x0x1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "bad case" in p.stderr and "Traceback" not in p.stderr


def test_a_slow_implementation_is_timed_fewer_times(monkeypatch):
    """Past the time budget an implementation is timed less often (its warm-up is its one
    measurement when a call exceeds the whole budget), and the table says which rows."""
    from horen_fast import benchmark
    monkeypatch.setattr(benchmark, "BUDGET_S", 0.0)
    rows = benchmark.run_cases([(300, 64, 2, "float32")], reps=3, rate=1e10)
    assert rows and all(r["reps"] == 1 for r in rows)
    monkeypatch.setattr(benchmark, "BUDGET_S", 1e9)
    rows += benchmark.run_cases([(300, 64, 2, "float32")], reps=3, rate=1e10)
    assert {r["reps"] for r in rows} == {1, 3}
    info = {"cpu": "x", "cores": 2, "threads": 2, "flags": "", "kernel_isa": "-", "tile_bytes": 0, "caches": {},
            "torch": "-", "date": "-", "loadavg_1min": 0.0}
    table = benchmark.format_table(info, {"rate": 1e10, "bytes": 1 << 30}, rows)
    assert "timed fewer than 3 times" in table and "published at 300x64x2 float32: 1" in table


def test_the_sketch_bench_times_every_isa():
    """bench/bench_sketch.py: the three ops, torch and every C++ ISA here, one row each."""
    pytest.importorskip("faiss")
    from bench import bench_sketch
    rows = bench_sketch.run([3000], [1, 9], reps=1, tau=0.5)
    assert len(rows) == 2 * 3 * (1 + len(bench_sketch.sketch_isas()))
    assert {r["op"] for r in rows} == {"sketch_scan", "sketch_rescue", "pair_dots"}
    assert all(r["median_ms"] > 0 for r in rows)


def test_the_fma_peak_is_measured():
    import platform
    import shutil
    if platform.machine() not in ("x86_64", "AMD64") or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("bench/fma_peak.py measures x86-64 with a C compiler")
    from pathlib import Path
    p = subprocess.run([sys.executable, "-m", "bench.fma_peak", "--threads", "1"], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    rate = float(p.stdout.split("G in all")[0].split(",")[-1])
    assert rate > 0.1


def test_the_sketch_ab_loads_each_build_it_is_given(tmp_path):
    """bench/ab_sketch.py: every build runs in its own process as horen_fast._sketch (a copy of the
    installed module under another folder here), one table row per op and batch; a folder with no
    module is a one-line error."""
    pytest.importorskip("faiss")
    import shutil
    from pathlib import Path
    from horen_fast import native
    if not native.SKETCH_BUILT:
        pytest.skip("the sketch module is not built")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(native._sketch_ext.__file__, copy)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bench.ab_sketch", native._sketch_ext.__file__, str(copy), "--n", "2000",
           "--batches", "1", "9", "--rounds", "1", "--calls", "1", "--cache", str(tmp_path / "sk.pt")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 9 |")]
    assert len(rows) == 4 and all(float(r.split("|")[3]) > 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "bench.ab_sketch", str(tmp_path), str(copy)], capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert bad.returncode != 0 and "no _sketch*.so in" in bad.stderr


def test_retrieval_builds_are_called_in_alternation(tmp_path):
    """bench/ab_retrieve.py runs each build of horen_fast._C it is given in a worker process of its
    own, which really loads that file (two copies of the installed module at two paths: each row of
    the header names its own copy; one process would give back the first module for both), and
    prints one row per case with the same decisions; a folder with no module, a malformed case and
    --burst 0 are one-line errors."""
    import shutil
    from pathlib import Path
    from horen_fast import native
    if native._retrieve_ext is None:
        pytest.skip("the retrieval module is not built")
    copies = []
    for name in ("first", "second"):
        folder = tmp_path / name / "horen_fast"
        folder.mkdir(parents=True)
        shutil.copy(native._retrieve_ext.__file__, folder)
        copies.append(folder.parent)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bench.ab_retrieve", *map(str, copies), "--cases", "300x64x1,200x48x9:bfloat16",
           "--calls", "3", "--burst", "2", "--gap", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, p.stderr
    for letter, folder in zip("AB", copies):
        loaded = next(line for line in p.stdout.splitlines() if line.startswith(f"  {letter}: "))
        assert loaded.endswith(f"({next(folder.glob('horen_fast/_C*.so'))})"), loaded
    rows = [line.split("|") for line in p.stdout.splitlines() if line.startswith("| 300x64x1 ") or
            line.startswith("| 200x48x9 ")]
    assert len(rows) == 2
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and r[-2].strip() == "yes" for r in rows)
    for args, message in (([str(tmp_path), str(copies[0])], "no _C*.so in"),
                          ([str(copies[0]), str(copies[1]), "--cases", "300x64"], "bad case '300x64'"),
                          ([str(copies[0]), str(copies[1]), "--burst", "0"], "--burst must be >= 1")):
        bad = subprocess.run([sys.executable, "-m", "bench.ab_retrieve", *args], capture_output=True,
                             text=True, timeout=120, cwd=root)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr


def test_the_batched_loops_are_timed_from_a_checkout(tmp_path):
    """bench/loop_rate.py compiles csrc/retrieve/kernel.cpp of the checkout it is given and prints
    one row of multiply-add rates per case; a folder without the kernel, or an ISA this CPU lacks, is
    a one-line error."""
    import shutil
    from pathlib import Path
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("bench/loop_rate.py needs a C++ compiler")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bench.loop_rate", "--cases", "9x40,8x1029", "--isa", "scalar", "--reps", "2",
           "--stream-keys", "90"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert p.returncode == 0, p.stderr
    rows = [line.split("|")[1:-1] for line in p.stdout.splitlines() if line.startswith(("| 9 |", "| 8 |"))]
    assert len(rows) == 2 and all(float(v) > 0 for r in rows for v in r[2:])
    bad = subprocess.run([sys.executable, "-m", "bench.loop_rate", "--source", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert bad.returncode == 2 and "must be a horen-fast checkout" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "bench.loop_rate", "--cases", "8"], capture_output=True, text=True,
                         timeout=120, cwd=root)
    assert bad.returncode == 2 and "--cases must be NJxD" in bad.stderr
