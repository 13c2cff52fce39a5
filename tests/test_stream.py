"""The ZsRE-style record stream (horen_fast.stream, ``horen-fast stream``)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("faker")
from horen_fast import stream  # noqa: E402

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre_dev.jsonl"


def _records():
    people = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra"]
    out = []
    for i, p in enumerate(people):
        out.append({"subject": p, "src": f"What university did {p} attend?",
                    "rephrase": f"Which university did {p} go to?", "alt": f"Univ {i}",
                    "answers": [f"Real {i}"], "loc": f"nq question: q{i}", "loc_ans": f"a{i}"})
        out.append({"subject": p, "src": f"In which city was {p} born?",
                    "rephrase": f"Where was {p} born?", "alt": f"City {i}",
                    "answers": [], "loc": f"nq question: r{i}", "loc_ans": f"b{i}"})
    return out


def test_relations_group_templates_and_answers():
    rels = stream.relations_from_records(_records())
    assert len(rels) == 2
    uni = next(r for r in rels if any("university" in t for t in rel_t(r)))
    assert set(uni.templates) == {"What university did {subject} attend?", "Which university did {subject} go to?"}
    assert {"Univ 0", "Real 0", "Univ 3"} <= set(uni.answers)


def rel_t(r):
    return r.templates


def test_stream_is_deterministic_marked_and_well_formed():
    recs = _records()
    a = stream.make_stream(recs, 300, seed=7, pool_size=2000)
    b = stream.make_stream(recs, 300, seed=7, pool_size=2000)
    c = stream.make_stream(recs, 300, seed=8, pool_size=2000)
    assert a == b and a != c and len(a) == 300
    real = [r for r in a if not r["synthetic"]]
    assert [r["real_index"] for r in real] == list(range(len(recs)))          # file order
    assert [a.index(r) for r in real] == [round(i * 300 / len(recs)) for i in range(len(recs))]
    answers = {r["alt"] for r in recs} | {x for r in recs for x in r["answers"]}
    locs = {(r["loc"], r["loc_ans"]) for r in recs}
    for r in a:
        if r["synthetic"]:
            assert r["subject"] in r["src"] and r["subject"] in r["rephrase"]
            assert r["src"] != r["rephrase"]              # another template of the relation
            assert r["alt"] in answers and (r["loc"], r["loc_ans"]) in locs
        assert r["stream_seed"] == 7


def test_subject_pool_is_large_and_distinct():
    pool = stream.subject_pool(["Real Subject"], seed=0, size=10_000)
    assert len(pool) >= 10_000 and len(set(pool)) == len(pool) and "Real Subject" in pool


def test_sibling_rate_controls_density():
    recs = _records()
    low = stream.sibling_density(stream.make_stream(recs, 2000, 1, sibling_rate=0.0))
    high = stream.sibling_density(stream.make_stream(recs, 2000, 1, sibling_rate=0.5))
    assert low < 0.05 < 0.5 < high


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="n must be"):
        stream.make_stream(_records(), 0)
    with pytest.raises(ValueError, match="no usable record"):
        stream.make_stream([{"subject": "x", "src": "no slot here", "alt": "y"}], 10)


def test_cli_writes_jsonl_and_reports(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in _records()))
    out = tmp_path / "s.jsonl"
    p = subprocess.run([sys.executable, "-m", "horen_fast.cli", "stream", "--from", str(src), "--n", "50",
                        "--seed", "3", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["n"] == 50 and report["real"] == 8
    lines = out.read_text().splitlines()
    assert len(lines) == 50 and all(json.loads(x)["stream_seed"] == 3 for x in lines)
    bad = subprocess.run([sys.executable, "-m", "horen_fast.cli", "stream", "--from", str(tmp_path / "missing"),
                          "--n", "5", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "missing" in bad.stderr


@pytest.mark.skipif(not DEV.exists(), reason="../shared/data/zsre_dev.jsonl is not present")
def test_stream_from_real_dev_file():
    recs = stream._read_zsre(str(DEV))
    s = stream.make_stream(recs, 5000, seed=1)
    assert sum(not r["synthetic"] for r in s) == len(recs)
    assert 0.5 < stream.sibling_density(s) < 0.9
