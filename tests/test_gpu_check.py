"""The CPU-checkable parts of bench/gpu_check.py: its float64 reference against the oracle, the
whole script on tiny shapes under Triton's interpreter (a real subprocess), argument errors and
the markdown writer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu_check
from oracle import anisotropic_keys, mixed_queries, oracle_retrieve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_reference_agrees_with_the_oracle(steps):
    rng = np.random.default_rng(steps)
    k = anisotropic_keys(rng, 300, 24, cos=0.85)
    q = mixed_queries(rng, k, 12, 24)
    kw = dict(gpu_check.PAPER, steps=steps, threshold=0.8)
    index, best, knife = gpu_check.reference(torch.tensor(q), torch.tensor(k), **kw)
    exp = oracle_retrieve(q, k, **kw)
    ok = ~exp.knife
    assert np.array_equal(index.numpy()[ok], exp.index[ok])
    assert np.array_equal(knife.numpy(), exp.knife)
    m = ok & exp.matched
    np.testing.assert_allclose(best.numpy()[m], exp.best[m], atol=1e-12)


def test_planted_matches_sit_beyond_element_2_31():
    case = gpu_check.Case(4, 2**31 // 64 + 50, 64, "bf16", 1, "dense", True)
    lo, hi = gpu_check.planted_range(case)
    assert lo * 64 >= 2**31 and (lo - 1) * 64 < 2**31 and hi == case.N
    assert gpu_check.planted_range(gpu_check.Case(4, 100, 64, "bf16", 1, "dense")) == (0, 100)
    with pytest.raises(ValueError, match="exceed 2"):
        gpu_check.planted_range(gpu_check.Case(4, 100, 64, "bf16", 1, "dense", True))
    assert all(c.N * c.d > 2**31 for c in gpu_check.CASES if c.beyond_2_31)


@pytest.mark.skipif(pytest.importorskip("triton") is None, reason="needs triton")
def test_interpreter_run_passes_and_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out, md = tmp_path / "check.json", tmp_path / "check.md"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--interpret", "--json", str(out),
                           "--markdown", str(md)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["passed"] and len(report["checks"]) == len(gpu_check.TINY_CASES)
    assert {c["B"] for c in report["checks"]} >= {1, 3, 4, 6, 20}
    assert all(c["matched"] > 0 for c in report["checks"])
    assert md.read_text().startswith("GPU check on cpu") and "| B | N | d |" in md.read_text()


def test_arguments(monkeypatch, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])
        assert "no CUDA device" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--interpret"])
    assert "TRITON_INTERPRET" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET")
    args = gpu_check.parse_args(["--interpret", "--json", "a.json", "--skip-timing"])
    assert args.json == "a.json" and args.skip_timing


def test_markdown_lists_checks_and_timings():
    check = dict(B=16, N=50_000, d=14336, dtype="bf16", steps=1, kind="dense", beyond_2_31=True, passed=False,
                 wrong_rows=[3], matched=8, knife_rows=1, max_score_error=3e-6)
    timing = dict(N=50_000, d=14336, dtype="bf16", B=16, triton_ms=0.61, triton_graph_ms=0.55, torch_ms=9.5,
                  one_read_GBps=2600.0, copy_fraction=0.83, speedup_vs_torch=17.3)
    text = gpu_check.markdown(dict(device="H200", passed=False, checks=[check], timing=[timing], copy_GBps=3100.0,
                                   graph=dict(passed=True, cases=[]), no_sync=dict(passed=True, cases=[])))
    assert text.startswith("GPU check on H200: FAIL")
    assert "| 16 | 50000 | 14336 | bf16 | 1 | dense | yes | 8 | 1 | 3.0e-06 | FAIL [3] |" in text
    assert "| 50000 | 14336 | bf16 | 16 | 0.610 | 0.550 | 9.500 | 2600 | 0.83 | 17.3x |" in text
    assert "copy: 3100 GB/s" in text
