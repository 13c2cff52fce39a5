"""One dispatch point for retrieval backends and native ops.

Each implementation of an op registers itself with ``register(op, name, reasons, run, priority)``:
``reasons(*args)`` returns the list of reasons why it cannot serve that call (device, dtype,
instruction set, extension not built...; [] means it can), ``run(*args)`` does the work. Callers
ask ``select(op, *args, impl=...)`` for the run function:

- a forced name that cannot serve the call raises ``NotSupportedError`` listing EVERY reason (no
  silent hand-off to another implementation);
- ``impl="auto"`` takes the highest-priority implementation with no reasons among those meant for
  the arguments' device (``devices``), and warns once (with the reasons) when it skips a
  higher-priority one.

``reasons_for(op, *args)`` reports every implementation's reasons for a call. Ops in use:
"retrieve" (torch, cpp, triton; args ``(queries, keys, params)``), "sketch_scan",
"sketch_rescue", "pair_dots" (torch, cpp). This registry is the package's only global state.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["NotSupportedError", "register", "select", "reasons_for", "names"]


class NotSupportedError(ValueError):
    """A forced implementation cannot serve the call; the message lists every reason."""


@dataclass(frozen=True)
class Implementation:
    name: str
    reasons: Callable[..., list]
    run: Callable
    priority: int
    devices: tuple[str, ...] | None  # device types auto-selection considers it for (None: all)


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_ORDER: dict[str, list[Implementation]] = {}   # per op, highest priority first (kept by register)
_warned: set[tuple] = set()


def register(op: str, name: str, reasons: Callable[..., list], run: Callable, priority: int = 0, *,
             devices: Sequence[str] | None = None) -> None:
    """Add (or replace) implementation ``name`` of ``op``. ``devices`` (e.g. ("cuda",)) limits
    where ``impl="auto"`` considers it; a forced name is tried on any device."""
    for label, value in (("op", op), ("name", name)):
        if not isinstance(value, str) or not value or value == "auto":
            raise ValueError(f"{label} must be a non-empty string other than 'auto', got {value!r}")
    if not callable(reasons) or not callable(run):
        raise TypeError(f"reasons and run must be callables (implementation {name!r} of {op!r})")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {priority!r}")
    table = _REGISTRY.setdefault(op, {})
    table[name] = Implementation(name, reasons, run, priority, None if devices is None else tuple(devices))
    # highest priority first; equal priorities in registration order
    _ORDER[op] = sorted(table.values(), key=lambda i: -i.priority)


def names(op: str) -> list[str]:
    """The registered implementations of ``op``, highest priority first."""
    return [impl.name for impl in _ordered(op)]


def reasons_for(op: str, *args) -> dict[str, list[str]]:
    """For every implementation of ``op``: why it cannot serve ``args`` ([] = it can)."""
    return {impl.name: _reasons(impl, args) for impl in _ordered(op)}


def select(op: str, *args, impl: str = "auto") -> Callable:
    """The run function that serves ``args``: the forced ``impl``, or the best one for "auto"."""
    table = _table(op)
    if impl != "auto":
        if impl not in table:
            raise ValueError(f"unknown {op} implementation {impl!r}; choose 'auto' or one of "
                             + ", ".join(repr(n) for n in names(op)))
        why = _reasons(table[impl], args)
        if why:
            raise NotSupportedError(f"{op}: {impl!r} cannot serve this call: " + "; ".join(why))
        return table[impl].run
    device = _device_type(args)
    skipped = []
    for cand in _ordered(op):
        if cand.devices is not None and device is not None and device not in cand.devices:
            continue
        why = _reasons(cand, args)
        if not why:
            for name, reasons in skipped:
                key = (op, name, cand.name, tuple(reasons))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"horen_fast: {op} uses {cand.name!r} because {name!r} cannot serve "
                                  f"this call: {'; '.join(reasons)}", RuntimeWarning, stacklevel=3)
            return cand.run
        skipped.append((cand.name, why))
    detail = "; ".join(f"{n}: {'; '.join(r)}" for n, r in skipped) or "none registered for this device"
    raise NotSupportedError(f"{op}: no implementation can serve this call ({detail})")


def _table(op: str) -> dict[str, Implementation]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def _ordered(op: str) -> list[Implementation]:
    _table(op)  # a clear error for an unknown op
    return _ORDER[op]


def _reasons(impl: Implementation, args) -> list[str]:
    why = impl.reasons(*args)
    if not isinstance(why, (list, tuple)) or not all(isinstance(w, str) for w in why):
        raise TypeError(f"the reasons function of {impl.name!r} must return a list of strings, got {why!r}")
    return list(why)


def _device_type(args) -> str | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None
