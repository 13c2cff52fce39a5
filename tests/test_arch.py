"""The architecture registry (horen_fast.arch): every registered family, as a tiny random
transformers model, is edited, generates the same tokens with and without the KV cache, and is
bit for bit the original model after detach; each entry's fields match the model it describes."""
import types

import pytest
import torch
from torch import nn

import tiny_models as tm
from horen_fast import arch as A
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDITS = [("the capital of France is", "Rome"), ("Einstein was born in", "Cairo")]
PROMPTS = [p for p, _ in EDITS] + ["the official language of Spain is"]


def test_every_registered_type_has_a_tiny_model():
    """tests/tiny_models.py builds each registered model type, so each is tested below."""
    assert set(A.ARCHS) - set(tm.ARCHS) <= {"olmo", "smollm3"}   # Llama layouts without a tiny config here


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_edit_generate_cached_equals_cache_free_and_detach_restores(arch):
    tok = tm.tokenizer("left")
    model = tm.model(arch, layers=3, seed=7)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
    modules = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=30, hopfield_key_match_threshold=0.95))
    entry = A.ARCHS[model.config.model_type]
    assert ed.layer_path == f"{entry.blocks}.1.{entry.mlp_out}"
    results = ed.edit_many(EDITS, progress=False)
    assert [r.action for r in results] == ["added", "added"]
    cached = ed.generate(**enc, max_new_tokens=3, do_sample=False)
    free = ed.generate(**enc, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, free)
    first = cached[:2, enc["input_ids"].shape[1]]
    want = [tok(" " + t, add_special_tokens=False)["input_ids"][0] for _, t in EDITS]
    assert first.tolist() == want

    ed.detach()
    with torch.no_grad():
        after = model(**enc).logits
    assert torch.equal(after, before)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_entry_fields_match_the_model(arch):
    """blocks / mlp_out / conv1d describe the model; plain_head holds exactly where it is claimed
    (and gemma2's soft-capped logits are why its entry says False)."""
    model = tm.model(arch, layers=3, seed=8)
    entry = A.arch_of(model)
    assert entry is A.ARCHS[model.config.model_type]
    blocks = model.get_submodule(entry.blocks)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 3
    d_in, d_out, conv1d = A.layer_dims(blocks[0].get_submodule(entry.mlp_out))
    assert conv1d == entry.conv1d
    assert d_out == model.get_input_embeddings().weight.shape[1]   # the projection writes the residual
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    if arch == "gemma2":   # soft-capped logits (30 * tanh(z / 30)); a small cap makes it visible here
        model.config.final_logit_softcapping = 0.1
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        split = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state)
    if entry.plain_head:
        torch.testing.assert_close(split, logits, rtol=1e-6, atol=1e-6)
    else:
        assert not torch.allclose(split, logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "bloom"])
def test_layer_index_resolves_per_architecture(arch):
    model = tm.model(arch, layers=3)
    entry = A.ARCHS[model.config.model_type]
    expected = f"{entry.blocks}.{{}}.{entry.mlp_out}"
    assert A.resolve_layer(model, 1)[0] == expected.format(1)
    assert A.resolve_layer(model, -1)[0] == expected.format(2)
    path, module = A.resolve_layer(model, expected.format(0))
    assert module is model.get_submodule(path)
    assert A.block_of(model, path) == (model.get_submodule(entry.blocks), 0)
    with pytest.raises(ValueError, match="out of range"):
        A.resolve_layer(model, 3)
    with pytest.raises(ValueError, match="no module"):
        A.resolve_layer(model, expected.format(9))


def test_non_linear_layer_rejected():
    model = tm.model("llama", layers=2)
    with pytest.raises(TypeError, match="linear layer"):
        A.resolve_layer(model, "model.layers.0.mlp")


def test_default_layer():
    assert A.default_layer(tm.model("llama", layers=4)) == 2
    assert A.default_layer(types.SimpleNamespace(num_hidden_layers=30)) == 15   # SmolLM2-135M
    assert A.default_layer(types.SimpleNamespace(config=types.SimpleNamespace(n_layer=12))) == 6
    assert A.default_layer(types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=1))) == 0
    with pytest.raises(ValueError, match="pass the layer yourself"):
        A.default_layer(types.SimpleNamespace(config=types.SimpleNamespace()))


