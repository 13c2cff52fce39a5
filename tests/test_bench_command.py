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
