"""A Codebook's file: one safetensors file (tensors, JSON metadata, sha256; horen_fast/_files.py).

Tensors: ``keys`` [N, key_dim], ``values`` [N, value_dim], ``ids`` [N] (int64), ``label_lengths``
[N] (int64, -1 for no label) and ``label_tokens`` (int64, the labels' token ids one after another).
Metadata: kind, format_version, count, key_dim, value_dim, dtype, next_id, config (the retrieval
defaults) and prefilter (None, or a PrefilterConfig as one flat dict).

Format version 2 stores the prefilter config flat; version 1 stored
{"index", "candidates", "safe", "tolerance", "options": {...}} (or no field), which
``PrefilterConfig.from_dict`` migrates. A checksum only proves the file is what was written, not
that what was written is sound, so ``read_codebook_file`` checks the contents as ``Codebook.add``
checks its arguments (horen_fast/entries.py): a crafted file with a NaN or non-unit key, a
non-finite value, bad ids or labels, or a bad prefilter option is refused with HoReNFileError.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._files import HoReNFileError, load_tensors
from .entries import Label, check_ids, check_keys, check_label, check_values
from .prefilter import PrefilterConfig

__all__ = ["FORMAT_VERSION", "KIND", "SavedCodebook", "dtype_name", "read_codebook_file"]

KIND = "horen_fast.Codebook"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise TypeError(f"unsupported codebook dtype {dtype}; use one of {', '.join(DTYPES)}")


@dataclass
class SavedCodebook:
    """A checked file's contents, ready for a Codebook."""
    key_dim: int
    value_dim: int
    dtype: torch.dtype
    config: dict
    prefilter: PrefilterConfig | None
    next_id: int
    keys: torch.Tensor
    values: torch.Tensor
    ids: list[int]
    labels: list[Label]


def _int_field(meta: dict, name: str, lo: int) -> int:
    v = meta.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def read_codebook_file(path, device) -> SavedCodebook:
    """Read and check a Codebook file; raises HoReNFileError naming the file and the problem."""
    tensors, meta = load_tensors(path, KIND)
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise HoReNFileError(path, f"format version {version!r} is not supported (this horen-fast "
                                   f"reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    try:
        n, dk, dv = (_int_field(meta, name, lo) for name, lo in (("count", 0), ("key_dim", 1),
                                                                    ("value_dim", 1)))
        next_id = _int_field(meta, "next_id", 0)
        if meta.get("dtype") not in DTYPES:
            raise ValueError(f"dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[meta["dtype"]]
        config = meta.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict of retrieval options, got {config!r}")
        pf = meta.get("prefilter")
        prefilter = None if pf is None else PrefilterConfig.from_dict(pf)
    except (KeyError, TypeError, ValueError) as exc:
        raise HoReNFileError(path, f"metadata is incomplete or invalid ({exc})") from None
    expected = {"keys": (n, dk), "values": (n, dv), "ids": (n,), "label_lengths": (n,)}
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape:
            raise HoReNFileError(path, f"tensor {name!r} has shape "
                                       f"{None if t is None else tuple(t.shape)}, expected {shape}")
    tokens_t = tensors.get("label_tokens", torch.empty(0, dtype=torch.long))
    for name, t in (("ids", tensors["ids"]), ("label_lengths", tensors["label_lengths"]),
                    ("label_tokens", tokens_t)):
        if t.dtype != torch.int64 or t.dim() != 1:
            raise HoReNFileError(path, f"tensor {name!r} must be 1-D int64, got {t.dtype} of shape "
                                       f"{tuple(t.shape)}")
    try:
        keys = check_keys(tensors["keys"], dk, dtype, torch.device(device), n=n, stored=True)
        values = check_values(tensors["values"], dv, dtype, torch.device(device), n)
        ids = check_ids(tensors["ids"], n)
        if n and max(ids) >= next_id:
            raise ValueError(f"entry id {max(ids)} is not below next_id {next_id}")
        lengths, tokens = tensors["label_lengths"].tolist(), tokens_t.tolist()
        if any(x < -1 for x in lengths) or sum(max(x, 0) for x in lengths) != len(tokens):
            raise ValueError("labels do not add up to the stored label tokens")
        labels, pos = [], 0
        for ln in lengths:
            labels.append(None if ln < 0 else check_label(tokens[pos: pos + ln]))
            pos += max(ln, 0)
    except (TypeError, ValueError) as exc:
        raise HoReNFileError(path, f"contents are invalid: {exc}") from None
    return SavedCodebook(dk, dv, dtype, config, prefilter, next_id, keys, values, ids, labels)
