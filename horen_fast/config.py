"""HoReNConfig: every hyper-parameter of the published HoReN runs (horen_fast/hparams/ ships them as YAML), in one dataclass.

Field names are the published YAML keys, plus ``layer`` (the wrapped layer), ``backend`` (the
retrieval backend), ``seed`` (cold initialization) and ``early_stop_margin`` (None: every edit
takes ``n_iter`` Adam steps; a number m: an edit stops once each of its target tokens is the argmax
of the logits by at least m, with ``n_iter`` as the cap; see ``training.Trainer.train``).
``HoReNConfig.from_yaml`` reads the published hyper-parameter files as they are: ``inner_params: [model.layers[29].mlp.down_proj.weight]`` becomes
``layer="model.layers.29.mlp.down_proj"``; GRACE-era keys (eps, dist_fn, eps_expand, num_pert,
replacement) and EasyEdit bookkeeping keys (alg_name, model_name, device, name, batch_size, ...) are
accepted and ignored; any other key is an error.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from .retrieval import check_params

__all__ = ["HoReNConfig", "parse_query_strategy", "normalize_layer_path"]

# Keys of the published files that HoReN does not use (GRACE leftovers) or that belong to the
# EasyEdit harness rather than to the method.
IGNORED_KEYS = frozenset({
    "eps", "dist_fn", "eps_expand", "num_pert", "replacement",              # GRACE-era
    "alg_name", "model_name", "device", "name", "batch_size", "model_parallel",  # EasyEdit harness
    "sequential_edit", "results_dir", "stats_dir", "use_chat_template",
})

ADAPTER_MODES = ("value", "lora", "none")
VAL_INITS = ("cold", "warm")

_STRATEGY = re.compile(r"^(?:(last_prompt_token)|(first_prompt_token)|last_(\d+)_prompt_tokens_avg"
                       r"|last_(\d+(?:\.\d+)?)_perc_prompt_tokens_avg)$")


def parse_query_strategy(strategy: str) -> tuple[str, float]:
    """``(kind, amount)`` for a query selection strategy:
    ("last", 1), ("first", 1), ("last", n) for ``last_{n}_prompt_tokens_avg`` and
    ("perc", p) for ``last_{p}_perc_prompt_tokens_avg``."""
    m = _STRATEGY.match(strategy) if isinstance(strategy, str) else None
    if m is None:
        raise ValueError(
            f"query_selection_strategy {strategy!r} is not understood; use 'last_prompt_token', "
            f"'first_prompt_token', 'last_<n>_prompt_tokens_avg' or 'last_<p>_perc_prompt_tokens_avg' "
            f"(the paper uses 'last_60_perc_prompt_tokens_avg')")
    if m.group(1):
        return "last", 1
    if m.group(2):
        return "first", 1
    if m.group(3):
        n = int(m.group(3))
        if n < 1:
            raise ValueError(f"query_selection_strategy {strategy!r}: n must be >= 1")
        return "last", n
    p = float(m.group(4))
    if not 0 < p <= 100:
        raise ValueError(f"query_selection_strategy {strategy!r}: the percentage must be in (0, 100]")
    return "perc", p


def normalize_layer_path(path: str) -> str:
    """``model.layers[29].mlp.down_proj.weight`` -> ``model.layers.29.mlp.down_proj``."""
    s = re.sub(r"\[(-?\d+)\]", r".\1", path.strip())
    for suffix in (".weight", ".bias"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    if not s or any(part == "" for part in s.split(".")):
        raise ValueError(f"layer path {path!r} is not a module path like 'model.layers.15.mlp.down_proj'")
    return s


def _float(name, v, *, positive=False, lo=None):
    if isinstance(v, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"{name} must be a number, got the string {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v!r}")
    return float(v)


def _int(name, v, *, lo):
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _bool(name, v):
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")
    return v



def read_yaml_mapping(path, what: str = "HoReN config") -> dict:
    """The mapping in a YAML text file, with one-line errors naming the file: missing, a folder,
    not text, not valid YAML, not a mapping."""
    import yaml
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} file at {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; a {what} is a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a text file (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start} is not UTF-8); a {what} is a YAML text file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of hyper-parameters, got {type(data).__name__}")
    return data


@dataclass
class HoReNConfig:
    """HoReN hyper-parameters; defaults are the paper's (Llama-3.1-8B value-mode run),
    except ``bf16`` (False: the editor never casts the model; a loader may read it)."""

    layer: str | int | None = None
    n_iter: int = 50
    edit_lr: float = 1.0
    adapter_mode: str = "value"
    val_init: str = "cold"
    normalize_codebook_keys: bool = True
    query_selection_strategy: str = "last_60_perc_prompt_tokens_avg"
    hopfield_retrieval_alpha: float = 0.1
    hopfield_retrieval_beta: float = 20.0
    hopfield_retrieval_eps: float = 1e-5
    hopfield_retrieval_max_iter: int = 1
    hopfield_key_match_threshold: float = 0.85
    lora_rank: int = 4
    lora_scale: float = 1.0
    lora_edit_lr: float = 1e-3
    bf16: bool = False
    max_length: int = 512
    backend: str = "auto"
    seed: int = 0
    early_stop_margin: float | None = None


    def __post_init__(self):
        if self.layer is None:
            raise ValueError("HoReNConfig needs layer=: a module path such as "
                             "'model.layers.15.mlp.down_proj' or a layer index such as 15")
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, str)):
            raise ValueError(f"layer must be a module path (str) or a layer index (int), got {self.layer!r}")
        if isinstance(self.layer, str):
            self.layer = (int(self.layer) if re.fullmatch(r"-?\d+", self.layer.strip())
                          else normalize_layer_path(self.layer))
        self.n_iter = _int("n_iter", self.n_iter, lo=0)
        self.edit_lr = _float("edit_lr", self.edit_lr, positive=True)
        if self.adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"adapter_mode must be one of {ADAPTER_MODES}, got {self.adapter_mode!r}")
        if self.val_init not in VAL_INITS:
            raise ValueError(f"val_init must be one of {VAL_INITS}, got {self.val_init!r}")
        self.normalize_codebook_keys = _bool("normalize_codebook_keys", self.normalize_codebook_keys)
        if not self.normalize_codebook_keys:
            raise ValueError("normalize_codebook_keys=false (the un-normalized ablation) is not supported: "
                             "horen-fast retrieves on the unit sphere; set it to true")
        parse_query_strategy(self.query_selection_strategy)
        self.hopfield_retrieval_alpha = _float("hopfield_retrieval_alpha", self.hopfield_retrieval_alpha)
        self.hopfield_retrieval_beta = _float("hopfield_retrieval_beta", self.hopfield_retrieval_beta)
        self.hopfield_retrieval_eps = _float("hopfield_retrieval_eps", self.hopfield_retrieval_eps)
        self.hopfield_retrieval_max_iter = _int("hopfield_retrieval_max_iter",
                                                self.hopfield_retrieval_max_iter, lo=0)
        self.hopfield_key_match_threshold = _float("hopfield_key_match_threshold",
                                                   self.hopfield_key_match_threshold)
        if not -1.0 <= self.hopfield_key_match_threshold <= 1.0:
            raise ValueError(f"hopfield_key_match_threshold is a cosine and must be in [-1, 1] (e.g. 0.85), "
                             f"got {self.hopfield_key_match_threshold!r}")
        check_params(**self.retrieval_kwargs(with_backend=False))
        self.lora_rank = _int("lora_rank", self.lora_rank, lo=1)
        self.lora_scale = _float("lora_scale", self.lora_scale)
        self.lora_edit_lr = _float("lora_edit_lr", self.lora_edit_lr, positive=True)
        self.bf16 = _bool("bf16", self.bf16)
        self.max_length = _int("max_length", self.max_length, lo=2)
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a string such as 'auto', 'torch', 'cpp', 'triton', got {self.backend!r}")
        self.seed = _int("seed", self.seed, lo=0)
        if self.early_stop_margin is not None:
            self.early_stop_margin = _float("early_stop_margin", self.early_stop_margin, lo=0.0)

    # ---- derived ----------------------------------------------------------------------------
    def retrieval_kwargs(self, with_backend: bool = True) -> dict[str, Any]:
        """Keyword arguments of ``retrieve`` / ``Codebook`` (beta, alpha, steps, threshold, eps)."""
        out = dict(beta=self.hopfield_retrieval_beta, alpha=self.hopfield_retrieval_alpha,
                   steps=self.hopfield_retrieval_max_iter, threshold=self.hopfield_key_match_threshold,
                   eps=self.hopfield_retrieval_eps)
        if with_backend:
            out["backend"] = self.backend
        return out

    @property
    def lr(self) -> float:
        """The learning rate of an edit: ``lora_edit_lr`` in lora mode, else ``edit_lr``."""
        return self.lora_edit_lr if self.adapter_mode == "lora" else self.edit_lr

    # ---- dict / YAML ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "the config") -> "HoReNConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a mapping of hyper-parameters, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        alg = data.get("alg_name")
        if alg is not None and str(alg).upper() not in ("HOREN", "HOPFIELD"):
            raise ValueError(f"{source} is for the editing method {alg!r}, not HoReN (alg_name: HOREN)")
        inner = data.pop("inner_params", None)
        if inner is not None:
            if isinstance(inner, str):
                inner = [inner]
            if not isinstance(inner, list) or len(inner) != 1 or not isinstance(inner[0], str):
                raise ValueError(f"{source}: inner_params must list exactly one weight (HoReN wraps one "
                                 f"layer), got {inner!r}")
            path = normalize_layer_path(inner[0])
            given = data.get("layer")
            if given is not None and not (isinstance(given, str) and normalize_layer_path(given) == path):
                raise ValueError(f"{source}: layer {given!r} and inner_params {inner[0]!r} disagree; give one")
            data["layer"] = path
        unknown = sorted(set(data) - known - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; HoReN keys are {sorted(known)} "
                             f"(plus inner_params; ignored: {sorted(IGNORED_KEYS)})")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_yaml(cls, path) -> "HoReNConfig":
        path = os.fspath(path)
        try:
            return cls.from_dict(read_yaml_mapping(path, "HoReN config"), source=path)
        except TypeError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_yaml(self, path) -> None:
        """Write the config as YAML (atomically: a crash leaves any previous file intact)."""
        import yaml
        path = os.fspath(path)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".horen-config-", suffix=".yaml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
