"""Sequential-editing runs measured at checkpoints, their JSON reports and plots, and the
``horen-fast eval`` command. The metrics themselves (Reliability, Generalization, Locality, OP)
are defined in horen_fast/metrics.py.

A run edits the records one after another on a fresh editor and, at each checkpoint (by default
1, 2, 5, 10, 20, 50, ... and always the last record), evaluates every record edited so far. The
report is rewritten after each checkpoint, so an interrupted run (Ctrl-C) leaves the finished
checkpoints and their per-record results behind.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from .data import EditRecord
from .metrics import aggregate, evaluate_records, failure_details, locality_reference

__all__ = ["default_checkpoints", "run_sequential", "check_resume", "Interrupted", "write_report",
           "keep_previous", "plot_report", "package_versions", "parse_layer", "build_editor",
           "threshold_source", "register_cli"]


def default_checkpoints(n: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below ``n``, then ``n``: a curve on a log axis."""
    marks, scale = [], 1
    while scale < n:
        marks += [m * scale for m in (1, 2, 5) if m * scale < n]
        scale *= 10
    return marks + [n]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_sequential``: ``edits_done`` of ``n`` edits were made; ``body`` is the
    report body at the last finished checkpoint (None before the first)."""

    def __init__(self, edits_done: int, n: int, body: dict | None):
        super().__init__(f"interrupted after {edits_done} of {n} edits")
        self.edits_done, self.n, self.body = edits_done, n, body


def _edit_one(editor, record: EditRecord):
    return editor.edit(record.prompt, record.target)


def _result_fields(res) -> dict:
    return {f: getattr(res, f) for f in ("id", "loss", "action", "replaced_id", "iterations") if hasattr(res, f)}


def run_sequential(editor, records: Sequence[EditRecord], checkpoints: Sequence[int] | None = None, *,
                   batch_size: int = 32, progress: bool = True, edit_fn=_edit_one, tokenizer=None,
                   edit_batch: int = 1, on_checkpoint: Callable[[dict], None] | None = None,
                   resume: dict | None = None) -> dict:
    """Edit ``records`` one after another on ``editor`` (which must hold no edits yet) and evaluate
    all records edited so far at each checkpoint (``default_checkpoints(n)`` when None; the last
    checkpoint is always len(records)).

    ``edit_fn(editor, record)`` makes one edit (default ``editor.edit(prompt, target)``); it lets
    another editing loop (e.g. a baseline) be measured the same way. ``edit_batch`` > 1 hands that
    many records at a time to ``editor.edit_many`` (trained together: faster, the same edits, but
    a record's own edit time is then not measurable: records get ``edit_batch_seconds``, the wall
    time of their batch, instead of ``edit_seconds``). ``on_checkpoint(body)`` is called after each
    checkpoint. Ctrl-C raises ``Interrupted``. Returns the report's body: ``checkpoints``
    (aggregates and timings), ``records`` (per record, at the last checkpoint), ``timings``,
    ``locality_reference`` (the unedited model's locality tokens of every record).

    ``resume``: the body of an earlier run of the same records, and ``editor`` holding that run's
    edits as they stood at its last checkpoint (``HoReNEditor.load`` of a save made there): the
    run goes on from that checkpoint and returns the whole run's body (``check_resume``)."""
    tokenizer = tokenizer if tokenizer is not None else editor.tokenizer
    n = len(records)
    if n == 0:
        raise ValueError("no records to edit")
    if isinstance(edit_batch, bool) or not isinstance(edit_batch, int) or edit_batch < 1:
        raise ValueError(f"edit_batch must be a positive integer, got {edit_batch!r}")
    if edit_batch > 1 and edit_fn is not _edit_one:
        raise ValueError("edit_batch > 1 uses editor.edit_many; a custom edit_fn edits one record at a time")
    held = len(editor) if hasattr(editor, "__len__") else 0
    if resume is None and held != 0:
        raise ValueError(f"the editor already holds {held} edits; locality is measured against "
                         f"the unedited model, so start from a fresh editor")
    marks = (default_checkpoints(n) if checkpoints is None
             else sorted({c for c in checkpoints if 0 < c < n} | {n}))
    edit_info: list[dict] = []
    points: list[dict] = []
    edit_seconds = eval_seconds = 0.0
    if resume is not None:
        check_resume(resume, records, held)
        points = list(resume["checkpoints"])
        edit_info = [{k[5:]: v for k, v in r.items() if k.startswith("edit_")} for r in resume["records"]]
        loc_before = resume["locality_reference"]
        t = resume["timings"]
        reference_seconds, edit_seconds, eval_seconds = (t["locality_reference_seconds"], t["edit_seconds"],
                                                         t["eval_seconds"])
        marks = [m for m in marks if m > len(edit_info)]
    else:
        t0 = time.perf_counter()
        loc_before = locality_reference(editor, tokenizer, records, batch_size=batch_size)
        reference_seconds = time.perf_counter() - t0

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=len(edit_info), desc="editing", unit="edit", file=sys.stderr)
    body = resume
    try:
        for mark in marks:
            t0 = time.perf_counter()
            while len(edit_info) < mark:
                done = len(edit_info)
                chunk = records[done: min(mark, done + edit_batch)]
                te = time.perf_counter()
                if edit_batch > 1:
                    results = editor.edit_many([(r.prompt, r.target) for r in chunk], progress=False)
                    seconds = time.perf_counter() - te
                    edit_info += [{**_result_fields(res), "batch_seconds": seconds, "batch_size": len(chunk)}
                                  for res in results]
                else:
                    res = edit_fn(editor, chunk[0])
                    edit_info.append({**_result_fields(res), "seconds": time.perf_counter() - te})
                if bar is not None:
                    bar.update(len(chunk))
            edit_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            per_record = evaluate_records(editor, tokenizer, records[:mark], loc_before, batch_size=batch_size)
            seconds = time.perf_counter() - t0
            eval_seconds += seconds
            point = {**aggregate(per_record), "edit_seconds_total": edit_seconds, "eval_seconds": seconds}
            if hasattr(editor, "__len__"):
                point["entries"] = len(editor)
            points.append(point)
            if bar is not None:
                bar.set_postfix({k: round(point[k], 3) for k in ("rel", "gen", "loc", "op")})
            body = {
                "checkpoints": list(points),
                "records": [{**r.to_dict(), **m, **{f"edit_{k}": v for k, v in e.items()}}
                            for r, m, e in zip(records, per_record, edit_info)],
                "timings": {"locality_reference_seconds": reference_seconds, "edit_seconds": edit_seconds,
                            "eval_seconds": eval_seconds, "seconds_per_edit": edit_seconds / mark,
                            "total_seconds": reference_seconds + edit_seconds + eval_seconds},
                "locality_reference": [list(map(int, t)) for t in loc_before],
            }
            if on_checkpoint is not None:
                on_checkpoint(body)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(len(edit_info), n, body) from None
    finally:
        if bar is not None:
            bar.close()
    return body


