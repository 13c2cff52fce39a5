"""Choosing the match threshold tau (and the recommended settings of known models).

Whether an edit fires on a prompt depends only on retrieval: the prompt's query (the wrapped
layer's input, SPEC 2) against the codebook keys (the queries of the edit prompts, SPEC 5). Both
are properties of the unedited model up to the wrapped layer, since the adapter only changes what
comes after it. So tau can be chosen without training a single value:

1. one forward pass (stopped at the wrapped layer) gives the queries of the edit prompts, of their
   paraphrases and of unrelated prompts;
2. the codebook that sequential editing would build is replayed (reuse / replace / add, SPEC 5.3,
   with the editor's own decision, ``edits.decide``);
3. for every candidate tau, the Hopfield final scores (SPEC 3) tell which prompts match which entry:
   an edit prompt or a paraphrase is served when it matches an entry made for its target, an
   unrelated prompt is left alone when it matches nothing;
4. tau maximizes the geometric mean of the three rates (a retrieval-only OP), and is taken in the
   middle of the widest run of thresholds that reach the maximum (the largest margin).

``calibrate`` returns that tau; ``retrieval_table`` gives the rates for every candidate, for
analysis and for ``bench/sweep_defaults.py``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .arch import layer_path, resolve_layer
from .codebook import Codebook
from .data import EditRecord, left_pad
from .edits import SAME_KEY_COS, Changes, Decision, decide, edit_label
from .retrieval import final_scores

__all__ = ["DEFAULTS", "recommended_config", "prompt_queries", "edit_label", "Replay", "replay", "replay_codebook",
           "RetrievalTable", "retrieval_table", "choose_threshold", "calibrate", "register_cli"]

# Recommended settings of the models horen-fast knows, chosen on the first 300 ZsRE dev records
# (bench/sweep_defaults.py; table in bench/RESULTS.md, "ZsRE dev, SmolLM2"). Keys are HoReNConfig
# fields; the rest are the paper's. For SmolLM2 the layer barely matters (retrieval-only OP 0.82-0.85
# for layers 3-29 except 9); tau does: 0.735 instead of the paper's 0.85 serves 0.11 more paraphrases
# with no unrelated prompt matched.
DEFAULTS: dict[str, dict] = {
    "smollm2": {"layer": 15, "hopfield_key_match_threshold": 0.735, "hopfield_retrieval_beta": 20.0},
}
DEFAULT_TAUS = tuple(round(0.50 + 0.0025 * i, 4) for i in range(199))   # 0.50 .. 0.995


def recommended_config(model_name: str = "smollm2", model=None):
    """The HoReNConfig to start from: the recommended settings of a known model name (see
    DEFAULTS), else the paper's settings at ``arch.default_layer(model)``."""
    from .config import HoReNConfig
    key = str(model_name).lower()
    if key in ("smollm2-135m", "smollm2-135m-instruct"):
        key = "smollm2"
    if key in DEFAULTS:
        return HoReNConfig(**DEFAULTS[key])
    if model is None:
        raise ValueError(f"no recommended settings for {model_name!r}; pass the model so that the "
                         f"default layer can be derived, or build a HoReNConfig yourself")
    from .arch import default_layer
    return HoReNConfig(layer=default_layer(model))


# --------------------------------------------------------------------------- queries

class _Stop(Exception):
    pass


def _layer_module(model, layer, editor=None):
    """The linear module whose input is the query at ``layer`` (the wrapped base layer when an
    editor's adapter sits there)."""
    if editor is not None and layer_path(model, layer) == editor.layer_path:
        return editor.adapter.base
    return resolve_layer(model, layer)[1]


