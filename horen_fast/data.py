"""Reading editing records (ZsRE / EasyEdit style) from a JSON array or a JSON Lines file.

Accepted field names for one record, first match wins:

| meaning            | ZsRE (MEND/ROME split) | EasyEdit                                                      |
| ------------------ | ---------------------- | ------------------------------------------------------------- |
| edit prompt        | ``src``                | ``prompt``                                                    |
| new target         | ``alt``                | ``target_new`` (also ``target``)                              |
| paraphrase         | ``rephrase``           | ``rephrase_prompt``                                           |
| unrelated prompt   | ``loc``                | ``locality_prompt`` or ``locality: {KEY: {prompt, ...}}``     |
| its answer         | ``loc_ans``            | ``locality_ground_truth`` or ``locality: {KEY: {..., ground_truth}}`` |

In the nested EasyEdit form the first locality entry is used; a list of prompts / answers there
uses its first element. ``target_new`` given as ``{"str": ...}`` (CounterFact style) is accepted.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["EditRecord", "RecordsError", "read_records", "parse_record"]

_FIELDS = {
    "prompt": ("src", "prompt"),
    "target": ("alt", "target_new", "target"),
    "rephrase": ("rephrase", "rephrase_prompt"),
    "loc_prompt": ("loc", "locality_prompt"),
    "loc_answer": ("loc_ans", "locality_ground_truth"),
}
ALL_FIELDS = tuple(_FIELDS)


class RecordsError(ValueError):
    """A records file that cannot be read or a record that lacks what is needed."""


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    target: str
    rephrase: str | None = None
    loc_prompt: str | None = None
    loc_answer: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _text(value, where: str, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict) and "str" in value:        # {"str": "...", "id": ...}
        value = value["str"]
    if isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if not isinstance(value, str):
        raise RecordsError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _nested_locality(obj: dict, where: str) -> tuple[str | None, str | None]:
    loc = obj.get("locality")
    if not isinstance(loc, dict) or not loc:
        return None, None
    first = next(iter(loc.values()))
    if not isinstance(first, dict):
        raise RecordsError(f"{where}: 'locality' must map names to {{'prompt': ..., 'ground_truth': ...}}")
    return (_text(first.get("prompt"), where, "locality.prompt"),
            _text(first.get("ground_truth"), where, "locality.ground_truth"))


def parse_record(obj, where: str = "record", require=("prompt", "target")) -> EditRecord:
    """One record from a dict in either naming; ``require`` lists the EditRecord fields that must
    be present (``ALL_FIELDS`` for evaluation)."""
    if not isinstance(obj, dict):
        raise RecordsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    found = {}
    for name, keys in _FIELDS.items():
        found[name] = None
        for key in keys:
            if obj.get(key) is not None:
                found[name] = _text(obj[key], where, key)
                break
    if found["loc_prompt"] is None and found["loc_answer"] is None:
        found["loc_prompt"], found["loc_answer"] = _nested_locality(obj, where)
    missing = [name for name in require if not found[name]]
    if missing:
        names = "; ".join(f"{m}: one of {', '.join(_FIELDS[m])}" for m in missing)
        if any(m.startswith("loc") for m in missing):
            names += " (or EasyEdit's nested 'locality')"
        raise RecordsError(f"{where}: missing or empty field(s) {names}. Present keys: {sorted(obj)}")
    return EditRecord(**found)


def _load_objects(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    stripped = text.lstrip()
    if not stripped:
        raise RecordsError(f"{path}: the file is empty")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{path}: invalid JSON array (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        if not isinstance(data, list):
            raise RecordsError(f"{path}: expected a JSON array of records")
        return data
    objects = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); expected a JSON "
                               f"array or JSON Lines (one object per line)") from None
    return objects


def read_records(path, n: int | None = None, require=ALL_FIELDS) -> list[EditRecord]:
    """The first ``n`` records (all when None) of a JSON array or JSON Lines file, in file order."""
    path = Path(path)
    if n is not None and n < 1:
        raise RecordsError(f"n must be at least 1, got {n}")
    objects = _load_objects(path)
    if n is not None:
        if n > len(objects):
            raise RecordsError(f"{path}: asked for {n} records but the file has {len(objects)}")
        objects = objects[:n]
    if not objects:
        raise RecordsError(f"{path}: no records")
    return [parse_record(obj, f"{path}: record {i + 1}", require) for i, obj in enumerate(objects)]


def real_positions(path, n: int | None = None) -> list[int] | None:
    """Positions (0-based, among the first ``n``) of the real records of a stream made by
    ``horen-fast stream`` (``"synthetic": false``); None for a file without the marks."""
    objects = _load_objects(Path(path))[:n]
    if not any(isinstance(o, dict) and "synthetic" in o for o in objects):
        return None
    return [i for i, o in enumerate(objects) if isinstance(o, dict) and o.get("synthetic") is False]


def left_pad(rows: list[list[int]], pad: int):
    """(input_ids, attention_mask) LongTensors for token-id lists, padded on the left with ``pad``."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids, mask
