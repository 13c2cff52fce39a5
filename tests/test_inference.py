"""Where each row's prompt ends at inference (horen_fast/inference.py) and the adapter's states, on
tiny random transformers models."""
import threading

import pytest
import torch

import tiny_models as tm
from horen_fast import inference
from horen_fast.adapter import State
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor
from horen_fast.inference import KnownPrompts, describe_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDITS = [("the capital of France is", "Tokyo"), ("the language of Egypt is", "Japanese")]


@pytest.fixture(scope="module")
def edited():
    tok = tm.tokenizer()
    model = tm.model("llama")
    # the retrieval backend is not what this file tests: the reference one
    ed = HoReNEditor(model, tok, HoReNConfig(layer=2, n_iter=30, hopfield_key_match_threshold=0.85,
                                             backend="torch"))
    ed.edit_many(EDITS, progress=False)
    return ed


def logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc


# ---- KnownPrompts ------------------------------------------------------------------------------
def test_known_prompts_mark_the_longest_known_prefix_of_each_row():
    kp = KnownPrompts()
    kp.add([2, 5, 6])
    kp.add([2, 5, 6, 7, 8])
    kp.add([2, 9])
    assert len(kp) == 3 and [2, 5, 6] in kp and [2, 5] not in kp
    ids = torch.tensor([[0, 0, 2, 5, 6, 7, 8, 9],     # left padding, the longer prompt, then more
                        [2, 5, 6, 7, 1, 1, 0, 0],     # right padding, the shorter prompt
                        [0, 2, 9, 9, 9, 9, 9, 9],     # the length-2 prompt
                        [2, 4, 4, 4, 4, 4, 4, 0]])    # no known prompt: every real token
    mask = (ids != 0).long()
    pm = kp.prompt_mask(ids, mask)
    assert pm.dtype == torch.bool
    assert pm.tolist() == [[False, False, True, True, True, True, True, False],
                           [True, True, True, False, False, False, False, False],
                           [False, True, True, False, False, False, False, False],
                           [True, True, True, True, True, True, True, False]]
    # no mask: every token is real; a prompt equal to the whole row is that row
    assert kp.prompt_mask(torch.tensor([[2, 5, 6]])).tolist() == [[True, True, True]]


def test_known_prompts_reject_bad_input():
    kp = KnownPrompts()
    with pytest.raises(ValueError, match="at least one token"):
        kp.add([])
    with pytest.raises(ValueError, match="non-empty string"):
        kp.add_texts(tm.tokenizer(), [""])
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        kp.prompt_mask(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        kp.prompt_mask(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))


def test_describe_pass_tells_first_passes_from_decode_steps():
    from transformers import DynamicCache

    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    first, m, i = describe_pass((), {"input_ids": ids, "attention_mask": mask})
    assert first and m is mask and i is ids
    assert describe_pass((ids,), {}) == (True, None, ids)
    assert describe_pass((), {"input_ids": ids[:, :1], "attention_mask": mask}) == (False, None, None)
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    assert describe_pass((), {"input_ids": ids, "past_key_values": cache})[0] is False
    first, m, i = describe_pass((), {"inputs_embeds": torch.zeros(2, 5, 8), "attention_mask": mask})
    assert first and m is mask and i is None
    assert inference.cache_length(None) == 0 and inference.cache_length(cache) == 3


