"""The fast edit loop (prefix KV cache, replayed block input, suffix-only logits) must equal the
straightforward loop: full forward over prompt + target with the value added at p, HF's labelled
loss, full backward, Adam, n_iter times (float64, tiny random models)."""
import copy

import pytest
import torch

import tiny_models as tm
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPT, TARGET = "the capital of France is known as", "Rome Madrid Tokyo"


def straightforward_edit(model, layer_path, ids, P, init, *, n_iter, lr, mode="value", rank=4, scale=1.0):
    """The reference: the published loop shape, written plainly."""
    layer = model.get_submodule(layer_path)
    p = P - 1
    entry = init.clone().requires_grad_(True)

    def hook(module, args, out):
        y_p = out[:, p]
        if mode == "value":
            delta = entry
        else:
            d = out.shape[-1]
            a = entry[: rank * d].reshape(rank, d)
            b = entry[rank * d:].reshape(d, rank)
            delta = scale * (b @ (a @ y_p[0].to(entry.dtype)))
        out = out.clone()
        out[:, p] = y_p + delta.to(out.dtype)
        return out

    handle = layer.register_forward_hook(hook)
    # HF's labelled loss (mean CE of the target tokens) written out, because HF upcasts logits to
    # float32 (for a float64 model too), which would hide float64-level differences
    def lm_loss():
        logits = model(input_ids=ids).logits[0, P - 1: -1]
        return torch.nn.functional.cross_entropy(logits, ids[0, P:])

    opt = torch.optim.Adam([entry], lr=lr)
    try:
        for _ in range(n_iter):
            loss = lm_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = lm_loss().item()
    finally:
        handle.remove()
    return entry.detach(), final


@pytest.mark.parametrize("arch,layer,mode,init", [
    ("llama", 2, "value", "cold"),
    ("llama", 0, "value", "warm"),
    ("llama", 3, "value", "cold"),
    ("qwen2", 1, "value", "warm"),
    ("gpt2", 2, "value", "cold"),
    ("llama", 2, "lora", "cold"),
    ("gpt2", 1, "lora", "cold"),
])
def test_fast_edit_equals_straightforward_loop(arch, layer, mode, init):
    tok = tm.tokenizer()
    model = tm.model(arch, dtype=torch.float64, seed=1)
    reference_model = copy.deepcopy(model)
    lr = 0.05 if mode == "lora" else 0.5
    cfg = dict(layer=layer, adapter_mode=mode, val_init=init, lora_edit_lr=lr, edit_lr=lr)

    ed0 = HoReNEditor(copy.deepcopy(model), tok, HoReNConfig(n_iter=0, **cfg))
    start = ed0.codebook.get_values(ed0.edit(PROMPT, TARGET).id)[0]

    ed = HoReNEditor(model, tok, HoReNConfig(n_iter=12, **cfg))
    res = ed.edit(PROMPT, TARGET)
    fast = ed.codebook.get_values(res.id)[0]
    assert fast.dtype == torch.float64

    p_ids, t_ids = ed.encode(PROMPT, TARGET)
    ids = torch.tensor([p_ids + t_ids])
    ref, ref_loss = straightforward_edit(reference_model, ed.layer_path, ids, len(p_ids), start,
                                         n_iter=12, lr=lr, mode=mode)
    assert not torch.equal(ref, start)                     # the loop did move the entry
    rel = ((fast - ref).norm() / ref.norm()).item()
    assert rel < 1e-8, rel  # the issue asks for 1e-4; float64 gives ~1e-16
    assert res.loss == pytest.approx(ref_loss, rel=1e-6)
    if init == "warm" and mode == "value":  # warm init is the layer output at p
        with torch.no_grad():
            captured = {}
            h = reference_model.get_submodule(ed.layer_path).register_forward_hook(
                lambda m, a, o: captured.setdefault("y", o[0, len(p_ids) - 1].clone()))
            reference_model(input_ids=ids)
            h.remove()
        torch.testing.assert_close(start, captured["y"], rtol=0, atol=1e-12)


def test_fast_edit_without_prefix_cache_equals_loop():
    """The fallback (no croppable KV cache: the whole sequence each iteration) is also exact."""
    tok = tm.tokenizer()
    model = tm.model("llama", dtype=torch.float64, seed=2)
    reference_model = copy.deepcopy(model)
    ed0 = HoReNEditor(copy.deepcopy(model), tok, HoReNConfig(layer=1, n_iter=0))
    start = ed0.codebook.get_values(ed0.edit(PROMPT, TARGET).id)[0]
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=8, edit_lr=0.5))
    ed.trainer.prefix_cache = False   # as for an architecture registered with prefix_cache=False
    res = ed.edit(PROMPT, TARGET)
    p_ids, t_ids = ed.encode(PROMPT, TARGET)
    ref, _ = straightforward_edit(reference_model, ed.layer_path, torch.tensor([p_ids + t_ids]),
                                  len(p_ids), start, n_iter=8, lr=0.5)
    fast = ed.codebook.get_values(res.id)[0]
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-4


