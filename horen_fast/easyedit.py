"""horen-fast as an EasyEdit editing method, driven by EasyEdit's own code without patches.

Register it once, then use EasyEdit as for any method::

    from easyeditor import BaseEditor
    from horen_fast import easyedit, hparams

    easyedit.register()                       # ALG_DICT["HOREN"] = apply_horen_to_model
    hp = easyedit.HoReNHyperParams.from_hparams(hparams.path("llama-3.1-8b"))
    editor = BaseEditor.from_hparams(hp)
    metrics, edited_model, _ = editor.edit(prompts=..., target_new=..., rephrase_prompts=...,
                                           locality_inputs=..., sequential_edit=True)

``apply_horen_to_model`` has the calling convention of EasyEdit's ``apply_<method>_to_model``. It
edits the model in place (``copy=True``: a deep copy) and returns ``(model, weights_copy)``:

* ``model`` is the model itself, with the HoReN adapter on the configured layer and its editor at
  ``model.horen_editor``. Its own forward and generate apply each edit at its prompt's end
  (never at a target or generated token): ``model.generate`` pins the prompt (with and without the KV cache, greedy or sampled,
  batched), and every prompt of the requests it was given (prompt, rephrase_prompt, locality and
  portability prompts) is a known prompt (``inference.KnownPrompts``), so EasyEdit's teacher-forced
  scoring of ``prompt + " " + target`` in one forward pass gets the edit at the prompt's last
  token, not at the last target token. A pass over a row that begins with no known prompt takes
  all its non-padding tokens as the prompt. (Known prompts live on the adapter for the session;
  ``HoReNEditor.save`` does not keep them. EasyEdit's fluency check, ``generate_fast``, runs a
  batch's first pass over the shortest prompt only, so for longer prompts of such a batch the
  edit is not applied at their end.)
* ``weights_copy`` undoes the edits (the original layer back, the editor and the pinned generate
  removed) in either of EasyEdit's restore conventions: called (its ``CALLABLE_RESTORE_ALGS``) or
  through ``weights_copy.items()`` (the weight-copy convention of ``restore_after_edit`` and
  ``normal_edit``): HoReN never changes a weight, so ``items()`` has nothing to copy back; it
  removes the adapter and yields nothing.

Calling ``apply_horen_to_model`` again on the same model adds to the same codebook (EasyEdit's
``sequential_edit=True``); with ``sequential_edit=False`` EasyEdit restores after each request.
Hyper-parameters: a ``HoReNHyperParams``, a HoReNConfig, a dict or YAML path of the published
keys, or any object with those keys as attributes; keys of EasyEdit's own (``evaluation_type``,
``fp16``, ``model_parallel``, ...) are accepted with one warning and ignored by HoReN.

What EasyEdit's code cannot do with a registered method: ``batch_edit`` and ``normal_edit`` assert
``BatchEditor.is_batchable_method(alg_name)``, a fixed list of names in EasyEdit; ``edit`` asserts
``batch_size == 1`` for every other method. Edit many records at once with
``model.horen_editor.edit_many`` (or EasyEdit's ``edit(..., sequential_edit=True)``).

Which EasyEdit metric differs from horen-fast's own evaluation (horen_fast.metrics), and why: EasyEdit's
default ``rewrite_acc`` / ``rephrase_acc`` are teacher-forced (each target token is the argmax
after the gold target tokens before it) and its locality compares those argmax tokens over the
locality prompt + answer before and after editing; horen-fast's Rel / Gen / Loc are greedy
generation (each token after the generated ones; Rel and Gen 0 when the decoded answer
re-encodes to another length). With the edit applied at the same position the two agree on
single-token targets; on longer targets they can differ either way, teacher forcing usually
higher (one wrong token does not derail the ones after it). EasyEdit's vanilla generation
(``test_prediction_acc(..., vanilla_generation=True)``, the published harness's metric for
HOREN: cache-free greedy ``model.generate``) gives horen-fast's Rel / Gen except the re-encoding rule.
bench/easyedit_run.py runs EasyEdit's real code and prints both.
"""
from __future__ import annotations

import copy as _copy
import dataclasses
import os
import warnings
from typing import Any

from . import inference
from .arch import layer_path
from .config import IGNORED_KEYS, HoReNConfig, read_yaml_mapping
from .editor import HoReNEditor

__all__ = ["apply_horen_to_model", "as_config", "register", "HoReNHyperParams", "Restore",
           "request_prompts", "EDITOR_ATTR"]