def test_unregistered_model_type_is_matched_by_structure_without_the_head_shortcut():
    tok = tm.tokenizer("left")
    model = tm.model("llama", layers=3, seed=9)
    model.config.model_type = "my_llama_variant"
    entry = A.arch_of(model)
    assert (entry.blocks, entry.mlp_out, entry.plain_head) == ("model.layers", "mlp.down_proj", False)
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=30))
    assert ed.trainer.head is None
    r = ed.edit(*EDITS[0])
    ed.detach()
    model.config.model_type = "llama"      # the registered entry: the same edit, via the head shortcut
    ref = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=30))
    assert ref.trainer.head is not None
    r_ref = ref.edit(*EDITS[0])
    assert r.action == r_ref.action == "added" and r.loss == pytest.approx(r_ref.loss, rel=1e-5)
    torch.testing.assert_close(ed.codebook.values, ref.codebook.values, rtol=1e-4, atol=1e-5)


def test_register_one_entry():
    """Adding an architecture is one entry (here: a made-up layout wrapping up_proj)."""
    model = tm.model("llama", layers=3)
    model.config.model_type = "made_up"
    A.register("made_up", A.Arch("model.layers", "mlp.up_proj", plain_head=False, default_depth=0.0))
    try:
        assert A.resolve_layer(model, 2)[0] == "model.layers.2.mlp.up_proj"
        assert A.default_layer(model) == 0
    finally:
        A.ARCHS.pop("made_up")
    with pytest.raises(ValueError, match="non-empty string"):
        A.register("", A.Arch("a", "b"))
    with pytest.raises(TypeError, match="horen_fast.arch.Arch"):
        A.register("x", ("model.layers", "mlp.down_proj"))


def test_unknown_structure_asks_for_a_path_or_an_entry():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="horen_fast.arch.register"):
        A.resolve_layer(model, 0)
    assert A.resolve_layer(model, "2")[0] == "2"


def test_prefix_cache_false_trains_over_the_whole_sequence_to_the_same_entry(monkeypatch):
    """An entry with prefix_cache=False (a cache that cannot be cropped and reused) trains over the
    whole sequence each step; the trained entry is the same."""
    tok = tm.tokenizer("left")
    model = tm.model("llama", layers=3, seed=10, dtype=torch.float64)
    cfg = HoReNConfig(layer=2, n_iter=10)
    with_cache = HoReNEditor(model, tok, cfg)
    assert with_cache.trainer.prefix_cache
    r1 = with_cache.edit(*EDITS[0])
    v1 = with_cache.codebook.get_values(r1.id)[0]
    with_cache.detach()
    monkeypatch.setitem(A.ARCHS, "llama", A.Arch("model.layers", "mlp.down_proj", prefix_cache=False))
    without = HoReNEditor(model, tok, cfg)
    assert not without.trainer.prefix_cache
    r2 = without.edit(*EDITS[0])
    torch.testing.assert_close(without.codebook.get_values(r2.id)[0], v1, rtol=1e-9, atol=1e-9)
    assert r2.loss == pytest.approx(r1.loss, rel=1e-9)


def test_a_layer_that_sees_flattened_tokens_is_refused_clearly():
    """OPT flattens the tokens to [B*T, d] before its MLP: an edit there is refused, not garbled."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.OPTConfig(vocab_size=tm.vocab_size(), hidden_size=48, ffn_dim=96, num_hidden_layers=2,
                      num_attention_heads=4, word_embed_proj_dim=48, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = T.OPTForCausalLM(cfg).eval()
    ed = HoReNEditor(model, tm.tokenizer("left"), HoReNConfig(layer="model.decoder.layers.1.fc2", n_iter=2))
    with pytest.raises(ValueError, match="not \\[batch, tokens, width\\]"):
        ed.edit(*EDITS[0])
    assert len(ed) == 0
