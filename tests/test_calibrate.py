"""Choosing tau: codebook replay, threshold choice, queries, calibrate() and the calibrate command."""
import json

import pytest
import torch
import torch.nn.functional as F

from horen_fast.calibrate import (DEFAULT_TAUS, DEFAULTS, calibrate, choose_threshold, edit_label, prompt_queries,
                                  recommended_config, replay_codebook, retrieval_table)
from horen_fast.cli import main
from horen_fast.config import HoReNConfig
from horen_fast.data import parse_record
from horen_fast.editor import HoReNEditor
from tiny_lm import RECORDS, byte_bpe_tokenizer, save_tiny_model, tiny_llama, write_records


def _cluster(n, d=32, seed=0, spread=0.35):
    """n well-separated centers, paraphrases near them (cos ~0.9), unrelated queries elsewhere."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n, d, generator=g), dim=1)
    para = F.normalize(centers + spread * F.normalize(torch.randn(n, d, generator=g), dim=1), dim=1)
    unrelated = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return centers, para, unrelated


def test_replay_adds_reuses_and_replaces():
    q = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    q[2] = F.normalize(q[0] + 0.05 * q[1], dim=0)   # near edit 0, same target -> reuses entry 0
    q[4] = q[1]                                      # edit 1's prompt again, new target -> replaces it
    labels = [(7,), (8,), (7,), (9,), (10,)]
    keys, key_labels, entry_of = replay_codebook(q, labels, threshold=0.8)
    # a replaced entry keeps its key and place and takes the new label (edits.decide)
    assert key_labels == [(7,), (10,), (9,)]
    assert entry_of == [0, -1, 0, 2, 1]
    assert torch.allclose(keys, F.normalize(q[[0, 1, 3]].double(), dim=1))
    # above the threshold no reuse: edit 2 gets its own entry
    _, key_labels, entry_of = replay_codebook(q, labels, threshold=0.9999)
    assert key_labels == [(7,), (10,), (7,), (9,)] and entry_of == [0, -1, 2, 3, 1]


def test_choose_threshold_takes_the_middle_of_the_widest_plateau():
    taus = [0.1 * i for i in range(10)]
    assert choose_threshold(taus, [0, 1, 1, 0, 1, 1, 1, 1, 0, 0]) == 5
    assert choose_threshold(taus, [0.2, 0.5, 0.3, 0, 0, 0, 0, 0, 0, 0]) == 1
    assert choose_threshold(taus, [1] * 10) == 4


def test_retrieval_table_separates_paraphrases_from_unrelated_prompts():
    centers, para, unrelated = _cluster(40)
    labels = [(i,) for i in range(40)]
    table = retrieval_table(centers, para, unrelated, labels, DEFAULT_TAUS, beta=20.0)
    k = table.best()
    row = table.row(k)
    assert row["rel"] == row["gen"] == row["loc"] == 1.0
    para_cos = (para * centers).sum(1)
    unrelated_best = final = None
    from horen_fast.retrieval import final_scores
    final = final_scores(unrelated.double(), centers.double())
    unrelated_best = final.max(dim=1).values
    assert float(unrelated_best.max()) < row["tau"] < float(para_cos.min())
    # too strict a threshold loses paraphrases, too loose matches unrelated prompts
    assert table.gen[-1] < 1.0 and table.loc[0] < 1.0


@pytest.fixture(scope="module")
def tiny_editor():
    tok = byte_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=5, eos_token_id=tok.eos_token_id)
    return HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=2))


def test_prompt_queries_equal_the_editor_keys(tiny_editor):
    ed, tok = tiny_editor, tiny_editor.tokenizer
    recs = [parse_record(r) for r in RECORDS]
    results = [ed.edit(r.prompt, r.target) for r in recs]
    try:
        q = prompt_queries(ed, tok, [r.prompt for r in recs], [1], ed.config.query_selection_strategy,
                           batch_size=3)[1]
        keys = ed.codebook.get_keys([x.id for x in results]).float()
        assert torch.allclose(F.normalize(q, dim=1), keys, atol=1e-5)
        assert [edit_label(tok, r.prompt, r.target) for r in recs] == ed.codebook.get_labels([x.id for x in results])
        # the deeper layer works with the adapter installed at layer 1
        q2 = prompt_queries(ed, tok, ["Where"], [1, 2], "last_prompt_token")
        assert q2[2].shape == (1, 64) and q2[1].shape == (1, 64)
    finally:
        for x in results:
            ed.forget(x.id)


def test_calibrate_returns_a_candidate_tau(tiny_editor):
    recs = [parse_record(r) for r in RECORDS]
    tau, table = calibrate(tiny_editor, tiny_editor.tokenizer, recs, details=True)
    assert tau in table.taus and table.op[table.taus.index(tau)] == max(table.op)
    assert len(tiny_editor) == 0          # nothing was edited
    with pytest.raises(ValueError, match="rephrase"):
        calibrate(tiny_editor, tiny_editor.tokenizer, [recs[0], parse_record({"src": "a", "alt": "b"})])


def test_recommended_config():
    cfg = recommended_config("smollm2")
    assert isinstance(cfg, HoReNConfig)
    for key, value in DEFAULTS["smollm2"].items():
        assert getattr(cfg, key) == value
    with pytest.raises(ValueError, match="no recommended settings"):
        recommended_config("unknown-model")
    model = tiny_llama(50)
    assert recommended_config("unknown-model", model).layer == 3 // 2


def test_calibrate_command(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny")
    data = write_records(tmp_path / "recs.json", jsonl=False)
    out = tmp_path / "cal.json"
    rc = main(["calibrate", "--data", str(data), "--model", str(folder), "--layer", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tau"] in DEFAULT_TAUS and summary["n"] == len(RECORDS) and summary["layer"] == 1
    report = json.loads(out.read_text())
    assert len(report["table"]) == len(DEFAULT_TAUS) and report["summary"] == summary
