"""Early stopping of an edit's optimization (HoReNConfig.early_stop_margin, training.Trainer.train):
a row stops once every target token is the argmax of its logits by the margin, n_iter stays the
cap, rows of a batch stop independently, and a stopped row's entry never moves again."""
import copy

import pytest
import torch

import tiny_models as tm
from horen_fast.config import HoReNConfig
from horen_fast.editor import HoReNEditor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDITS = [("the capital of France is known as", "Rome Madrid"),
         ("Einstein was born in", "Cairo"),
         ("the author of the song is", "Tesla Edison Tokyo"),
         ("the official language of Spain is", "German")]


def reference(model, layer_path, ids, P, init, *, n_iter, lr, margin):
    """Plain loop: full forward over prompt + target with the value added at p; before each Adam
    step, stop if every target token's logit beats every other logit by ``margin``."""
    layer = model.get_submodule(layer_path)
    entry = init.clone().requires_grad_(True)

    def hook(module, args, out):
        out = out.clone()
        out[:, P - 1] = out[:, P - 1] + entry.to(out.dtype)
        return out

    handle = layer.register_forward_hook(hook)
    opt = torch.optim.Adam([entry], lr=lr)
    steps = 0
    try:
        for _ in range(n_iter):
            logits = model(input_ids=ids).logits[0, P - 1: -1]
            target = ids[0, P:]
            top2 = logits.topk(2, dim=1)
            gap = torch.where(top2.indices[:, 0] == target, top2.values[:, 0] - top2.values[:, 1],
                              logits.gather(1, target[:, None])[:, 0] - top2.values[:, 0])
            if margin is not None and bool((gap >= margin).all()):
                break
            loss = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    finally:
        handle.remove()
    return entry.detach(), steps


def jobs_for(editor, edits, cfg):
    """The editor's own first pass and starting entries for ``edits`` (none stored)."""
    tr = editor.trainer
    jobs = tr.prepare([editor.encode(p, t) for p, t in edits], cfg)
    for job in jobs:
        job.entry = tr.initial_entry(cfg, job.ids.tolist(), job.y_p, editor.codebook.value_dim,
                                     editor.codebook.dtype)
    return jobs


@pytest.mark.parametrize("arch,margin", [("llama", 0.5), ("gpt2", 0.1)])
def test_an_edit_stops_where_the_plain_loop_stops(arch, margin):
    tok = tm.tokenizer()
    model = tm.model(arch, dtype=torch.float64, seed=3)
    cfg = HoReNConfig(layer=2, n_iter=40, edit_lr=0.5, early_stop_margin=margin)
    ed = HoReNEditor(copy.deepcopy(model), tok, cfg)
    seen = []
    for prompt, target in EDITS:
        with ed.trainer.frozen():
            (job,) = jobs_for(ed, [(prompt, target)], cfg)
            init = job.entry.clone()
            ed.trainer.train([job], cfg)
        p_ids, t_ids = ed.encode(prompt, target)
        want, steps = reference(model, ed.layer_path, torch.tensor([p_ids + t_ids]), len(p_ids), init,
                                n_iter=cfg.n_iter, lr=cfg.lr, margin=cfg.early_stop_margin)
        assert job.iterations == steps
        torch.testing.assert_close(job.entry, want, rtol=1e-7, atol=1e-9)
        seen.append(steps)
    assert min(seen) < cfg.n_iter == max(seen), f"the test needs edits that stop early and at the cap: {seen}"


def test_rows_of_a_batch_stop_independently_and_stopped_rows_do_not_move():
    tok = tm.tokenizer()
    model = tm.model("llama", dtype=torch.float64, seed=3)
    cfg = HoReNConfig(layer=2, n_iter=40, edit_lr=0.5, early_stop_margin=0.5)
    ed = HoReNEditor(model, tok, cfg)
    with ed.trainer.frozen():
        alone = []
        for edit in EDITS:
            (job,) = jobs_for(ed, [edit], cfg)
            ed.trainer.train([job], cfg)
            alone.append(job)
        batch = jobs_for(ed, EDITS, cfg)
        ed.trainer.train(batch, cfg)
    its = [job.iterations for job in batch]
    assert len(set(its)) > 1, f"the rows should stop at different steps, got {its}"
    assert its == [job.iterations for job in alone]
    for a, b in zip(alone, batch):
        torch.testing.assert_close(b.entry, a.entry, rtol=1e-7, atol=1e-9)
        assert b.loss == pytest.approx(a.loss, rel=1e-7)


def test_n_iter_is_the_cap_and_no_margin_means_every_step():
    tok = tm.tokenizer()
    model = tm.model("llama", dtype=torch.float64, seed=3)
    capped = HoReNConfig(layer=2, n_iter=7, edit_lr=0.5, early_stop_margin=1e6)
    plain = HoReNConfig(layer=2, n_iter=7, edit_lr=0.5)
    ed = HoReNEditor(model, tok, plain)
    with ed.trainer.frozen():
        a = jobs_for(ed, EDITS[:2], capped)
        b = jobs_for(ed, EDITS[:2], plain)
        ed.trainer.train(a, capped)
        ed.trainer.train(b, plain)
    assert [j.iterations for j in a] == [j.iterations for j in b] == [7, 7]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.entry, y.entry, rtol=0, atol=0)
        assert x.loss == y.loss


def test_a_reused_entry_that_already_works_takes_no_step():
    tok = tm.tokenizer()
    model = tm.model("llama", dtype=torch.float64, seed=3)
    cfg = HoReNConfig(layer=2, n_iter=40, edit_lr=0.5, early_stop_margin=0.5)
    ed = HoReNEditor(model, tok, cfg)
    first = ed.edit(*EDITS[1])   # stops after 12 steps (see the batch test)
    before = ed.codebook.get_values(first.id).clone()
    again = ed.edit(*EDITS[1])
    assert again.action == "reused" and again.id == first.id
    torch.testing.assert_close(ed.codebook.get_values(first.id), before, rtol=0, atol=0)
    assert again.loss == pytest.approx(first.loss, rel=1e-9)


@pytest.mark.parametrize("bad", [-0.5, "x", float("nan"), True])
def test_a_bad_margin_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="early_stop_margin"):
        HoReNConfig(layer=2, early_stop_margin=bad)


def test_the_margin_round_trips_through_yaml(tmp_path):
    cfg = HoReNConfig(layer=2, early_stop_margin="1.5")
    assert cfg.early_stop_margin == 1.5
    cfg.to_yaml(tmp_path / "c.yaml")
    assert HoReNConfig.from_yaml(tmp_path / "c.yaml").early_stop_margin == 1.5
    assert HoReNConfig(layer=2).early_stop_margin is None
