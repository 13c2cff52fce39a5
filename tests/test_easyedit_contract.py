"""The contract EasyEdit's own code relies on, exercised with EasyEdit's call shapes on a tiny random
Llama (no EasyEdit import: its package pulls dependencies that do not install quickly;
bench/easyedit_run.py runs EasyEdit's real BaseEditor).

The call shapes, as EasyEdit's code makes them (easyeditor/editors/editor.py, editors/utils.py,
evaluate/evaluate.py and evaluate/evaluate_utils.py):
- edit_requests: ``apply_algo(self.model, tok, [request], hparams, copy=False,
  return_orig_weights=True, keep_original_weight=False, train_ds=None)`` per request; metrics on
  the model it returns; with ``sequential_edit=False``, ``restore_after_edit``: ``weights_copy()``
  for its CALLABLE_RESTORE_ALGS, else a weight copy of every ``weights_copy.items()`` pair;
- normal_edit: the same weight-copy loop right after one call with all requests;
- default scoring (test_prediction_acc): one teacher-forced forward over ``prompt + " " + target``
  (left padding), argmax at positions prompt_len-1 .. -2 against the tokens after the prompt,
  where prompt_len = padding + non-padding tokens of the prompt alone; locality: the argmax tokens
  before and after editing must agree;
- vanilla generation (GRACE, and HOREN in the published fork): ``model.generate(input_ids,
  attention_mask, max_new_tokens=len(target tokens), do_sample=False, use_cache=False)``.
"""
import warnings

import numpy as np
import pytest
import torch

import tiny_models as tm
from horen_fast import inference
from horen_fast.easyedit import EDITOR_ATTR, HoReNHyperParams, Restore, apply_horen_to_model, as_config, register

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HPARAMS = dict(alg_name="HOREN", model_name="tiny", device="cpu", inner_params=["model.layers[2].mlp.down_proj.weight"],
               n_iter=30, edit_lr=1.0, adapter_mode="value", val_init="cold", normalize_codebook_keys=True,
               query_selection_strategy="last_60_perc_prompt_tokens_avg", hopfield_retrieval_alpha=0.1,
               hopfield_retrieval_beta=20.0, hopfield_retrieval_eps=1e-5, hopfield_retrieval_max_iter=1,
               hopfield_key_match_threshold=0.85, batch_size=1, max_length=64,
               # EasyEdit's own keys: accepted with a warning
               model_parallel=False, fp16=False, evaluation_type="teacher-forcing")


def requests():
    """Requests as EasyEdit's _prepare_requests builds them (one locality prompt each)."""
    rows = [("the capital of France is", "Tokyo", "Paris", "which city is the capital of France",
             "the song was written by", "Mozart"),
            ("the language of Egypt is", "Japanese", "Arabic", "what language is spoken in Egypt",
             "the film was directed by", "Newton"),
            ("Einstein plays", "violin", "chess", "what does Einstein play",
             "who lives in Berlin", "Curie")]
    return [{"prompt": p, "target_new": t, "ground_truth": g, "portability": {}, "rephrase_prompt": r,
             "locality": {"neighborhood": {"prompt": lp, "ground_truth": la}}}
            for p, t, g, r, lp, la in rows]


@pytest.fixture
def lm():
    return tm.model("llama"), tm.tokenizer()


@pytest.fixture
def hp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HoReNHyperParams(**HPARAMS)


def teacher_forced(model, tok, hparams, prompts, targets, locality=False):
    """EasyEdit's default (teacher-forced) scoring, as test_prediction_acc computes it."""
    if isinstance(prompts, str):
        prompts, targets = [prompts], [targets]
    joined = [p + " " + t for p, t in zip(prompts, targets)]
    longest = max(len(tok.encode(s)) for s in joined) + 1
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(joined, padding=True, truncation=True, max_length=max(hparams.max_length, longest),
                  return_tensors="pt")
        alone = tok(prompts, padding=True, truncation=True, max_length=max(hparams.max_length, longest),
                    return_tensors="pt")
    finally:
        tok.padding_side = side
    prompt_len = [int((a != tok.pad_token_id).sum()) + int((j == tok.pad_token_id).sum())
                  for a, j in zip(alone["input_ids"], enc["input_ids"])]
    with torch.no_grad():
        answers = model(**enc).logits.argmax(-1).tolist()
    labels = enc["input_ids"].tolist()
    answers = [a[n - 1:-1] for a, n in zip(answers, prompt_len)]
    labels = [lab[n:] for lab, n in zip(labels, prompt_len)]
    if locality:
        return answers
    return [float(np.mean(np.equal(a, lab))) for a, lab in zip(answers, labels)]


def vanilla(model, tok, prompt, target, locality=False):
    """The published harness's cache-free greedy generation (vanilla_generation=True)."""
    want = tok.encode(target, add_special_tokens=False)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=len(want), pad_token_id=tok.eos_token_id, do_sample=False,
                         use_cache=False)
    got = out[0].tolist()[-len(want):]
    return got if locality else float(np.mean(np.equal(want, got)))