EDITOR_ATTR = "horen_editor"
_KNOWN_KEYS = frozenset(f.name for f in dataclasses.fields(HoReNConfig)) | {"inner_params"} | IGNORED_KEYS
# EasyEdit's harness keys, with the values its BaseEditor expects when a file leaves them out
_HARNESS_DEFAULTS = {"alg_name": "HOREN", "model_name": None, "device": 0, "model_parallel": False,
                     "batch_size": 1}


def _known_only(data: dict, source: str) -> dict:
    extra = sorted(k for k in data if k not in _KNOWN_KEYS)
    if extra:
        warnings.warn(f"{source}: ignoring key(s) {extra} (EasyEdit's or another method's; HoReN does "
                      f"not use them)", UserWarning, stacklevel=3)
    return {k: v for k, v in data.items() if k in _KNOWN_KEYS}


def _read_yaml(path) -> dict:
    return read_yaml_mapping(path, "HoReN hyper-parameter")


def as_config(hparams) -> HoReNConfig:
    """A HoReNConfig from a HoReNHyperParams, a HoReNConfig, a dict of the published YAML keys, a
    path to such a YAML file, or an object with those keys as attributes (an EasyEdit
    HyperParams). Keys HoReN does not know are ignored with a warning."""
    if isinstance(hparams, HoReNHyperParams):
        return hparams.config
    if isinstance(hparams, HoReNConfig):
        return hparams
    if isinstance(hparams, dict):
        data, source = hparams, "the hparams dict"
    elif isinstance(hparams, (str, os.PathLike)):
        data, source = _read_yaml(hparams), os.fspath(hparams)
    elif dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
        data = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams)}
        source = f"hparams ({type(hparams).__name__})"
    elif hasattr(hparams, "__dict__") and not isinstance(hparams, type):
        data = {k: v for k, v in vars(hparams).items() if not k.startswith("_")}
        source = f"hparams ({type(hparams).__name__})"
    else:
        raise TypeError(f"hparams must be a HoReNHyperParams, a HoReNConfig, a dict, a YAML path or an "
                        f"object with HoReN hyper-parameters as attributes; got {type(hparams).__name__}")
    return HoReNConfig.from_dict(_known_only(data, source), source=source)


class HoReNHyperParams:
    """EasyEdit's hyper-parameter object for HoReN (what ``BaseEditor.from_hparams`` takes).

    Every key given is an attribute, so EasyEdit reads its own keys (``model_name``, ``device``,
    ``model_parallel``, ``batch_size``, ``max_length``, ``evaluation_type``, ``fp16``,
    ``use_chat_template``, ...) where it expects them; ``alg_name``, ``model_name``, ``device``,
    ``model_parallel`` and ``batch_size`` default to "HOREN", None, 0, False and 1. ``config`` is
    the HoReNConfig of the HoReN keys (checked at construction)."""

    def __init__(self, **keys: Any):
        data = {**_HARNESS_DEFAULTS, **keys}
        self.config = HoReNConfig.from_dict(_known_only(data, "HoReNHyperParams"),
                                            source="HoReNHyperParams")
        data.setdefault("max_length", self.config.max_length)
        if "config" in data:
            raise ValueError("HoReNHyperParams: 'config' is not a hyper-parameter name")
        self.__dict__.update(data)

    @classmethod
    def from_hparams(cls, path) -> "HoReNHyperParams":
        """Read a YAML file (EasyEdit's convention: ``.yaml`` may be left out)."""
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(path + ".yaml"):
            path += ".yaml"
        return cls(**_read_yaml(path))

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "config"}

    def __repr__(self) -> str:
        return f"HoReNHyperParams({self.to_dict()!r})"


def register(alg_dict: dict | None = None, name: str = "HOREN") -> dict:
    """Register ``apply_horen_to_model`` as EasyEdit's method ``name`` (its ``ALG_DICT``, from
    ``easyeditor.util.alg_dict`` unless given); returns that dict. ``BaseEditor`` looks the method
    up there by ``hparams.alg_name``."""
    if alg_dict is None:
        try:
            from easyeditor.util.alg_dict import ALG_DICT as alg_dict
        except ImportError as exc:
            raise ImportError(f"register() needs EasyEdit (the easyeditor package) importable, or its "
                              f"ALG_DICT passed as alg_dict= ({exc})") from exc
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    alg_dict[name] = apply_horen_to_model
    return alg_dict


