"""HoReNEditor.save / HoReNEditor.load: a round trip through a fresh process, a save as one unit
under real SIGKILLs, refusals of incomplete or inconsistent saves, orphan clean-up, the umask."""
import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

import tiny_models as tm
from horen_fast._files import HoReNFileError
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor
from horen_fast.persist import MANIFEST

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
    names = sorted(n for n in os.listdir(tmp_path / "edits") if not n.startswith("."))
    assert len(names) == 3 and names[2] == MANIFEST, names
    assert re.fullmatch(r"codebook-[0-9a-f]{16}\.safetensors", names[0]) and re.fullmatch(r"config-[0-9a-f]{16}\.yaml", names[1])
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


def _saved(tmp_path, threshold=0.99):
    tok = tm.tokenizer("left")
    model = tm.model("llama", layers=2, seed=32)
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=2, hopfield_key_match_threshold=threshold))
    ed.edit_many(EDITS, progress=False)
    ed.save(tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / MANIFEST).read_text())
    return ed, tok, tmp_path / "e", manifest


def test_a_truncated_config_is_rejected_not_read_with_defaults(tmp_path):
    ed, tok, folder, manifest = _saved(tmp_path, threshold=0.99)
    ed.detach()
    config = folder / manifest["config"]["file"]
    text = config.read_text()
    config.write_text(text[: text.index("hopfield_key_match_threshold")])   # a torn write
    with pytest.raises(HoReNFileError, match=re.escape(str(config)) + ".*truncated"):
        HoReNEditor.load(folder, ed.model, tok)
    config.write_text(text)
    assert HoReNEditor.load(folder, ed.model, tok).config.hopfield_key_match_threshold == 0.99


@pytest.mark.parametrize("damage", ["codebook byte", "codebook missing", "manifest missing", "manifest torn",
                                    "manifest other version", "manifest without codebook"])
def test_load_rejects_incomplete_or_inconsistent_saves_naming_the_file(tmp_path, damage):
    ed, tok, folder, manifest = _saved(tmp_path)
    ed.detach()
    codebook, man = folder / manifest["codebook"]["file"], folder / MANIFEST
    if damage == "codebook byte":
        data = bytearray(codebook.read_bytes())
        data[-3] ^= 0xFF
        codebook.write_bytes(bytes(data))
        bad, why = codebook, "checksum differs"
    elif damage == "codebook missing":
        codebook.unlink()
        bad, why = codebook, "missing"
    elif damage == "manifest missing":
        man.unlink()
        bad, why = man, "missing"
    elif damage == "manifest torn":
        man.write_text(man.read_text()[:40])
        bad, why = man, "not valid JSON"
    elif damage == "manifest other version":
        man.write_text(json.dumps({**manifest, "version": 99}))
        bad, why = man, "version 99"
    else:
        man.write_text(json.dumps({k: v for k, v in manifest.items() if k != "codebook"}))
        bad, why = man, "'codebook' record"
    with pytest.raises(HoReNFileError, match=re.escape(str(bad)) + ".*" + why):
        HoReNEditor.load(folder, ed.model, tok)
    assert ed.model.model.layers[1].mlp.down_proj is ed.adapter.base   # nothing was attached


def test_an_old_two_file_save_is_refused_with_a_way_out(tmp_path):
    ed, tok, folder, manifest = _saved(tmp_path)
    ed.detach()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    os.rename(folder / manifest["config"]["file"], legacy / "config.yaml")
    os.rename(folder / manifest["codebook"]["file"], legacy / "codebook.safetensors")
    with pytest.raises(HoReNFileError, match="manifest.json: missing.*older horen-fast"):
        HoReNEditor.load(legacy, ed.model, tok)


def test_orphans_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    ed, tok, folder, manifest = _saved(tmp_path)
    orphans = [".horen-part-0123456789abcdef", ".codebook.safetensors.k3j2.tmp", ".manifest.json.ab12.tmp",
               ".horen-config-x1y2.yaml", "codebook-0123456789abcdef.safetensors", "config-0123456789abcdef.yaml"]
    for name in orphans:
        (folder / name).write_bytes(b"left by a killed save")
    (folder / "notes.txt").write_text("the user's own file")
    ed.save(folder)
    left = set(os.listdir(folder))
    assert not left & set(orphans)
    assert manifest["codebook"]["file"] not in left            # the previous save's files too
    assert "notes.txt" in left
    new = json.loads((folder / MANIFEST).read_text())
    assert {new["codebook"]["file"], new["config"]["file"], MANIFEST} <= left


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        ed, tok, folder, manifest = _saved(tmp_path)
    finally:
        os.umask(old)
    for name in (manifest["codebook"]["file"], manifest["config"]["file"], MANIFEST):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o666 & ~umask, name


KILLER = """
import json, os, random, signal, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
import tiny_models as tm
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor
tok = tm.tokenizer("left")
ed = HoReNEditor(tm.model("llama", layers=2, seed=33), tok, HoReNConfig(layer=1, n_iter=0))
ed.edit_many({edits!r}, progress=False)
probe = tm.model("llama", layers=2, seed=33)
folder, ids, random = {folder!r}, ed.codebook.ids, random.Random(0)

def version(v):       # config and codebook both carry the version number
    ed.config.hopfield_key_match_threshold = 0.5 + (v % 400) / 1000
    for i in ids:
        ed.codebook.update(i, value=torch.full((ed.codebook.value_dim,), float(v)))

version(0)
ed.save(folder)
stats = {{"kills": 0, "orphans_seen": 0, "versions": []}}
for trial in range({kills}):
    start = (trial + 1) * 1000
    pid = os.fork()
    if pid == 0:          # saves new versions until killed
        v = start
        while True:
            version(v)
            ed.save(folder)
            v += 1
    time.sleep(random.uniform(0.0, 0.25))   # one save takes 15-60 ms here
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    stats["kills"] += 1
    stats["orphans_seen"] += any(n.startswith(".") and n != ".horen.lock" for n in os.listdir(folder))
    loaded = HoReNEditor.load(folder, probe, tok)          # raises if the directory is not one version
    values = loaded.codebook.values
    v = int(values[0, 0])
    assert bool((values == v).all()), "codebook rows from different versions"
    assert round((loaded.config.hopfield_key_match_threshold - 0.5) * 1000) == v % 400, "config and codebook differ"
    assert loaded.codebook.ids == ids
    stats["versions"].append(v)
    loaded.detach()
print(json.dumps(stats))
"""


def test_sigkill_during_save_always_leaves_one_whole_version(tmp_path):
    """Real SIGKILLs of a process saving in a loop (HOREN_SAVE_KILLS, default 10): after each, the
    directory loads, and its config and codebook come from the same save (30 kills were run once:
    24 interrupted a save, all 30 loaded one whole version)."""
    kills = int(os.environ.get("HOREN_SAVE_KILLS", "10"))
    code = KILLER.format(here=HERE, edits=EDITS, folder=str(tmp_path / "e"), kills=kills)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["kills"] == kills
    assert sum(v > 0 for v in stats["versions"]) > kills // 3     # many kills came after saves completed
    print(stats)
