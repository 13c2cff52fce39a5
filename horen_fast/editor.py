"""HoReNEditor: edit a Hugging Face causal LM with HoReN (see the horen_fast package docstring).

The editor installs a ``HoReNAdapter`` in place of one linear layer (the MLP output projection of
layer L, found through ``horen_fast.arch``), keeps every edit as one entry of a ``Codebook``, and
never changes the base weights. Its parts:

- ``edits``: edit records, their tokenization, and the reuse / replace / add decision;
- ``training``: the first pass of an edit and the optimization of its entry (``Trainer``);
- ``persist``: save / load of a directory as one unit;
- ``inference``: where the prompt ends at inference, ``generate`` and ``score``.

``edit_many`` decides edits in order (each against the codebook its predecessors left), then
trains up to ``batch_size`` entries together, one padded row each: an edit's loss reads only its
own entry and Adam is elementwise, so this equals editing one by one (to rounding), while the
weights are read once per step for the whole batch. An edit that would reuse or replace an entry
still waiting to be trained is decided after those are trained.

A call is all or nothing: if it raises (a bad record, out of memory, Ctrl-C), every change it made
is undone, and the codebook is exactly as before the call (same ids, order, keys, values, labels).
``self.lock`` (a re-entrant lock) is held by every method that reads or changes the edits, so an
editor may be shared between threads.

At inference the adapter adds each row's matched value at that row's last prompt position at the
prefill pass; see ``horen_fast.inference``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from . import inference, persist
from .adapter import HoReNAdapter
from .arch import get_module, layer_dims, layer_path, resolve_layer  # noqa: F401 (resolve_layer: re-exported)
from .codebook import Codebook
from .config import HoReNConfig
from .edits import Changes, decide, encode, parse_record
from .training import Trainer

__all__ = ["HoReNEditor", "EditResult", "resolve_layer"]


@dataclass
class EditResult:
    id: int                    # the codebook entry holding this edit
    loss: float                # target cross-entropy with the final value
    action: str                # "added" | "reused" | "replaced"
    replaced_id: int | None    # the entry whose earlier edit this one replaced (action "replaced": = id)
    seconds: float             # wall time of the edit
    iterations: int = 0        # Adam steps its entry took (< n_iter when early_stop_margin stopped it)


def _chunks(records: Iterable, size: int):
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def _uninterrupted():
    """Hold off Ctrl-C (SIGINT) while a rollback runs (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: None)
    except ValueError:   # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class HoReNEditor:
    """HoReN on one layer of ``model`` (see the module docstring).

    Attributes: ``model``, ``tokenizer``, ``config``, ``codebook``, ``adapter``, ``layer_path``,
    ``device``, ``lock``, ``attached``.
    """

    def __init__(self, model: nn.Module, tokenizer, config: HoReNConfig, *,
                 codebook: Codebook | None = None):
        if not isinstance(config, HoReNConfig):
            raise TypeError(f"config must be a HoReNConfig, got {type(config).__name__}")
        self.lock = threading.RLock()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.layer_path = layer_path(model, config.layer)
        base = get_module(model, self.layer_path)
        if isinstance(base, HoReNAdapter):
            raise ValueError(f"{self.layer_path} already carries a HoReN adapter; detach() that editor first")
        d_key, d_value, _ = layer_dims(base)
        param = next(model.parameters())
        self.device = param.device
        entry_dim = self.entry_dim(config, d_value)
        if codebook is None:
            dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
            codebook = Codebook(d_key, entry_dim, dtype=dtype, device=self.device, **config.retrieval_kwargs())
        else:
            if (codebook.key_dim, codebook.value_dim) != (d_key, entry_dim):
                raise ValueError(
                    f"these edits were made on a layer of input width {codebook.key_dim} and entry width "
                    f"{codebook.value_dim} ({config.adapter_mode} mode), but {self.layer_path} in this "
                    f"{type(model).__name__} has input width {d_key} and output width {d_value} (entry "
                    f"width {entry_dim}); load them into the model they were made for")
            codebook.config.update(config.retrieval_kwargs())
            if codebook.device != self.device:
                codebook.to(self.device)
        self.codebook = codebook
        self.adapter = HoReNAdapter(base, codebook, mode=config.adapter_mode,
                                    strategy=config.query_selection_strategy,
                                    lora_rank=config.lora_rank, lora_scale=config.lora_scale)
        self.trainer = Trainer(model, self.adapter, self.layer_path)
        parent_path, _, name = self.layer_path.rpartition(".")
        self._parent = get_module(model, parent_path) if parent_path else model
        self._name = name
        self._set_child(self.adapter)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, always_call=True),
        ]
        self._attached = True
        # the model's own generate pins each row's prompt too, so a cache-free model.generate
        # applies every edit at the prompt's end, not at each newest token
        inference.pin_generate(self)

    def __deepcopy__(self, memo):
        """A deep copy (e.g. of a model carrying this editor) with its own, fresh lock."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, threading.RLock() if name == "lock" else copy.deepcopy(value, memo))
        return new

    @staticmethod
    def entry_dim(config: HoReNConfig, d_value: int) -> int:
        """Width of a codebook entry: the value (value, none) or the flattened LoRA pair."""
        return 2 * config.lora_rank * d_value if config.adapter_mode == "lora" else d_value

    # ---- installation -----------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """False once ``detach`` put the original layer back."""
        return self._attached

    def _set_child(self, module: nn.Module) -> None:
        if isinstance(self._parent, (nn.ModuleList, nn.Sequential)) and self._name.isdigit():
            self._parent[int(self._name)] = module
        else:
            setattr(self._parent, self._name, module)

    def detach(self) -> None:
        """Put the original layer back and remove the hooks; the editor is unusable afterwards."""
        with self.lock:
            if not self._attached:
                return
            for h in self._hooks:
                h.remove()
            self._set_child(self.adapter.base)
            inference.unpin_generate(self.model)
            self._attached = False

    def _check(self) -> None:
        if not self._attached:
            raise RuntimeError("this HoReNEditor was detached; create a new one (or HoReNEditor.load)")

    def _pre_hook(self, module, args, kwargs):
        self.adapter.begin_pass(*inference.describe_pass(args, kwargs))

    def _post_hook(self, module, args, output):
        self.adapter.end_pass()

    def __len__(self) -> int:
        return len(self.codebook)

    def __repr__(self) -> str:
        return (f"HoReNEditor(layer={self.layer_path!r}, mode={self.config.adapter_mode!r}, "
                f"edits={len(self.codebook)}, attached={self._attached})")

    def encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) of an edit (``edits.encode`` with this editor's tokenizer and
        ``max_length``)."""
        return encode(self.tokenizer, prompt, target, self.config.max_length)

    # ---- editing ----------------------------------------------------------------------------
    def edit(self, prompt: str, target: str) -> EditResult:
        """Make one edit (reuse, replace or add an entry, then train its value); returns its EditResult."""
        return self.edit_many([(prompt, target)], progress=False)[0]

    def edit_many(self, records: Iterable, progress: bool = True, batch_size: int = 16) -> list[EditResult]:
        """Sequential editing: the same result as ``edit`` on each record in turn (module docstring).

        A record is a dict with "prompt" and "target" (or EasyEdit's "target_new"), or a
        (prompt, target) pair. Up to 4 * ``batch_size`` decided edits wait to be trained, grouped by
        length to limit padding. If anything raises, every change of this call is undone."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        from tqdm.auto import tqdm
        total = len(records) if hasattr(records, "__len__") else None
        with self.lock:
            self._check()
            changes = Changes(self.codebook)
            bar = tqdm(total=total, disable=not progress, desc="HoReN edits", unit="edit")
            try:
                with self.trainer.frozen():
                    return self._edit_all(records, batch_size, changes, bar)
            except BaseException:
                with _uninterrupted():
                    changes.undo()
                raise
            finally:
                bar.close()

    def _edit_all(self, records: Iterable, batch_size: int, changes: Changes, bar) -> list[EditResult]:
        cfg, cb, trainer = self.config, self.codebook, self.trainer
        results, pending = [], []
        window = 4   # edits wait for up to window * batch_size others, to be batched by length

        def flush():
            # train the waiting edits in batches of similar length (less padding), report in order
            order = sorted(pending, key=lambda job: len(job.ids) - job.start)
            for lo in range(0, len(order), batch_size):
                batch = order[lo: lo + batch_size]
                t0 = time.perf_counter()
                trainer.train(batch, cfg)
                for job in batch:
                    changes.set(job.entry_id, value=job.entry)
                share = (time.perf_counter() - t0) / len(batch)
                for job in batch:
                    job.seconds += share
                bar.update(len(batch))
            results.extend(EditResult(id=job.entry_id, loss=float(job.loss), action=job.decision.action,
                                      replaced_id=job.decision.replaced_id, seconds=job.seconds,
                                      iterations=job.iterations)
                           for job in pending)
            pending.clear()

        for chunk in _chunks(records, batch_size):
            encoded = [self.encode(*parse_record(rec)) for rec in chunk]
            for job in trainer.prepare(encoded, cfg):
                decision = decide(cb, job.q, job.label, busy={j.entry_id for j in pending})
                if decision is None:   # it reuses or replaces an entry still waiting: train those first
                    flush()
                    decision = decide(cb, job.q, job.label)
                job.decision = decision
                if decision.action == "reused":
                    job.entry_id, job.entry = decision.entry_id, cb.get_values(decision.entry_id)[0].clone()
                else:
                    job.entry = trainer.initial_entry(cfg, job.ids.tolist(), job.y_p, cb.value_dim, cb.dtype)
                    # stored now (its key and label decide later edits); its value once trained
                    job.entry_id = changes.apply(decision, job.q, job.label, job.entry)
                pending.append(job)
                if len(pending) >= window * batch_size:
                    flush()
        flush()
        return results

    def forget(self, entry_id: int) -> None:
        """Remove an edit (its codebook entry); outputs return to what they were without it."""
        with self.lock:
            self._check()
            self.codebook.remove(int(entry_id))

    # ---- inference --------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """``model.generate`` with the edits applied at each row's last prompt token (the prompt is
        every non-padding token of the input); see ``inference.generate``."""
        self._check()
        return inference.generate(self, *args, **kwargs)

    def score(self, prompts: list[str], targets: list[str], batch_size: int = 16) -> torch.Tensor:
        """Summed teacher-forced log-probabilities of each target after its prompt (tokenized as an
        edit is), with the edits applied: FloatTensor [B]; see ``inference.score``."""
        self._check()
        return inference.score(self, prompts, targets, batch_size=batch_size)

    # ---- files ------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Save the config and the edits to the directory ``path`` (created if needed) as one unit:
        a save interrupted at any point leaves the previous save loadable (``horen_fast.persist``)."""
        with self.lock:
            self._check()
            persist.save(path, dataclasses.replace(self.config, layer=self.layer_path), self.codebook)

    @classmethod
    def load(cls, path, model: nn.Module, tokenizer) -> "HoReNEditor":
        """Attach saved edits to ``model``; an incomplete or inconsistent save, or a model whose
        layer has another shape, is rejected."""
        config, codebook = persist.load(os.fspath(path), device=next(model.parameters()).device)
        return cls(model, tokenizer, config, codebook=codebook)
