"""Record readers, the eval command end to end on a tiny random Llama saved to a local folder, and the
report's schema; batched generation through an editor that holds edits."""
import json
import math

import pytest

from horen_fast.cli import main
from horen_fast.config import HoReNConfig
from horen_fast.data import EditRecord, RecordsError, read_records
from horen_fast.editor import HoReNEditor
from horen_fast.evaluate import default_checkpoints, run_sequential
from horen_fast.metrics import generate_tokens
from tiny_lm import RECORDS, byte_bpe_tokenizer, save_tiny_model, tiny_llama, write_records


# --------------------------------------------------------------------------- records

def test_reads_zsre_jsonl_and_json_array(tmp_path):
    a = read_records(write_records(tmp_path / "a.jsonl"))
    b = read_records(write_records(tmp_path / "b.json", jsonl=False), n=2)
    assert len(a) == len(RECORDS) and a[:2] == b
    assert a[0] == EditRecord(RECORDS[0]["src"], RECORDS[0]["alt"], RECORDS[0]["rephrase"], RECORDS[0]["loc"],
                              RECORDS[0]["loc_ans"])


def test_reads_easyedit_names_flat_and_nested(tmp_path):
    flat = {"prompt": "p", "target_new": "t", "rephrase_prompt": "r", "locality_prompt": "l",
            "locality_ground_truth": "a"}
    nested = {"prompt": "p", "target_new": {"str": "t"}, "rephrase_prompt": ["r", "r2"],
              "locality": {"neighborhood": {"prompt": "l", "ground_truth": ["a"]}}}
    recs = read_records(write_records(tmp_path / "e.json", [flat, nested], jsonl=False))
    assert recs[0] == recs[1] == EditRecord("p", "t", "r", "l", "a")


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ('{"src": "a"}\nnot json\n', "line 2 is not valid JSON"),
    ('[{"src": "a", ', "invalid JSON array"),
    ('{"a": 1}', "record 1: missing"),
    ('{"src": "a", "alt": "b", "rephrase": "c", "loc": "d"}', "record 1: missing .*loc_answer"),
    ('[{"src": "q", "alt": 3}]', "must be a string"),
    ('[1]', "expected a JSON object"),
])
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(RecordsError, match=message):
        read_records(path)


def test_missing_file_and_too_many(tmp_path):
    with pytest.raises(RecordsError, match="no such file"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(RecordsError, match="asked for 9 records but the file has 4"):
        read_records(write_records(tmp_path / "a.jsonl"), n=9)
    assert read_records(write_records(tmp_path / "b.jsonl"), n=1, require=("prompt", "target"))[0].prompt


# --------------------------------------------------------------------------- editor + batched generation

def test_batched_generation_through_an_editor_with_edits():
    """Rows of different prompt lengths in one left-padded batch get the same tokens as one-row
    editor.generate (the edit lands at each row's own last prompt token)."""
    tok = byte_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=7, eos_token_id=tok.eos_token_id)
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=2, hopfield_key_match_threshold=0.5))
    for r in RECORDS[:2]:
        ed.edit(r["src"], r["alt"])
    prompts = [RECORDS[0]["src"], "Where", RECORDS[1]["src"], RECORDS[1]["rephrase"]]
    batched = generate_tokens(ed, tok, prompts, [4, 3, 5, 2], batch_size=4)
    for p, n, (_, gen) in zip(prompts, [4, 3, 5, 2], batched):
        enc = tok(p, return_tensors="pt")
        one = ed.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen == one[0, enc["input_ids"].shape[1]:].tolist()


def test_run_sequential_refuses_an_editor_with_edits():
    tok = byte_bpe_tokenizer()
    ed = HoReNEditor(tiny_llama(len(tok)), tok, HoReNConfig(layer=1, n_iter=1))
    ed.edit("a question?", "answer")
    with pytest.raises(ValueError, match="already holds 1 edits"):
        run_sequential(ed, [EditRecord("q", "t", "r", "l", "a")])


# --------------------------------------------------------------------------- eval command