@torch.no_grad()
def prompt_queries(model, tokenizer, prompts: Sequence[str], layers: Sequence, strategy: str, *,
                   batch_size: int = 32) -> dict:
    """The (unnormalized) queries of ``prompts`` at each wrapped layer in ``layers`` (indices or
    module paths): {layer: tensor [len(prompts), d_key]} (float32, float64 for a float64 model, as
    ``adapter.build_queries`` makes them). ``model`` is a causal LM or a
    HoReNEditor (its edits are not applied here; queries do not depend on them). Each forward pass
    stops after the deepest requested layer."""
    from .adapter import build_queries
    editor = model if hasattr(model, "adapter") and hasattr(model, "codebook") else None
    model = editor.model if editor is not None else model
    modules = [_layer_module(model, layer, editor) for layer in layers]
    if len(set(map(id, modules))) != len(modules):
        raise ValueError(f"layers {list(layers)} name the same module twice")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(not x for x in ids):
        raise ValueError("a prompt tokenizes to nothing")
    out = {layer: [None] * len(prompts) for layer in layers}
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    captured: dict[int, torch.Tensor] = {}

    def hook_for(k):
        def hook(module, args):
            captured[k] = args[0].detach()
            if len(captured) == len(modules):
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(hook_for(k)) for k, m in enumerate(modules)]
    was_enabled = editor.adapter.enabled if editor is not None else None
    if editor is not None:
        editor.adapter.enabled = False
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, mask = left_pad([ids[i] for i in rows], pad)
            captured.clear()
            try:
                positions = (mask.cumsum(1) - 1).clamp(min=0)
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                      position_ids=positions.to(device), use_cache=False)
            except _Stop:
                pass
            if len(captured) != len(modules):
                raise RuntimeError("the forward pass did not reach every requested layer")
            for k, layer in enumerate(layers):
                q, _ = build_queries(captured[k], mask.to(device) != 0, strategy)
                for r, i in enumerate(rows):
                    out[layer][i] = q[r].cpu()
    finally:
        for h in handles:
            h.remove()
        if editor is not None:
            editor.adapter.enabled = was_enabled
    return {layer: torch.stack(v) for layer, v in out.items()}


# --------------------------------------------------------------------------- codebook replay

@dataclass
class Replay:
    """What sequential editing did, edit by edit (``replay``)."""
    actions: list[str]     # per edit: "added" | "reused" | "replaced" (edits.decide)
    entry_ids: list[int]   # per edit: the entry it was stored in (EditResult.id)
    entry_of: list[int]    # per edit: the entry holding it now, -1 where a later edit of the same
                           # prompt replaced it


def replay(codebook, queries: torch.Tensor, labels: Sequence[tuple], *, same: Sequence[bool] | None = None,
           marks: Sequence[int] = (), at_mark=None) -> Replay:
    """Replay sequential editing on ``codebook`` (empty; build it as the editor builds its own for
    the editor's decisions: same dtype, retrieval settings and backend): edit i has query
    ``queries[i]`` and label ``labels[i]``, and is decided by the editor's own ``edits.decide`` and
    stored by ``edits.Changes`` (values are zeros: decisions never read them).

    ``same[i]`` (optional): False where no earlier edit has (nearly) this very key; such an edit
    whose label no live entry holds can only be added, and is added without a lookup. Without it
    every edit is looked up, as the editor does. ``at_mark(k, state)`` is called after the first
    ``k`` edits for each k in ``marks``, with the Replay so far."""
    labels = [tuple(x) for x in labels]
    changes = Changes(codebook)
    no_value = torch.zeros(codebook.value_dim, dtype=codebook.dtype, device=codebook.device)
    q = queries.to(codebook.dtype)
    live_labels: dict[tuple, int] = {}
    owners: dict[int, list[int]] = {}   # entry id -> edits (an entry is never removed here)
    state = Replay([], [], [])
    todo = sorted({int(m) for m in marks if 0 < int(m) <= len(labels)})
    for i, label in enumerate(labels):
        if same is None or live_labels.get(label, 0) > 0 or same[i]:
            decision = decide(codebook, q[i], label)
        else:
            decision = Decision("added", None)
        if decision.action == "replaced":
            old = codebook.get_labels(decision.entry_id)[0]
            live_labels[old] -= 1
            for e in owners.pop(decision.entry_id):
                state.entry_of[e] = -1
        j = changes.apply(decision, q[i], label, no_value)
        if decision.action != "reused":
            live_labels[label] = live_labels.get(label, 0) + 1
        owners.setdefault(j, []).append(i)
        state.actions.append(decision.action)
        state.entry_ids.append(j)
        state.entry_of.append(j)
        while todo and todo[0] == i + 1:
            todo.pop(0)
            if at_mark is not None:
                at_mark(i + 1, state)
    return state


