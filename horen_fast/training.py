"""The training side of an edit: the one no-grad first pass, and the optimization of entries.

``Trainer`` is built once per editor (where the blocks are, whether the logits are a plain head,
the forward's keyword names). Per batch of edits:

1. ``prepare`` runs one no-grad pass over tokens [0, T-1) of every edit (right padding) and
   captures the layer input over the prompt (the query, SPEC 2), the layer output at p = P - 1
   (warm init), the input of decoder block L at positions [p, T-1), and the KV cache, cropped to
   the prefix [0, p). It returns one ``Job`` per edit.
2. ``train`` optimizes the jobs' entries together with Adam (one row each) on the mean
   cross-entropy of each edit's target tokens, with the entry applied at p. Nothing before p and
   nothing before block L depends on the entry, so each iteration runs only positions [p, T-1),
   from block L on (blocks < L are swapped, for the duration, for a module returning the captured
   block input), over a fresh copy of the prefix KV cache, and computes logits only at those
   positions (when the architecture's logits are a plain head). Gradients are taken for the entry
   only (``torch.autograd.grad``; parameters are frozen): no weight gradient is ever computed.
   An edit's loss reads only its own entry and Adam is elementwise, so a batch equals one by one.
   With ``config.early_stop_margin`` an edit stops once its target tokens are the argmax by that
   margin (read from the logits the loss already computes; ``n_iter`` stays the cap) and leaves
   the batch; ``Job.iterations`` records its steps.
"""
from __future__ import annotations

import inspect
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import build_queries, lora_init
from .arch import arch_of, block_of

__all__ = ["Trainer", "Job"]


@dataclass(eq=False)
class Job:
    """One edit between its first pass and its trained entry."""
    ids: torch.Tensor            # prompt + target token ids [T]
    P: int                       # prompt length; p = P - 1
    start: int                   # first position the training pass runs (p, or 0 without a prefix cache)
    prefix: list | None          # per layer (key, value) of positions [0, start), [1, heads, start, d]
    h: torch.Tensor | None       # input of block L at positions [start, T-1), [n, hidden]
    q: torch.Tensor              # the query [1, d_key]
    label: tuple                 # target token ids
    y_p: torch.Tensor            # layer output at p (warm init)
    base_loss: float | None      # target loss without any entry ("none" mode)
    seconds: float               # its share of the first pass's wall time
    decision: object = None      # the editor's edits.Decision for this edit
    entry_id: int | None = None  # the codebook entry that will hold it
    entry: torch.Tensor | None = None   # the starting entry (set by the editor), then the trained one
    loss: float | None = None
    iterations: int | None = None   # Adam steps its entry took (training.Trainer.train)


