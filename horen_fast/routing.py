"""Routing-exact evaluation (``horen-fast eval --routing-only``): which codebook entry every prompt
reaches, at every checkpoint of a sequential run, without training a single value.

Whether an edit fires on a prompt depends only on retrieval, and retrieval only on the unedited
model up to the wrapped layer (the adapter changes what comes after it; SPEC 2-5). So:

1. the distinct prompts of the run (edit prompts, paraphrases, locality prompts: the locality
   prompts of a stream repeat) go once through the model, each batched forward pass stopping at
   the wrapped layer (``calibrate.prompt_queries``);
2. the codebook is replayed in edit order by the editor's own reuse / replace / add code
   (``calibrate.replay``: ``edits.decide`` and ``edits.Changes``) on a codebook built as the
   editor builds its own (``replay_codebook_for``: the same dtype, retrieval settings and backend),
   so every decision is the editor's;
3. at each checkpoint every prompt of the records edited so far is retrieved against the codebook
   as it stands, and routed to its own entry (the entry its record's edit is stored in), to
   another entry holding the same target, to another entry, or to none.

Rel_r / Gen_r: the fraction of edit prompts / paraphrases routed to an entry holding their target
(their own entry, or another one trained for the same target tokens); Loc_r: the fraction of
locality prompts routed to no entry (their output is then bit for bit the unedited model's);
OP_r: the geometric mean. They equal the full run's Rel / Gen / Loc where each entry's trained
value produces its target and every value that fires on an unrelated prompt changes its answer.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Sequence

import torch

from .calibrate import prompt_queries, replay
from .codebook import Codebook
from .data import EditRecord
from .edits import edit_label
from .metrics import overall

__all__ = ["KINDS", "replay_codebook_for", "route", "routing_counts", "routing_run", "routing_command"]

KINDS = ("rel", "gen", "loc")   # edit prompts, paraphrases, locality prompts


def replay_codebook_for(model, config, key_dim: int) -> Codebook:
    """An empty codebook on which decisions are the editor's: the dtype, device and retrieval
    settings (backend included) that ``HoReNEditor`` gives its own for ``model`` and ``config``;
    values of width 1 (decisions never read values)."""
    param = next(model.parameters())
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    return Codebook(key_dim, 1, dtype=dtype, device=param.device, **config.retrieval_kwargs())


def route(codebook, queries: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """The entry id each query matches (-1: none), by ``codebook.retrieve``, ``chunk`` rows at a time."""
    if len(codebook) == 0:
        return torch.full((queries.shape[0],), -1, dtype=torch.long)
    out = [codebook.retrieve(queries[lo: lo + chunk].to(codebook.dtype)).index.cpu()
           for lo in range(0, queries.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def routing_counts(routes: Sequence[int], own: Sequence[int], wanted: Sequence[tuple], label_of: dict) -> dict:
    """Counts of prompts routed to their own entry (``own[i]``), to another entry holding their
    label ``wanted[i]`` (same_target), to another entry (other) or to none."""
    c = {"own": 0, "same_target": 0, "other": 0, "none": 0}
    for r, o, w in zip(routes, own, wanted):
        if r < 0:
            c["none"] += 1
        elif r == o:
            c["own"] += 1
        elif label_of[r] == w:
            c["same_target"] += 1
        else:
            c["other"] += 1
    return c


def _rates(counts: dict, n: int) -> dict:
    """Rel_r / Gen_r / Loc_r / OP_r of {kind: routing_counts} over n records."""
    out = {kind: (counts[kind]["none"] if kind == "loc" else counts[kind]["own"] + counts[kind]["same_target"]) / n
           for kind in KINDS}
    out["op"] = overall(out["rel"], out["gen"], out["loc"])
    return out


def _subset_rates(routes: dict, own, labels, label_of: dict, rows: list[int]) -> dict:
    """The rates over the records at ``rows`` (and their number n)."""
    if not rows:
        return {"n": 0}
    counts = {kind: routing_counts([routes[kind][i] for i in rows], [own[i] for i in rows],
                                   [labels[i] for i in rows], label_of) for kind in KINDS}
    return {"n": len(rows), **_rates(counts, len(rows))}


def routing_run(model, tokenizer, records: Sequence[EditRecord], config, checkpoints: Sequence[int] | None = None,
                *, batch_size: int = 32, keep_routes: bool = True, progress: bool = False,
                subset: Sequence[int] | None = None) -> dict:
    """The routing-only run of ``records`` (module docstring). ``model``: a causal LM or a
    HoReNEditor (its edits are ignored); ``config``: the HoReNConfig the full run would use;
    checkpoints: as ``evaluate.run_sequential`` (default 1, 2, 5, 10, ... and the last record).
    Returns {"checkpoints": [{n, entries, rel, gen, loc, op (the routing rates), counts, seconds}],
    "actions", "entry_ids" (each edit's decision and entry, as EditResult.action and .id),
    "distinct_prompts", "timings"}; with ``keep_routes`` each checkpoint also has ``routes``:
    {kind: the entry id each record's prompt of that kind is routed to (-1: none)}; with ``subset``
    (record positions, e.g. a stream's real records) each checkpoint also has ``subset``: the same
    rates over the subset's records edited so far (n, rel, gen, loc, op)."""
    from .evaluate import default_checkpoints
    records = list(records)
    n = len(records)
    if n == 0:
        raise ValueError("no records to replay")
    missing = [i + 1 for i, r in enumerate(records) if not (r.rephrase and r.loc_prompt)]
    if missing:
        raise ValueError(f"routing needs a paraphrase and a locality prompt in every record; record(s) "
                         f"{missing[:5]} lack one")
    marks = default_checkpoints(n) if checkpoints is None else sorted({c for c in checkpoints if 0 < c < n} | {n})
    t0 = time.perf_counter()
    texts: dict[str, int] = {}
    where = {kind: [texts.setdefault(getattr(r, field), len(texts)) for r in records]
             for kind, field in zip(KINDS, ("prompt", "rephrase", "loc_prompt"))}
    distinct = list(texts)
    q = prompt_queries(model, tokenizer, distinct, [config.layer], config.query_selection_strategy,
                       batch_size=batch_size)[config.layer]
    forward_seconds = time.perf_counter() - t0
    labels = [edit_label(tokenizer, r.prompt, r.target) for r in records]
    lm = model.model if hasattr(model, "adapter") and hasattr(model, "codebook") else model
    book = replay_codebook_for(lm, config, q.shape[1])
    points = []
    timing = {"forward_seconds": forward_seconds, "replay_seconds": 0.0, "route_seconds": 0.0}
    clock = [time.perf_counter()]

    def at_mark(k: int, state) -> None:
        t1 = time.perf_counter()
        timing["replay_seconds"] += t1 - clock[0]
        used = sorted({where[kind][i] for kind in KINDS for i in range(k)})
        reach = dict(zip(used, route(book, q[used]).tolist()))
        label_of = dict(zip(book.ids, book.get_labels(book.ids))) if len(book) else {}
        point = {"n": k, "entries": len(book), "counts": {}}
        routes = {}
        for kind in KINDS:
            routes[kind] = [reach[where[kind][i]] for i in range(k)]
            point["counts"][kind] = routing_counts(routes[kind], state.entry_of[:k], labels[:k], label_of)
        point.update(_rates(point["counts"], k))
        if subset is not None:
            point["subset"] = _subset_rates(routes, state.entry_of, labels, label_of, [i for i in subset if i < k])
        if keep_routes:
            point["routes"] = routes
        clock[0] = time.perf_counter()
        timing["route_seconds"] += clock[0] - t1
        point["seconds"] = clock[0] - t0
        points.append(point)
        if progress:
            print(f"routing: {k} edits, {len(book)} entries, rel {point['rel']:.3f} gen {point['gen']:.3f} "
                  f"loc {point['loc']:.3f} op {point['op']:.3f} ({point['seconds']:.0f} s)", file=sys.stderr, flush=True)

    clock[0] = time.perf_counter()
    done = replay(book, q[[where["rel"][i] for i in range(n)]], labels, marks=marks, at_mark=at_mark)
    timing["total_seconds"] = time.perf_counter() - t0
    return {"checkpoints": points, "actions": done.actions, "entry_ids": done.entry_ids,
            "distinct_prompts": len(distinct), "timings": timing}


def routing_command(args, records: Sequence[EditRecord], editor, config, checkpoints, head: dict) -> int:
    """``horen-fast eval --routing-only``: ``routing_run`` with the eval command's options
    (``args.out``, ``args.plot``, ``args.batch_size``, ``args.no_progress``); the report has the
    eval report's head and checkpoints whose rel/gen/loc/op are Rel_r/Gen_r/Loc_r/OP_r. Prints the
    same last line of JSON as eval (n, rel, gen, loc, op, entries) plus the seconds."""
    from .evaluate import plot_report, write_report
    from .data import real_positions
    data = getattr(args, "data", None)
    subset = real_positions(data, len(records)) if data is not None else None
    body = routing_run(editor, editor.tokenizer, records, config, checkpoints, batch_size=args.batch_size,
                       keep_routes=False, progress=not args.no_progress, subset=subset)
    if subset is not None:
        body["subset_is"] = "the stream's real records (\"synthetic\": false)"
    last = body["checkpoints"][-1]
    report = {**head, "title": head.get("title", "HoReN") + " (routing only)", "status": "complete",
              "routing_only": True, **{k: last[k] for k in ("n", "rel", "gen", "loc", "op")}, **body}
    if args.out:
        write_report(report, args.out)
    if args.plot:
        plot_report(report, args.plot)
    summary = {k: last[k] for k in ("n", "rel", "gen", "loc", "op")}
    summary.update(entries=last["entries"], routing_only=True,
                   seconds=round(body["timings"]["total_seconds"], 3))
    print(json.dumps(summary))
    return 0
