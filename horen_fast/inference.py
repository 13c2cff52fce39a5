"""Where each row's prompt ends at inference: what the editor's forward pre-hook tells the
adapter (``describe_pass``), known prompts, and generation and scoring that pin the prompt.

A HoReN edit is applied at the last prompt token of each row, at the first pass over an empty KV
cache. Which tokens are "the prompt" is decided here, per first pass, in this order:

1. pinned by the caller (``HoReNEditor.generate`` / ``score``, or ``model.generate`` once
   ``pin_generate`` was called): the adapter's ``State.PINNED``;
2. the longest *known prompt* (``KnownPrompts``) that the row's non-padding tokens begin with:
   a teacher-forced pass over ``prompt + " " + target`` (EasyEdit's default scoring) gets the
   edit at the prompt's last token, not at the target's;
3. otherwise every non-padding token (``attention_mask``), or every token without a mask.

Passes over a non-empty KV cache (decode steps), and passes whose 2-D ``attention_mask`` is wider
than the input, add nothing. So ``model.generate`` with the KV cache applies each edit once, at
the prefill; a cache-free generation (``use_cache=False``, every step re-running the whole
sequence) needs 1 or 2, otherwise each step would treat its whole sequence as the prompt and add
the value at the newest token.

A known prompt is found only where its tokens (``tokenizer(prompt)``) begin the row, which holds
for ``prompt + " " + target`` unless the tokenizer merges tokens across that space. ``generate``
and ``score`` hold ``editor.lock``; plain ``model(...)`` calls from several threads at once are
not serialized (the adapter's pass state is shared).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .editor import HoReNEditor

__all__ = ["KnownPrompts", "cache_length", "describe_pass", "generate", "score", "PinnedGenerate",
           "pin_generate", "unpin_generate"]


def cache_length(cache) -> int:
    """Number of positions held by a KV cache (a transformers Cache, a legacy tuple, or None)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class KnownPrompts:
    """Token-id sequences of prompts the model will be asked about (e.g. the prompt, rephrase,
    locality and portability prompts of EasyEdit requests).

    ``prompt_mask(input_ids, attention_mask)`` marks, in each row, the longest known prompt that
    the row's non-padding tokens begin with (any padding side), or every non-padding token when
    none does. Matching runs on the host (one copy of the ids per first pass); it costs
    O(number of distinct prompt lengths x row length) per row, whatever the number of prompts."""

    def __init__(self):
        self._seqs: set[tuple[int, ...]] = set()
        self._lengths: list[int] = []          # distinct lengths, longest first

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, ids) -> bool:
        return tuple(int(i) for i in ids) in self._seqs

    def add(self, ids: Sequence[int]) -> None:
        """Know one prompt, as token ids (with the special tokens the tokenizer adds)."""
        seq = tuple(int(i) for i in ids)
        if not seq:
            raise ValueError("a known prompt needs at least one token")
        if seq not in self._seqs:
            self._seqs.add(seq)
            if len(seq) not in self._lengths:
                self._lengths = sorted({*self._lengths, len(seq)}, reverse=True)

    def add_texts(self, tokenizer, prompts: Iterable[str]) -> None:
        """Know each prompt string, tokenized as ``tokenizer(prompt)`` tokenizes it."""
        for p in prompts:
            if not isinstance(p, str) or not p:
                raise ValueError(f"a known prompt must be a non-empty string, got {p!r}")
            self.add(tokenizer(p)["input_ids"])

    def clear(self) -> None:
        self._seqs.clear()
        self._lengths = []

    def prompt_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """bool [B, T]: True on each row's prompt tokens (class docstring)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        real = (torch.ones(B, T, dtype=torch.bool) if attention_mask is None
                else attention_mask.detach().cpu() != 0)
        if real.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(real.shape)} but input_ids {(B, T)}")
        out = real.clone()
        ids = input_ids.detach().cpu().tolist()
        for b in range(B):
            pos = real[b].nonzero().flatten().tolist()
            tokens = tuple(ids[b][i] for i in pos)
            for n in self._lengths:
                if n <= len(tokens) and tokens[:n] in self._seqs:
                    if n < len(tokens):
                        out[b, pos[n:]] = False
                    break
        return out.to(input_ids.device)


def describe_pass(args: tuple, kwargs: dict
                  ) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """``(first, attention_mask, input_ids)`` of a model forward call, from its positional and
    keyword arguments: ``first`` is False for a decode step (a non-empty KV cache, or a 2-D
    ``attention_mask`` wider than the input); the mask is None when absent (or not 2-D) and the
    ids None when the call passes ``inputs_embeds``."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds") if ids is None else None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        mask = None
    x = ids if ids is not None else embeds
    T = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
    first = cache_length(cache) == 0 and (mask is None or T is None or mask.shape[1] == T)
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2):
        ids = None
    return first, (mask if first else None), (ids if first else None)