class Restore:
    """The ``weights_copy`` of ``apply_horen_to_model``: undoes the edits (module docstring)."""

    def __init__(self, model, editor: HoReNEditor):
        self.model, self.editor = model, editor

    def __call__(self) -> None:
        """Put the original layer back and drop the editor and the pinned generate from the model."""
        self.editor.detach()
        inference.unpin_generate(self.model)
        if self.model.__dict__.get(EDITOR_ATTR) is self.editor:
            del self.model.__dict__[EDITOR_ATTR]

    def items(self):
        """EasyEdit's weight-copy convention: restore, then nothing to copy back."""
        self()
        return iter(())

    def __repr__(self) -> str:
        return f"Restore({self.editor!r})"


def _request(req) -> dict:
    if not isinstance(req, dict):
        raise TypeError(f"an EasyEdit request is a dict with 'prompt' and 'target_new'; got {req!r}")
    target = req.get("target_new", req.get("target"))
    if isinstance(target, (list, tuple)) and len(target) == 1:
        target = target[0]
    if not isinstance(req.get("prompt"), str) or not isinstance(target, str):
        raise ValueError(f"an EasyEdit request needs a string 'prompt' and a string 'target_new'; "
                         f"got keys {sorted(req)}")
    return {"prompt": req["prompt"], "target": target}


def request_prompts(req: dict) -> list[str]:
    """Every prompt an EasyEdit request will be scored on: prompt, rephrase_prompt, and the
    prompts of its locality and portability entries (a string or a list each)."""
    out = [req.get("prompt"), req.get("rephrase_prompt")]
    for group in ("locality", "portability"):
        for entry in (req.get(group) or {}).values():
            p = entry.get("prompt") if isinstance(entry, dict) else None
            out.extend(p if isinstance(p, (list, tuple)) else [p])
    return [p for p in out if isinstance(p, str) and p]


def _chat(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)


def _same(editor: HoReNEditor, config: HoReNConfig) -> bool:
    """Whether ``config`` describes the editor already installed (same layer, same values)."""
    a, b = editor.config.to_dict(), config.to_dict()
    la, lb = a.pop("layer"), b.pop("layer")
    if a != b:
        return False
    if lb == la or lb == editor.layer_path:
        return True
    return isinstance(lb, int) and layer_path(editor.model, lb) == editor.layer_path


def apply_horen_to_model(model, tok, requests: list[dict], hparams, copy: bool = False,
                         return_orig_weights: bool = False, keep_original_weight: bool = False,
                         **kwargs: Any):
    """Edit ``model`` with every request (sequentially); EasyEdit's calling convention.

    ``requests``: dicts with "prompt" and "target_new"; their "rephrase_prompt", "locality" and
    "portability" prompts become known prompts (module docstring). ``hparams``: see ``as_config``;
    with ``use_chat_template`` true, the chat-templated prompts are known too. ``copy=True`` edits
    a deep copy and leaves ``model`` alone. ``return_orig_weights``, ``keep_original_weight`` and
    other keyword arguments (``train_ds``) are accepted for compatibility: the base weights are
    never modified.

    Returns ``(edited_model, weights_copy)``: the model (``edited_model.horen_editor`` is its
    HoReNEditor) and a ``Restore``."""
    config = as_config(hparams)
    reqs = requests if isinstance(requests, (list, tuple)) else [requests]
    records = [_request(r) for r in reqs]
    if copy:
        model = _copy.deepcopy(model)
    editor = model.__dict__.get(EDITOR_ATTR)
    if editor is not None and not editor.attached:
        del model.__dict__[EDITOR_ATTR]
        editor = None
    if editor is None:
        editor = HoReNEditor(model, tok, config)
        model.__dict__[EDITOR_ATTR] = editor
    elif not _same(editor, config):
        raise ValueError(
            f"this model already carries a HoReN editor with another configuration "
            f"({editor!r}); call the weights_copy returned with it (or model.{EDITOR_ATTR}.detach()) "
            f"before editing with new hyper-parameters")
    editor.edit_many(records, progress=False)
    inference.pin_generate(editor)
    prompts = [p for r in reqs for p in request_prompts(r)]
    chat = hparams.get("use_chat_template") if isinstance(hparams, dict) else getattr(hparams, "use_chat_template", None)
    if chat is True:
        prompts += [_chat(tok, p) for p in prompts]
    with editor.lock:
        editor.adapter.known_prompts.add_texts(tok, prompts)
    return model, Restore(model, editor)
