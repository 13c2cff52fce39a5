"""`horen-fast demo` end to end on a tiny random Llama folder (the real model: see
test_integration_smollm2.py)."""
import io

import pytest

from horen_fast.cli import main
from horen_fast.demo import DEMO_FACTS, TEMPLATE, run_demo


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_lm import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_demo_runs(tiny_folder, capsys):
    rc = main(["demo", "--model", str(tiny_folder), "--layer", "1", "--n-iter", "2",
               "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count(" -> ") >= 2 * len(DEMO_FACTS)        # the edit list and the table headings
    assert "paraphrases:" in out and "Time: load" in out


def test_demo_figures(tiny_folder):
    buf = io.StringIO()
    res = run_demo(str(tiny_folder), layer=1, n_iter=3, max_new_tokens=2, progress=False, out=buf)
    n = len(DEMO_FACTS)
    assert res["n"] == n and len(res["results"]) == n
    assert len({r.id for r in res["results"]}) == n           # one entry per fact
    assert len(res["before"]) == len(res["after"]) == 3 * n
    for i, r in enumerate(res["results"]):
        entry, cos = res["retrievals"][3 * i]                 # the edited question itself
        assert entry == r.id and cos == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= v <= n for v in res["ok"].values())
    assert TEMPLATE.format(question="x").startswith("Q: x")


def test_demo_shows_whole_answers(tiny_folder):
    """Every answer appears whole (wrapped over lines, never cut), before and after."""
    buf = io.StringIO()
    res = run_demo(str(tiny_folder), layer=1, n_iter=2, max_new_tokens=40, progress=False, out=buf)
    text = buf.getvalue()
    squeezed = "".join(text.split())          # wrapping only adds whitespace (and indentation)
    long_answers = [a for a in res["before"] + res["after"] if len(" ".join(a.split())) > 60]
    assert long_answers                                  # 40 tokens of a random model: long lines
    for answer in res["before"] + res["after"]:
        assert "".join(answer.split()) in squeezed, answer
    assert max(len(line) for line in text.splitlines()) <= 120


def test_busy_cores_is_a_current_measure():
    import os
    from horen_fast.cli import busy_cores
    busy = busy_cores(0.1)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
