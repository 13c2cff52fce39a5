"""HoReNEditor behaviour on tiny random Llama / Qwen2 / GPT-2 models: edits reach their targets,
unmatched inputs are untouched bit for bit, padding and batching do not matter, cached and
cache-free generation agree, forget / replace / detach, modes."""
import copy

import pytest
import torch

import tiny_models as tm
from horen_fast.adapter import HoReNAdapter, build_queries
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


EDITS = [("the capital of France is", "Rome"), ("the author of the song is", "Mozart"),
         ("Einstein was born in", "Cairo"), ("who plays the piano", "Newton")]
OTHER = ["the official language of Spain is", "the river in Egypt is called", "Tesla was",
         "the famous film was directed by the"]


def greedy(ed_or_model, tok, prompts, n=1, **kw):
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = ed_or_model.generate(**enc, max_new_tokens=n, do_sample=False, **kw)
    return out[:, enc["input_ids"].shape[1]:]


def target_ids(tok, targets):
    return torch.tensor([tok(" " + t, add_special_tokens=False)["input_ids"] for t in targets])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_edits_reach_their_targets(arch):
    tok = tm.tokenizer("left")
    model = tm.model(arch, seed=11)
    before = greedy(model, tok, OTHER)
    ed = HoReNEditor(model, tok, HoReNConfig(layer=2, n_iter=30, hopfield_key_match_threshold=0.99))
    results = ed.edit_many(EDITS, progress=False)
    assert [r.action for r in results] == ["added"] * 4 and len(ed) == 4
    assert [r.id for r in results] == [0, 1, 2, 3]
    assert all(r.seconds > 0 and r.loss == r.loss for r in results)
    got = greedy(ed, tok, [p for p, _ in EDITS])
    assert torch.equal(got, target_ids(tok, [t for _, t in EDITS]))
    assert torch.equal(greedy(ed, tok, OTHER), before)   # unmatched prompts: unchanged


