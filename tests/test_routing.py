"""Routing-exact evaluation (horen_fast/routing.py): its decisions are the editor's, edit by edit
and prompt by prompt at every checkpoint, on a real (tiny) transformers model; its counts and
rates follow their definitions; prompts go through the model once."""
import json

import pytest
import torch

import tiny_models as tm
from horen_fast.calibrate import replay
from horen_fast.codebook import Codebook
from horen_fast.config import HoReNConfig
from horen_fast.data import EditRecord
from horen_fast.editor import HoReNEditor
from horen_fast.metrics import retrieved_entries
from horen_fast.routing import route, routing_command, routing_counts, routing_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOC = [("nq question: who wrote the song hallelujah", "Leonard Cohen"),
       ("nq question: types of skiing in the winter", "Downhill")]


def stream():
    """Edits that add, reuse (the same edit again) and replace (the same prompt, a new target),
    with paraphrases; the locality prompts repeat, as in a stream."""
    base = [("the capital of France is", "the capital city of France is", "Paris"),
            ("Einstein was born in", "the birthplace of Einstein is", "Ulm"),
            ("the author of the song is", "the song was written by", "Tesla"),
            ("the official language of Spain is", "people in Spain speak", "Spanish"),
            ("the capital of France is", "the capital city of France is", "Paris"),     # reused
            ("the official language of Spain is", "people in Spain speak", "German"),   # replaced
            ("the river of Kyoto flows through", "Kyoto's river is in", "Japan"),
            ("the author of the song is", "who wrote the song? it was", "Edison")]     # replaced
    return [EditRecord(p, t, r, *LOC[i % 2]) for i, (p, r, t) in enumerate(base)]


