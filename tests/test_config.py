"""HoReNConfig: defaults, validation, published YAML files (layer resolution: test_arch.py)."""
import textwrap

import pytest

from horen_fast.config import HoReNConfig, normalize_layer_path, parse_query_strategy

# The shape of the published hyper-parameter files (SPEC 7): EasyEdit keys, GRACE-era leftovers,
# inner_params in bracket form, and "1e-5", which YAML 1.1 reads as a string.
PUBLISHED_STYLE = textwrap.dedent("""\
    alg_name: "HOREN"
    model_name: "./hugging_cache/llama3.1-8b-instruct"
    device: 0

    inner_params:
    - model.layers[29].mlp.down_proj.weight

    n_iter: 50
    edit_lr: 1.0
    lora_edit_lr: 0.001

    name: Hopfield
    adapter_mode: value
    val_init: cold
    replacement: replace_last
    eps: 1.0
    dist_fn: euc
    eps_expand: variance
    num_pert: 8
    normalize_codebook_keys: true
    query_selection_strategy: last_60_perc_prompt_tokens_avg

    hopfield_retrieval_alpha: 0.1
    hopfield_retrieval_beta: 20.0
    hopfield_retrieval_eps: 1e-5
    hopfield_retrieval_max_iter: 1
    hopfield_key_match_threshold: 0.85

    lora_rank: 4
    lora_scale: 1.0
    bf16: true

    batch_size: 1
    max_length: 512
    """)


def write(tmp_path, text, name="h.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_papers():
    c = HoReNConfig(layer=15)
    assert (c.n_iter, c.edit_lr, c.adapter_mode, c.val_init) == (50, 1.0, "value", "cold")
    assert c.normalize_codebook_keys and c.query_selection_strategy == "last_60_perc_prompt_tokens_avg"
    assert c.retrieval_kwargs() == dict(beta=20.0, alpha=0.1, steps=1, threshold=0.85, eps=1e-5, backend="auto")
    assert c.lr == 1.0 and HoReNConfig(layer=1, adapter_mode="lora").lr == 1e-3


def test_published_yaml_is_read_as_is(tmp_path):
    c = HoReNConfig.from_yaml(write(tmp_path, PUBLISHED_STYLE))
    assert c.layer == "model.layers.29.mlp.down_proj"
    assert c.hopfield_retrieval_eps == 1e-5 and isinstance(c.hopfield_retrieval_eps, float)
    assert c.bf16 is True and c.lora_edit_lr == 0.001 and c.max_length == 512
    assert c.hopfield_key_match_threshold == 0.85


def test_yaml_round_trip(tmp_path):
    c = HoReNConfig(layer="transformer.h.3.mlp.c_proj", n_iter=7, adapter_mode="lora", lora_rank=2,
                    query_selection_strategy="last_3_prompt_tokens_avg", hopfield_key_match_threshold=0.8,
                    seed=5)
    c.to_yaml(tmp_path / "c.yaml")
    assert HoReNConfig.from_yaml(tmp_path / "c.yaml") == c
    assert HoReNConfig.from_dict(c.to_dict()) == c
    i = HoReNConfig(layer=12)
    i.to_yaml(tmp_path / "i.yaml")
    assert HoReNConfig.from_yaml(tmp_path / "i.yaml").layer == 12


@pytest.mark.parametrize("text,match", [
    ("layer: 3\nlearning_rate: 1.0\n", "unknown key"),
    ("layer: 3\nn_iter: -1\n", "n_iter"),
    ("layer: 3\nn_iter: fifty\n", "n_iter"),
    ("layer: 3\nedit_lr: 0\n", "edit_lr"),
    ("layer: 3\nadapter_mode: prefix\n", "adapter_mode"),
    ("layer: 3\nval_init: hot\n", "val_init"),
    ("layer: 3\nquery_selection_strategy: middle_token\n", "query_selection_strategy"),
    ("layer: 3\nquery_selection_strategy: last_0_perc_prompt_tokens_avg\n", "percentage"),
    ("layer: 3\nhopfield_retrieval_alpha: 1.5\n", "alpha"),
    ("layer: 3\nhopfield_retrieval_beta: -2\n", "beta"),
    ("layer: 3\nhopfield_retrieval_eps: tiny\n", "hopfield_retrieval_eps"),
    ("layer: 3\nbf16: maybe\n", "bf16"),
    ("layer: 3\nnormalize_codebook_keys: false\n", "normalize_codebook_keys"),
    ("n_iter: 5\n", "layer"),
    ("alg_name: GRACE\nlayer: 3\n", "not HoReN"),
    ("inner_params:\n- model.layers[1].mlp.down_proj.weight\n- model.layers[2].mlp.down_proj.weight\n",
     "exactly one"),
    ("layer: model.layers.2.mlp.down_proj\ninner_params:\n- model.layers[1].mlp.down_proj.weight\n", "disagree"),
    ("- just\n- a list\n", "mapping"),
    ("layer: [3\n", "not valid YAML"),
])
def test_bad_yaml_gives_a_clear_error(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        HoReNConfig.from_yaml(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HoReN config"):
        HoReNConfig.from_yaml(tmp_path / "nope.yaml")


def test_layer_forms():
    assert normalize_layer_path("model.layers[29].mlp.down_proj.weight") == "model.layers.29.mlp.down_proj"
    assert HoReNConfig(layer="model.layers[3].mlp.down_proj").layer == "model.layers.3.mlp.down_proj"
    assert HoReNConfig(layer="7").layer == 7
    with pytest.raises(ValueError):
        HoReNConfig(layer=True)


def test_query_strategies_parse():
    assert parse_query_strategy("last_prompt_token") == ("last", 1)
    assert parse_query_strategy("first_prompt_token") == ("first", 1)
    assert parse_query_strategy("last_5_prompt_tokens_avg") == ("last", 5)
    assert parse_query_strategy("last_60_perc_prompt_tokens_avg") == ("perc", 60.0)


def test_bad_config_files_get_one_line_errors_naming_the_problem(tmp_path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError, match="not a text file"):
        HoReNConfig.from_yaml(binary)
    with pytest.raises(ValueError, match="is a folder"):
        HoReNConfig.from_yaml(tmp_path)
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        HoReNConfig.from_yaml(bad)


@pytest.mark.parametrize("tau", [2.0, -1.5])
def test_a_threshold_outside_the_cosine_range_is_refused(tau):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        HoReNConfig(layer=1, hopfield_key_match_threshold=tau)