def quality(model, tok, hparams, req):
    loc = req["locality"]["neighborhood"]
    return {"rewrite_acc": teacher_forced(model, tok, hparams, req["prompt"], req["target_new"]),
            "vanilla_acc": vanilla(model, tok, req["prompt"], req["target_new"]),
            "loc_tokens": teacher_forced(model, tok, hparams, loc["prompt"], loc["ground_truth"], locality=True),
            "loc_generated": vanilla(model, tok, loc["prompt"], loc["ground_truth"], locality=True)}


def call(apply, model, tok, reqs, hparams):
    return apply(model, tok, reqs, hparams, copy=False, return_orig_weights=True,
                 keep_original_weight=False, train_ds=None)


def test_sequential_edit_scores_the_edits_with_easyedits_own_metrics(lm, hp):
    model, tok = lm
    reqs = requests()
    pre = [quality(model, tok, hp, r) for r in reqs]
    assert all(p["rewrite_acc"] == [0.0] and p["vanilla_acc"] == 0.0 for p in pre)
    for i, req in enumerate(reqs):            # edit_requests(..., sequential_edit=True)
        edited, weights_copy = call(apply_horen_to_model, model, tok, [req], hp)
        assert edited is model and isinstance(weights_copy, Restore)
        post = quality(edited, tok, hp, req)
        assert post["rewrite_acc"] == [1.0] and post["vanilla_acc"] == 1.0
        assert post["loc_tokens"] == pre[i]["loc_tokens"]           # locality 1.0
        assert post["loc_generated"] == pre[i]["loc_generated"]
    assert len(getattr(model, EDITOR_ATTR)) == len(reqs)
    for req in reqs:                                                 # earlier edits still hold
        assert quality(model, tok, hp, req)["rewrite_acc"] == [1.0]


def test_teacher_forcing_without_the_prompt_misses_the_edit(lm, hp):
    """What the issue found: with every token of prompt + target taken as the prompt, the value
    lands on the last target token, whose logits are never scored."""
    model, tok = lm
    req = requests()[0]
    call(apply_horen_to_model, model, tok, [req], hp)
    assert teacher_forced(model, tok, hp, req["prompt"], req["target_new"]) == [1.0]
    getattr(model, EDITOR_ATTR).adapter.known_prompts.clear()
    assert teacher_forced(model, tok, hp, req["prompt"], req["target_new"]) == [0.0]
    assert vanilla(model, tok, req["prompt"], req["target_new"]) == 1.0    # generate stays pinned


