"""HoReNEditor: edit a Hugging Face causal LM with HoReN (SPEC 1-5).

The editor installs a ``HoReNAdapter`` in place of one linear layer (the MLP output projection of
layer L), keeps every edit as one entry of a ``Codebook``, and never changes the base weights.

How an edit runs (``edit``, ``edit_many``), and why it costs O(1) in the number of stored edits:

1. ``prompt + " " + target`` is tokenized; the prompt is the first P tokens, p = P - 1 its last
   position, and the target tokens are everything after it (their labels; SPEC 5.1).
2. One no-grad pass over tokens [0, T-1) captures the layer input over the prompt (the query,
   SPEC 2), the layer output at p (warm init), the input of decoder block L at positions [p, T-1),
   and the KV cache, which is cropped to the prefix [0, p).
3. The query is retrieved once against the codebook (SPEC 5.2-5.3): reuse the matched entry if its
   label equals this edit's target, replace it if its key is this query (the same prompt edited
   again), else add a new entry (cold: uniform [0, 1); warm: y[p]).
4. The entry alone is optimized with its own Adam (lr ``edit_lr``, ``n_iter`` steps) on the mean
   cross-entropy of the target tokens, with the entry applied at p. Nothing before position p and
   nothing before block L depends on the entry, so each iteration runs only the positions
   [p, T-1) (exactly those whose logits predict target tokens), from block L on (blocks < L are
   swapped, for the duration, for a module returning the captured block input), over a fresh copy
   of the prefix KV cache, and computes logits only at those positions.
   During the optimization no other codebook entry is applied at p: the published code applies
   the entry it retrieves for the query, and for a new entry that is the entry itself (its key is
   the query, cosine 1); for a reused entry it is the matched entry, the one being trained. So
   retrieval is decided once, before the loop, and the loop applies only the trained entry.
   Parameters are frozen during edits and gradients are taken for the entry only
   (``torch.autograd.grad``): no weight gradient is ever computed.
5. ``edit_many`` decides edits in order (each against the codebook its predecessors left), then
   trains up to ``batch_size`` entries together, one padded row each. Since an edit's loss reads
   only its own entry and Adam is elementwise, this equals editing one by one (to rounding), while
   the weights are read once per step for the whole batch instead of once per edit.

At inference the adapter adds each row's matched value at that row's last prompt position at the
prefill pass (SPEC 4). The prompt is read from the ``attention_mask`` of the first pass (a forward
pre-hook on the model): all non-padding tokens of a pass over an empty KV cache are the prompt;
passes over a non-empty cache (decode steps) add nothing; a 2-D ``attention_mask`` whose width
differs from the input's also marks a decode step. Without an ``attention_mask`` every input token
is prompt. So a plain ``model(...)`` call or ``model.generate(...)`` with the KV cache applies the
edits where ``editor.generate`` does. ``generate`` and ``score`` pin the prompt explicitly, so
cache-free generation (which re-runs the whole sequence each step) applies the edit at the same
position as cached generation; a plain ``model.generate(use_cache=False)`` cannot know the
original prompt and would treat each step's whole sequence as the prompt.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import HoReNAdapter, build_queries, layer_dims, lora_init
from .codebook import Codebook
from .config import HoReNConfig

__all__ = ["HoReNEditor", "EditResult", "resolve_layer"]

CONFIG_FILE = "config.yaml"
CODEBOOK_FILE = "codebook.safetensors"
SAME_KEY_COS = 1 - 1e-6   # SPEC 5.3: a matched key this close to the query is "the same prompt"

# (container of the decoder blocks, the MLP output projection inside a block), per architecture
_LAYOUTS = (
    ("model.layers", "mlp.down_proj"),          # Llama, Qwen2, Mistral, Gemma, Phi-3, ...
    ("transformer.h", "mlp.c_proj"),            # GPT-2 (Conv1D)
    ("gpt_neox.layers", "mlp.dense_4h_to_h"),   # GPT-NeoX / Pythia
)


# model types whose logits are exactly lm_head(base_model(...).last_hidden_state)
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2",
                         "smollm3"})


@dataclass
class EditResult:
    id: int                    # the codebook entry holding this edit
    loss: float                # target cross-entropy with the final value
    action: str                # "added" | "reused" | "replaced"
    replaced_id: int | None    # the entry this edit replaced (action "replaced")
    seconds: float             # wall time of the edit


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and re.fullmatch(r"-?\d+", part):
            idx = int(part)
            if not -len(mod) <= idx < len(mod):
                raise IndexError(part)
            mod = mod[idx]
        else:
            mod = getattr(mod, part)
    return mod


def resolve_layer(model: nn.Module, layer: str | int) -> tuple[str, nn.Module]:
    """The module path and module for ``layer`` (a module path, or a decoder layer index resolved
    with the architecture's layout: ``model.layers.{i}.mlp.down_proj`` for Llama/Qwen2/Mistral,
    ``transformer.h.{i}.mlp.c_proj`` for GPT-2)."""
    if isinstance(layer, int):
        for container, proj in _LAYOUTS:
            try:
                blocks = _get(model, container)
            except AttributeError:
                continue
            n = len(blocks)
            if not -n <= layer < n:
                raise ValueError(f"layer index {layer} is out of range: the model has {n} decoder "
                                 f"layers ({container}.0 .. {container}.{n - 1})")
            path = f"{container}.{layer % n}.{proj}"
            break
        else:
            raise ValueError(f"cannot resolve layer index {layer} for {type(model).__name__}: give the "
                             f"module path of the MLP output projection instead (layer='...down_proj')")
    else:
        path = layer
    try:
        module = _get(model, path)
    except (AttributeError, IndexError):
        raise ValueError(f"the model ({type(model).__name__}) has no module {path!r}") from None
    if isinstance(module, HoReNAdapter):
        raise ValueError(f"{path} already carries a HoReN adapter; detach() that editor first")
    layer_dims(module)  # raises a clear TypeError for a non-linear module
    return path, module


def _blocks_of(model: nn.Module, path: str) -> tuple[nn.ModuleList | None, int | None]:
    """The decoder-block list containing the layer at ``path`` and the block's index."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if re.fullmatch(r"\d+", parts[i]):
            parent = _get(model, ".".join(parts[:i]))
            if isinstance(parent, nn.ModuleList):
                return parent, int(parts[i])
    return None, None