def check_resume(body: dict, records: Sequence[EditRecord], held: int) -> None:
    """Raise ValueError unless ``body`` (an earlier run's report body) can be continued on
    ``records`` by an editor holding ``held`` entries: its records are the first of ``records``,
    in order, and the editor holds as many entries as the run had at its last checkpoint."""
    for key in ("checkpoints", "records", "timings", "locality_reference"):
        if key not in body:
            raise ValueError(f"the report to resume has no {key!r} (it was written by an older "
                             f"horen-fast or is not an eval report); start a new run")
    if not body["checkpoints"]:
        raise ValueError("the report to resume has no finished checkpoint; start a new run")
    done = body["checkpoints"][-1]["n"]
    if len(body["records"]) != done or done > len(records) or len(body["locality_reference"]) != len(records):
        raise ValueError(f"the report to resume covers {done} edits of {len(body['locality_reference'])} "
                         f"records, not a prefix of these {len(records)} records; pass the same --data and --n")
    for i, (old, new) in enumerate(zip(body["records"], records)):
        if old.get("prompt") != new.prompt or old.get("target") != new.target:
            raise ValueError(f"record {i + 1} differs from the report's ({old.get('prompt')!r} -> "
                             f"{old.get('target')!r}); pass the same --data")
    want = body["checkpoints"][-1].get("entries")
    if want is not None and want != held:
        raise ValueError(f"the saved edits hold {held} entries but the report's last checkpoint had "
                         f"{want}; they are not from the same point of the run")


# --------------------------------------------------------------------------- reports

