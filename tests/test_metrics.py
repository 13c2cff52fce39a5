"""The metric functions on hand-computed cases, and batched generation against one-row generate."""
import math

import pytest
import torch

from horen_fast.data import EditRecord
from horen_fast.metrics import (aggregate, answer_lengths, evaluate_records, generate_tokens, locality_reference,
                                locality_score, locality_tokens, overall, stop_ids, target_accuracy)
from tiny_lm import byte_bpe_tokenizer, tiny_llama

EOS = 0
BOS = 1


class CharTokenizer:
    """One token per character (id = code point); 0 is EOS/pad (special), 1 is BOS (special)."""
    pad_token_id = EOS
    eos_token_id = EOS

    def encode(self, text, add_special_tokens=True):
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]

    def __call__(self, text):
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (EOS, BOS)))


def ids(text):
    return [ord(c) for c in text]


def test_answer_lengths_count_the_leading_space():
    assert answer_lengths(CharTokenizer(), "Paris") == (6, 5)
    tok = byte_bpe_tokenizer()
    gen, cmp = answer_lengths(tok, "Japan")
    assert gen == len(tok.encode(" Japan", add_special_tokens=False))
    assert cmp == len(tok.encode("Japan", add_special_tokens=False))
    assert gen != cmp  # byte-level BPE: " Japan" starts with a separate space piece here


@pytest.mark.parametrize("generated, expected", [
    (" Paris", 1.0),            # leading space stripped, then equal
    ("Paris!", 1.0),            # cut to the target's length before comparing
    (" Pariz", 0.8),            # 4 of 5 tokens equal
    (" pARIS", 0.0),            # right length, no token equal
    (" Xaris", 0.8),            # first token wrong
    ("   Paris", 1.0),          # any leading whitespace goes
    (" Par", 0.0),              # shorter than the target: lengths differ, score 0
    ("\nParis", 1.0),           # lstrip removes newlines too (as EasyEdit's str.lstrip)
])
def test_target_accuracy_hand_cases(generated, expected):
    assert target_accuracy(CharTokenizer(), ids(generated), "Paris") == pytest.approx(expected)


def test_target_accuracy_skips_special_tokens_and_handles_early_stop():
    tok = CharTokenizer()
    assert target_accuracy(tok, [BOS] + ids(" Paris"), "Paris") == 1.0   # specials skipped when decoding
    assert target_accuracy(tok, ids(" Pa") + [EOS], "Paris") == 0.0      # stopped early: too short
    assert target_accuracy(tok, ids(" ab"), "") == 1.0                   # empty target: EasyEdit's NaN -> 1


def test_target_accuracy_with_a_byte_level_bpe():
    tok = byte_bpe_tokenizer()
    target = "University of Michigan"
    with_space = tok.encode(" " + target, add_special_tokens=False)
    assert target_accuracy(tok, with_space, target) == 1.0
    no_space = tok.encode(target, add_special_tokens=False)
    assert target_accuracy(tok, no_space, target) == 1.0
    # first word wrong: the re-encoded answer is cut to the target's length and compared token by token
    wrong = tok.encode(" Universe of Michigan", add_special_tokens=False)
    t_ids = tok.encode(target, add_special_tokens=False)
    a_ids = tok.encode("Universe of Michigan", add_special_tokens=False)[: len(t_ids)]
    expected = (sum(a == b for a, b in zip(a_ids, t_ids)) / len(t_ids)) if len(a_ids) == len(t_ids) else 0.0
    assert target_accuracy(tok, wrong, target) == pytest.approx(expected)
    assert target_accuracy(tok, wrong, target) < 1.0


def test_locality_tokens_and_score():
    assert locality_tokens([5, 6, 7], [8, 9], 3) == [7, 8, 9]
    assert locality_tokens([5, 6, 7], [EOS], 2) == [7, EOS]   # stopped early: the prompt's tail counts
    assert locality_tokens([5], [8], 0) == []
    assert locality_score([1, 2, 3], [1, 9, 3]) == pytest.approx(2 / 3)
    assert locality_score([4, 4], [4, 4]) == 1.0
    assert locality_score([], []) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        locality_score([1, 2], [1])


def test_overall_is_the_geometric_mean():
    assert overall(1.0, 1.0, 1.0) == pytest.approx(1.0)
    assert overall(0.5, 1.0, 1.0) == pytest.approx(0.5 ** (1 / 3))
    assert overall(0.9, 0.4, 1.0) == pytest.approx((0.9 * 0.4) ** (1 / 3))
    assert overall(0.0, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        overall(float("nan"), 1.0, 1.0)


def test_aggregate_means_then_geometric_mean():
    rows = [{"rel": 1.0, "gen": 0.5, "loc": 1.0}, {"rel": 0.5, "gen": 0.0, "loc": 1.0}]
    agg = aggregate(rows)
    assert agg["n"] == 2 and agg["rel"] == 0.75 and agg["gen"] == 0.25 and agg["loc"] == 1.0
    assert agg["op"] == pytest.approx((0.75 * 0.25) ** (1 / 3))


@pytest.fixture(scope="module")
def tiny():
    tok = byte_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=3, eos_token_id=tok.eos_token_id)
    return model, tok


