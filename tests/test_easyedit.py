"""apply_horen_to_model: EasyEdit's calling convention on a tiny random Llama."""
import dataclasses
import types

import pytest
import torch

import tiny_models as tm
from horen_fast.config import HoReNConfig
from horen_fast.easyedit import EDITOR_ATTR, apply_horen_to_model, as_config

# The published YAML keys, as EasyEdit hands them over (GRACE-era and harness keys included).
HPARAMS = {
    "alg_name": "HOREN", "model_name": "tiny", "device": 0,
    "inner_params": ["model.layers[2].mlp.down_proj.weight"],
    "n_iter": 30, "edit_lr": 1.0, "lora_edit_lr": 0.001, "name": "Hopfield", "adapter_mode": "value",
    "val_init": "cold", "replacement": "replace_last", "eps": 1.0, "dist_fn": "euc",
    "eps_expand": "variance", "num_pert": 8, "normalize_codebook_keys": True,
    "query_selection_strategy": "last_60_perc_prompt_tokens_avg", "hopfield_retrieval_alpha": 0.1,
    "hopfield_retrieval_beta": 20.0, "hopfield_retrieval_eps": "1e-5",
    "hopfield_retrieval_max_iter": 1, "hopfield_key_match_threshold": 0.85, "lora_rank": 4,
    "lora_scale": 1.0, "bf16": False, "batch_size": 1, "max_length": 64,
}
REQUESTS = [
    {"prompt": "the capital of France is", "target_new": "Tokyo",
     "rephrase_prompt": "which city is the capital of France", "locality": {}},
    {"prompt": "the language of Egypt is", "target_new": "Japanese", "portability": {}},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def lm():
    return tm.model("llama"), tm.tokenizer()


def greedy(model, tok, prompt, n):
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:]).split()


def test_edits_in_place_and_accumulates(lm):
    model, tok = lm
    before = greedy(model, tok, "the capital of France is", 1)
    edited, restore = apply_horen_to_model(model, tok, REQUESTS[:1], HPARAMS)
    assert edited is model and callable(restore)
    editor = getattr(model, EDITOR_ATTR)
    assert len(editor) == 1 and editor.layer_path == "model.layers.2.mlp.down_proj"
    assert greedy(model, tok, "the capital of France is", 1) == ["Tokyo"] != before
    # a second call (EasyEdit's sequential_edit) adds to the same codebook
    edited2, _ = apply_horen_to_model(model, tok, REQUESTS[1:], HPARAMS)
    assert edited2 is model and getattr(model, EDITOR_ATTR) is editor and len(editor) == 2
    assert greedy(model, tok, "the capital of France is", 1) == ["Tokyo"]
    assert greedy(model, tok, "the language of Egypt is", 1) == ["Japanese"]


