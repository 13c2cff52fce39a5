"""HoReNEditor.save / HoReNEditor.load: a round trip through a fresh process, and refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_models as tm
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

EDITS = [("the capital of France is", "Rome"), ("the author of the song is", "Mozart"),
         ("Einstein was born in", "Cairo")]
PROMPTS = [p for p, _ in EDITS] + ["the official language of Spain is"]

CHILD = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
import tiny_models as tm
from transformers import AutoModelForCausalLM
from horen_fast.editor import HoReNEditor
tok = tm.tokenizer("left")
model = AutoModelForCausalLM.from_pretrained({model!r}).eval()
ed = HoReNEditor.load({edits!r}, model, tok)
enc = tok({prompts!r}, return_tensors="pt", padding=True)
out = ed.generate(**enc, max_new_tokens=3, do_sample=False)
with torch.no_grad():
    logits = model(**enc).logits
print(json.dumps({{"tokens": out.tolist(), "ids": ed.codebook.ids, "len": len(ed),
                  "layer": ed.layer_path, "logits": logits[:, -1].tolist(),
                  "threshold": ed.config.hopfield_key_match_threshold}}))
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    tok = tm.tokenizer("left")
    model = tm.model("llama", seed=30)
    model.save_pretrained(tmp_path / "model")
    ed = HoReNEditor(model, tok, HoReNConfig(layer=2, n_iter=20, hopfield_key_match_threshold=0.97))
    results = ed.edit_many(EDITS, progress=False)
    ed.forget(results[1].id)
    ed.save(tmp_path / "edits")
    assert sorted(os.listdir(tmp_path / "edits")) == ["codebook.safetensors", "config.yaml"]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    tokens = ed.generate(**enc, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        logits = model(**enc).logits[:, -1]
    code = CHILD.format(here=HERE, model=str(tmp_path / "model"), edits=str(tmp_path / "edits"), prompts=PROMPTS)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ids"] == ed.codebook.ids == [results[0].id, results[2].id] and got["len"] == 2
    assert got["layer"] == "model.layers.2.mlp.down_proj" and got["threshold"] == 0.97
    assert got["tokens"] == tokens.tolist()
    torch.testing.assert_close(torch.tensor(got["logits"]), logits, rtol=1e-5, atol=1e-5)


def test_load_into_the_same_process_continues_editing(tmp_path):
    tok = tm.tokenizer("left")
    model = tm.model("gpt2", seed=31)
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=10, adapter_mode="lora", lora_rank=2))
    first = ed.edit(*EDITS[0])
    ed.save(tmp_path / "e")
    ed.detach()
    again = HoReNEditor.load(tmp_path / "e", model, tok)
    assert again.config.adapter_mode == "lora" and again.config.layer == "transformer.h.1.mlp.c_proj"
    torch.testing.assert_close(again.codebook.values, ed.codebook.values, rtol=0, atol=0)
    second = again.edit(*EDITS[1])
    assert second.id == first.id + 1 and len(again) == 2


def test_load_rejects_a_model_with_another_layer_shape(tmp_path):
    tok = tm.tokenizer("left")
    ed = HoReNEditor(tm.model("llama", hidden=48, inter=96), tok, HoReNConfig(layer=1, n_iter=2))
    ed.edit(*EDITS[0])
    ed.save(tmp_path / "e")
    other = tm.model("llama", hidden=64, inter=128)
    layer = other.model.layers[1].mlp.down_proj
    with pytest.raises(ValueError, match="input width 96.*input width 128"):
        HoReNEditor.load(tmp_path / "e", other, tok)
    assert other.model.layers[1].mlp.down_proj is layer and not other._forward_pre_hooks
    shallow = tm.model("llama", layers=1)
    with pytest.raises(ValueError, match="no module"):
        HoReNEditor.load(tmp_path / "e", shallow, tok)
    with pytest.raises(FileNotFoundError, match="not a saved HoReN editor"):
        HoReNEditor.load(tmp_path / "missing", other, tok)
