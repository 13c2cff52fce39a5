"""EasyEdit entry point: ``apply_horen_to_model`` with the calling convention of EasyEdit's
``apply_<method>_to_model`` functions (GRACE, WISE, the published HoReN), so horen-fast can be
registered in EasyEdit's ``ALG_DICT`` in place of the published implementation::

    from horen_fast.easyedit import apply_horen_to_model
    ALG_DICT["HOREN"] = apply_horen_to_model

It returns ``(edited_model, weights_copy)``: ``edited_model`` is the model itself, edited in
place (the HoReN adapter installed on the configured layer), with its editor at
``edited_model.horen_editor``; ``weights_copy`` is a callable that removes the edits and puts the
original layer back (EasyEdit calls it between edits when ``sequential_edit`` is off). Calling
``apply_horen_to_model`` again on the same model adds to the same codebook (sequential editing).
"""
from __future__ import annotations

import copy as _copy
import dataclasses
import os
from typing import Any, Callable

from .config import HoReNConfig
from .editor import HoReNEditor

__all__ = ["apply_horen_to_model", "as_config", "EDITOR_ATTR"]

EDITOR_ATTR = "horen_editor"


def as_config(hparams) -> HoReNConfig:
    """A HoReNConfig from a HoReNConfig, a dict of the published YAML keys, a path to such a YAML
    file, or an object with those keys as attributes (an EasyEdit HyperParams)."""
    if isinstance(hparams, HoReNConfig):
        return hparams
    if isinstance(hparams, dict):
        return HoReNConfig.from_dict(hparams, source="the hparams dict")
    if isinstance(hparams, (str, os.PathLike)):
        return HoReNConfig.from_yaml(hparams)
    if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
        data = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams)}
    elif hasattr(hparams, "__dict__"):
        data = {k: v for k, v in vars(hparams).items() if not k.startswith("_")}
    else:
        raise TypeError(f"hparams must be a HoReNConfig, a dict, a YAML path or an object with "
                        f"HoReN hyper-parameters as attributes; got {type(hparams).__name__}")
    return HoReNConfig.from_dict(data, source=f"hparams ({type(hparams).__name__})")


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


def _same(editor: HoReNEditor, config: HoReNConfig) -> bool:
    """Whether ``config`` describes the editor already installed (same layer, same values)."""
    a, b = editor.config.to_dict(), config.to_dict()
    la, lb = a.pop("layer"), b.pop("layer")
    if a != b:
        return False
    if lb == la or lb == editor.layer_path:
        return True
    blocks, index = editor._blocks, editor._block_index
    return isinstance(lb, int) and blocks is not None and lb % len(blocks) == index


def apply_horen_to_model(model, tok, requests: list[dict], hparams, copy: bool = False,
                         return_orig_weights: bool = False, keep_original_weight: bool = False,
                         **kwargs: Any) -> tuple[Any, Callable[[], None]]:
    """Edit ``model`` with every request (sequentially); EasyEdit's calling convention.

    ``requests``: dicts with "prompt" and "target_new" (other EasyEdit keys such as
    "rephrase_prompt", "locality" and "portability" are for evaluation and are ignored here).
    ``hparams``: see ``as_config``. ``copy=True`` edits a deep copy and leaves ``model`` alone.
    ``return_orig_weights`` and ``keep_original_weight`` are accepted for compatibility: the base
    weights are never modified, and the returned callable restores the original layer.

    Returns ``(edited_model, weights_copy)``; ``edited_model.horen_editor`` is the HoReNEditor
    (its ``edit_many``, ``generate``, ``score``, ``save``, ``forget``), and ``weights_copy()``
    detaches it."""
    config = as_config(hparams)
    reqs = [_request(r) for r in (requests if isinstance(requests, (list, tuple)) else [requests])]
    if copy:
        model = _copy.deepcopy(model)
    editor = model.__dict__.get(EDITOR_ATTR)
    if editor is not None and not editor._attached:
        editor = None
    if editor is None:
        editor = HoReNEditor(model, tok, config)
        model.__dict__[EDITOR_ATTR] = editor
    elif not _same(editor, config):
        raise ValueError(
            f"this model already carries a HoReN editor with another configuration "
            f"({editor!r}); call the weights_copy function returned with it (or "
            f"model.{EDITOR_ATTR}.detach()) before editing with new hyper-parameters")
    editor.edit_many(reqs, progress=False)

    def weights_copy() -> None:
        """Remove the edits: put the original layer back and drop the editor from the model."""
        editor.detach()
        if model.__dict__.get(EDITOR_ATTR) is editor:
            del model.__dict__[EDITOR_ATTR]

    return model, weights_copy