def replay_codebook(edit_queries: torch.Tensor, labels: Sequence[tuple], *, threshold: float,
                    beta: float = 20.0, alpha: float = 0.1, steps: int = 1, eps: float = 1e-5):
    """The codebook sequential editing builds (SPEC 5.3) from the edit prompts' queries, in order
    (``replay`` on a float64 torch codebook): returns (keys [N, d] unit norm, entry labels,
    entry_of_edit: the entry index each edit ended in, or -1 where a later edit of the same prompt
    replaced it)."""
    q = F.normalize(edit_queries.double(), dim=1)
    # an earlier edit with (nearly) this very key: the only way a "replace" can happen
    same = torch.tril(q @ q.T > SAME_KEY_COS, diagonal=-1).any(dim=1).tolist()
    book = Codebook(q.shape[1], 1, dtype=torch.float64, beta=beta, alpha=alpha, steps=steps,
                    threshold=threshold, eps=eps, backend="torch")
    done = replay(book, q, labels, same=same)
    return book.keys.clone(), list(book.get_labels(book.ids)) if len(book) else [], done.entry_of


# --------------------------------------------------------------------------- retrieval table

@dataclass
class RetrievalTable:
    """Retrieval-only rates for each candidate threshold."""
    taus: list[float]
    rel: list[float]   # edit prompts matched to an entry with their target
    gen: list[float]   # paraphrases matched to an entry with their target
    loc: list[float]   # unrelated prompts matched to nothing
    op: list[float]    # geometric mean of the three
    entries: list[int]

    def best(self) -> int:
        return choose_threshold(self.taus, self.op)

    def row(self, k: int) -> dict:
        return {"tau": self.taus[k], "rel": self.rel[k], "gen": self.gen[k], "loc": self.loc[k],
                "op": self.op[k], "entries": self.entries[k]}


def _rates(scores: torch.Tensor, key_labels, wanted, tau: float) -> float:
    best, idx = scores.max(dim=1)
    ok = [(float(b) > tau) and key_labels[int(j)] == w for b, j, w in zip(best, idx, wanted)]
    return sum(ok) / len(ok)


