"""The static GPU check (bench/gpu_static.py) on a representative reduced grid: every kernel the
planner launches, compiled ahead of time for sm_80, sm_90 and sm_100 by the ptxas in the triton
wheel, without a GPU. Fails on any spill or over-limit grid in the small path, any over-limit
grid anywhere, and any configuration that cannot be resident. Runs the real command in a
subprocess without TRITON_INTERPRET (the kernels must be compiled, not interpreted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"kernel", "target", "path", "B", "N", "d", "dtype", "registers", "spill_bytes", "shared_bytes",
          "ctas_per_sm", "grid", "key_bytes_read"}
RUNS = [  # (targets, dtypes, B, N, d): the largest grids (N = 16M, B = 1024), both paths, ragged d
    ("sm_80,sm_90,sm_100", "bf16", "1,4,1024", "16000000", "64,14336"),
    ("sm_90", "fp32,fp16", "3,16", "50000", "1536"),
]


def _run(tmp_path, i, targets, dtypes, b, n, d):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / f"static{i}.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_static", "--targets", targets, "--dtypes", dtypes,
                           "--batch", b, "--keys", n, "--width", d, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else [])


@pytest.fixture(scope="module")
def static_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    rows, procs = [], []
    for i, run in enumerate(RUNS):
        proc, r = _run(tmp, i, *run)
        procs.append(proc)
        rows += r
    return procs, rows


def test_static_check_passes(static_rows):
    procs, rows = static_rows
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "| target | path | kernel |" in proc.stdout  # the markdown table
    assert {r["target"] for r in rows} == {"sm_80", "sm_90", "sm_100"}
    assert {r["path"] for r in rows} == {"small", "large"}


def test_rows_have_the_documented_fields_and_meet_the_limits(static_rows):
    _, rows = static_rows
    assert rows
    kernels = {r["kernel"] for r in rows}
    assert {"small_step", "large_scores", "large_wsum", "combine", "update", "bound", "final"} <= kernels
    for r in rows:
        assert FIELDS <= r.keys(), r
        assert len(r["grid"]) == 3 and all(isinstance(g, int) for g in r["grid"])
        assert r["grid"][0] <= 2**31 - 1 and max(r["grid"][1:]) <= 65535, r
        assert r["ctas_per_sm"] >= 1 and r["registers"] <= 255, r
        if r["path"] == "small":
            assert r["spill_bytes"] == 0, r
            assert r["B"] <= 4
        assert r["key_bytes_read"] >= r["N"] * r["d"] * {"fp32": 4, "bf16": 2, "fp16": 2}[r["dtype"]]


def test_bad_arguments_get_one_line_errors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for args, needle in ((["--targets", "sm_70"], "unknown target"), (["--dtypes", "int8"], "unknown dtype"),
                         (["--batch", "x"], "comma-separated integers")):
        proc = subprocess.run([sys.executable, "-m", "bench.gpu_static", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and needle in proc.stderr, (args, proc.stderr[-500:])
