"""Hyper-parameter files shipped with horen-fast, in the published HoReN key names.

``path(name)`` gives the file of a model, for ``HoReNConfig.from_yaml`` and for EasyEdit
(``horen_fast.easyedit.HoReNHyperParams.from_hparams``)::

    from horen_fast import HoReNConfig, hparams
    config = HoReNConfig.from_yaml(hparams.path("llama-3.1-8b"))

``names()`` lists them: llama-3.1-8b and deepseek-r1-distill-qwen-1.5b (the paper's runs),
smollm2-135m (horen-fast's calibrated layer and threshold for SmolLM2-135M-Instruct).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["path", "names"]

_DIR = Path(__file__).resolve().parent
_ALIASES = {"llama3.1-8b": "llama-3.1-8b", "llama-3.1-8b-instruct": "llama-3.1-8b",
            "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


def names() -> list[str]:
    """The names ``path`` accepts (without aliases), sorted."""
    return sorted(p.stem for p in _DIR.glob("*.yaml"))


def path(name: str) -> Path:
    """The YAML file of ``name`` (case-insensitive; e.g. "llama-3.1-8b", "smollm2")."""
    if not isinstance(name, str):
        raise TypeError(f"hparams.path takes a model name such as 'llama-3.1-8b', got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    file = _DIR / f"{key}.yaml"
    if not file.is_file():
        raise ValueError(f"no shipped hyper-parameter file for {name!r}; the shipped ones are "
                         f"{names()} (or give HoReNConfig.from_yaml a path of your own)")
    return file