class _Replay(nn.Module):
    """Stands in for the decoder blocks before L while an edit trains: returns the captured input
    of block L at the suffix positions, whatever it is given."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.hidden


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def _record(rec) -> tuple[str, str]:
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


def _chunks(records: Iterable, size: int):
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class HoReNEditor:
    """HoReN on one layer of ``model`` (see the module docstring).

    Attributes: ``model``, ``tokenizer``, ``config``, ``codebook``, ``adapter``, ``layer_path``.
    """

    def __init__(self, model: nn.Module, tokenizer, config: HoReNConfig, *,
                 codebook: Codebook | None = None):
        if not isinstance(config, HoReNConfig):
            raise TypeError(f"config must be a HoReNConfig, got {type(config).__name__}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.layer_path, base = resolve_layer(model, config.layer)
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
        parent_path, _, name = self.layer_path.rpartition(".")
        self._parent = _get(model, parent_path) if parent_path else model
        self._name = name
        self._blocks, self._block_index = _blocks_of(model, self.layer_path)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        # Where logits are a plain linear head on the base model's output, the edit loop computes
        # them only at the target positions (base model + head), not at padding.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base_model = getattr(model, "base_model", model)
        self._head = None
        if (getattr(getattr(model, "config", None), "model_type", None) in _PLAIN_HEAD
                and isinstance(head, nn.Linear) and base_model is not model):
            self._head, self._base = head, base_model
            bparams = inspect.signature(base_model.forward).parameters
            self._base_cache_kw = "cache" if "cache" in bparams else "past_key_values"
        self._set_child(self.adapter)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, always_call=True),
        ]
        self._attached = True

    @staticmethod
    def entry_dim(config: HoReNConfig, d_value: int) -> int:
        """Width of a codebook entry: the value (value, none) or the flattened LoRA pair."""
        return 2 * config.lora_rank * d_value if config.adapter_mode == "lora" else d_value

    # ---- installation -----------------------------------------------------------------------
    def _set_child(self, module: nn.Module) -> None:
        if isinstance(self._parent, (nn.ModuleList, nn.Sequential)) and self._name.isdigit():
            self._parent[int(self._name)] = module
        else:
            setattr(self._parent, self._name, module)

    def detach(self) -> None:
        """Put the original layer back and remove the hooks; the editor is unusable afterwards."""
        if not self._attached:
            return
        for h in self._hooks:
            h.remove()
        self._set_child(self.adapter.base)
        self._attached = False

    def _check(self) -> None:
        if not self._attached:
            raise RuntimeError("this HoReNEditor was detached; create a new one (or HoReNEditor.load)")

    def _pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            mask = None
        T = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
        first = _cache_length(cache) == 0 and (mask is None or T is None or mask.shape[1] == T)
        self.adapter.begin_pass(first, mask if first else None)

    def _post_hook(self, module, args, output):
        self.adapter.end_pass()

    def __len__(self) -> int:
        return len(self.codebook)

    def __repr__(self) -> str:
        return (f"HoReNEditor(layer={self.layer_path!r}, mode={self.config.adapter_mode!r}, "
                f"edits={len(self.codebook)}, attached={self._attached})")

    # ---- tokenization -----------------------------------------------------------------------
    def _encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) of ``prompt + " " + target`` (SPEC 5.1). The joint
        tokenization is used when it starts with the prompt's own tokens; otherwise the target is
        tokenized alone (``" " + target``, no special tokens) and appended."""
        tok = self.tokenizer
        p_ids = list(tok(prompt)["input_ids"])
        full = list(tok(prompt + " " + target)["input_ids"])
        if len(full) > len(p_ids) and full[: len(p_ids)] == p_ids:
            t_ids = full[len(p_ids):]
        else:
            t_ids = list(tok(" " + target, add_special_tokens=False)["input_ids"])
        if not p_ids or not t_ids:
            raise ValueError(f"the prompt {prompt!r} or target {target!r} tokenizes to nothing")
        if len(p_ids) + len(t_ids) > self.config.max_length:
            raise ValueError(f"prompt + target is {len(p_ids) + len(t_ids)} tokens, more than max_length="
                             f"{self.config.max_length}; shorten it or raise max_length")
        return p_ids, t_ids

    # ---- editing ----------------------------------------------------------------------------
    @contextmanager
    def _editing(self):
        """Eval mode and frozen parameters for the duration of edits (restored after)."""
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
            self.adapter._capture = None
            self.adapter._edit = None

    def _initial_entry(self, ids: list[int], y_p: torch.Tensor) -> torch.Tensor:
        """A new entry's starting point: cold = uniform [0, 1) (SPEC 5.3), warm = y[p]; LoRA:
        A ~ U(-1/sqrt(d), 1/sqrt(d)), B = 0. The random draws are seeded by ``config.seed`` and the
        edit's token ids, so an edit starts the same whatever was edited before it."""
        cfg, cb = self.config, self.codebook
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(str(ids).encode()))
        if cfg.adapter_mode == "none":
            init = torch.zeros(cb.value_dim)
        elif cfg.adapter_mode == "lora":
            init = lora_init(cfg.lora_rank, self.adapter.value_dim, g)
        elif cfg.val_init == "warm":
            init = y_p.reshape(-1)
        else:
            init = torch.rand(cb.value_dim, generator=g)
        return init.to(self.device, cb.dtype)

    def _prepare(self, records: list[tuple[str, str]]) -> list["_Job"]:
        """Tokenize a chunk of edits and run their one no-grad pass over [0, T-1), all rows at once
        (right padding; module docstring, 2)."""
        t0 = time.perf_counter()
        enc = [self._encode(p, t) for p, t in records]
        B = len(enc)
        lengths = [len(a) + len(b) for a, b in enc]
        n = max(lengths) - 1
        ids = torch.zeros(B, n + 1, dtype=torch.long, device=self.device)
        mask = torch.zeros(B, n, dtype=torch.long, device=self.device)
        prompt = torch.zeros(B, n, dtype=torch.bool, device=self.device)
        for b, (a, t) in enumerate(enc):
            ids[b, : lengths[b]] = torch.tensor(a + t)
            mask[b, : lengths[b] - 1] = 1
            prompt[b, : len(a)] = True
        ad, cap = self.adapter, {}

        def capture(x, y):
            cap["x"], cap["y"] = x.detach(), y.detach()

        hooks = []
        if self._blocks is not None and self._block_index > 0:
            def block_input(module, args, kwargs):
                h = args[0] if args else kwargs.get("hidden_states")
                if isinstance(h, torch.Tensor):
                    cap["h"] = h.detach()

            def block_output(module, args, output):
                cap["plain"] = isinstance(output, torch.Tensor)
            hooks = [self._blocks[self._block_index].register_forward_pre_hook(block_input, with_kwargs=True),
                     self._blocks[self._block_index - 1].register_forward_hook(block_output)]
        none_mode = self.config.adapter_mode == "none"
        kw = {self._cache_kw: None, "use_cache": True}
        if self._logits_to_keep:
            kw["logits_to_keep"] = 0 if none_mode else 1
        ad._capture = capture
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids[:, :n], attention_mask=mask, **kw)
        finally:
            ad._capture = None
            for h in hooks:
                h.remove()
        cache = getattr(out, self._cache_kw, None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        layers = self._cache_layers(cache, n)
        q, _ = build_queries(cap["x"], prompt, self.config.query_selection_strategy)
        h = cap.get("h") if cap.get("plain") else None
        share = (time.perf_counter() - t0) / B
        jobs = []
        for b, (a, t) in enumerate(enc):
            P, T = len(a), lengths[b]
            p = P - 1
            start = p if layers is not None else 0   # without a prefix cache: the whole sequence
            prefix = None if layers is None or p == 0 else [(k[b:b + 1, :, :p], v[b:b + 1, :, :p])
                                                            for k, v in layers]
            base_loss = None
            if none_mode:
                base_loss = float(F.cross_entropy(out.logits[b, p: T - 1].float(), ids[b, P:T]))
            jobs.append(_Job(ids=ids[b, :T], P=P, start=start, prefix=prefix,
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
        for item in cache:
            k, v = item[0], item[1]
            if k is None or k.shape[-2] != length:
                return None
            out.append((k, v))
        return out

    def _decide(self, job: "_Job", pending: set[int]) -> bool:
        """Reuse, replace or add (SPEC 5.2-5.3) against the codebook as it stands. Returns False
        (deciding nothing) when the edit would reuse or replace an entry still being trained in
        ``pending``."""
        cb = self.codebook
        job.action, job.entry_id, job.replaced = "added", None, None
        if len(cb):
            res = cb.retrieve(job.q)
            if bool(res.matched[0]):
                j = int(res.index[0])
                if cb.get_labels(j)[0] == job.label:
                    job.action, job.entry_id = "reused", j
                else:
                    k = cb.get_keys(j)[0].to(torch.float64)
                    if float(F.normalize(job.q[0].to(torch.float64), dim=0) @ k) > SAME_KEY_COS:
                        job.action, job.replaced = "replaced", j
                if j in pending and job.action != "added":
                    return False
        if job.action == "reused":
            job.entry = cb.get_values(job.entry_id)[0]
        else:
            job.entry = self._initial_entry(job.ids.tolist(), job.y_p)
            if job.replaced is not None:
                cb.remove(job.replaced)
            # stored now (key and label decide later edits); its value is written after training
            job.entry_id = int(cb.add(job.q, job.entry[None], [job.label])[0])
        return True

    def _train(self, jobs: list["_Job"]) -> None:
        """Optimize the entries of ``jobs`` (one row each, all at once) and store them."""
        t0 = time.perf_counter()
        cfg, cb = self.config, self.codebook
        if cfg.adapter_mode == "none":
            losses = [job.base_loss for job in jobs]
        else:
            run = _Batch(self, jobs)
            entry = torch.stack([job.entry for job in jobs]).detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([entry], lr=cfg.lr)
            with run:
                for _ in range(cfg.n_iter):
                    (grad,) = torch.autograd.grad(run.losses(entry).sum(), (entry,))
                    entry.grad = grad
                    opt.step()
                with torch.no_grad():
                    losses = run.losses(entry).tolist()
            entry = entry.detach()
            for i, job in enumerate(jobs):
                cb.update(job.entry_id, value=entry[i])
        share = (time.perf_counter() - t0) / len(jobs)
        for job, loss in zip(jobs, losses):
            job.result = EditResult(id=job.entry_id, loss=float(loss), action=job.action,
                                    replaced_id=job.replaced, seconds=job.seconds + share)

    def edit(self, prompt: str, target: str) -> EditResult:
        """Make one edit (SPEC 5); returns its EditResult."""
        return self.edit_many([(prompt, target)], progress=False)[0]

    def edit_many(self, records: Iterable, progress: bool = True, batch_size: int = 16) -> list[EditResult]:
        """Sequential editing: the same result as ``edit`` on each record in turn.

        A record is a dict with "prompt" and "target" (or EasyEdit's "target_new"), or a
        (prompt, target) pair. Each edit's entry is decided (reuse / replace / add) in order, against
        the codebook as the edits before it left it; then up to ``batch_size`` entries are optimized
        together, one row each: an edit's optimization reads only its own entry (module
        docstring, 4), and Adam is elementwise, so this equals training them one by one (up to
        floating-point rounding) while reading the model's weights once per step for all of them.
        Up to 4 * ``batch_size`` decided edits wait to be trained, grouped by length to limit
        padding; an edit that would reuse or replace an entry still waiting is decided after those
        are trained. If editing is interrupted, the edits still waiting are taken back."""
        self._check()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        from tqdm.auto import tqdm
        total = len(records) if hasattr(records, "__len__") else None
        results, pending = [], []
        window = 4   # edits wait for up to window * batch_size others, to be batched by length
        bar = tqdm(total=total, disable=not progress, desc="HoReN edits", unit="edit")

        def flush():
            # train the waiting edits in batches of similar length (less padding), report in order
            order = sorted(pending, key=lambda job: len(job.ids) - job.start)
            for lo in range(0, len(order), batch_size):
                self._train(order[lo: lo + batch_size])
                bar.update(len(order[lo: lo + batch_size]))
            results.extend(job.result for job in pending)
            pending.clear()
        try:
            with self._editing():
                for chunk in _chunks(records, batch_size):
                    for job in self._prepare([_record(rec) for rec in chunk]):
                        if not self._decide(job, {j.entry_id for j in pending}):
                            flush()
                            self._decide(job, set())
                        pending.append(job)
                        if len(pending) >= window * batch_size:
                            flush()
                flush()
        except BaseException:
            for job in pending:  # entries stored for edits that were not trained: take them back
                if job.action != "reused" and job.entry_id in self.codebook:
                    self.codebook.remove(job.entry_id)
            raise
        finally:
            bar.close()
        return results

    def forget(self, entry_id: int) -> None:
        """Remove an edit (its codebook entry); outputs return to what they were without it."""
        self._check()
        self.codebook.remove(int(entry_id))

    # ---- inference --------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``model.generate`` with the edits applied at each row's last prompt token (the prompt is
        every non-padding token of ``input_ids``). Takes the tokenizer's outputs and any Hugging Face
        generation argument; returns what ``model.generate`` returns. With the KV cache (default) the
        edit is applied at the prefill pass only; with ``use_cache=False`` each step re-runs the
        whole sequence and the edit stays at the same position, so both give the same tokens."""
        self._check()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad(), self.adapter.pinned(attention_mask != 0):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def score(self, prompts: list[str], targets: list[str], batch_size: int = 16) -> torch.Tensor:
        """Summed teacher-forced log-probabilities of each target after its prompt (tokenized as an
        edit is), with the edits applied: FloatTensor [B]."""
        self._check()
        if isinstance(prompts, str):
            prompts, targets = [prompts], [targets]
        if len(prompts) != len(targets):
            raise ValueError(f"score: {len(prompts)} prompts but {len(targets)} targets")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        out = []
        for lo in range(0, len(prompts), batch_size):
            enc = [self._encode(p, t) for p, t in zip(prompts[lo: lo + batch_size], targets[lo: lo + batch_size])]
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
            ids, mask, prompt, gold = (t.to(self.device) for t in (ids, mask, prompt, gold))
            with torch.no_grad(), self.adapter.pinned(prompt):
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            lp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64
                                                    else torch.float32), dim=-1)
            tok_lp = lp.gather(2, ids[:, 1:, None]).squeeze(2)
            out.append((tok_lp * gold[:, :-1]).sum(1))
        return torch.cat(out)

    # ---- files ------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Save the config and the codebook to the directory ``path`` (created if needed)."""
        self._check()
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        dataclasses.replace(self.config, layer=self.layer_path).to_yaml(os.path.join(path, CONFIG_FILE))
        self.codebook.save(os.path.join(path, CODEBOOK_FILE))

    @classmethod
    def load(cls, path, model: nn.Module, tokenizer) -> "HoReNEditor":
        """Attach saved edits to ``model``; a model whose layer has another shape is rejected."""
        path = os.fspath(path)
        for name in (CONFIG_FILE, CODEBOOK_FILE):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{path} is not a saved HoReN editor: {name} is missing")
        config = HoReNConfig.from_yaml(os.path.join(path, CONFIG_FILE))
        device = next(model.parameters()).device
        codebook = Codebook.load(os.path.join(path, CODEBOOK_FILE), device=device)
        return cls(model, tokenizer, config, codebook=codebook)


@dataclass(eq=False)
class _Job:
    """One edit between its first pass and its stored result."""
    ids: torch.Tensor            # prompt + target token ids [T]
    P: int                       # prompt length; p = P - 1
    start: int                   # first position the training pass runs (p, or 0 without a prefix cache)
    prefix: list | None          # per layer (key, value) of positions [0, start), [1, heads, start, d]
    h: torch.Tensor | None       # input of block L at positions [start, T-1), [n, hidden]
    q: torch.Tensor              # the query [1, d_key]
    label: tuple                 # target token ids
    y_p: torch.Tensor            # layer output at p (warm init)
    base_loss: float | None      # target loss without any entry ("none" mode)
    seconds: float
    action: str = "added"
    entry_id: int | None = None
    replaced: int | None = None
    entry: torch.Tensor | None = None
    result: EditResult | None = None


class _Batch:
    """The training pass of a batch of edits: row b runs positions [start_b, T_b - 1) of edit b,
    with edit b's entry added at its p_b, over its prefix KV cache [0, start_b) (left-padded to the
    longest prefix, masked), from block L on (blocks before L replay the captured block input while
    inside ``with``). ``losses(entries)`` returns each row's mean target cross-entropy [B]."""

    def __init__(self, editor: HoReNEditor, jobs: list[_Job]):
        self.editor = ed = editor
        dev = ed.device
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
        if ed._blocks is not None and ed._block_index > 0 and all(job.h is not None for job in jobs):
            h = jobs[0].h.new_zeros(B, n, jobs[0].h.shape[-1])
            for b, job in enumerate(jobs):
                h[b, : lens[b]] = job.h
            self.replay = _Replay(h)
        self.replaced = []

    def __enter__(self):
        ed = self.editor
        if self.replay is not None:
            for i in range(ed._block_index):
                self.replaced.append((i, ed._blocks[i]))
                ed._blocks[i] = self.replay
        return self

    def __exit__(self, *exc):
        for i, block in self.replaced:
            self.editor._blocks[i] = block
        self.replaced = []
        return False

    def losses(self, entries: torch.Tensor) -> torch.Tensor:
        ed = self.editor
        cache = None
        if self.prefix is not None:
            from transformers import DynamicCache
            cache = DynamicCache(ddp_cache_data=self.prefix, config=ed.model.config)
        kw = dict(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position_ids,
                  use_cache=cache is not None)
        ed.adapter._edit = (self.pos, entries)
        try:
            if ed._head is not None:
                kw[ed._base_cache_kw] = cache
                hidden = ed._base(**kw).last_hidden_state
                logits = ed._head(hidden[self.valid])
            else:
                kw[ed._cache_kw] = cache
                logits = ed.model(**kw).logits[self.valid]
        finally:
            ed.adapter._edit = None
        logits = logits.double() if logits.dtype == torch.float64 else logits.float()
        ce = F.cross_entropy(logits, self.flat_targets, reduction="none")
        return ce.new_zeros(len(self.count)).index_add(0, self.rows, ce) / self.count
