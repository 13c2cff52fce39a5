"""HoReNAdapter: the nn.Module that wraps the edited layer (where HoReN sits, the query, and how a matched value is applied: see the horen_fast package docstring).

Its forward computes the wrapped layer's output ``y = base(x)`` and then does what the adapter's
``state`` says (one at a time; each set explicitly, through the public methods below):

- ``PROMPT`` (the default): at a first pass, one query per row over that row's prompt tokens,
  ``codebook.retrieve`` once (no host sync), the matched value added at the row's last prompt
  position;
- ``PINNED`` (``with adapter.pinned(prompt_mask)``): the same, with the prompt fixed by the caller;
- ``OFF`` (``adapter.enabled = False``): ``y`` only;
- ``CAPTURE`` (``with adapter.capturing(fn)``): ``fn(x, y)``, then ``y`` (an edit's first pass);
- ``TRAIN`` (``with adapter.training_entries(positions, entries)``): row b gets ``entries[b]`` at
  ``positions[b]`` (entries being optimized; nothing retrieved).

In ``PROMPT`` state, which tokens are the prompt comes from ``begin_pass`` (called by the
editor's forward pre-hook on the model): a row that begins with one of ``known_prompts``
(``inference.KnownPrompts``) has that prompt, any other row its non-padding tokens
(``attention_mask``); without ``begin_pass`` the whole input is the prompt.
Decode steps (``begin_pass(first=False)``, a pass over a non-empty KV cache) add nothing: their
cached keys and values already saw the edit. Rows that match nothing keep ``y`` bit for
bit.
"""
from __future__ import annotations

import enum
import math
from contextlib import contextmanager

import torch
from torch import nn

from .arch import layer_dims
from .codebook import Codebook
from .config import parse_query_strategy
from .inference import KnownPrompts

__all__ = ["HoReNAdapter", "State", "build_queries", "layer_dims"]


def build_queries(x: torch.Tensor, prompt_mask: torch.Tensor, strategy: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (the layer input over the prompt, reduced by the query strategy and normalized) and last prompt positions.

    x: layer input [B, T, d]; prompt_mask: bool [B, T], True on each row's prompt tokens (any
    padding layout). Returns (queries [B, d] in float32, or float64 for float64 input, not yet
    normalized; rows without prompt tokens are zero), last_pos LongTensor [B]. No host sync."""
    kind, amount = parse_query_strategy(strategy)
    B, T = prompt_mask.shape
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    pm = prompt_mask.to(torch.bool)
    pmi = pm.to(torch.long)
    from_end = pmi.flip(1).cumsum(1).flip(1)      # 1 at the last prompt token, 2 before it, ...
    last_pos = (T - 1) - pmi.flip(1).argmax(1)
    if kind == "first":
        sel = pm & (pmi.cumsum(1) == 1)
        k = torch.ones(B, dtype=torch.long, device=x.device)
    else:
        plen = pmi.sum(1)
        if kind == "last":
            k = plen.clamp(max=int(amount))
        elif float(amount).is_integer():       # exact integer ceil(P * p / 100)
            k = (plen * int(amount) + 99) // 100
        else:
            k = torch.ceil(plen.to(torch.float64) * (amount / 100.0)).to(torch.long)
        k = k.clamp(min=1)
        sel = pm & (from_end <= k[:, None])
    w = sel.to(cdtype) / k.to(cdtype)[:, None]
    q = torch.bmm(w[:, None, :], x.to(cdtype)).squeeze(1)
    return q, last_pos


class State(enum.Enum):
    """What the adapter's forward does (module docstring)."""
    PROMPT = "prompt"      # apply edits; the prompt of each row from the pass (begin_pass)
    PINNED = "pinned"      # apply edits; the prompt fixed by the caller (pinned)
    OFF = "off"            # the wrapped layer only (enabled = False)
    CAPTURE = "capture"    # hand (x, y) to a callback, add nothing (capturing)
    TRAIN = "train"        # add entries being trained at given positions (training_entries)