# ---- adapter states ----------------------------------------------------------------------------
def test_adapter_states_are_explicit(edited):
    ad = edited.adapter
    assert ad.state is State.PROMPT
    with ad.pinned(torch.ones(1, 3, dtype=torch.bool)):
        assert ad.state is State.PINNED
    with ad.capturing(lambda x, y: None):
        assert ad.state is State.CAPTURE
        with pytest.raises(RuntimeError, match="CAPTURE"):
            with ad.training_entries(torch.zeros(1, dtype=torch.long), torch.zeros(1, ad.value_dim)):
                pass
    with ad.training_entries(torch.zeros(1, dtype=torch.long), torch.zeros(1, ad.value_dim)):
        assert ad.state is State.TRAIN
    ad.enabled = False
    try:
        assert ad.state is State.OFF
    finally:
        ad.enabled = True
    assert ad.state is State.PROMPT
    with pytest.raises(ValueError, match="2-D"):
        ad.pinned(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        ad.training_entries(torch.zeros(2, dtype=torch.long), torch.zeros(1, ad.value_dim))
    with pytest.raises(TypeError, match="callable"):
        ad.capturing(3)


def test_capturing_and_training_states_drive_the_forward(edited):
    ad, tok = edited.adapter, edited.tokenizer
    enc = tok(["the capital of France is"], return_tensors="pt")
    seen = []
    with torch.no_grad(), ad.capturing(lambda x, y: seen.append((x.shape, y.shape))):
        edited.model(**enc)
    assert seen == [((1, enc["input_ids"].shape[1], ad.key_dim), (1, enc["input_ids"].shape[1], ad.value_dim))]
    ad.enabled = False
    try:
        with torch.no_grad():
            base = edited.model(**enc).logits
            entry = torch.randn(1, ad.value_dim)
            pos = torch.tensor([2])
            with ad.training_entries(pos, entry):
                trained = edited.model(**enc).logits
    finally:
        ad.enabled = True
    assert torch.equal(trained[:, :2], base[:, :2]) and not torch.equal(trained[:, 2:], base[:, 2:])


# ---- teacher forcing over prompt + target ------------------------------------------------------
def test_a_known_prompt_gets_the_edit_at_its_end_in_a_teacher_forced_pass(edited):
    """EasyEdit's default scoring: one forward pass over prompt + " " + target. With the prompt
    known, the value is added at the prompt's last token: the logits equal those of the pinned
    pass of editor.score, and the target is the argmax there."""
    model, tok, ad = edited.model, edited.tokenizer, edited.adapter
    texts = [f"{p} {t}" for p, t in EDITS] + ["the river of Spain is blue"]
    enc = tok(texts, return_tensors="pt", padding=True)
    prompt_lens = [len(tok(p)["input_ids"]) for p, _ in EDITS]
    pinned = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
    T = enc["input_ids"].shape[1]
    for b, n in enumerate(prompt_lens):
        start = T - int(enc["attention_mask"][b].sum())
        pinned[b, start: start + n] = True
    pinned[2] = enc["attention_mask"][2] != 0
    with torch.no_grad(), ad.pinned(pinned):
        want = model(**enc).logits
    ad.known_prompts.clear()
    untracked, _ = logits(model, tok, texts)
    ad.known_prompts.add_texts(tok, [p for p, _ in EDITS])
    try:
        got, _ = logits(model, tok, texts)
    finally:
        ad.known_prompts.clear()
    assert torch.equal(got, want)
    assert not torch.equal(untracked[:2], want[:2])      # the whole input as prompt: elsewhere
    for b, (p, t) in enumerate(EDITS):
        p_last = T - int(enc["attention_mask"][b].sum()) + prompt_lens[b] - 1
        assert tok.decode([int(got[b, p_last].argmax())]) == t


def test_rows_that_match_nothing_stay_bit_for_bit(edited):
    model, tok, ad = edited.model, edited.tokenizer, edited.adapter
    texts = ["the capital of France is Tokyo", "the river of Spain is blue", "who plays chess"]
    ad.known_prompts.add_texts(tok, ["the capital of France is", "the river of Spain is"])
    try:
        got, _ = logits(model, tok, texts)
        ad.enabled = False
        try:
            base, _ = logits(model, tok, texts)
        finally:
            ad.enabled = True
    finally:
        ad.known_prompts.clear()
    assert not ad.last_retrieval.matched[1:].any()
    assert torch.equal(got[1:], base[1:]) and not torch.equal(got[0], base[0])


# ---- generation ---------------------------------------------------------------------------------
def greedy(fn, tok, prompts, use_cache, n=3):
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = fn(**enc, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def test_a_pinned_model_generate_applies_the_edit_once_with_and_without_the_cache(edited):
    model, tok = edited.model, edited.tokenizer
    prompts = [p for p, _ in EDITS] + ["the river of Spain is"]
    # attaching an editor pins the model's own generate
    assert isinstance(model.__dict__["generate"], inference.PinnedGenerate)
    cached = greedy(model.generate, tok, prompts, True)
    assert greedy(model.generate, tok, prompts, False) == cached
    assert greedy(edited.generate, tok, prompts, False) == cached
    assert [tok.decode(r[:1]) for r in cached[:2]] == [t for _, t in EDITS]
    inference.unpin_generate(model)
    try:
        assert "generate" not in model.__dict__
        assert greedy(model.generate, tok, prompts, True) == cached
        # without the pin, each cache-free step takes its whole sequence as the prompt
        assert greedy(model.generate, tok, prompts, False) != cached
    finally:
        inference.pin_generate(edited)


def test_generate_takes_the_input_ids_positionally_or_by_name(edited):
    tok = edited.tokenizer
    enc = tok(["the capital of France is"], return_tensors="pt")
    a = edited.generate(enc["input_ids"], max_new_tokens=2, do_sample=False, pad_token_id=0)
    b = edited.generate(inputs=enc["input_ids"], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="both positionally and by name"):
        edited.generate(enc["input_ids"], input_ids=enc["input_ids"])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        edited.generate(input_ids=enc["input_ids"], attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="needs input_ids"):
        edited.generate(max_new_tokens=2)


def test_a_detached_editor_leaves_a_plain_model_generate():
    tok = tm.tokenizer()
    model = tm.model("llama", seed=3)
    enc = tok(["the capital of France is"], return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=5, backend="torch"))
    ed.edit(*EDITS[0])
    inference.pin_generate(ed)
    ed.detach()
    assert torch.equal(model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0), ref)
    assert "generate" not in model.__dict__


def test_generate_and_score_hold_the_editor_lock(edited):
    lock = edited.lock
    tok = edited.tokenizer
    enc = tok(["the capital of France is"], return_tensors="pt")
    done = []
    calls = [lambda: edited.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0),
             lambda: edited.score(["the capital of France is"], ["Tokyo"])]
    for call in calls:
        with lock:
            t = threading.Thread(target=lambda: done.append(call()))
            t.start()
            t.join(0.5)
            assert t.is_alive() and not done      # waits for the lock
        t.join(30)
        assert len(done) == 1
        done.clear()