def generate(editor: "HoReNEditor", *args, **kwargs):
    """``editor.model.generate`` with every row's prompt pinned to the non-padding tokens of the
    input (Hugging Face's arguments: ``input_ids`` / ``inputs`` positionally or by name,
    ``attention_mask``, any generation argument). With the KV cache the edit is applied at the
    prefill; with ``use_cache=False`` each step re-runs the whole sequence and the edit stays at
    the prompt's last token, so both give the same tokens. Holds ``editor.lock``."""
    model = editor.model
    if args:
        if "input_ids" in kwargs or "inputs" in kwargs:
            raise TypeError("generate got the input ids both positionally and by name")
        kwargs["input_ids"], args = args[0], args[1:]
    if "inputs" in kwargs:
        kwargs["input_ids"] = kwargs.pop("inputs")
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        raise ValueError("generate needs input_ids [batch, tokens] (or inputs_embeds [batch, tokens, "
                         f"width]); got {type(ids).__name__}")
    mask = kwargs.get("attention_mask")
    if mask is None:
        prompt = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
    else:
        if mask.shape != ids.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the input "
                             f"{tuple(ids.shape[:2])}")
        prompt = mask != 0
    with editor.lock, torch.no_grad(), editor.adapter.pinned(prompt):
        return type(model).generate(model, *args, **kwargs)


def score(editor: "HoReNEditor", prompts: list[str], targets: list[str], batch_size: int = 16
          ) -> torch.Tensor:
    """Summed teacher-forced log-probabilities of each target after its prompt (tokenized as an
    edit is, ``edits.encode``), with the edits applied at the prompt's last token (pinned):
    FloatTensor [B]. Holds ``editor.lock``."""
    from .edits import encode

    if isinstance(prompts, str) and isinstance(targets, str):
        prompts, targets = [prompts], [targets]
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise ValueError(f"score: {len(prompts)} prompts but {len(targets)} targets")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    tok, device = editor.tokenizer, editor.device
    pad = tok.pad_token_id
    if pad is None:
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    out = []
    for lo in range(0, len(prompts), batch_size):
        enc = [encode(tok, p, t, editor.config.max_length)
               for p, t in zip(prompts[lo: lo + batch_size], targets[lo: lo + batch_size])]
        B, T = len(enc), max(len(a) + len(b) for a, b in enc)
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        prompt = torch.zeros(B, T, dtype=torch.bool)
        gold = torch.zeros(B, T, dtype=torch.bool)   # positions whose next token is a target
        for i, (a, b) in enumerate(enc):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            mask[i, : len(a) + len(b)] = 1
            prompt[i, : len(a)] = True
            gold[i, len(a) - 1: len(a) + len(b) - 1] = True
        ids, mask, prompt, gold = (t.to(device) for t in (ids, mask, prompt, gold))
        with editor.lock, torch.no_grad(), editor.adapter.pinned(prompt):
            logits = editor.model(input_ids=ids, attention_mask=mask).logits
        lp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64
                                                else torch.float32), dim=-1)
        tok_lp = lp.gather(2, ids[:, 1:, None]).squeeze(2)
        out.append((tok_lp * gold[:, :-1]).sum(1))
    return torch.cat(out)


class PinnedGenerate:
    """The ``generate`` that ``pin_generate`` installs on a model: ``generate(editor, ...)`` while
    the editor is attached, the class's own ``generate`` once it was detached. An object rather
    than a closure, so a deep copy of the model gets one bound to the copied editor."""

    def __init__(self, editor: "HoReNEditor"):
        self.editor = editor

    def __call__(self, *args, **kwargs):
        model = self.editor.model
        if not self.editor.attached:
            unpin_generate(model)
            return type(model).generate(model, *args, **kwargs)
        return generate(self.editor, *args, **kwargs)


def pin_generate(editor: "HoReNEditor") -> None:
    """Make ``editor.model.generate`` itself pin the prompt (``generate`` above), so callers that
    hold only the model (EasyEdit's evaluation, the published harness's cache-free generation)
    get each edit at its prompt's end. Undone by ``unpin_generate``; after the editor is detached
    the model generates as the original model again."""
    editor.model.__dict__["generate"] = PinnedGenerate(editor)


def unpin_generate(model) -> None:
    """Give ``model`` its class's ``generate`` back (no-op when it was not pinned)."""
    if isinstance(model.__dict__.get("generate"), PinnedGenerate):
        del model.__dict__["generate"]