class HoReNAdapter(nn.Module):
    """Wraps one linear layer; see the module docstring. ``base`` is the original layer (its
    parameters are shared, never modified)."""

    def __init__(self, base: nn.Module, codebook: Codebook, *, mode: str, strategy: str,
                 lora_rank: int = 4, lora_scale: float = 1.0):
        super().__init__()
        self.base = base
        self.key_dim, self.value_dim, self.conv1d = layer_dims(base)
        self.codebook = codebook
        self.mode = mode
        self.strategy = strategy
        parse_query_strategy(strategy)
        self.lora_rank, self.lora_scale = lora_rank, lora_scale
        self.enabled = True               # False: State.OFF
        self.known_prompts = KnownPrompts()  # prompts whose end a first pass recognizes
        self.last_retrieval = None       # RetrievalResult of the last pass that retrieved
        self._pass = None                 # None (no info) | ("first", mask or None) | ("decode",)
        self._pinned = None               # State.PINNED: bool [B, T0] prompt mask
        self._capture = None              # State.CAPTURE: callable(x, y)
        self._edit = None                 # State.TRAIN: (positions [B], entries [B, E])

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, entries={len(self.codebook)}, strategy={self.strategy!r}"

    # ---- state ------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """The adapter's current ``State`` (module docstring)."""
        if self._capture is not None:
            return State.CAPTURE
        if self._edit is not None:
            return State.TRAIN
        if not self.enabled:
            return State.OFF
        return State.PINNED if self._pinned is not None else State.PROMPT

    def begin_pass(self, first: bool, attention_mask: torch.Tensor | None = None,
                   input_ids: torch.Tensor | None = None) -> None:
        """Describe the coming pass (called by the editor's forward pre-hook): ``first`` (over an
        empty KV cache; False: a decode step, which adds nothing), its ``attention_mask`` ([B, T],
        non-zero on real tokens; None: all are) and ``input_ids``. A row that begins with one of
        ``known_prompts`` has that prompt as its prompt; otherwise all its real tokens are."""
        if not first:
            self._pass = ("decode",)
            return
        if input_ids is not None and self._pinned is None and len(self.known_prompts):
            attention_mask = self.known_prompts.prompt_mask(input_ids, attention_mask)
        self._pass = ("first", attention_mask)

    def end_pass(self) -> None:
        self._pass = None

    @contextmanager
    def _entered(self, attr: str, value):
        if self._capture is not None or self._edit is not None:
            raise RuntimeError(f"the adapter is in state {self.state.name}; leave it before "
                               f"entering another edit state")
        old = getattr(self, attr)
        setattr(self, attr, value)
        try:
            yield self
        finally:
            setattr(self, attr, old)

    def pinned(self, prompt_mask: torch.Tensor):
        """State.PINNED inside the block: fix the prompt (bool/0-1 [B, T0], True on prompt tokens)
        of every first pass, e.g. for cache-free generation, where each step re-runs the whole
        sequence (the pass's T may exceed T0: the positions after T0 are not prompt)."""
        if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dim() != 2:
            raise ValueError(f"the pinned prompt mask must be a 2-D tensor [batch, tokens], got "
                             f"{getattr(prompt_mask, 'shape', type(prompt_mask).__name__)}")
        return self._entered("_pinned", prompt_mask.to(torch.bool))

    def capturing(self, callback):
        """State.CAPTURE inside the block: each forward calls ``callback(x, y)`` (the layer's
        input and output) and returns ``y`` unchanged (an edit's first pass)."""
        if not callable(callback):
            raise TypeError(f"capturing needs a callable(x, y), got {type(callback).__name__}")
        return self._entered("_capture", callback)

    def training_entries(self, positions: torch.Tensor, entries: torch.Tensor):
        """State.TRAIN inside the block: row b of each forward gets ``delta(entries[b])`` added at
        position ``positions[b]`` (entries being optimized; nothing is retrieved)."""
        if positions.dim() != 1 or entries.dim() != 2 or positions.shape[0] != entries.shape[0]:
            raise ValueError(f"training needs positions [B] and entries [B, entry_dim], got "
                             f"{tuple(positions.shape)} and {tuple(entries.shape)}")
        return self._entered("_edit", (positions, entries))

    def _prompt_mask(self, B: int, T: int, device) -> torch.Tensor | None:
        """The prompt mask [B, T] for this pass, or None when nothing is to be added."""
        state = self._pass
        if state is not None and state[0] == "decode":
            return None
        if self._pinned is not None:
            pm = self._pinned.to(device)
            if pm.shape[0] != B:
                if B % pm.shape[0]:
                    raise ValueError(f"the pinned prompt mask has {pm.shape[0]} rows but the batch has {B}")
                pm = pm.repeat_interleave(B // pm.shape[0], dim=0)  # beams / num_return_sequences
            T0 = pm.shape[1]
            if T0 > T:
                raise ValueError(f"the pinned prompt has {T0} positions but this pass only {T}")
            if T0 < T:
                pm = torch.cat([pm, pm.new_zeros(B, T - T0)], dim=1)
            return pm
        mask = state[1] if state is not None else None
        if mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the layer sees a batch "
                             f"of {B} x {T} tokens")
        return mask.to(device) != 0

    # ---- entries ----------------------------------------------------------------------------
    def delta(self, entry: torch.Tensor, y_p: torch.Tensor) -> torch.Tensor:
        """What an entry adds to y at the last prompt position. entry: [B, entry_dim] (the
        codebook's value rows), y_p: [B, d_value]."""
        if self.mode == "value":
            return entry
        r, d = self.lora_rank, self.value_dim
        a = entry[:, : r * d].reshape(-1, r, d)
        b = entry[:, r * d:].reshape(-1, d, r)
        h = torch.bmm(a, y_p.to(entry.dtype)[:, :, None])
        return self.lora_scale * torch.bmm(b, h).squeeze(2)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self._capture is not None:
            self._capture(x, y)
            return y
        if self._edit is not None:  # row b of the batch trains entry b, applied at pos[b]
            pos, entry = self._edit
            rows = torch.arange(y.shape[0], device=y.device)
            y_p = y[rows, pos]
            return y.index_put((rows, pos), y_p + self.delta(entry, y_p).to(y.dtype))
        if not self.enabled or len(self.codebook) == 0 or x.dim() != 3:
            return y
        B, T = x.shape[:2]
        pm = self._prompt_mask(B, T, x.device)
        if pm is None:
            return y
        q, last = build_queries(x, pm, self.strategy)
        res = self.codebook.retrieve(q)
        self.last_retrieval = res
        if self.mode == "none":
            return y
        rows = torch.arange(B, device=y.device)
        y_p = y[rows, last]
        new = y_p + self.delta(self.codebook.value_rows(res.index), y_p).to(y.dtype)
        y = y.clone() if y.requires_grad else y
        y[rows, last] = torch.where(res.matched[:, None], new, y_p)
        return y


def lora_init(rank: int, d_value: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh LoRA entry, flattened [A (rank x d), B (d x rank)]: A ~ U(-1/sqrt(d), 1/sqrt(d))
    (nn.Linear's default), B = 0, so a new entry starts as a no-op."""
    bound = 1.0 / math.sqrt(d_value)
    a = (torch.rand(rank * d_value, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return torch.cat([a, torch.zeros(d_value * rank, dtype=torch.float64)])