def package_versions() -> dict:
    import importlib.metadata as md
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("horen-fast", "torch", "transformers", "tokenizers", "numpy", "safetensors"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    from . import __version__
    versions["horen_fast"] = __version__
    return versions


def write_report(report: dict, path) -> None:
    """Write ``report`` as JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def keep_previous(path) -> Path | None:
    """If ``path`` exists, rename it to NAME.YYYYmmdd-HHMMSS.EXT (its modification time, UTC) so
    that a new run does not overwrite it; returns the new name, or None."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%d-%H%M%S")
    kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    i = 1
    while kept.exists():
        kept = path.with_name(f"{path.stem}.{stamp}-{i}{path.suffix}")
        i += 1
    path.rename(kept)
    return kept


# one style per curve, so that curves on top of each other stay visible: different markers, sizes
# and line styles, the wide translucent Reliability line under the others
_STYLES = (("rel", "Reliability", dict(marker="o", markersize=10, linestyle="-", linewidth=4, alpha=0.45)),
           ("gen", "Generalization", dict(marker="s", markersize=7, linestyle="--", linewidth=2)),
           ("loc", "Locality", dict(marker="^", markersize=5, linestyle=":", linewidth=2)),
           ("op", "OP (geometric mean)", dict(marker="x", markersize=5, linestyle="-", color="black",
                                              linewidth=1)))


def plot_report(report: dict, path) -> None:
    """Rel / Gen / Loc / OP against the number of sequential edits (log axis when it spans a
    factor of 20 or more)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = report["checkpoints"]
    xs = [p["n"] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label, style in _STYLES:
        ax.plot(xs, [p[key] for p in points], label=label, **style)
    if len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 20:
        ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits")
    ax.set_ylabel("score")
    ax.set_ylim(-0.03, 1.05)
    ax.set_title(report.get("title", "HoReN sequential editing"), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True) if not ax.get_xscale() == "log" else None
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- editor from the command line

def parse_layer(text: str | None):
    """A --layer value: an int for an index (e.g. "15", "-1"), else the module path as given."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


_parse_layer = parse_layer   # the name calibrate.py imports today; to go once it imports parse_layer


def threshold_source(model_name: str, config_path=None, threshold=None) -> tuple[float | None, str]:
    """(tau, where it comes from) for these command-line choices; tau None: decided by the config
    file."""
    from .calibrate import recommended_config
    from .config import HoReNConfig
    if threshold is not None:
        return threshold, "--threshold"
    if config_path:
        return None, f"hopfield_key_match_threshold in {config_path}"
    try:
        tau = recommended_config(model_name).hopfield_key_match_threshold
    except ValueError:
        return HoReNConfig(layer=0).hopfield_key_match_threshold, "the paper's default, no recommended settings for this model"
    return tau, f"recommended for {model_name}, calibrated on ZsRE"


def build_editor(model_name: str, *, layer=None, config_path=None, threshold=None, progress=True):
    """(editor, config) for a model name or path: the recommended config for a known model, a
    YAML config file when given, then --layer / --threshold overrides. A bad model, config or
    layer raises horen_fast.cli.CommandError naming it."""
    from .calibrate import recommended_config
    from .cli import bad_input
    from .config import HoReNConfig
    from .editor import HoReNEditor
    from .models import load_model
    with bad_input(f"--model {model_name}"):
        model, tokenizer = load_model(model_name, progress=progress)
    if config_path:
        with bad_input(f"--config {config_path}", "pass a HoReN YAML config (horen_fast/hparams/ has examples)"):
            config = HoReNConfig.from_yaml(config_path)
    else:
        with bad_input(f"--model {model_name}", "pass --layer (and --threshold) or --config"):
            config = recommended_config(model_name, model)
    overrides = {}
    if layer is not None:
        overrides["layer"] = layer
    if threshold is not None:
        overrides["hopfield_key_match_threshold"] = threshold
    if overrides:
        with bad_input(" ".join(f"--{'layer' if k == 'layer' else 'threshold'} {v}" for k, v in overrides.items())):
            config = HoReNConfig.from_dict({**config.to_dict(), **overrides})
    origin = ("--layer" if layer is not None else f"--config {config_path}" if config_path
              else "the recommended settings")
    with bad_input(f"layer {config.layer!r} (from {origin})", "pass another --layer"):
        editor = HoReNEditor(model, tokenizer, config)
    return editor, config


# --------------------------------------------------------------------------- command line

def _parse_checkpoints(text: str) -> list[int] | None:
    from .cli import CommandError
    if text == "geometric":
        return None
    try:
        marks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"--checkpoints {text!r}: expected comma-separated edit counts (e.g. 10,100) "
                           f"or 'geometric'") from None
    if any(m < 1 for m in marks):
        raise CommandError(f"--checkpoints {text!r}: edit counts must be >= 1")
    return marks