def test_restore_gives_back_the_original_model(lm):
    model, tok = lm
    ids = tok(["the capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    _, restore = apply_horen_to_model(model, tok, REQUESTS, HPARAMS)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, ref)
    restore()
    assert isinstance(model.model.layers[2].mlp.down_proj, torch.nn.Linear)
    assert EDITOR_ATTR not in model.__dict__ and "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    # after restoring, a new call starts a fresh codebook
    apply_horen_to_model(model, tok, REQUESTS[:1], HPARAMS)
    assert len(getattr(model, EDITOR_ATTR)) == 1


def test_copy_leaves_the_model_alone(lm):
    model, tok = lm
    edited, _ = apply_horen_to_model(model, tok, REQUESTS[:1], HPARAMS, copy=True)
    assert edited is not model
    assert isinstance(model.model.layers[2].mlp.down_proj, torch.nn.Linear)
    assert EDITOR_ATTR not in model.__dict__ and len(getattr(edited, EDITOR_ATTR)) == 1


def test_hparams_forms_agree(tmp_path):
    ref = as_config(HPARAMS)
    assert ref.layer == "model.layers.2.mlp.down_proj" and ref.n_iter == 30
    assert ref.hopfield_retrieval_eps == 1e-5
    ref.to_yaml(tmp_path / "h.yaml")
    assert as_config(tmp_path / "h.yaml") == ref
    assert as_config(str(tmp_path / "h.yaml")) == ref
    assert as_config(ref) is ref
    assert as_config(types.SimpleNamespace(**HPARAMS)) == ref

    @dataclasses.dataclass
    class HyperParams:          # the shape of EasyEdit's HORENHyperParams
        alg_name: str
        inner_params: list
        n_iter: int = 30
        device: int = 0
        max_length: int = 64
    assert as_config(HyperParams("HOREN", ["model.layers[2].mlp.down_proj.weight"])) == ref
    with pytest.raises(TypeError, match="hparams must be"):
        as_config(42)
    with pytest.raises(ValueError, match="not HoReN"):
        as_config({**HPARAMS, "alg_name": "GRACE"})


def test_requests_are_checked(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="target_new"):
        apply_horen_to_model(model, tok, [{"prompt": "the capital of France is"}], HPARAMS)
    with pytest.raises(TypeError, match="prompt"):
        apply_horen_to_model(model, tok, ["the capital of France is"], HPARAMS)


def test_other_hyper_parameters_on_an_edited_model_are_refused(lm):
    model, tok = lm
    apply_horen_to_model(model, tok, REQUESTS[:1], HPARAMS)
    # the same layer named by index is the same configuration
    same = HoReNConfig.from_dict({**{k: v for k, v in HPARAMS.items() if k != "inner_params"},
                                  "layer": 2})
    apply_horen_to_model(model, tok, REQUESTS[1:], same)
    assert len(getattr(model, EDITOR_ATTR)) == 2
    with pytest.raises(ValueError, match="another configuration"):
        apply_horen_to_model(model, tok, REQUESTS[1:], {**HPARAMS, "hopfield_key_match_threshold": 0.5})


# ---- shipped hyper-parameter files ----------------------------------------------------------------
PUBLISHED_KEYS = {"inner_params", "n_iter", "edit_lr", "adapter_mode", "val_init", "normalize_codebook_keys",
                  "query_selection_strategy", "hopfield_retrieval_alpha", "hopfield_retrieval_beta",
                  "hopfield_retrieval_eps", "hopfield_retrieval_max_iter", "hopfield_key_match_threshold",
                  "lora_rank", "lora_scale", "lora_edit_lr", "bf16", "max_length",
                  "alg_name", "model_name", "device", "batch_size"}    # SPEC 7, plus EasyEdit's harness keys


@pytest.mark.parametrize("name, layer, tau, bf16", [
    ("llama-3.1-8b", 29, 0.85, True),
    ("deepseek-r1-distill-qwen-1.5b", 27, 0.80, False),
    ("smollm2-135m", 15, 0.735, False),
])
def test_shipped_hparams_files_hold_the_published_settings(name, layer, tau, bf16):
    import warnings

    import yaml
    from horen_fast import hparams
    from horen_fast.easyedit import HoReNHyperParams

    path = hparams.path(name)
    assert path.parent.name == "hparams" and path.parent.parent.name == "horen_fast"
    keys = yaml.safe_load(path.read_text())
    assert set(keys) <= PUBLISHED_KEYS and keys["alg_name"] == "HOREN"
    cfg = HoReNConfig.from_yaml(path)
    assert cfg.layer == f"model.layers.{layer}.mlp.down_proj"
    assert (cfg.hopfield_key_match_threshold, cfg.bf16) == (tau, bf16)
    assert (cfg.n_iter, cfg.edit_lr, cfg.val_init, cfg.adapter_mode) == (50, 1.0, "cold", "value")
    assert cfg.query_selection_strategy == "last_60_perc_prompt_tokens_avg"
    assert (cfg.hopfield_retrieval_alpha, cfg.hopfield_retrieval_beta, cfg.hopfield_retrieval_max_iter,
            cfg.hopfield_retrieval_eps) == (0.1, 20.0, 1, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # nothing in the files is unknown to HoReN
        assert HoReNHyperParams.from_hparams(path).config == cfg
    assert name in hparams.names()


def test_hparams_path_names_and_errors():
    from horen_fast import hparams

    assert hparams.path("SmolLM2") == hparams.path("smollm2-135m")
    assert hparams.path("llama3.1-8b") == hparams.path("llama-3.1-8b")
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        hparams.path("gpt-j")
    with pytest.raises(TypeError, match="model name"):
        hparams.path(8)
