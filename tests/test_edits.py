"""horen_fast.edits on its own: the reuse / replace / add decision against the float64 oracle, the
undo of applied decisions bit for bit, edit records and their tokenization."""
import numpy as np
import pytest
import torch

import tiny_models as tm
from horen_fast import Codebook
from horen_fast.edits import SAME_KEY_COS, Changes, Decision, decide, encode, parse_record
from oracle import anisotropic_keys, oracle_retrieve, unit


def book(keys, dtype=torch.float64, **kw):
    cb = Codebook(keys.shape[1], 3, dtype=dtype, threshold=0.8, **kw)
    cb.add(torch.as_tensor(keys, dtype=dtype), torch.zeros(len(keys), 3, dtype=dtype),
           [(100 + i,) for i in range(len(keys))])
    return cb


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decide_follows_the_oracle(dtype):
    rng = np.random.default_rng(5)
    keys = anisotropic_keys(rng, 60, 24, cos=0.4)
    cb = book(keys, dtype)
    checked = {"added": 0, "reused": 0, "replaced": 0}
    for i in range(300):
        kind = i % 4
        j = int(rng.integers(0, len(keys)))
        if kind in (0, 2):   # the stored prompt again (kind 2: with a new target)
            q = keys[j] * rng.uniform(0.1, 10)
        elif kind == 1:      # a paraphrase
            q = keys[j] + rng.uniform(0.05, 0.5) * unit(rng.standard_normal(24))
        else:                # anything, with a new target
            q = rng.standard_normal(24)
        exp = oracle_retrieve(q[None], keys, threshold=0.8)
        if exp.knife[0]:
            continue
        m = int(exp.index[0])
        same_label = kind <= 1 and m >= 0
        label = (100 + m,) if same_label else (7, i)
        got = decide(cb, torch.as_tensor(q, dtype=dtype), label)
        if m < 0:
            want = Decision("added", None)
        elif same_label:
            want = Decision("reused", m)
        elif float(unit(q) @ keys[m]) > SAME_KEY_COS:
            want = Decision("replaced", m)
        else:
            want = Decision("added", None)
        assert got == want, (i, kind)
        checked[want.action] += 1
    assert min(checked.values()) >= 10, checked


def test_decide_waits_for_busy_entries_and_an_empty_codebook_adds():
    rng = np.random.default_rng(6)
    keys = anisotropic_keys(rng, 8, 16)
    cb = book(keys)
    q = torch.as_tensor(keys[3])
    assert decide(cb, q, (103,)) == Decision("reused", 3)
    assert decide(cb, q, (103,), busy={3}) is None               # reuse of an entry being trained
    replaced = decide(cb, q, (9,))
    assert replaced == Decision("replaced", 3) and replaced.replaced_id == 3
    assert decide(cb, q, (9,), busy={3}) is None
    assert decide(cb, q, (103,), busy={4}) == Decision("reused", 3)
    assert decide(cb, q, (103,), threshold=0.9999999) in (Decision("reused", 3), Decision("added", None))
    empty = Codebook(16, 3, dtype=torch.float64)
    assert decide(empty, q, (1,)) == Decision("added", None)


@pytest.mark.parametrize("prefilter", [None, "faiss"])
def test_changes_undo_gives_back_the_codebook_bit_for_bit(prefilter):
    kw = {}
    if prefilter:
        pytest.importorskip("faiss")
        from horen_fast.prefilter import PrefilterConfig
        kw["prefilter"] = PrefilterConfig(candidates=4)
    rng = np.random.default_rng(7)
    keys = anisotropic_keys(rng, 12, 16)
    cb = book(keys, torch.float32, **kw)
    cb.remove([2, 5])                                            # storage order no longer = ids
    before = (cb.ids, cb.keys.clone(), cb.values.clone(), cb.get_labels(cb.ids))
    queries = torch.as_tensor(rng.standard_normal((6, 16)), dtype=torch.float32)
    hits = cb.retrieve(queries)
    changes = Changes(cb)
    new = changes.apply(Decision("added", None), queries[0], (1, 2), torch.ones(3))
    changes.apply(Decision("replaced", 7), queries[1], (3,), torch.full((3,), 2.0))
    assert changes.apply(Decision("reused", 7), queries[1], (3,), torch.zeros(3)) == 7
    changes.set(7, value=torch.full((3,), 5.0))
    changes.set(new, value=torch.full((3,), 6.0), label=(4,))
    changes.apply(Decision("added", None), queries[2], (5,), torch.ones(3))
    assert len(cb) == len(before[0]) + 2 and cb.get_labels(7) == [(3,)]
    changes.undo()
    assert cb.ids == before[0] and cb.get_labels(cb.ids) == before[3]
    assert torch.equal(cb.keys, before[1]) and torch.equal(cb.values, before[2])
    again = cb.retrieve(queries)
    assert torch.equal(again.index, hits.index) and torch.equal(again.matched, hits.matched)
    assert len(changes) == 0


def test_records_and_tokenization():
    assert parse_record({"prompt": "a", "target_new": "b"}) == ("a", "b")
    assert parse_record(("a", "b")) == ("a", "b")
    with pytest.raises(TypeError, match="a dict with 'prompt'"):
        parse_record("a b")
    with pytest.raises(ValueError, match="non-empty prompt and target"):
        parse_record({"prompt": "a", "target": ""})
    tok = tm.byte_bpe_tokenizer()
    p_ids, t_ids = encode(tok, "In which country is the Kyoto river?", "Japan")
    assert p_ids == tok("In which country is the Kyoto river?")["input_ids"]
    assert p_ids + t_ids == tok("In which country is the Kyoto river? Japan")["input_ids"]
    words = tm.tokenizer()
    p_ids, t_ids = encode(words, "the capital of France is", "Rome")
    assert t_ids == words(" Rome", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="more than max_length=4"):
        encode(words, "the capital of France is", "Rome", max_length=4)
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        encode(words, "the capital of France is", " ")


def test_a_prompt_of_only_padding_is_refused_with_the_real_reason():
    for tok in (tm.tokenizer(), tm.byte_bpe_tokenizer()):    # with and without a BOS token
        pad = tok.pad_token
        with pytest.raises(ValueError, match="no tokens other than padding"):
            encode(tok, f"{pad}{pad}", "Rome")