def _one_row(model, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_batched_generation_equals_one_row_generate(tiny):
    model, tok = tiny
    prompts = ["What family are Ramalinaceae?", "Where", "nq question: who wrote the song hallelujah",
               "Which family does Ramalinaceae belong to?", "In which country is the Kyoto river?"]
    max_new = [3, 5, 1, 4, 2]
    batched = generate_tokens(model, tok, prompts, max_new, batch_size=3)
    for p, n, (p_ids, gen) in zip(prompts, max_new, batched):
        assert p_ids == tok(p)["input_ids"]
        assert gen == _one_row(model, tok, p, n)
        assert len(gen) <= n


def test_a_repeated_prompt_is_generated_once_with_the_same_answer(tiny):
    model, tok = tiny
    rows = []

    class Counting:
        def __init__(self, m):
            self.m, self.config, self.generation_config = m, m.config, m.generation_config

        def parameters(self):
            return self.m.parameters()

        def generate(self, **kw):
            rows.append(kw["input_ids"].shape[0])
            return self.m.generate(**kw)
    prompts = ["Where", "nq question: who wrote the song hallelujah", "Where", "Where",
               "nq question: who wrote the song hallelujah"]
    max_new = [3, 2, 3, 4, 2]
    got = generate_tokens(Counting(model), tok, prompts, max_new, batch_size=8)
    assert sum(rows) == 3                       # ("Where", 3), (nq, 2), ("Where", 4)
    for p, n, (p_ids, gen) in zip(prompts, max_new, got):
        assert p_ids == tok(p)["input_ids"] and gen == _one_row(model, tok, p, n)
    got[0][1].append(-1)                        # each row is its own list
    assert got[2][1] == _one_row(model, tok, "Where", 3)


def test_generation_stops_at_eos():
    tok = byte_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=1, eos_token_id=tok.eos_token_id)
    with torch.no_grad():   # make EOS the greedy choice everywhere
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id] = 1.0
        model.model.norm.weight.fill_(1.0)
    (p_ids, gen), = generate_tokens(model, tok, ["Where did Watts Humphrey study?"], [4])
    assert gen == [tok.eos_token_id]
    assert locality_tokens(p_ids, gen, 3) == p_ids[-2:] + [tok.eos_token_id]


def test_a_plain_model_in_a_batch_stops_at_its_own_eos():
    """A plain causal LM (not an editor): its ``.model`` is the inner decoder, without a generation
    config; the stop token must come from the LM's own config. Made visible in a batch: one row
    meets EOS early while the other keeps generating (one row alone stops generate itself)."""
    tok = byte_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=5, eos_token_id=tok.eos_token_id)
    model.generation_config.eos_token_id = None
    prompts = ["Where did Watts Humphrey study?", "nq question: who wrote the song hallelujah",
               "In which country is the Kyoto river?", "What family are Ramalinaceae?"]
    free = [_one_row(model, tok, p, 6) for p in prompts]
    pick = next((a, b, t) for a in range(len(prompts)) for b in range(len(prompts)) if a != b
                for t in free[a][1:4] if t not in free[b] and t != tok.pad_token_id)
    a, b, eos = pick
    model.generation_config.eos_token_id = eos
    assert stop_ids(model, tok) == {eos}
    rows = generate_tokens(model, tok, [prompts[a], prompts[b]], [6, 6], batch_size=2)
    assert rows[0][1] == free[a][: free[a].index(eos) + 1] == _one_row(model, tok, prompts[a], 6)
    assert rows[1][1] == free[b] and len(rows[1][1]) == 6


def test_unedited_model_scores_full_locality(tiny):
    model, tok = tiny
    records = [EditRecord("What family are Ramalinaceae?", "Lamiinae", "Ramalinaceae family?",
                          "nq question: who wrote the song hallelujah", "Leonard Cohen"),
               EditRecord("Where did Watts Humphrey study?", "University of Michigan", "Watts Humphrey studied at?",
                          "nq question: types of skiing", "Downhill")]
    before = locality_reference(model, tok, records, batch_size=2)
    rows = evaluate_records(model, tok, records, before, batch_size=4)
    assert [r["loc"] for r in rows] == [1.0, 1.0]
    for r, rec in zip(rows, records):
        assert 0.0 <= r["rel"] <= 1.0 and 0.0 <= r["gen"] <= 1.0
        n_gen = answer_lengths(tok, rec.target)[0]
        gen = _one_row(model, tok, rec.prompt, n_gen)
        assert r["rel"] == target_accuracy(tok, gen, rec.target)
        assert math.isfinite(aggregate(rows)["op"])
