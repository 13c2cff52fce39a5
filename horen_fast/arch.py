"""Where HoReN sits in each model architecture: one ``Arch`` entry per ``config.model_type``.

An entry says where the decoder blocks are, which module inside a block is the MLP output
projection (the layer HoReN wraps), whether it is GPT-2's Conv1D, whether the logits are a plain
linear head on the base model's output, whether an edit's training pass may reuse the prompt's KV
cache, and the default layer. Adding an architecture is one ``ARCHS`` entry (or ``register``).

A model whose ``model_type`` is not registered is matched by structure against the registered
layouts (the first whose block list and projection exist), with the cautious settings: no plain-
head shortcut. Everything else in horen-fast asks this module, never a model type of its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = ["Arch", "ARCHS", "register", "arch_of", "layer_dims", "default_layer", "layer_path",
           "resolve_layer", "block_of", "get_module"]


@dataclass(frozen=True)
class Arch:
    blocks: str                  # module path of the decoder-block list (an nn.ModuleList)
    mlp_out: str                 # the MLP output projection inside one block
    conv1d: bool = False         # the projection is GPT-2's Conv1D (weight [in, out]), not nn.Linear
    plain_head: bool = True      # logits == lm_head(base_model(...).last_hidden_state) exactly
    prefix_cache: bool = True    # an edit's training pass may reuse the prompt prefix's KV cache
    default_depth: float = 0.5   # default layer = int(default_depth * number of decoder layers)


_LLAMA = Arch("model.layers", "mlp.down_proj")

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "phi3": _LLAMA,
    "olmo": _LLAMA, "olmo2": _LLAMA, "smollm3": _LLAMA, "gemma": _LLAMA, "stablelm": _LLAMA,
    "gemma2": Arch("model.layers", "mlp.down_proj", plain_head=False),   # final logit soft-capping
    "gpt2": Arch("transformer.h", "mlp.c_proj", conv1d=True),
    "gpt_neox": Arch("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "phi": Arch("model.layers", "mlp.fc2"),
    "gptj": Arch("transformer.h", "mlp.fc_out"),
    "bloom": Arch("transformer.h", "mlp.dense_4h_to_h"),
    "falcon": Arch("transformer.h", "mlp.dense_4h_to_h"),
}
# Not registered: OPT (its decoder layers flatten the tokens to [B*T, d] before fc1/fc2, and the
# adapter reads [B, T, d]).


def register(model_type: str, arch: Arch) -> None:
    """Add (or replace) the entry of ``model_type``."""
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be a horen_fast.arch.Arch, got {type(arch).__name__}")
    ARCHS[model_type] = arch


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and re.fullmatch(r"-?\d+", part):
            idx = int(part)
            if not -len(mod) <= idx < len(mod):
                raise IndexError(part)
            mod = mod[idx]
        else:
            mod = getattr(mod, part)
    return mod


def _model_type(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def arch_of(model: nn.Module) -> Arch | None:
    """The entry of ``model``'s model_type; else the first registered layout its modules have
    (cautious: ``plain_head=False``); else None."""
    arch = ARCHS.get(_model_type(model))
    if arch is not None:
        return arch
    for known in dict.fromkeys(ARCHS.values()):
        try:
            blocks = _get(model, known.blocks)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                _get(blocks[0], known.mlp_out)
        except (AttributeError, IndexError):
            continue
        return Arch(known.blocks, known.mlp_out, conv1d=known.conv1d, plain_head=False,
                    prefix_cache=known.prefix_cache, default_depth=known.default_depth)
    return None


def layer_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(input width, output width, is_conv1d) of a linear layer: nn.Linear, or GPT-2's Conv1D
    (weight stored transposed, [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        nx, nf = module.weight.shape
        return int(nx), int(nf), True
    raise TypeError(f"HoReN wraps a linear layer (nn.Linear or GPT-2 Conv1D); the chosen layer is "
                    f"{type(module).__name__}. Point layer= at the MLP output projection "
                    f"(e.g. model.layers.15.mlp.down_proj)")


def default_layer(model) -> int:
    """The index of the decoder layer whose MLP output projection HoReN edits by default:
    ``int(default_depth * n_layers)`` of the model's entry (the middle layer; 15 of SmolLM2-135M's
    30). ``model`` is a model or its config. The published runs chose near-last layers for 8B
    models (layer 29 of 32 for Llama-3.1-8B, 27 of 28 for DeepSeek-R1-Distill-Qwen-1.5B); pass your own when you know better."""
    cfg = getattr(model, "config", model)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cannot tell how many layers {type(model).__name__} has "
                         f"(no config.num_hidden_layers / n_layer); pass the layer yourself")
    arch = ARCHS.get(getattr(cfg, "model_type", None))
    depth = arch.default_depth if arch is not None else 0.5
    return min(n - 1, int(depth * n))


def layer_path(model: nn.Module, layer: str | int) -> str:
    """The module path of ``layer``: a module path as given, or a decoder layer index resolved with
    the model's entry (``model.layers.{i}.mlp.down_proj`` for Llama, ``transformer.h.{i}.mlp.c_proj``
    for GPT-2, ...)."""
    if not isinstance(layer, int):
        return layer
    arch = arch_of(model)
    if arch is None:
        raise ValueError(f"cannot resolve layer index {layer} for {type(model).__name__} (model_type "
                         f"{_model_type(model)!r} is not in horen_fast.arch.ARCHS): give the module "
                         f"path of the MLP output projection instead (layer='...down_proj'), or "
                         f"register the architecture with horen_fast.arch.register")
    blocks = _get(model, arch.blocks)
    n = len(blocks)
    if not -n <= layer < n:
        raise ValueError(f"layer index {layer} is out of range: the model has {n} decoder "
                         f"layers ({arch.blocks}.0 .. {arch.blocks}.{n - 1})")
    return f"{arch.blocks}.{layer % n}.{arch.mlp_out}"


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` (list indices as numbers); ValueError when missing."""
    try:
        return _get(model, path)
    except (AttributeError, IndexError):
        raise ValueError(f"the model ({type(model).__name__}) has no module {path!r}") from None


def resolve_layer(model: nn.Module, layer: str | int) -> tuple[str, nn.Module]:
    """(module path, module) of ``layer`` (see ``layer_path``); TypeError for a non-linear module."""
    path = layer_path(model, layer)
    module = get_module(model, path)
    layer_dims(module)
    return path, module


def block_of(model: nn.Module, path: str) -> tuple[nn.ModuleList | None, int | None]:
    """The decoder-block list containing the module at ``path`` and the block's index (None, None
    when ``path`` is not inside a ModuleList)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if re.fullmatch(r"\d+", parts[i]):
            parent = _get(model, ".".join(parts[:i]))
            if isinstance(parent, nn.ModuleList):
                return parent, int(parts[i])
    return None, None