def test_eval_command_end_to_end(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny")
    data = write_records(tmp_path / "recs.jsonl")
    cfg = tmp_path / "cfg.yaml"
    HoReNConfig(layer=1, n_iter=3, hopfield_key_match_threshold=0.9).to_yaml(cfg)
    out, plot = tmp_path / "report.json", tmp_path / "metrics.png"
    rc = main(["eval", "--data", str(data), "--n", "3", "--model", str(folder), "--config", str(cfg),
               "--checkpoints", "1,2,10", "--out", str(out), "--plot", str(plot), "--batch-size", "2",
               "--no-progress"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("n", "rel", "gen", "loc", "op"):
        assert key in last
    assert last["n"] == 3

    report = json.loads(out.read_text())
    assert {k: report[k] for k in ("n", "rel", "gen", "loc", "op")} == {k: last[k] for k in ("n", "rel", "gen", "loc", "op")}
    assert [c["n"] for c in report["checkpoints"]] == [1, 2, 3]      # 10 > n is dropped, n always kept
    for c in report["checkpoints"]:
        for key in ("rel", "gen", "loc", "op"):
            assert 0.0 <= c[key] <= 1.0
        assert c["op"] == pytest.approx((c["rel"] * c["gen"] * c["loc"]) ** (1 / 3))
        assert c["entries"] <= c["n"] and c["eval_seconds"] >= 0
    assert len(report["records"]) == 3
    for rec, src in zip(report["records"], RECORDS):
        assert rec["prompt"] == src["src"] and rec["target"] == src["alt"]
        for key in ("rel", "gen", "loc", "rel_answer", "gen_answer", "edit_seconds", "edit_action", "edit_loss"):
            assert key in rec
    mean_rel = sum(r["rel"] for r in report["records"]) / 3
    assert math.isclose(mean_rel, report["rel"])
    assert report["config"]["layer"] == 1 and report["config"]["n_iter"] == 3
    for key in ("torch", "transformers", "python", "horen_fast"):
        assert report["versions"][key]
    for key in ("edit_seconds", "eval_seconds", "seconds_per_edit", "model_load_seconds"):
        assert report["timings"][key] >= 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["status"] == "complete" and report["started"] <= report["finished"]
    assert report["command"].startswith("horen-fast eval --data ") and "--checkpoints 1,2,10" in report["command"]
    assert report["threshold_source"] == f"hopfield_key_match_threshold in {cfg}"
    failed = [r for r in report["records"] if min(r["rel"], r["gen"], r["loc"]) < 1]
    for i, rec in enumerate(report["records"]):
        assert ("retrieved" in rec) == (rec in failed)
        if "retrieved" in rec:
            own = rec["retrieved"]["prompt"]          # an edit prompt's query is its own key
            assert own["entry"] == rec["edit_id"] and own["record"] == i and own["matched"]
            assert own["cosine"] == pytest.approx(1.0, abs=1e-5)
            for kind in ("rephrase", "loc_prompt"):
                got = rec["retrieved"][kind]
                assert got["matched"] == (got["cosine"] > 0.9) and -1 <= got["cosine"] <= 1 + 1e-6


def test_default_checkpoints_are_geometric():
    assert default_checkpoints(1) == [1]
    assert default_checkpoints(4) == [1, 2, 4]
    assert default_checkpoints(100) == [1, 2, 5, 10, 20, 50, 100]
    assert default_checkpoints(1200)[-4:] == [200, 500, 1000, 1200]


def test_eval_twice_to_the_same_out_keeps_both(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny")
    data = write_records(tmp_path / "recs.jsonl")
    out = tmp_path / "report.json"
    args = ["eval", "--data", str(data), "--n", "2", "--model", str(folder), "--layer", "1", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    first = out.read_text()
    assert [c["n"] for c in json.loads(first)["checkpoints"]] == [1, 2]       # geometric by default
    capsys.readouterr()
    assert main(args + ["--edit-batch", "2", "--checkpoints", "2"]) == 0
    err = capsys.readouterr().err
    kept = [p for p in tmp_path.glob("report.*.json")]
    assert len(kept) == 1 and kept[0].read_text() == first
    assert f"{out} exists; the earlier one is kept as {kept[0]}" in err
    second = json.loads(out.read_text())
    assert second["edit_batch"] == 2
    for rec in second["records"]:               # batched: the batch's time, not a per-record one
        assert "edit_seconds" not in rec and rec["edit_batch_seconds"] > 0 and rec["edit_batch_size"] == 2
    for rec in json.loads(first)["records"]:
        assert rec["edit_seconds"] > 0 and "edit_batch_seconds" not in rec


def test_one_edit_at_a_time_times_each_record(tmp_path):
    """edit_batch 1: each record's edit_seconds is the wall time of its own edit."""
    tok = byte_bpe_tokenizer()
    ed = HoReNEditor(tiny_llama(len(tok), eos_token_id=tok.eos_token_id), tok, HoReNConfig(layer=1, n_iter=2))
    records = [EditRecord(r["src"], r["alt"], r["rephrase"], r["loc"], r["loc_ans"]) for r in RECORDS]
    seen = []
    body = run_sequential(ed, records, [2], progress=False, on_checkpoint=lambda b: seen.append(b))
    assert [b["checkpoints"][-1]["n"] for b in seen] == [2, 4] and body is seen[-1]
    assert len(seen[0]["records"]) == 2 and len(body["records"]) == 4
    seconds = [r["edit_seconds"] for r in body["records"]]
    assert all(s > 0 for s in seconds)
    assert sum(seconds) <= body["timings"]["edit_seconds"] + 1e-6


def test_eval_command_reports_bad_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a question", "alt": "x"}\n')
    assert main(["eval", "--data", str(bad), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "rephrase" in err


def test_help_names_the_threshold_and_its_source(capsys):
    from horen_fast.calibrate import recommended_config
    with pytest.raises(SystemExit) as done:
        main(["eval", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    tau = recommended_config("smollm2").hopfield_key_match_threshold
    assert f"--model smollm2: {tau} (horen-fast's recommended setting" in text
    assert "with --config: the file's hopfield_key_match_threshold" in text
    assert "any other model: the paper's 0.85" in text


# --------------------------------------------------------------------------- resuming a run

def _strip_times(report):
    drop = ("seconds", "saved_edits")
    points = [{k: v for k, v in c.items() if not any(d in k for d in drop)} for c in report["checkpoints"]]
    records = [{k: v for k, v in r.items() if "seconds" not in k} for r in report["records"]]
    return points, records


def _ctrl_c_at_the_second_checkpoint(monkeypatch):
    """Make the eval command's second evaluation raise KeyboardInterrupt; returns the real one."""
    import horen_fast.evaluate as ev
    real = ev.evaluate_records
    calls = []

    def stop_at_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ev, "evaluate_records", stop_at_second)
    return real


def test_an_interrupted_run_resumed_equals_one_run(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first checkpoint, then --resume from its saved edits: the same checkpoints,
    the same per-record results and bit-identical saved codebooks as a run that was never stopped."""
    import torch
    import horen_fast.evaluate as ev
    from horen_fast.persist import load
    folder = save_tiny_model(tmp_path / "tiny")
    data = write_records(tmp_path / "recs.jsonl")
    common = ["eval", "--data", str(data), "--n", "4", "--model", str(folder), "--layer", "1",
              "--checkpoints", "2,4", "--no-progress", "--threads", "1"]
    whole, cut = tmp_path / "whole.json", tmp_path / "cut.json"
    assert main(common + ["--out", str(whole), "--save-edits", str(tmp_path / "w")]) == 0

    real = _ctrl_c_at_the_second_checkpoint(monkeypatch)
    assert main(common + ["--out", str(cut), "--save-edits", str(tmp_path / "c")]) == 130
    monkeypatch.setattr(ev, "evaluate_records", real)
    stopped = json.loads(cut.read_text())
    assert stopped["status"].startswith("interrupted") and [c["n"] for c in stopped["checkpoints"]] == [2]
    capsys.readouterr()

    assert main(common + ["--out", str(cut), "--save-edits", str(tmp_path / "c"), "--resume"]) == 0
    assert "resuming after 2 edits" in capsys.readouterr().err
    a, b = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert b["status"] == "complete" and _strip_times(a) == _strip_times(b)
    assert a["locality_reference"] == b["locality_reference"]
    for n in (2, 4):
        (_, x), (_, y) = load(str(tmp_path / "w" / f"edits-{n}")), load(str(tmp_path / "c" / f"edits-{n}"))
        assert x.ids == y.ids and torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    assert main(common + ["--out", str(cut), "--save-edits", str(tmp_path / "c"), "--resume"]) == 2
    assert "complete run of 4 edits; nothing to resume" in capsys.readouterr().err


def test_resume_refuses_other_records_or_config(tmp_path, capsys, monkeypatch):
    import horen_fast.evaluate as ev
    folder = save_tiny_model(tmp_path / "tiny")
    data = write_records(tmp_path / "recs.jsonl")
    out, saves = tmp_path / "r.json", tmp_path / "s"
    common = ["--model", str(folder), "--layer", "1", "--checkpoints", "1,3", "--no-progress",
              "--out", str(out), "--save-edits", str(saves)]
    real = _ctrl_c_at_the_second_checkpoint(monkeypatch)
    assert main(["eval", "--data", str(data), "--n", "3", *common]) == 130
    monkeypatch.setattr(ev, "evaluate_records", real)
    capsys.readouterr()
    other = write_records(tmp_path / "other.jsonl", [dict(RECORDS[1]), *RECORDS[1:]])
    assert main(["eval", "--data", str(other), "--n", "3", *common, "--resume"]) == 2
    assert "record 1 differs" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--n", "3", *common, "--threshold", "0.5", "--resume"]) == 2
    assert "another config" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--n", "3", "--model", str(folder), "--resume",
                 "--no-progress"]) == 2
    assert "need --out" in capsys.readouterr().err