def test_batched_teacher_forcing_and_generation(lm, hp):
    model, tok = lm
    reqs = requests()
    for req in reqs:
        call(apply_horen_to_model, model, tok, [req], hp)
    prompts = [r["prompt"] for r in reqs] + ["the river of Spain is"]
    targets = [r["target_new"] for r in reqs] + ["blue"]
    acc = teacher_forced(model, tok, hp, prompts, targets)
    assert acc[:3] == [1.0, 1.0, 1.0]
    enc = tok(prompts, return_tensors="pt", padding=True)
    outs = [model.generate(**enc, max_new_tokens=2, do_sample=False, use_cache=c, pad_token_id=0)
            for c in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert [tok.decode(o[enc["input_ids"].shape[1]]) for o in outs[0][:3]] == targets[:3]


@pytest.mark.parametrize("convention", ["callable", "weight copy"])
def test_non_sequential_edit_restores_in_either_convention(lm, hp, convention):
    model, tok = lm
    enc = tok(["the capital of France is Tokyo"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    for req in requests()[:2]:                 # edit_requests(..., sequential_edit=False)
        edited, weights_copy = call(apply_horen_to_model, model, tok, [req], hp)
        assert quality(edited, tok, hp, req)["rewrite_acc"] == [1.0]
        if convention == "callable":
            with torch.no_grad():
                weights_copy()
        else:
            copied = 0
            for _key, _value in weights_copy.items():
                copied += 1
            assert copied == 0
        assert isinstance(model.model.layers[2].mlp.down_proj, torch.nn.Linear)
        assert EDITOR_ATTR not in model.__dict__ and "generate" not in model.__dict__
        with torch.no_grad():
            assert torch.equal(model(**enc).logits, ref)


def test_normal_edit_shape_edits_all_then_restores(lm, hp):
    """normal_edit: one call with every request, then the weight-copy loop on the same model."""
    model, tok = lm
    edited, weights_copy = call(apply_horen_to_model, model, tok, requests(), hp)
    assert len(getattr(edited, EDITOR_ATTR)) == 3
    with torch.no_grad():
        for _k, _v in weights_copy.items():
            raise AssertionError("nothing to copy back")
    assert EDITOR_ATTR not in model.__dict__


def test_copy_true_edits_a_copy_whose_generate_is_its_own(lm, hp):
    model, tok = lm
    req = requests()[0]
    enc = tok([req["prompt"] + " " + req["target_new"]], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    copied, restore_copy = apply_horen_to_model(model, tok, [req], hp, copy=True)
    assert copied is not model and len(getattr(copied, EDITOR_ATTR)) == 1
    assert EDITOR_ATTR not in model.__dict__ and "generate" not in model.__dict__
    assert copied.__dict__["generate"].editor is getattr(copied, EDITOR_ATTR)
    assert vanilla(copied, tok, req["prompt"], req["target_new"]) == 1.0
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref)
    restore_copy()
    assert "generate" not in copied.__dict__


def test_copy_true_of_an_edited_model_copies_its_edits(lm, hp):
    model, tok = lm
    first, second = requests()[:2]
    apply_horen_to_model(model, tok, [first], hp)
    copied, _ = apply_horen_to_model(model, tok, [second], hp, copy=True)
    assert len(getattr(copied, EDITOR_ATTR)) == 2 and len(getattr(model, EDITOR_ATTR)) == 1
    assert copied.__dict__["generate"].editor is getattr(copied, EDITOR_ATTR)
    assert vanilla(copied, tok, second["prompt"], second["target_new"]) == 1.0
    assert vanilla(model, tok, first["prompt"], first["target_new"]) == 1.0
    assert vanilla(model, tok, second["prompt"], second["target_new"]) == 0.0


def test_a_detached_editor_gives_the_model_its_own_generate_back(lm, hp):
    model, tok = lm
    req = requests()[0]
    apply_horen_to_model(model, tok, [req], hp)
    getattr(model, EDITOR_ATTR).detach()
    assert "generate" not in model.__dict__                  # detach gives the class's generate back
    assert vanilla(model, tok, req["prompt"], req["target_new"]) == 0.0
    apply_horen_to_model(model, tok, [req], hp)           # a detached editor is replaced by a new one
    assert len(getattr(model, EDITOR_ATTR)) == 1 and getattr(model, EDITOR_ATTR).attached


def test_easyedit_keys_are_accepted_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"\['evaluation_type', 'fp16'\]"):
        hp = HoReNHyperParams(**HPARAMS)
    # what EasyEdit's BaseEditor and evaluation read
    assert (hp.alg_name, hp.model_name, hp.device, hp.model_parallel, hp.batch_size) == ("HOREN", "tiny", "cpu", False, 1)
    assert hp.fp16 is False and hp.evaluation_type == "teacher-forcing" and hp.max_length == 64
    assert hp.config.layer == "model.layers.2.mlp.down_proj" and as_config(hp) is hp.config
    assert HoReNHyperParams(inner_params=["model.layers[2].mlp.down_proj.weight"]).model_parallel is False
    with pytest.warns(UserWarning, match="fp16"):
        assert as_config(HPARAMS) == hp.config
    import yaml
    (tmp_path / "horen.yaml").write_text(yaml.safe_dump(HPARAMS))
    with pytest.warns(UserWarning, match="evaluation_type"):
        again = HoReNHyperParams.from_hparams(str(tmp_path / "horen"))     # EasyEdit adds .yaml
    assert again.to_dict() == hp.to_dict()
    with pytest.raises(ValueError, match="not HoReN"):
        HoReNHyperParams(**{**HPARAMS, "alg_name": "ROME"})
    with pytest.raises(FileNotFoundError, match="no HoReN hyper-parameter file"):
        HoReNHyperParams.from_hparams(tmp_path / "missing.yaml")


def test_register_puts_the_method_in_alg_dict():
    alg = {"ROME": object()}
    assert register(alg) is alg and alg["HOREN"] is apply_horen_to_model
    register(alg, name="HOREN-FAST")
    assert alg["HOREN-FAST"] is apply_horen_to_model and len(alg) == 3
    with pytest.raises(ValueError, match="non-empty string"):
        register(alg, name="")
    try:
        import easyeditor  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="easyeditor"):
            register()


def test_prompts_of_requests_become_known(lm, hp):
    model, tok = lm
    req = {**requests()[0], "portability": {"one_hop": {"prompt": ["who lives in Tokyo", "the city of Tokyo is"],
                                                        "ground_truth": [["Japan"], ["Japanese"]]}}}
    apply_horen_to_model(model, tok, [req], hp)
    known = getattr(model, EDITOR_ATTR).adapter.known_prompts
    for p in (req["prompt"], req["rephrase_prompt"], req["locality"]["neighborhood"]["prompt"],
              "who lives in Tokyo", "the city of Tokyo is"):
        assert tok(p)["input_ids"] in known
    assert len(known) == 5
    assert isinstance(model.__dict__["generate"], inference.PinnedGenerate)


def test_chat_templated_prompts_are_known_with_use_chat_template(lm):
    """test_prediction_acc applies the chat template to rewrite prompts when use_chat_template is set."""
    model, tok = lm
    tok.chat_template = "{% for m in messages %}<s> who {{ m['content'] }}{% endfor %}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = HoReNHyperParams(**{**HPARAMS, "use_chat_template": True})
    req = requests()[0]
    apply_horen_to_model(model, tok, [req], hp)
    templated = tok.apply_chat_template([{"role": "user", "content": req["prompt"]}], add_generation_prompt=True,
                                        tokenize=False)
    known = getattr(model, EDITOR_ATTR).adapter.known_prompts
    assert tok(templated)["input_ids"] in known and tok(req["prompt"])["input_ids"] in known
    assert len(known) == 6       # prompt, rephrase, locality; each also templated