def _cmd_eval(args) -> int:
    from .cli import CommandError, torch_threads
    from .data import RecordsError, read_records
    started = datetime.now(timezone.utc)
    try:
        records = read_records(args.data, args.n)
    except RecordsError as exc:
        raise CommandError(str(exc)) from None
    checkpoints = _parse_checkpoints(args.checkpoints)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError("--plot needs matplotlib, which is not installed; run: "
                               "pip install 'horen-fast[plot]' (or drop --plot)") from None
    if args.edit_batch < 1:
        raise CommandError(f"--edit-batch {args.edit_batch}: must be at least 1")
    t0 = time.perf_counter()
    editor, config = build_editor(args.model, layer=parse_layer(args.layer), config_path=args.config,
                                  threshold=args.threshold, progress=not args.no_progress)
    load_seconds = time.perf_counter() - t0
    _, source = threshold_source(args.model, args.config, args.threshold)
    print(f"horen-fast eval: {len(records)} records, layer {config.layer}, tau "
          f"{config.hopfield_key_match_threshold} ({source})", file=sys.stderr)
    resume = None
    if args.resume or args.save_edits:
        if args.routing_only:
            raise CommandError("--resume and --save-edits are for full runs; a --routing-only run trains nothing")
        if not args.out:
            raise CommandError("--resume and --save-edits need --out (the report says where the run stands)")
    if args.resume:
        editor, resume = _resumed(args, editor, config, records)
    for path in (args.out, args.plot):
        if resume is not None and path == args.out:
            continue
        kept = keep_previous(path) if path else None
        if kept:
            print(f"horen-fast eval: {path} exists; the earlier one is kept as {kept}", file=sys.stderr)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    head = {
        "title": f"HoReN on {name}, {Path(args.data).name}",
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join(getattr(args, "command_line", None) or ["horen-fast", *sys.argv[1:]]),
        "model": args.model,
        "data": {"path": str(args.data), "n": len(records)},
        "config": config.to_dict(),
        "threshold_source": source,
        "edit_batch": args.edit_batch,
        "versions": package_versions(),
    }
    if args.routing_only:
        from .routing import routing_command
        return routing_command(args, records, editor, config, checkpoints, head)

    def report_of(body: dict, status: str) -> dict:
        last = body["checkpoints"][-1]
        report = {**head, "status": status, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  **{k: last[k] for k in ("n", "rel", "gen", "loc", "op")}, **body}
        report["timings"] = {**body["timings"], "model_load_seconds": load_seconds}
        return report

    def save(body: dict) -> None:
        if args.save_edits:
            mark = body["checkpoints"][-1]
            if "saved_edits" not in mark:
                mark["saved_edits"] = str(Path(args.save_edits) / f"edits-{mark['n']}")
                editor.save(mark["saved_edits"])
        if args.out:
            done = body["checkpoints"][-1]["n"]
            write_report(report_of(body, "complete" if done == len(records) else
                                   f"running: {done} of {len(records)} edits evaluated"), args.out)
    try:
        with torch_threads(args.threads, "eval"):
            body = run_sequential(editor, records, checkpoints, batch_size=args.batch_size,
                                  progress=not args.no_progress, edit_batch=args.edit_batch,
                                  on_checkpoint=save, resume=resume)
            failure_details(editor, body, batch_size=args.batch_size)
    except Interrupted as exc:
        done = exc.body["checkpoints"][-1]["n"] if exc.body else 0
        where = ""
        if args.out and exc.body:
            write_report(report_of(exc.body, f"interrupted after {exc.edits_done} of {exc.n} edits; "
                                             f"evaluated up to {done}"), args.out)
            where = f"; {args.out} holds the checkpoints up to {done} edits and their per-record results"
        print(f"horen-fast eval: interrupted after {exc.edits_done} of {exc.n} edits (last finished "
              f"checkpoint: {done or 'none'}){where}", file=sys.stderr)
        return 130
    report = report_of(body, "complete")
    if args.out:
        write_report(report, args.out)
    if args.plot:
        plot_report(report, args.plot)
    last = body["checkpoints"][-1]
    summary = {k: last[k] for k in ("n", "rel", "gen", "loc", "op")}
    summary.update(entries=last.get("entries"), edit_seconds=round(body["timings"]["edit_seconds"], 3),
                   eval_seconds=round(body["timings"]["eval_seconds"], 3))
    print(json.dumps(summary))
    return 0