class _Replay(nn.Module):
    """Stands in for the decoder blocks before L while edits train: returns the captured input
    of block L at the suffix positions, whatever it is given."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.hidden


class Trainer:
    """The model side of editing for one wrapped layer (module docstring)."""

    def __init__(self, model: nn.Module, adapter, layer_path: str):
        self.model, self.adapter = model, adapter
        self.device = next(model.parameters()).device
        self.blocks, self.block_index = block_of(model, layer_path)
        arch = arch_of(model)
        self.prefix_cache = arch is None or arch.prefix_cache
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in params
        # where logits are a plain linear head on the base model's output, the training pass
        # computes them only at the target positions (base model + head), not at padding
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base_model = getattr(model, "base_model", model)
        self.head = self.base = None
        if arch is not None and arch.plain_head and isinstance(head, nn.Linear) and base_model is not model:
            self.head, self.base = head, base_model
            bparams = inspect.signature(base_model.forward).parameters
            self.base_cache_kw = "cache" if "cache" in bparams else "past_key_values"

    @contextmanager
    def frozen(self):
        """Eval mode and frozen parameters for the duration (restored after)."""
        was_training = self.model.training
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.model.train(was_training)

    def initial_entry(self, config, ids: list[int], y_p: torch.Tensor, value_dim: int,
                      dtype: torch.dtype) -> torch.Tensor:
        """A new entry's starting point: cold = uniform [0, 1) (SPEC 5.3), warm = y[p]; LoRA:
        A ~ U(-1/sqrt(d), 1/sqrt(d)), B = 0. The random draws are seeded by ``config.seed`` and the
        edit's token ids, so an edit starts the same whatever was edited before it."""
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(str(ids).encode()))
        if config.adapter_mode == "none":
            init = torch.zeros(value_dim)
        elif config.adapter_mode == "lora":
            init = lora_init(config.lora_rank, self.adapter.value_dim, g)
        elif config.val_init == "warm":
            init = y_p.reshape(-1)
        else:
            init = torch.rand(value_dim, generator=g)
        return init.to(self.device, dtype)

    # ---- first pass ---------------------------------------------------------------------------
    def prepare(self, encoded: list[tuple[list[int], list[int]]], config) -> list[Job]:
        """One no-grad pass over [0, T-1) of every (prompt ids, target ids) edit; a Job each."""
        t0 = time.perf_counter()
        dev, B = self.device, len(encoded)
        lengths = [len(a) + len(b) for a, b in encoded]
        n = max(lengths) - 1
        ids = torch.zeros(B, n + 1, dtype=torch.long, device=dev)
        mask = torch.zeros(B, n, dtype=torch.long, device=dev)
        prompt = torch.zeros(B, n, dtype=torch.bool, device=dev)
        for b, (a, t) in enumerate(encoded):
            ids[b, : lengths[b]] = torch.tensor(a + t)
            mask[b, : lengths[b] - 1] = 1
            prompt[b, : len(a)] = True
        cap = {}

        def capture(x, y):
            cap["x"], cap["y"] = x.detach(), y.detach()

        hooks = []
        if self.blocks is not None and self.block_index > 0:
            def block_input(module, args, kwargs):
                h = args[0] if args else kwargs.get("hidden_states")
                if isinstance(h, torch.Tensor):
                    cap["h"] = h.detach()

            def block_output(module, args, output):
                cap["plain"] = isinstance(output, torch.Tensor)
            hooks = [self.blocks[self.block_index].register_forward_pre_hook(block_input, with_kwargs=True),
                     self.blocks[self.block_index - 1].register_forward_hook(block_output)]
        none_mode = config.adapter_mode == "none"
        kw = {self.cache_kw: None, "use_cache": True}
        if self.logits_to_keep:
            kw["logits_to_keep"] = 0 if none_mode else 1
        try:
            with torch.no_grad(), self.adapter.capturing(capture):
                out = self.model(input_ids=ids[:, :n], attention_mask=mask, **kw)
        finally:
            for h in hooks:
                h.remove()
        cache = getattr(out, self.cache_kw, None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if "x" not in cap or cap["x"].dim() != 3:
            shape = tuple(cap["x"].shape) if "x" in cap else None
            raise ValueError(f"the wrapped layer saw an input of shape {shape}, not [batch, tokens, width] "
                             f"(this architecture flattens the tokens before the MLP, e.g. OPT); HoReN cannot "
                             f"edit this layer")
        layers = self._cache_layers(cache, n) if self.prefix_cache else None
        q, _ = build_queries(cap["x"], prompt, config.query_selection_strategy)
        h = cap.get("h") if cap.get("plain") else None
        share = (time.perf_counter() - t0) / B
        jobs = []
        for b, (a, t) in enumerate(encoded):
            P, T = len(a), lengths[b]
            p = P - 1
            start = p if layers is not None else 0   # without a prefix cache: the whole sequence
            prefix = None if layers is None or p == 0 else [(k[b:b + 1, :, :p], v[b:b + 1, :, :p])
                                                            for k, v in layers]
            base_loss = None
            if none_mode:
                base_loss = float(F.cross_entropy(out.logits[b, p: T - 1].float(), ids[b, P:T]))
            jobs.append(Job(ids=ids[b, :T], P=P, start=start, prefix=prefix,
                            h=None if h is None else h[b, start: T - 1], q=q[b: b + 1], label=tuple(t),
                            y_p=cap["y"][b, p], base_loss=base_loss, seconds=share))
        return jobs

    @staticmethod
    def _cache_layers(cache, length: int):
        """Per layer (key, value) [B, heads, length, d] of the first pass, or None when the cache
        cannot be cropped by position (e.g. sliding-window layers shorter than the sequence)."""
        if cache is None:
            return None
        out = []
        try:
            items = list(cache)
        except TypeError:
            return None
        for item in items:
            k, v = item[0], item[1]
            if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[-2] != length:
                return None
            out.append((k, v))
        return out

    # ---- optimization ---------------------------------------------------------------------------
    def train(self, jobs: list[Job], config) -> None:
        """Optimize ``job.entry`` of every job together (one row each); sets ``job.entry`` to the
        trained entry, ``job.loss`` to its final target cross-entropy and ``job.iterations`` to the
        Adam steps it took.

        ``config.early_stop_margin`` (None: always ``n_iter`` steps): a row stops as soon as every
        one of its target tokens is the argmax of its logits by at least that margin (the target's
        logit minus the largest other logit), read from the logits of the loss pass that its next
        step would use; ``n_iter`` stays the cap. A stopped row leaves the batch: its entry no
        longer changes and later passes run only the rows still training (their Adam state carried
        over), so a batch costs the sum of its rows' steps, not the slowest row's."""
        if config.adapter_mode == "none":
            for job in jobs:
                job.loss, job.iterations = job.base_loss, 0
            return
        margin = config.early_stop_margin
        live = list(range(len(jobs)))
        steps = [0] * len(jobs)
        entry = torch.stack([job.entry for job in jobs]).detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([entry], lr=config.lr)
        run = _Batch(self, jobs).__enter__()
        try:
            for _ in range(config.n_iter):
                losses, margins = run.losses(entry, margins=margin is not None)
                stop = (margins >= margin).tolist() if margin is not None else [False] * len(live)
                if any(stop):
                    done = losses.detach().tolist()
                    for k, i in enumerate(live):
                        if stop[k]:
                            jobs[i].entry, jobs[i].loss = entry[k].detach().clone(), float(done[k])
                    keep = [k for k, s in enumerate(stop) if not s]
                    live = [live[k] for k in keep]
                    if not live:
                        break
                (grad,) = torch.autograd.grad(losses.sum(), (entry,))
                if any(stop):
                    entry, opt, grad = _keep_rows(entry, opt, grad, keep, config.lr)
                    run.__exit__(None, None, None)
                    run = _Batch(self, [jobs[i] for i in live]).__enter__()
                entry.grad = grad
                opt.step()
                for i in live:
                    steps[i] += 1
            if live:
                with torch.no_grad():
                    final = run.losses(entry)[0].tolist()
                for k, i in enumerate(live):
                    jobs[i].entry, jobs[i].loss = entry[k].detach().clone(), float(final[k])
        finally:
            run.__exit__(None, None, None)
        for job, n in zip(jobs, steps):
            job.iterations = n


def _keep_rows(entry: torch.Tensor, opt, grad: torch.Tensor, keep: list[int], lr: float):
    """(entry, Adam optimizer, gradient) restricted to the rows ``keep``, Adam state included:
    Adam is elementwise, so the kept rows go on exactly as if the others had never been there."""
    index = torch.tensor(keep, device=entry.device)
    new = entry.detach()[index].clone().requires_grad_(True)
    new_opt = torch.optim.Adam([new], lr=lr)
    old = opt.state.get(entry, {})
    if old:
        new_opt.state[new] = {k: (v[index].clone() if torch.is_tensor(v) and v.dim() > 0 else
                                  (v.clone() if torch.is_tensor(v) else v)) for k, v in old.items()}
    return new, new_opt, grad[index]


class _Batch:
    """The training pass of a batch of edits: row b runs positions [start_b, T_b - 1) of edit b,
    with edit b's entry added at its p_b, over its prefix KV cache [0, start_b) (left-padded to the
    longest prefix, masked), from block L on (blocks before L replay the captured block input while
    inside ``with``). ``losses(entries)`` returns each row's mean target cross-entropy [B]."""

    def __init__(self, trainer: Trainer, jobs: list[Job]):
        self.trainer = tr = trainer
        dev = tr.device
        B = len(jobs)
        self.pre = max((job.start for job in jobs), default=0)
        lens = [len(job.ids) - 1 - job.start for job in jobs]
        n = max(lens)
        ids = torch.zeros(B, n, dtype=torch.long, device=dev)
        targets = torch.full((B, n), -100, dtype=torch.long, device=dev)
        mask = torch.zeros(B, self.pre + n, dtype=torch.long, device=dev)
        pos = torch.empty(B, dtype=torch.long, device=dev)
        for b, job in enumerate(jobs):
            T, s = len(job.ids), job.start
            ids[b, : lens[b]] = job.ids[s: T - 1]
            targets[b, job.P - 1 - s: lens[b]] = job.ids[job.P: T]
            mask[b, self.pre - s: self.pre + lens[b]] = 1
            pos[b] = job.P - 1 - s
        self.ids, self.pos = ids, pos
        valid = targets != -100
        self.valid, self.flat_targets = valid, targets[valid]
        self.rows = valid.nonzero()[:, 0]
        self.count = valid.sum(1)
        self.position_ids = torch.tensor([job.start for job in jobs], device=dev)[:, None] + torch.arange(n, device=dev)
        self.mask = mask
        self.prefix = None
        if self.pre:
            self.prefix = []
            ref = next(job.prefix for job in jobs if job.prefix is not None)
            for layer, (k0, v0) in enumerate(ref):
                ks, vs = [], []
                for job in jobs:  # left-pad every prefix to the longest (padding is masked)
                    k, v = job.prefix[layer] if job.prefix is not None else (k0[..., :0, :], v0[..., :0, :])
                    ks.append(F.pad(k, (0, 0, self.pre - k.shape[-2], 0)))
                    vs.append(F.pad(v, (0, 0, self.pre - v.shape[-2], 0)))
                self.prefix.append((torch.cat(ks), torch.cat(vs)))
        self.replay = None
        if tr.blocks is not None and tr.block_index > 0 and all(job.h is not None for job in jobs):
            h = jobs[0].h.new_zeros(B, n, jobs[0].h.shape[-1])
            for b, job in enumerate(jobs):
                h[b, : lens[b]] = job.h
            self.replay = _Replay(h)
        self.swapped = []

    def __enter__(self):
        tr = self.trainer
        if self.replay is not None:
            for i in range(tr.block_index):
                self.swapped.append((i, tr.blocks[i]))
                tr.blocks[i] = self.replay
        return self

    def __exit__(self, *exc):
        for i, block in self.swapped:
            self.trainer.blocks[i] = block
        self.swapped = []
        return False

    def losses(self, entries: torch.Tensor, margins: bool = False):
        """(each row's mean target cross-entropy [B], and with ``margins`` each row's smallest
        target margin [B]: the target token's logit minus the largest other logit, over its
        target positions; else None)."""
        tr = self.trainer
        cache = None
        if self.prefix is not None:
            from transformers import DynamicCache
            cache = DynamicCache(ddp_cache_data=self.prefix, config=tr.model.config)
        kw = dict(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position_ids,
                  use_cache=cache is not None)
        with tr.adapter.training_entries(self.pos, entries):
            if tr.head is not None:
                kw[tr.base_cache_kw] = cache
                hidden = tr.base(**kw).last_hidden_state
                logits = tr.head(hidden[self.valid])
            else:
                kw[tr.cache_kw] = cache
                logits = tr.model(**kw).logits[self.valid]
        logits = logits.double() if logits.dtype == torch.float64 else logits.float()
        ce = F.cross_entropy(logits, self.flat_targets, reduction="none")
        per_row = ce.new_zeros(len(self.count)).index_add(0, self.rows, ce) / self.count
        if not margins:
            return per_row, None
        with torch.no_grad():
            col = self.flat_targets[:, None]
            target = logits.gather(1, col)[:, 0]
            other = logits.scatter(1, col, float("-inf")).max(dim=1).values
            gap = ce.new_full((len(self.count),), float("inf")).scatter_reduce(
                0, self.rows, target - other, reduce="amin")
        return per_row, gap
