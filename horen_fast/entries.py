"""What a codebook entry may hold, checked in one place: on add, on update and on load.

Keys are finite, non-zero rows (normalized on the way in; stored keys must already be unit norm
within the dtype's rounding), values are finite rows, ids are distinct integers >= 0, and a label
is None or a sequence of token ids (Python or numpy ints, or an integer tensor; each in
[0, 2**63)). Nothing is coerced: "42", 1.7 or True as a token id are errors, not 42, 1 and 1.
Tensors are detached on the way in, so a stored entry never keeps an autograd graph alive.
"""
from __future__ import annotations

import operator

import torch

__all__ = ["Label", "check_keys", "check_values", "check_labels", "check_label", "check_ids",
           "UNIT_TOLERANCE"]

Label = tuple[int, ...] | None

# how far from 1 a stored key's norm may be: the rounding of a normalized row in each dtype
UNIT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
_MAX_TOKEN = 2**63 - 1


def _rows(name: str, x, width: int, n: int | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    x = x.detach()
    if x.dim() == 1:
        x = x[None]
    want = f"[{'n' if n is None else n}, {width}]"
    if x.dim() != 2 or x.shape[1] != width or (n is not None and x.shape[0] != n):
        raise ValueError(f"{name} must be {want} (one row per entry, width {width}), got shape "
                         f"{tuple(x.shape)}")
    return x


def _bad_rows(mask: torch.Tensor) -> list[int]:
    return mask.nonzero()[:, 0].tolist()[:5]


def check_keys(keys, key_dim: int, dtype: torch.dtype, device: torch.device, *, n: int | None = None,
               stored: bool = False) -> torch.Tensor:
    """Keys [n, key_dim] (a 1-D tensor is one row) as unit rows in ``dtype`` on ``device``.

    ``stored=False`` (add, update): any finite non-zero rows, normalized here. ``stored=True``
    (load): rows that must already be finite and unit norm within UNIT_TOLERANCE[dtype]."""
    k = _rows("keys", keys, key_dim, n)
    wide = torch.float64 if dtype == torch.float64 or k.dtype == torch.float64 else torch.float32
    k = k.to(device, wide)
    norm = k.norm(dim=1, keepdim=True)
    bad = ~(torch.isfinite(norm) & (norm > 0))[:, 0]
    if bool(bad.any()):
        raise ValueError(f"keys rows {_bad_rows(bad)} are zero or not finite; a key must be a "
                         f"non-zero finite activation")
    if stored:
        tol = UNIT_TOLERANCE[dtype]
        off = ((norm[:, 0] - 1).abs() > tol)
        if bool(off.any()):
            rows = _bad_rows(off)
            raise ValueError(f"keys rows {rows} are not unit norm (norm {norm[rows[0], 0].item():.6g}, "
                             f"allowed 1 +- {tol:g}); stored keys are normalized")
        return k.to(dtype)
    return (k / norm).to(dtype)


def check_values(values, value_dim: int, dtype: torch.dtype, device: torch.device, n: int) -> torch.Tensor:
    """Values [n, value_dim] (a 1-D tensor is one row): finite, in ``dtype`` on ``device``."""
    v = _rows("values", values, value_dim, n)
    v = v.to(device, dtype)
    bad = ~torch.isfinite(v).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"values rows {_bad_rows(bad)} are not finite (NaN or inf); a value must "
                         f"be a finite vector")
    return v


def _token(x, label) -> int:
    if isinstance(x, (str, bytes)):
        raise TypeError(f"a label must be a sequence of int token ids, got the string {x!r} in {label!r}")
    if isinstance(x, bool):
        raise TypeError(f"a label must be a sequence of int token ids, got {x!r} in {label!r}")
    try:
        t = operator.index(x)  # ints, numpy ints and integer 0-d tensors; never floats or strings
    except TypeError:
        raise TypeError(f"a label must be a sequence of int token ids, got {x!r} "
                        f"({type(x).__name__}) in {label!r}") from None
    if not 0 <= t <= _MAX_TOKEN:
        raise ValueError(f"token id {t} in a label is out of range: token ids are in [0, 2**63)")
    return t


def check_label(label) -> Label:
    """None, or a tuple of token ids from a sequence (or 1-D integer tensor) of them, or one int."""
    if label is None:
        return None
    if isinstance(label, torch.Tensor):
        if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool \
                or label.dim() > 1:
            raise TypeError(f"a label must be a 1-D sequence of token ids, got a tensor {label.dtype} "
                            f"of shape {tuple(label.shape)}")
        return tuple(_token(x, label) for x in label.reshape(-1).tolist())
    if isinstance(label, (str, bytes)):
        raise TypeError(f"a label must be a sequence of int token ids, got the string {label!r}")
    if isinstance(label, (list, tuple)) or hasattr(label, "__iter__"):
        return tuple(_token(x, label) for x in label)
    return (_token(label, label),)


def check_labels(labels, n: int) -> list[Label]:
    """One label per entry: None (all unlabelled), or n labels (a single label for n == 1 may be
    given as a flat sequence of token ids)."""
    if labels is None:
        return [None] * n
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"labels must be a list with one label (a sequence of token ids) per entry, "
                        f"got the string {labels!r}")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        labels = list(labels)
    labels = list(labels)
    if n == 1 and labels and not isinstance(labels[0], (list, tuple, torch.Tensor, type(None))):
        labels = [labels]  # a single label given as a flat list of token ids
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} keys; give one label per key or None")
    return [check_label(lab) for lab in labels]


def check_ids(ids, n: int) -> list[int]:
    """n distinct integer ids >= 0 (a list, an int or an integer tensor)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"ids must be integers, got a tensor {ids.dtype}")
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    out = []
    for i in ids:
        if isinstance(i, bool):
            raise TypeError(f"ids must be integers, got {i!r}")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"ids must be integers, got {i!r} ({type(i).__name__})") from None
    if len(out) != n or len(set(out)) != n or any(not 0 <= i <= _MAX_TOKEN for i in out):
        raise ValueError(f"ids must be {n} distinct integers in [0, 2**63) (one per key), got {out[:8]}")
    return out