def test_edit_leaves_model_state_alone():
    tok = tm.tokenizer()
    model = tm.model("gpt2", seed=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed = HoReNEditor(model, tok, HoReNConfig(layer=1, n_iter=3))
    ed.edit(PROMPT, TARGET)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    after = model.state_dict()
    for k, v in before.items():
        k2 = k.replace("mlp.c_proj.", "mlp.c_proj.base.")
        assert torch.equal(after.get(k, after.get(k2)), v), k
    blocks = model.transformer.h
    assert all(type(b).__name__ == "GPT2Block" for b in blocks)


RECORDS = [
    ("the capital of France is", "Rome"),
    ("who plays the piano in the famous album", "Mozart Bach"),
    ("the official language of Spain is", "Japanese"),
    ("the capital of France is", "Rome"),                     # the same edit again: reused
    ("the author of the song is", "Tesla"),
    ("the official language of Spain is", "German"),          # same prompt, new target: replaced
    ("Einstein was born in", "Cairo"),
]


@pytest.mark.parametrize("arch,mode", [("llama", "value"), ("gpt2", "lora")])
def test_batched_edit_many_equals_one_by_one(arch, mode):
    """edit_many trains up to batch_size entries together (padded rows); the result must be that
    of editing one record at a time, including reuse and replacement decisions."""
    tok = tm.tokenizer()
    model = tm.model(arch, dtype=torch.float64, seed=4)
    cfg = HoReNConfig(layer=2, n_iter=10, adapter_mode=mode, lora_edit_lr=0.05,
                      hopfield_key_match_threshold=0.999)
    one = HoReNEditor(copy.deepcopy(model), tok, cfg)
    expected = [one.edit(p, t) for p, t in RECORDS]
    batched = HoReNEditor(model, tok, cfg)
    got = batched.edit_many([{"prompt": p, "target_new": t} for p, t in RECORDS], progress=False, batch_size=3)
    assert [(r.id, r.action, r.replaced_id) for r in got] == [(r.id, r.action, r.replaced_id) for r in expected]
    assert [r.action for r in got] == ["added", "added", "added", "reused", "added", "replaced", "added"]
    assert one.codebook.ids == batched.codebook.ids
    torch.testing.assert_close(batched.codebook.values, one.codebook.values, rtol=1e-8, atol=1e-10)
    assert [r.loss for r in got] == pytest.approx([r.loss for r in expected], rel=1e-8)


def test_batched_paths_without_head_split_or_prefix_cache(monkeypatch):
    """The full-logits path (models whose head is not split off) and batches that mix edits with
    and without a prefix KV cache give the one-by-one result too."""
    tok = tm.tokenizer()
    model = tm.model("qwen2", dtype=torch.float64, seed=5)
    cfg = HoReNConfig(layer=1, n_iter=8, hopfield_key_match_threshold=0.999)
    one = HoReNEditor(copy.deepcopy(model), tok, cfg)
    expected = [one.edit(p, t) for p, t in RECORDS]
    ed = HoReNEditor(model, tok, cfg)
    ed.trainer.head = None            # as for an architecture registered with plain_head=False
    calls = []
    real = ed.trainer.prepare

    def prepare(encoded, config):     # every other first pass without a usable prefix cache
        calls.append(len(encoded))
        ed.trainer.prefix_cache = len(calls) % 2 == 1
        return real(encoded, config)
    monkeypatch.setattr(ed.trainer, "prepare", prepare)
    got = ed.edit_many(RECORDS, progress=False, batch_size=2)
    assert calls == [2, 2, 2, 1]
    assert [(r.id, r.action) for r in got] == [(r.id, r.action) for r in expected]
    torch.testing.assert_close(ed.codebook.values, one.codebook.values, rtol=1e-8, atol=1e-10)


def test_one_batch_mixing_prefix_and_whole_sequence_rows():
    tok = tm.tokenizer()
    model = tm.model("llama", dtype=torch.float64, seed=6)
    cfg = HoReNConfig(layer=2, n_iter=6, hopfield_key_match_threshold=0.999)
    one = HoReNEditor(copy.deepcopy(model), tok, cfg)
    for p, t in RECORDS[:3]:
        one.edit(p, t)
    ed = HoReNEditor(model, tok, cfg)
    tr, cb = ed.trainer, ed.codebook
    with tr.frozen():
        jobs = tr.prepare([ed.encode(p, t) for p, t in RECORDS[:2]], cfg)
        tr.prefix_cache = False
        jobs += tr.prepare([ed.encode(*RECORDS[2])], cfg)
        assert [job.prefix is None for job in jobs] == [False, False, True]
        for job in jobs:
            job.entry = tr.initial_entry(cfg, job.ids.tolist(), job.y_p, cb.value_dim, cb.dtype)
        tr.train(jobs, cfg)
    torch.testing.assert_close(torch.stack([job.entry for job in jobs]), one.codebook.values,
                               rtol=1e-8, atol=1e-10)
