"""What an edit is and where it goes: edit records, their tokenization (SPEC 5.1), and the
reuse / replace / add decision (SPEC 5.2-5.3), in one place that the editor and calibration call.

``decide(codebook, query, label)`` looks the edit's query up in the codebook once:

- the matched entry has this edit's label (target tokens): **reuse** it (its value is trained on);
- else the matched key is this query (cosine > ``SAME_KEY_COS``: the same prompt edited again):
  **replace** it: the entry keeps its id, its key and its place, and takes this edit's label and a
  fresh value (the latest edit wins);
- else (or nothing matched): **add** a new entry (key = the query).

``Changes`` applies decisions to a codebook and can undo them exactly: an edit only ever appends
entries or overwrites an entry's value and label (never removes, never moves, never re-normalizes a
key), so undoing in reverse order gives back the same ids, order, keys, values and labels bit for
bit (entry ids handed out meanwhile are not reused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["SAME_KEY_COS", "parse_record", "encode", "edit_label", "Decision", "decide", "Changes"]

SAME_KEY_COS = 1 - 1e-6   # SPEC 5.3: a matched key this close to the query is "the same prompt"


def parse_record(rec) -> tuple[str, str]:
    """(prompt, target) of an edit record: a dict with "prompt" and "target" (or EasyEdit's
    "target_new"), or a (prompt, target) pair."""
    if isinstance(rec, dict):
        prompt = rec.get("prompt")
        target = rec.get("target", rec.get("target_new"))
    elif isinstance(rec, (tuple, list)) and len(rec) == 2:
        prompt, target = rec
    else:
        raise TypeError(f"an edit record is a dict with 'prompt' and 'target' (or 'target_new'), or a "
                        f"(prompt, target) pair; got {rec!r}")
    if not isinstance(prompt, str) or not isinstance(target, str) or not prompt or not target:
        raise ValueError(f"an edit needs a non-empty prompt and target string; got {rec!r}")
    return prompt, target


def encode(tokenizer, prompt: str, target: str, max_length: int | None = None
           ) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of ``prompt + " " + target`` (SPEC 5.1). The joint tokenization is
    used when it starts with the prompt's own tokens; otherwise the target is tokenized alone
    (``" " + target``, no special tokens) and appended."""
    p_ids = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(prompt + " " + target)["input_ids"])
    if len(full) > len(p_ids) and full[: len(p_ids)] == p_ids:
        t_ids = full[len(p_ids):]
    else:
        t_ids = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if not p_ids or not t_ids:
        raise ValueError(f"the prompt {prompt!r} or target {target!r} tokenizes to nothing")
    pad = getattr(tokenizer, "pad_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    if pad is not None and all(t in (pad, bos) for t in p_ids):
        raise ValueError(f"the prompt {prompt!r} has no tokens other than padding (pad token "
                         f"{getattr(tokenizer, 'pad_token', pad)!r}): its query would be zero; give a prompt "
                         f"with real text")
    if max_length is not None and len(p_ids) + len(t_ids) > max_length:
        raise ValueError(f"prompt + target is {len(p_ids) + len(t_ids)} tokens, more than max_length="
                         f"{max_length}; shorten it or raise max_length")
    return p_ids, t_ids


def edit_label(tokenizer, prompt: str, target: str) -> tuple[int, ...]:
    """The label an edit stores: its target token ids (as ``encode`` splits them)."""
    return tuple(encode(tokenizer, prompt, target)[1])


@dataclass(frozen=True)
class Decision:
    action: str                 # "added" | "reused" | "replaced"
    entry_id: int | None        # the entry reused or replaced (None for "added": not stored yet)

    @property
    def replaced_id(self) -> int | None:
        return self.entry_id if self.action == "replaced" else None


def decide(codebook, query: torch.Tensor, label, *, busy=frozenset(), **overrides) -> Decision | None:
    """Reuse, replace or add for one edit (module docstring) against ``codebook`` as it stands.

    query: [d] or [1, d] (not necessarily normalized); label: the target token ids; ``busy``: ids of
    entries whose value is still being trained: an edit that would reuse or replace one of them
    returns None (decide it again once they are stored). ``overrides`` go to ``codebook.retrieve``
    (e.g. threshold=...)."""
    q = query.reshape(1, -1)
    label = tuple(int(t) for t in label)
    if len(codebook) == 0:
        return Decision("added", None)
    res = codebook.retrieve(q, **overrides)
    if not bool(res.matched[0]):
        return Decision("added", None)
    j = int(res.index[0])
    if tuple(codebook.get_labels(j)[0] or ()) == label:
        decision = Decision("reused", j)
    else:
        k = codebook.get_keys(j)[0].to(torch.float64)
        if float(F.normalize(q[0].to(torch.float64), dim=0) @ k) <= SAME_KEY_COS:
            return Decision("added", None)
        decision = Decision("replaced", j)
    return None if j in busy else decision


@dataclass
class Changes:
    """Decisions applied to one codebook, undoable (module docstring)."""
    codebook: object
    _undo: list = field(default_factory=list)

    def apply(self, decision: Decision, query: torch.Tensor, label, value: torch.Tensor) -> int:
        """Store ``decision``: add an entry (key ``query``, value ``value``), or give the replaced
        entry ``label`` and ``value``; a reused entry is left as it is. Returns the entry id."""
        if decision.action == "added":
            return self.add(query, value, label)
        if decision.action == "replaced":
            self.set(decision.entry_id, value=value, label=label)
        return int(decision.entry_id)

    def add(self, query: torch.Tensor, value: torch.Tensor, label) -> int:
        entry_id = int(self.codebook.add(query.reshape(1, -1), value.reshape(1, -1), [tuple(label)])[0])
        self._undo.append(("added", entry_id))
        return entry_id

    def set(self, entry_id: int, *, value: torch.Tensor, label=...) -> None:
        """Overwrite an entry's value (and label), remembering the old ones."""
        cb = self.codebook
        old_value = cb.get_values(entry_id)[0].clone()
        old_label = cb.get_labels(entry_id)[0]
        if label is ...:
            cb.update(entry_id, value=value)
        else:
            cb.update(entry_id, value=value, label=tuple(label))
        self._undo.append(("set", entry_id, old_value, old_label))

    def undo(self) -> None:
        """Put the codebook back as it was before the first change (reverse order)."""
        cb = self.codebook
        while self._undo:
            op = self._undo.pop()
            if op[0] == "added":
                cb.remove(op[1])
            else:
                cb.update(op[1], value=op[2], label=op[3])

    def __len__(self) -> int:
        return len(self._undo)