def retrieval_table(edit_q: torch.Tensor, para_q: torch.Tensor | None, unrelated_q: torch.Tensor | None,
                    labels: Sequence[tuple], taus: Sequence[float] = DEFAULT_TAUS, *, beta: float = 20.0,
                    alpha: float = 0.1, steps: int = 1, eps: float = 1e-5, replay: bool = True) -> RetrievalTable:
    """Rates of correct retrieval at each tau. With ``replay`` the codebook is replayed for every
    tau (reuse decisions depend on it); without, it is replayed once at the median tau."""
    labels = [tuple(x) for x in labels]
    cache = {}
    rows = {"rel": [], "gen": [], "loc": [], "op": [], "entries": []}
    fixed = None if replay else replay_codebook(edit_q, labels, threshold=float(sorted(taus)[len(taus) // 2]),
                                                beta=beta, alpha=alpha, steps=steps, eps=eps)
    for tau in taus:
        keys, key_labels, _ = fixed or replay_codebook(edit_q, labels, threshold=tau, beta=beta, alpha=alpha,
                                                       steps=steps, eps=eps)
        sig = (keys.shape[0], tuple(key_labels))
        if sig not in cache:
            kw = dict(beta=beta, alpha=alpha, steps=steps, eps=eps)
            cache = {sig: {name: final_scores(qs.double(), keys, **kw) for name, qs in
                           (("rel", edit_q), ("gen", para_q), ("loc", unrelated_q)) if qs is not None}}
        s = cache[sig]
        rel = _rates(s["rel"], key_labels, labels, tau)
        gen = _rates(s["gen"], key_labels, labels, tau) if "gen" in s else 1.0
        loc = float((s["loc"].max(dim=1).values <= tau).double().mean()) if "loc" in s else 1.0
        for name, v in (("rel", rel), ("gen", gen), ("loc", loc), ("op", (rel * gen * loc) ** (1 / 3)),
                        ("entries", keys.shape[0])):
            rows[name].append(v)
    return RetrievalTable(taus=[float(t) for t in taus], **rows)


def choose_threshold(taus: Sequence[float], objective: Sequence[float], tol: float = 1e-9) -> int:
    """Index of the tau in the middle of the widest run of consecutive candidates that reach the
    maximum of ``objective``."""
    best = max(objective)
    runs, start = [], None
    for k, v in enumerate(objective):
        if v >= best - tol:
            start = k if start is None else start
        elif start is not None:
            runs.append((start, k - 1))
            start = None
    if start is not None:
        runs.append((start, len(objective) - 1))
    lo, hi = max(runs, key=lambda r: (taus[r[1]] - taus[r[0]], -r[0]))
    return (lo + hi) // 2


def calibrate(editor_or_model, tokenizer, records: Sequence[EditRecord], *, config=None,
              taus: Sequence[float] = DEFAULT_TAUS, batch_size: int = 32, details: bool = False):
    """Choose the match threshold tau for a model from a few records with paraphrases (``rephrase``)
    and unrelated prompts (``loc_prompt``); see the module docstring. ``editor_or_model``: a
    HoReNEditor (its config gives the layer and retrieval settings) or a causal LM with ``config``
    (a HoReNConfig; default ``recommended_config``). Nothing is edited. Returns tau, or
    (tau, RetrievalTable) with ``details``."""
    if config is None:
        config = getattr(editor_or_model, "config", None)
        from .config import HoReNConfig
        if not isinstance(config, HoReNConfig):
            config = recommended_config(getattr(getattr(editor_or_model, "config", None), "name_or_path", ""),
                                        editor_or_model)
    records = list(records)
    if len(records) < 2:
        raise ValueError("calibrate needs at least 2 records (more is better: 20 to 100)")
    missing = [i for i, r in enumerate(records) if not r.rephrase or not r.loc_prompt]
    if missing:
        raise ValueError(f"calibrate needs a paraphrase (rephrase) and an unrelated prompt (loc) in every "
                         f"record; record(s) {[i + 1 for i in missing[:5]]} lack one")
    n = len(records)
    prompts = [r.prompt for r in records] + [r.rephrase for r in records] + [r.loc_prompt for r in records]
    q = prompt_queries(editor_or_model, tokenizer, prompts, [config.layer], config.query_selection_strategy,
                       batch_size=batch_size)[config.layer]
    labels = [edit_label(tokenizer, r.prompt, r.target) for r in records]
    table = retrieval_table(q[:n], q[n:2 * n], q[2 * n:], labels, taus, beta=config.hopfield_retrieval_beta,
                            alpha=config.hopfield_retrieval_alpha, steps=config.hopfield_retrieval_max_iter,
                            eps=config.hopfield_retrieval_eps)
    tau = table.taus[table.best()]
    return (tau, table) if details else tau


# --------------------------------------------------------------------------- command line

def _cmd_calibrate(args) -> int:
    from .data import RecordsError, read_records
    from .evaluate import build_editor, _parse_layer
    try:
        records = read_records(args.data, args.n, require=("prompt", "target", "rephrase", "loc_prompt"))
    except RecordsError as exc:
        print(f"horen-fast calibrate: {exc}", file=sys.stderr)
        return 2
    editor, config = build_editor(args.model, layer=_parse_layer(args.layer), config_path=args.config,
                                  progress=not args.no_progress)
    tau, table = calibrate(editor, editor.tokenizer, records, config=config, batch_size=args.batch_size,
                           details=True)
    k = table.taus.index(tau)
    summary = {**table.row(k), "n": len(records), "layer": config.layer,
               "beta": config.hopfield_retrieval_beta, "previous_tau": config.hopfield_key_match_threshold}
    if args.out:
        from .evaluate import write_report
        write_report({"summary": summary, "config": config.to_dict(),
                      "table": [table.row(i) for i in range(len(table.taus))]}, args.out)
    print(f"tau = {tau:.4f}: on these records retrieval serves {summary['rel']:.3f} of edit prompts and "
          f"{summary['gen']:.3f} of paraphrases, and leaves {summary['loc']:.3f} of unrelated prompts alone. "
          f"Use --threshold {tau:.4f} (or hopfield_key_match_threshold: {tau:.4f} in the YAML).",
          file=sys.stderr)
    print(json.dumps(summary))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="choose the match threshold tau for a model from a few records",
                              description="Choose tau from records with paraphrases and unrelated prompts "
                                          "(retrieval only, no training). The last line is JSON.")
    p.add_argument("--data", required=True, help="records with src/rephrase/alt/loc (or EasyEdit names)")
    p.add_argument("--n", type=int, default=None, help="use the first N records (default: all)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a local Hugging Face folder")
    p.add_argument("--layer", default=None, help="layer index or module path of the wrapped projection")
    p.add_argument("--config", default=None, help="HoReN YAML config (published keys)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="write the full table (JSON) here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_calibrate)
