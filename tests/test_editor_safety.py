"""An edit call is all or nothing: after any exception (raised mid-training, a real SIGINT, a bad
later record) the codebook is exactly as before the call, including an earlier edit that the
call was replacing. And an editor shared between threads serializes edits with generation."""
import os
import signal
import threading

import pytest
import torch

import tiny_models as tm
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIRST = [("the capital of France is", "Rome"), ("the author of the song is", "Mozart"),
         ("Einstein was born in", "Cairo")]
SECOND = [("the capital of France is", "Rome"),          # reuses entry 0 (trains its value further)
          ("the author of the song is", "Tesla"),        # replaces entry 1's edit
          ("the official language of Spain is", "Japanese"),   # adds
          ("who plays the piano", "Newton")]                   # adds
OTHER = ["the river in Egypt is called", "the famous film was directed by the"]


def snapshot(cb):
    return (list(cb.ids), cb.keys.clone(), cb.values.clone(), [cb.get_labels(i)[0] for i in cb.ids])


def assert_same(cb, snap):
    ids, keys, values, labels = snap
    assert list(cb.ids) == ids
    assert torch.equal(cb.keys, keys) and torch.equal(cb.values, values)
    assert [cb.get_labels(i)[0] for i in cb.ids] == labels


def greedy(ed, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return ed.generate(**enc, max_new_tokens=2, do_sample=False)


@pytest.fixture
def edited():
    tok = tm.tokenizer("left")
    ed = HoReNEditor(tm.model("llama", layers=3, seed=40), tok,
                     HoReNConfig(layer=1, n_iter=20, hopfield_key_match_threshold=0.999))
    ed.edit_many(FIRST, progress=False)
    return ed, tok


class Fail(Exception):
    pass


def fail_on_call(module, n, action):
    """A forward hook on a real block that runs ``action`` at its n-th call."""
    calls = [0]

    def hook(mod, args, out):
        calls[0] += 1
        if calls[0] == n:
            action()
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("batch_size,call", [(1, 60), (16, 12)])
def test_an_exception_mid_training_leaves_the_codebook_exactly_as_before(edited, batch_size, call):
    ed, tok = edited
    snap, before = snapshot(ed.codebook), greedy(ed, tok, [p for p, _ in FIRST] + OTHER)

    def boom():
        raise Fail("simulated out of memory")
    block = ed.model.model.layers[2]
    # batch 16: 1 first pass, then 21 training passes for all four edits; batch 1: 4 first passes,
    # then 21 training passes per edit: call 60 is inside the third edit's, two edits already stored
    handle = fail_on_call(block, call, boom)
    try:
        with pytest.raises(Fail):
            ed.edit_many(SECOND, progress=False, batch_size=batch_size)
    finally:
        handle.remove()
    assert_same(ed.codebook, snap)
    assert torch.equal(greedy(ed, tok, [p for p, _ in FIRST] + OTHER), before)
    # and the editor goes on working: the replacement now goes through
    results = ed.edit_many(SECOND, progress=False, batch_size=batch_size)
    assert [r.action for r in results] == ["reused", "replaced", "added", "added"]
    assert results[1].id == snap[0][1]


def test_a_real_sigint_mid_training_rolls_back(edited):
    ed, tok = edited
    snap = snapshot(ed.codebook)
    handle = fail_on_call(ed.model.model.layers[2], 10, lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        with pytest.raises(KeyboardInterrupt):
            ed.edit_many(SECOND, progress=False)
    finally:
        handle.remove()
    assert_same(ed.codebook, snap)


def test_a_bad_later_record_undoes_the_edits_already_trained(edited):
    ed, tok = edited
    snap = snapshot(ed.codebook)
    with pytest.raises(ValueError, match="non-empty prompt and target"):
        ed.edit_many(SECOND[:2] + [("", "x")], progress=False, batch_size=1)   # 2 trained first
    assert_same(ed.codebook, snap)
    with pytest.raises(ValueError, match="max_length"):
        ed.edit_many(SECOND[:3] + [("the " * 600, "Rome")], progress=False, batch_size=2)
    assert_same(ed.codebook, snap)


def test_generate_while_another_thread_edits(edited):
    """Generation from one thread while another edits: every answer is the unedited model's for
    prompts no edit touches, and no call raises (without the lock, generation ran through the
    edit's replayed blocks and training state)."""
    ed, tok = edited
    expected = greedy(ed, tok, OTHER)
    errors, answers = [], []

    def editing():
        try:
            ed.edit_many(SECOND, progress=False, batch_size=1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=editing)
    worker.start()
    while worker.is_alive() or len(answers) < 2:   # at least one answer during the edit, one after
        answers.append(greedy(ed, tok, OTHER))
    worker.join()
    assert not errors
    assert len(answers) >= 2 and all(torch.equal(a, expected) for a in answers)
    assert len(ed) == len(FIRST) + 2


def test_two_threads_editing_one_editor_lose_nothing(edited):
    ed, tok = edited
    errors = []
    batches = [[("the capital of Italy is", "Paris"), ("Newton was born in", "Berlin")],
               [("the capital of Japan is", "Madrid"), ("Darwin was born in", "Tokyo")]]

    def run(records):
        try:
            ed.edit_many(records, progress=False)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(ed) == len(FIRST) + 4 and len(set(ed.codebook.ids)) == len(ed)


def test_a_deep_copy_of_an_edited_model_has_its_own_edits_and_lock(edited):
    import copy

    ed, tok = edited
    model = ed.model
    model.__dict__["horen_editor"] = ed          # as the EasyEdit adapter keeps it
    try:
        twin = copy.deepcopy(model)
    finally:
        del model.__dict__["horen_editor"]
    other = twin.__dict__["horen_editor"]
    assert other is not ed and other.model is twin and other.lock is not ed.lock
    assert other.codebook is not ed.codebook and other.codebook.ids == ed.codebook.ids
    assert other.trainer.model is twin and other.adapter is twin.model.layers[1].mlp.down_proj
    before = greedy(ed, tok, OTHER + [p for p, _ in FIRST])
    other.edit_many(SECOND, progress=False)
    assert len(other) == len(FIRST) + 2 and len(ed) == len(FIRST)
    assert torch.equal(greedy(ed, tok, OTHER + [p for p, _ in FIRST]), before)
    other.detach()
    assert ed.attached and ed.model.model.layers[1].mlp.down_proj is ed.adapter