def test_multi_token_target_is_learned():
    tok = tm.tokenizer("left")
    ed = HoReNEditor(tm.model("gpt2", seed=12, init=0.2), tok, HoReNConfig(layer=0))
    before = ed.score(["the capital of France is"], ["Rome Tokyo"]).item()
    r = ed.edit("the capital of France is", "Rome Tokyo")
    assert r.loss < 0.25 * -before / 2
    assert torch.equal(greedy(ed, tok, ["the capital of France is"], n=2), target_ids(tok, ["Rome Tokyo"]))
    assert r.loss < ed.score(["the capital of France is"], ["Rome Tokyo"]).neg().item() + 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_nothing_matched_is_bit_for_bit_the_original(arch):
    tok = tm.tokenizer("right")
    model = tm.model(arch, seed=13)
    enc = tok(OTHER, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=5, hopfield_key_match_threshold=0.995))
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref)         # attached, empty codebook
    ed.edit_many(EDITS, progress=False)
    with torch.no_grad():
        out = model(**enc).logits
    assert not ed.adapter.last_retrieval.matched.any()
    assert torch.equal(out, ref)
    # mixed batch: the matched row changes, the others stay bit for bit
    enc2 = tok(OTHER[:2] + [EDITS[0][0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = ed.adapter
        base.enabled = False
        ref2 = model(**enc2).logits
        base.enabled = True
        out2 = model(**enc2).logits
    assert ed.adapter.last_retrieval.matched.tolist() == [False, False, True]
    assert torch.equal(out2[:2], ref2[:2]) and not torch.equal(out2[2], ref2[2])


def test_padding_and_batching_do_not_change_results():
    left, right = tm.tokenizer("left"), tm.tokenizer("right")
    model = tm.model("llama", seed=14)
    ed = HoReNEditor(model, left, HoReNConfig(layer=2, n_iter=20, hopfield_key_match_threshold=0.99))
    ed.edit_many(EDITS[:2], progress=False)
    prompts = [EDITS[0][0], OTHER[3], EDITS[1][0], OTHER[2]]
    # plain forward, right padding: each row's logits at its own tokens equal the row alone
    enc = right(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        batch = model(**enc).logits
        matched = ed.adapter.last_retrieval.matched.tolist()
        for i, p in enumerate(prompts):
            alone = model(**right([p], return_tensors="pt")).logits[0]
            assert ed.adapter.last_retrieval.matched.tolist() == [matched[i]]
            torch.testing.assert_close(batch[i, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
    assert matched == [True, False, True, False]
    # generation, left padding: the batch gives each row's own tokens
    batch_tokens = greedy(ed, left, prompts, n=3)
    for i, p in enumerate(prompts):
        assert torch.equal(batch_tokens[i], greedy(ed, left, [p], n=3)[0])
    # score: the batch equals one by one
    targets = ["Rome", "blue", "Mozart", "two"]
    s = ed.score(prompts, targets)
    for i in range(4):
        torch.testing.assert_close(s[i], ed.score([prompts[i]], [targets[i]])[0], rtol=1e-5, atol=1e-5)
    ed.adapter.enabled = False
    unedited = ed.score(prompts, targets)
    ed.adapter.enabled = True
    assert s[0] > unedited[0] and s[2] > unedited[2]          # the edited targets became likelier
    assert torch.equal(s[[1, 3]], unedited[[1, 3]])            # unmatched rows: same scores


@pytest.mark.parametrize("arch,padding", [("llama", "left"), ("gpt2", "left"), ("qwen2", "right")])
def test_cached_generation_equals_cache_free(arch, padding):
    tok = tm.tokenizer(padding)
    model = tm.model(arch, seed=15)
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=20, hopfield_key_match_threshold=0.99))
    ed.edit_many(EDITS[:3], progress=False)
    prompts = [EDITS[0][0], OTHER[0], EDITS[2][0]] if padding == "left" else [EDITS[1][0]]
    cached = greedy(ed, tok, prompts, n=5)
    free = greedy(ed, tok, prompts, n=5, use_cache=False)
    assert torch.equal(cached, free)
    assert torch.equal(greedy(model, tok, prompts, n=5), cached)   # plain model.generate after attaching
    if padding == "left":
        assert cached[0, 0] == target_ids(tok, ["Rome"])[0, 0]


def test_retrieval_runs_once_per_prefill_and_not_at_decode():
    tok = tm.tokenizer("left")
    ed = HoReNEditor(tm.model("llama", seed=16), tok, HoReNConfig(layer=1, n_iter=2))
    ed.edit(*EDITS[0])
    calls = []
    real = ed.codebook.retrieve
    ed.codebook.retrieve = lambda q, **kw: calls.append(q.shape) or real(q, **kw)
    greedy(ed, tok, [EDITS[0][0], OTHER[0]], n=4)
    assert calls == [(2, ed.adapter.key_dim)]
    calls.clear()
    greedy(ed, tok, [EDITS[0][0], OTHER[0]], n=4, use_cache=False)
    assert len(calls) == 4


def test_same_prompt_again_reuses_or_replaces():
    tok = tm.tokenizer("left")
    ed = HoReNEditor(tm.model("llama", seed=17), tok, HoReNConfig(layer=2, n_iter=30))
    first = ed.edit("the capital of France is", "Rome")
    again = ed.edit("the capital of France is", "Rome")
    assert (again.action, again.id) == ("reused", first.id) and len(ed) == 1
    key = ed.codebook.get_keys(first.id).clone()
    new = ed.edit("the capital of France is", "Tokyo")
    # the entry of this prompt is replaced in place: same id, same key, the new label and value
    assert (new.action, new.replaced_id, new.id) == ("replaced", first.id, first.id)
    assert len(ed) == 1 and ed.codebook.ids == [first.id]
    assert torch.equal(ed.codebook.get_keys(first.id), key)
    assert ed.codebook.get_labels(first.id)[0] == tuple(target_ids(tok, ["Tokyo"])[0].tolist())
    assert torch.equal(greedy(ed, tok, ["the capital of France is"]), target_ids(tok, ["Tokyo"]))


def test_forget_restores_outputs_exactly():
    tok = tm.tokenizer("right")
    model = tm.model("qwen2", seed=18)
    twin = copy.deepcopy(model)
    enc = tok([EDITS[0][0], EDITS[1][0], OTHER[0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        original = model(**enc).logits
    cfg = HoReNConfig(layer=2, n_iter=10)
    ed = HoReNEditor(model, tok, cfg)
    a, b = ed.edit(*EDITS[0]), ed.edit(*EDITS[1])
    only_b = HoReNEditor(twin, tok, cfg)
    only_b.edit(*EDITS[1])
    with torch.no_grad():
        with_b = twin(**enc).logits
        both = model(**enc).logits
        ed.forget(a.id)
        after = model(**enc).logits
    assert not torch.equal(both, with_b)
    assert torch.equal(after, with_b)
    ed.forget(b.id)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, original)
    with pytest.raises(KeyError):
        ed.forget(b.id)


def test_detach_puts_the_original_layer_back():
    tok = tm.tokenizer("left")
    model = tm.model("gpt2", seed=19)
    layer = model.transformer.h[1].mlp.c_proj
    enc = tok(OTHER[:2] + [EDITS[0][0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=10))
    assert isinstance(model.transformer.h[1].mlp.c_proj, HoReNAdapter)
    with pytest.raises(ValueError, match="already carries"):
        HoReNEditor(model, tok, HoReNConfig(layer=1))
    ed.edit(*EDITS[0])
    ed.detach()
    assert model.transformer.h[1].mlp.c_proj is layer
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref)
    with pytest.raises(RuntimeError, match="detached"):
        ed.edit(*EDITS[1])
    HoReNEditor(model, tok, HoReNConfig(layer=1)).detach()   # attachable again


def test_lora_mode_edits_and_forgets():
    tok = tm.tokenizer("left")
    model = tm.model("llama", seed=20)
    cfg = HoReNConfig(layer=2, adapter_mode="lora", lora_rank=2, lora_edit_lr=0.1, n_iter=40,
                      hopfield_key_match_threshold=0.99)
    ed = HoReNEditor(model, tok, cfg)
    assert ed.codebook.value_dim == 2 * 2 * model.config.hidden_size
    before = greedy(model, tok, OTHER)
    r = ed.edit(*EDITS[0])
    assert torch.equal(greedy(ed, tok, [EDITS[0][0]]), target_ids(tok, [EDITS[0][1]]))
    assert torch.equal(greedy(ed, tok, OTHER), before)
    ed.forget(r.id)
    assert len(ed) == 0


def test_none_mode_retrieves_but_changes_nothing():
    tok = tm.tokenizer("right")
    model = tm.model("llama", seed=21)
    enc = tok([EDITS[0][0], OTHER[0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
    ed = HoReNEditor(model, tok, HoReNConfig(layer=2, adapter_mode="none", hopfield_key_match_threshold=0.99))
    r = ed.edit(*EDITS[0])
    assert r.action == "added" and r.loss > 0
    with torch.no_grad():
        out = model(**enc).logits
    assert ed.adapter.last_retrieval.matched.tolist() == [True, False]
    assert ed.adapter.last_retrieval.index.tolist() == [r.id, -1]
    assert torch.equal(out, ref)


def test_records_and_bad_input():
    tok = tm.tokenizer("left")
    ed = HoReNEditor(tm.model("llama", seed=22), tok, HoReNConfig(layer=1, n_iter=2, max_length=12))
    res = ed.edit_many([{"prompt": EDITS[0][0], "target": "Rome"}, {"prompt": EDITS[1][0], "target_new": "Bach"},
                        (EDITS[2][0], "Cairo")], progress=False, batch_size=2)
    assert [r.action for r in res] == ["added"] * 3 and len(ed) == 3
    with pytest.raises(TypeError, match="prompt"):
        ed.edit_many(["just a string"], progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        ed.edit("the capital of France is", "")
    with pytest.raises(ValueError, match="max_length"):
        ed.edit("the capital of France is the city that is known as the capital of", "Rome")
    with pytest.raises(ValueError, match="batch_size"):
        ed.edit_many([EDITS[0]], batch_size=0)
    assert len(ed) == 3


def reference_query(x, mask, strategy):
    """Row by row, from the prompt tokens' positions (SPEC 2)."""
    import math
    out = []
    for b in range(x.shape[0]):
        pos = mask[b].nonzero()[:, 0].tolist()
        P = len(pos)
        if strategy == "first_prompt_token":
            sel = pos[:1]
        elif strategy == "last_prompt_token":
            sel = pos[-1:]
        elif strategy.endswith("_perc_prompt_tokens_avg"):
            pct = float(strategy.split("_")[1])
            sel = pos[P - max(math.ceil(P * pct / 100 - 1e-9), 1):]
        else:
            sel = pos[P - min(int(strategy.split("_")[1]), P):]
        out.append(x[b, sel].mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("strategy", ["last_prompt_token", "first_prompt_token", "last_3_prompt_tokens_avg",
                                      "last_60_perc_prompt_tokens_avg", "last_25_perc_prompt_tokens_avg",
                                      "last_100_perc_prompt_tokens_avg"])
def test_query_strategies_per_row_any_padding(strategy):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 5, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 5, 7, 2]
    left = torch.zeros(6, 9, dtype=torch.bool)
    right = torch.zeros(6, 9, dtype=torch.bool)
    for b, n in enumerate(lengths):
        left[b, 9 - n:] = True
        right[b, :n] = True
    for mask in (left, right):
        q, last = build_queries(x, mask, strategy)
        torch.testing.assert_close(q, reference_query(x, mask, strategy))
        assert last.tolist() == [int(m.nonzero()[-1]) for m in mask]


def test_an_editor_on_a_prefiltered_codebook():
    """The editor takes a Codebook with a FAISS prefilter (and its sketch) as it is: edits land,
    unrelated prompts stay as they were, and the same edits give the same answers as exact retrieval."""
    pytest.importorskip("faiss")
    from horen_fast import Codebook
    from horen_fast.prefilter import PrefilterConfig

    tok = tm.tokenizer("left")
    model = tm.model("llama", seed=11)
    before = greedy(model, tok, OTHER)
    cfg = HoReNConfig(layer=2, n_iter=30, hopfield_key_match_threshold=0.99)
    probe = HoReNEditor(model, tok, cfg)
    d_key, d_value = probe.codebook.key_dim, probe.codebook.value_dim
    probe.detach()
    cb = Codebook(d_key, d_value, prefilter=PrefilterConfig(index="flat", candidates=2),
                  **cfg.retrieval_kwargs())
    ed = HoReNEditor(model, tok, cfg, codebook=cb)
    assert ed.codebook is cb and cb.prefilter.sketch is not None
    ed.edit_many(EDITS, progress=False)
    prompts = [p for p, _ in EDITS]
    assert torch.equal(greedy(ed, tok, prompts), target_ids(tok, [t for _, t in EDITS]))
    assert torch.equal(greedy(ed, tok, OTHER), before)
    q = torch.randn(8, d_key)
    assert torch.equal(cb.retrieve(q).index, cb.retrieve(q, exact=True).index)