def _resumed(args, editor, config, records):
    """(editor holding the edits saved at the last checkpoint of ``args.out``, that report's body)."""
    from .cli import CommandError
    from .editor import HoReNEditor
    try:
        report = json.loads(Path(args.out).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CommandError(f"--resume: cannot read the report {args.out} ({exc}); start without --resume") from None
    if report.get("status") == "complete":
        raise CommandError(f"--resume: {args.out} is a complete run of {report.get('n')} edits; nothing to resume")
    points = report.get("checkpoints") or []
    saved = points[-1].get("saved_edits") if points else None
    if not saved:
        raise CommandError(f"--resume: {args.out} has no checkpoint with saved edits (was it run with "
                           f"--save-edits?); start a new run")
    if report.get("config") != config.to_dict():
        raise CommandError(f"--resume: {args.out} was run with another config; pass the same --model, "
                           f"--layer, --threshold and --config")
    editor.detach()
    try:
        editor = HoReNEditor.load(saved, editor.model, editor.tokenizer)
        check_resume(report, records, len(editor))
    except (OSError, ValueError) as exc:
        raise CommandError(f"--resume: {exc}") from None
    print(f"horen-fast eval: resuming after {points[-1]['n']} edits from {saved}", file=sys.stderr)
    return editor, report


def _threshold_help() -> str:
    from .calibrate import DEFAULTS, recommended_config
    from .config import HoReNConfig
    known = "; ".join(f"--model {k}: {recommended_config(k).hopfield_key_match_threshold}" for k in DEFAULTS)
    return (f"the match threshold tau. Without it: {known} (horen-fast's recommended setting, "
            f"calibrated on ZsRE dev records with 'horen-fast calibrate'); with --config: the file's "
            f"hopfield_key_match_threshold; any other model: the paper's "
            f"{HoReNConfig(layer=0).hopfield_key_match_threshold}. The run prints the tau it uses "
            f"and where it comes from, and the report records both.")


def register_cli(subparsers) -> None:
    from .cli import add_threads_option
    p = subparsers.add_parser(
        "eval", help="edit records sequentially and measure Rel/Gen/Loc/OP",
        description="Apply the records' edits one after another and measure, at checkpoints: "
                    "Reliability (the edit prompt generates the new target), Generalization (its "
                    "paraphrase does), Locality (an unrelated prompt generates what it did before "
                    "the edits) and OP (their geometric mean). The last printed line is a JSON summary.")
    p.add_argument("--data", required=True, help="ZsRE / EasyEdit records: JSON array or JSON Lines")
    p.add_argument("--n", type=int, default=None, help="use the first N records (default: all)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a local Hugging Face folder")
    p.add_argument("--layer", default=None, help="layer index or module path of the wrapped projection")
    p.add_argument("--config", default=None, help="HoReN YAML config (the published keys)")
    p.add_argument("--threshold", type=float, default=None, help=_threshold_help())
    p.add_argument("--checkpoints", default="geometric",
                   help="edit counts to evaluate at, e.g. 10,100 (default 'geometric': 1, 2, 5, 10, 20, "
                        "50, ... and the last record)")
    p.add_argument("--edit-batch", type=int, default=1,
                   help="records trained together by edit_many (default 1: one edit at a time, with "
                        "each record's own edit time; e.g. 16 shares the model's weight reads among "
                        "16 edits, faster, with the same edits, timed per batch)")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch size (default 32)")
    p.add_argument("--out", default=None, help="write the JSON report here (rewritten after each "
                                               "checkpoint; an existing file is kept under a dated name)")
    p.add_argument("--plot", default=None, help="draw the metrics against the number of edits (PNG; "
                                                "needs matplotlib: pip install 'horen-fast[plot]')")
    p.add_argument("--routing-only", action="store_true",
                   help="no training: replay the codebook with the editor's own decisions and report, at "
                        "each checkpoint, how many edit prompts, paraphrases and locality prompts route to "
                        "their own entry, another entry or none (Rel_r, Gen_r, Loc_r, OP_r; "
                        "horen_fast/routing.py)")
    p.add_argument("--save-edits", default=None, metavar="DIR",
                   help="save the editor at each checkpoint, as DIR/edits-N (what --resume continues from)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run that --out reports from its last checkpoint's saved edits "
                        "(--save-edits); the same --data, --n and config are checked")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_option(p)
    p.set_defaults(func=_cmd_eval)
