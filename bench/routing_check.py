"""Validate the routing-only evaluation (horen_fast/routing.py) against a full sequential run.

``full``: a full ``horen-fast eval``-style run (the same editor: ``evaluate.build_editor``, the same
``run_sequential``) that also records, at every checkpoint, which codebook entry each edit prompt,
paraphrase and locality prompt retrieves (``metrics.retrieved_entries``) and each edit's action and
entry. It writes one JSON file.

``compare``: replays the same records routing-only and compares every decision with a ``full``
file: each edit's action and entry, and at each checkpoint each prompt's retrieved entry (matched or
not), then the metrics (Rel/Gen/Loc/OP against Rel_r/Gen_r/Loc_r/OP_r).

    nice python -m bench.routing_check full --n 300 --out /tmp/full300.json
    nice python -m bench.routing_check full --n 300 --early-stop-margin 1.0 --out /tmp/es300.json
    python -m bench.routing_check compare --full /tmp/full300.json
    python -m bench.routing_check compare --report run.json    # horen-fast eval --save-edits DIR --out run.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "zsre_dev.jsonl"


def _routes(found, tau):
    return [int(e) if cos > tau else -1 for e, cos in found]


def full(args) -> None:
    from horen_fast.data import read_records
    from horen_fast.evaluate import build_editor, run_sequential
    from horen_fast.metrics import retrieved_entries
    records = read_records(args.data, args.n)
    editor, config = build_editor(args.model, progress=False)
    if args.early_stop_margin is not None:
        from horen_fast.config import HoReNConfig
        from horen_fast.editor import HoReNEditor
        editor.detach()
        config = HoReNConfig.from_dict({**config.to_dict(), "early_stop_margin": args.early_stop_margin})
        editor = HoReNEditor(editor.model, editor.tokenizer, config)
    tau = config.hopfield_key_match_threshold
    points = []
    iterations = []   # Adam steps per edit (training.Job.iterations), in training order
    train = editor.trainer.train

    def counting_train(jobs, cfg):
        train(jobs, cfg)
        iterations.extend(job.iterations for job in jobs)
    editor.trainer.train = counting_train

    def on_checkpoint(body):
        mark = body["checkpoints"][-1]["n"]
        recs = records[:mark]
        prompts = [r.prompt for r in recs] + [r.rephrase for r in recs] + [r.loc_prompt for r in recs]
        found = retrieved_entries(editor, prompts)
        routes = _routes(found, tau)
        points.append({"n": mark, "metrics": body["checkpoints"][-1],
                       "rel_route": routes[:mark], "gen_route": routes[mark:2 * mark],
                       "loc_route": routes[2 * mark:], "cosines": [c for _, c in found]})
        print(f"checkpoint {mark}: {json.dumps({k: body['checkpoints'][-1][k] for k in ('rel', 'gen', 'loc', 'op')})}",
              file=sys.stderr, flush=True)
        write(body)

    def write(body):
        out = {"config": config.to_dict(), "data": str(args.data), "n": len(records), "edit_batch": args.edit_batch,
               "edits": [{k: r.get(f"edit_{k}") for k in ("id", "action", "seconds", "batch_seconds")}
                         for r in body["records"]],
               "timings": body["timings"], "iterations": iterations, "checkpoints": points}
        Path(args.out).write_text(json.dumps(out) + "\n")

    t0 = time.perf_counter()
    body = run_sequential(editor, records, None, progress=False, edit_batch=args.edit_batch,
                          on_checkpoint=on_checkpoint)
    write(body)
    print(f"done in {time.perf_counter() - t0:.0f} s: {args.out}", file=sys.stderr)


def from_report(path: str, model, tok) -> dict:
    """A ``full`` file's content from a ``horen-fast eval --save-edits`` report: the edits' actions
    and entries from its records, and at each checkpoint with saved edits, the entry each prompt
    retrieves from the codebook saved there (the full run's own keys)."""
    from horen_fast.editor import HoReNEditor
    from horen_fast.metrics import retrieved_entries
    rep = json.loads(Path(path).read_text())
    points = []
    for c in rep["checkpoints"]:
        if "saved_edits" not in c:
            continue
        n = c["n"]
        editor = HoReNEditor.load(c["saved_edits"], model, tok)
        try:
            recs = rep["records"][:n]
            prompts = [r["prompt"] for r in recs] + [r["rephrase"] for r in recs] + [r["loc_prompt"] for r in recs]
            routes = _routes(retrieved_entries(editor, prompts), editor.config.hopfield_key_match_threshold)
        finally:
            editor.detach()
        points.append({"n": n, "metrics": {k: c[k] for k in ("rel", "gen", "loc", "op")},
                       "rel_route": routes[:n], "gen_route": routes[n:2 * n], "loc_route": routes[2 * n:]})
        print(f"full run, checkpoint {n}: routes read from {c['saved_edits']}", file=sys.stderr, flush=True)
    return {"data": rep["data"]["path"], "n": rep["data"]["n"], "config": rep["config"],
            "edits": [{"id": r.get("edit_id"), "action": r.get("edit_action")} for r in rep["records"]],
            "checkpoints": points}


def compare(args) -> None:
    from horen_fast.config import HoReNConfig
    from horen_fast.data import read_records
    from horen_fast.models import load_model
    from horen_fast.routing import routing_run
    model, tok = load_model(args.model, progress=False)
    ref = json.loads(Path(args.full).read_text()) if args.full else from_report(args.report, model, tok)
    marks = [p["n"] for p in ref["checkpoints"]]   # the checkpoints the full run finished
    if not marks:
        raise SystemExit(f"{args.full}: no finished checkpoint yet")
    records = read_records(ref["data"], marks[-1])
    config = HoReNConfig.from_dict(ref["config"])
    t0 = time.perf_counter()
    body = routing_run(model, tok, records, config, marks)
    seconds = time.perf_counter() - t0
    report = {"seconds": seconds, "n": len(records), "of": ref["n"], "edits": {}, "checkpoints": [],
              "distinct_prompts": body["distinct_prompts"], "timings": body["timings"]}
    acts = [(e["action"], e["id"]) for e in ref["edits"][: marks[-1]]]
    mine = [(a, e) for a, e in zip(body["actions"], body["entry_ids"])]
    diff = [i for i, (x, y) in enumerate(zip(acts, mine)) if x[0] != y[0] or x[1] != y[1]]
    report["edits"] = {"compared": len(acts), "differ": len(diff), "first_differences": diff[:10]}
    for p, q in zip(ref["checkpoints"], body["checkpoints"]):
        row = {"n": p["n"]}
        for kind in ("rel", "gen", "loc"):
            a, b = p[f"{kind}_route"], q["routes"][kind]
            row[f"{kind}_route_differ"] = sum(x != y for x, y in zip(a, b))
            row[kind] = p["metrics"][kind]
            row[f"{kind}_r"] = q[kind]
        row["op"], row["op_r"] = p["metrics"]["op"], q["op"]
        report["checkpoints"].append(row)
    worst = max(abs(r[k] - r[f"{k}_r"]) for r in report["checkpoints"] for k in ("rel", "gen", "loc", "op"))
    report["max_metric_gap"] = worst
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("full")
    f.add_argument("--data", default=str(DEFAULT_DATA))
    f.add_argument("--n", type=int, default=300)
    f.add_argument("--model", default="smollm2")
    f.add_argument("--edit-batch", type=int, default=16)
    f.add_argument("--early-stop-margin", type=float, default=None)
    f.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--full", help="a file written by the full subcommand")
    which.add_argument("--report", help="a horen-fast eval report written with --save-edits")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--out", default=None)
    args = p.parse_args(argv)
    (full if args.cmd == "full" else compare)(args)


if __name__ == "__main__":
    main()