def threshold_with_a_mix(model, tok, records, layer):
    """A tau between the paraphrases' best cosines, so that some match and some do not."""
    ed = HoReNEditor(model, tok, HoReNConfig(layer=layer, n_iter=0, hopfield_key_match_threshold=0.999999))
    for r in records:
        ed.edit(r.prompt, r.target)
    cos = sorted(c for _, c in retrieved_entries(ed, [r.rephrase for r in records] + [r.loc_prompt for r in records],
                                                 batch_size=1))
    ed.detach()
    return (cos[len(cos) // 2] + cos[len(cos) // 2 - 1]) / 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_decision_and_route_equals_the_editors(arch):
    tok = tm.tokenizer()
    model = tm.model(arch, seed=7)          # float32, as an editor on a real model
    records = stream()
    tau = threshold_with_a_mix(model, tok, records, 2)
    cfg = HoReNConfig(layer=2, n_iter=1, hopfield_key_match_threshold=tau)
    marks = [2, 5, len(records)]
    body = routing_run(model, tok, records, cfg, marks)
    assert body["distinct_prompts"] == len({x for r in records for x in (r.prompt, r.rephrase, r.loc_prompt)})
    ed = HoReNEditor(model, tok, cfg)
    results, checked = [], 0
    for point in body["checkpoints"]:
        while len(results) < point["n"]:
            r = records[len(results)]
            results.append(ed.edit(r.prompt, r.target))
        k = point["n"]
        for kind, field in (("rel", "prompt"), ("gen", "rephrase"), ("loc", "loc_prompt")):
            # one prompt per batch: metrics.retrieved_entries pads without position ids, which
            # shifts an absolute-position model's (GPT-2's) queries
            found = retrieved_entries(ed, [getattr(r, field) for r in records[:k]], batch_size=1)
            assert point["routes"][kind] == [e if c > tau else -1 for e, c in found], (k, kind)
            checked += 1
        assert point["entries"] == len(ed)
    assert body["actions"] == [x.action for x in results]
    assert body["entry_ids"] == [x.id for x in results]
    assert {"added", "reused", "replaced"} <= set(body["actions"])
    last = body["checkpoints"][-1]["routes"]
    assert -1 in last["gen"] + last["loc"] and any(e >= 0 for e in last["gen"] + last["loc"])
    assert [p["n"] for p in body["checkpoints"]] == marks and checked == 9


def test_counts_and_rates_follow_their_definitions():
    g = torch.Generator().manual_seed(3)
    keys = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    book = Codebook(16, 1, dtype=torch.float64, threshold=0.9, backend="torch")
    labels = [(1,), (2,), (1,), (3,)]
    q = keys.double().clone()
    q[3] = q[1]                       # edit 3: edit 1's prompt with a new target -> replaces entry 1
    done = replay(book, q, labels)
    assert done.actions == ["added", "added", "added", "replaced"]
    assert done.entry_of == [0, -1, 2, 1] and done.entry_ids == [0, 1, 2, 1]
    # routes: edit 0 -> own; edit 1 -> entry 1 (now edit 3's target): other; edit 2 -> entry 0
    # (label (1,) too): same_target; edit 3 -> own
    routes = route(book, torch.stack([q[0], q[1], q[0], q[3]])).tolist()
    assert routes == [0, 1, 0, 1]
    c = routing_counts(routes, done.entry_of, labels, dict(zip(book.ids, book.get_labels(book.ids))))
    assert c == {"own": 2, "same_target": 1, "other": 1, "none": 0}
    far = -keys[:1].double()
    assert route(book, far).tolist() == [-1]
    assert route(Codebook(16, 1), far).tolist() == [-1]


def test_a_float64_model_gets_a_float64_replay_and_the_rates_match_the_counts():
    tok = tm.tokenizer()
    model = tm.model("llama", dtype=torch.float64, seed=7)
    records = stream()
    cfg = HoReNConfig(layer=1, n_iter=1, hopfield_key_match_threshold=0.9)
    body = routing_run(model, tok, records, cfg, [3])
    for p in body["checkpoints"]:
        c, k = p["counts"], p["n"]
        assert p["rel"] == (c["rel"]["own"] + c["rel"]["same_target"]) / k
        assert p["gen"] == (c["gen"]["own"] + c["gen"]["same_target"]) / k
        assert p["loc"] == c["loc"]["none"] / k
        assert p["op"] == pytest.approx((p["rel"] * p["gen"] * p["loc"]) ** (1 / 3))
        assert sum(c["rel"].values()) == sum(c["loc"].values()) == k
    ed = HoReNEditor(model, tok, cfg)
    assert ed.codebook.dtype == torch.float64
    assert body["actions"] == [ed.edit(r.prompt, r.target).action for r in records]


def test_records_without_a_paraphrase_are_refused():
    tok = tm.tokenizer()
    model = tm.model("llama", seed=7)
    with pytest.raises(ValueError, match="paraphrase and a locality prompt.*\\[2\\]"):
        routing_run(model, tok, [stream()[0], EditRecord("a b", "c")], HoReNConfig(layer=1))


def test_routing_command_writes_the_report_the_plot_and_the_last_json_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import argparse
    tok = tm.tokenizer()
    model = tm.model("llama", seed=7)
    cfg = HoReNConfig(layer=1, n_iter=1, hopfield_key_match_threshold=0.9)
    ed = HoReNEditor(model, tok, cfg)
    args = argparse.Namespace(out=str(tmp_path / "r.json"), plot=str(tmp_path / "r.png"), batch_size=4,
                              no_progress=True)
    assert routing_command(args, stream(), ed, cfg, None, {"title": "tiny"}) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"n", "rel", "gen", "loc", "op", "entries"} <= set(last) and last["n"] == len(stream())
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["routing_only"] and [p["n"] for p in report["checkpoints"]] == [1, 2, 5, 8]
    assert (tmp_path / "r.png").stat().st_size > 1000 and len(ed) == 0


def test_eval_routing_only_from_the_command_line(tmp_path, capsys):
    from horen_fast.cli import main
    folder = tm.save_tiny_model(tmp_path / "tiny")
    data = tm.write_records(tmp_path / "recs.jsonl")
    rc = main(["eval", "--routing-only", "--data", str(data), "--model", str(folder), "--layer", "1",
               "--threshold", "0.9", "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == len(tm.RECORDS) and last["routing_only"]


def test_the_rates_over_a_subset_are_those_of_its_records():
    """Two subsets that split the records give rates whose weighted mean is the whole run's."""
    tok = tm.tokenizer()
    model = tm.model("llama", seed=7)
    records = stream()
    cfg = HoReNConfig(layer=1, hopfield_key_match_threshold=threshold_with_a_mix(model, tok, records, 1))
    a, b = [0, 2, 5, 7], [1, 3, 4, 6]
    runs = [routing_run(model, tok, records, cfg, [3, 8], subset=s) for s in (a, b, list(range(8)))]
    for pa, pb, pall in zip(*(r["checkpoints"] for r in runs)):
        k = pall["n"]
        assert pa["subset"]["n"] == sum(i < k for i in a) and pb["subset"]["n"] == sum(i < k for i in b)
        for kind in ("rel", "gen", "loc"):
            assert pall["subset"][kind] == pytest.approx(pall[kind])
            assert (pa["subset"]["n"] * pa["subset"][kind] + pb["subset"]["n"] * pb["subset"][kind]
                    == pytest.approx(k * pall[kind]))
    assert len({r["checkpoints"][-1]["rel"] for r in runs}) == 1 and 0 < runs[0]["checkpoints"][-1]["gen"] < 1


def test_a_streams_real_records_are_found_and_reported(tmp_path, capsys):
    from horen_fast.cli import main
    from horen_fast.data import real_positions
    folder = tm.save_tiny_model(tmp_path / "tiny")
    rows = [{**r, "synthetic": i % 2 == 1} for i, r in enumerate(tm.RECORDS)]
    data = tm.write_records(tmp_path / "stream.jsonl", rows)
    assert real_positions(data) == [i for i in range(len(rows)) if i % 2 == 0]
    assert real_positions(tm.write_records(tmp_path / "plain.jsonl")) is None
    assert main(["eval", "--routing-only", "--data", str(data), "--model", str(folder), "--layer", "1",
                 "--threshold", "0.9", "--out", str(tmp_path / "r.json"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checkpoints"][-1]["subset"]["n"] == len(real_positions(data))
    assert "real records" in report["subset_is"]
