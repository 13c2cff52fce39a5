"""Measuring an edited model: the SPEC 6 metrics (EasyEdit's "vanilla generation" token accuracy,
the one the HoReN paper reports), sequential-editing runs with checkpoints, JSON reports, plots,
and the ``horen-fast eval`` command.

Token-level details, as EasyEdit does them:
- prompts are tokenized the tokenizer's default way (special tokens such as BOS included);
  targets and answers without special tokens;
- Reliability / Generalization: greedy-generate ``len(tokens(" " + target))`` tokens, decode them
  skipping special tokens, strip leading whitespace, re-encode, keep the first ``len(tokens(target))``
  and score the mean token equality with the target tokens, 0 when the lengths differ (1 for an
  empty target);
- Locality: greedy-generate ``len(tokens(" " + answer))`` tokens after the locality prompt; the
  compared tokens are the last ``len(tokens(answer))`` tokens of prompt + generation, before and
  after the edits; score = fraction equal.
- Generation stops at the model's end-of-sequence token, as ``generate`` does for one row.

Generation runs in left-padded batches (rows sorted by how many tokens they need) through
``generator.generate`` (a HoReNEditor, or any Hugging Face causal LM) with the KV cache.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .data import EditRecord, left_pad

__all__ = ["target_accuracy", "locality_tokens", "locality_score", "overall", "generate_tokens",
           "locality_reference", "evaluate_records", "aggregate", "run_sequential", "write_report",
           "plot_report", "package_versions", "register_cli"]


# --------------------------------------------------------------------------- metric functions

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def answer_lengths(tokenizer, answer: str) -> tuple[int, int]:
    """(tokens to generate, tokens compared): ``len(tokens(" " + answer))``, ``len(tokens(answer))``."""
    return len(_encode(tokenizer, " " + answer)), len(_encode(tokenizer, answer))


def target_accuracy(tokenizer, generated: Sequence[int], target: str) -> float:
    """Reliability / Generalization of one generation: decode (skipping special tokens), strip
    leading whitespace, re-encode, cut to the target's length; mean token equality when the lengths
    agree, else 0."""
    target_ids = _encode(tokenizer, target)
    if not target_ids:
        return 1.0
    text = tokenizer.decode(list(generated), skip_special_tokens=True).lstrip()
    answer_ids = _encode(tokenizer, text)[: len(target_ids)]
    if len(answer_ids) != len(target_ids):
        return 0.0
    return sum(a == b for a, b in zip(answer_ids, target_ids)) / len(target_ids)


def locality_tokens(prompt_ids: Sequence[int], generated: Sequence[int], k: int) -> list[int]:
    """The last ``k`` tokens of prompt + generation (what Locality compares)."""
    seq = list(prompt_ids) + list(generated)
    return seq[-k:] if k > 0 else []


def locality_score(before: Sequence[int], after: Sequence[int]) -> float:
    """Fraction of positions where the tokens before and after the edits are equal."""
    if len(before) != len(after):
        raise ValueError(f"locality token lists differ in length: {len(before)} vs {len(after)}")
    if not before:
        return 1.0
    return sum(a == b for a, b in zip(before, after)) / len(before)


def overall(rel: float, gen: float, loc: float) -> float:
    """OP: the geometric mean of Reliability, Generalization and Locality."""
    values = (rel, gen, loc)
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"metrics must be finite and >= 0, got {values}")
    return math.prod(values) ** (1.0 / 3.0)


# --------------------------------------------------------------------------- batched generation

def _stop_ids(generator) -> set[int]:
    model = getattr(generator, "model", generator)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _device(generator) -> torch.device:
    model = getattr(generator, "model", generator)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def generate_tokens(generator, tokenizer, prompts: Sequence[str], max_new: Sequence[int], *,
                    batch_size: int = 32) -> list[tuple[list[int], list[int]]]:
    """Greedy generation of ``max_new[i]`` tokens after ``prompts[i]`` for every i, in left-padded
    batches. Returns (prompt ids, generated ids) per prompt, generation cut after the first
    end-of-sequence token (as a one-row ``generate`` would stop there)."""
    if len(prompts) != len(max_new):
        raise ValueError("prompts and max_new differ in length")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token")
    stops = _stop_ids(generator)
    device = _device(generator)
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (max_new[i], len(ids[i])))
    out: list[tuple[list[int], list[int]] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = left_pad([ids[i] for i in rows], pad)
        steps = max(max_new[i] for i in rows)
        if steps == 0:
            for i in rows:
                out[i] = (ids[i], [])
            continue
        seqs = generator.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=steps, min_new_tokens=0, do_sample=False, num_beams=1,
                                  use_cache=True, pad_token_id=pad)
        seqs = getattr(seqs, "sequences", seqs)
        new = seqs[:, input_ids.shape[1]:].tolist()
        for r, i in enumerate(rows):
            gen = new[r][: max_new[i]]
            for j, tok in enumerate(gen):
                if tok in stops:
                    gen = gen[: j + 1]
                    break
            out[i] = (ids[i], gen)
    return out  # type: ignore[return-value]


def locality_reference(generator, tokenizer, records: Sequence[EditRecord], *,
                       batch_size: int = 32) -> list[list[int]]:
    """The locality tokens of each record's unrelated prompt (call before any edit)."""
    lengths = [answer_lengths(tokenizer, r.loc_answer) for r in records]
    gens = generate_tokens(generator, tokenizer, [r.loc_prompt for r in records], [g for g, _ in lengths],
                           batch_size=batch_size)
    return [locality_tokens(p, g, k) for (p, g), (_, k) in zip(gens, lengths)]


def evaluate_records(generator, tokenizer, records: Sequence[EditRecord], loc_before: Sequence[Sequence[int]], *,
                     batch_size: int = 32) -> list[dict]:
    """Rel / Gen / Loc (and the decoded answers) of each record, in one batched pass."""
    if len(loc_before) < len(records):
        raise ValueError("loc_before must have one entry per record")
    n = len(records)
    target_len = [answer_lengths(tokenizer, r.target)[0] for r in records]
    loc_len = [answer_lengths(tokenizer, r.loc_answer) for r in records]
    prompts = [r.prompt for r in records] + [r.rephrase for r in records] + [r.loc_prompt for r in records]
    max_new = target_len + target_len + [g for g, _ in loc_len]
    gens = generate_tokens(generator, tokenizer, prompts, max_new, batch_size=batch_size)
    results = []
    for i, r in enumerate(records):
        rel_gen, gen_gen, (loc_p, loc_g) = gens[i][1], gens[n + i][1], gens[2 * n + i]
        after = locality_tokens(loc_p, loc_g, loc_len[i][1])
        results.append({
            "rel": target_accuracy(tokenizer, rel_gen, r.target),
            "gen": target_accuracy(tokenizer, gen_gen, r.target),
            "loc": locality_score(loc_before[i], after),
            "rel_answer": tokenizer.decode(rel_gen, skip_special_tokens=True),
            "gen_answer": tokenizer.decode(gen_gen, skip_special_tokens=True),
        })
    return results


def aggregate(per_record: Sequence[dict]) -> dict:
    """Mean Rel / Gen / Loc over records and OP = geometric mean of the three means."""
    n = len(per_record)
    if n == 0:
        raise ValueError("no records to aggregate")
    means = {k: sum(r[k] for r in per_record) / n for k in ("rel", "gen", "loc")}
    return {"n": n, **means, "op": overall(means["rel"], means["gen"], means["loc"])}


# --------------------------------------------------------------------------- sequential runs

_EDIT_CHUNK = 64   # edits handed to editor.edit_many at once (it trains them in batches of 16)


def _edit_one(editor, record: EditRecord):
    return editor.edit(record.prompt, record.target)


def run_sequential(editor, records: Sequence[EditRecord], checkpoints: Sequence[int] | None = None, *,
                   batch_size: int = 32, progress: bool = True, edit_fn=_edit_one, tokenizer=None) -> dict:
    """Edit ``records`` one after another on ``editor`` (which must hold no edits yet) and evaluate
    all records edited so far at each checkpoint (the last checkpoint is always len(records)).

    ``edit_fn(editor, record)`` makes one edit (default ``editor.edit(prompt, target)``); it lets
    another editing loop (e.g. a baseline) be measured the same way. Returns the report's body:
    ``checkpoints`` (aggregates and timings), ``records`` (per record, at the last checkpoint),
    ``timings``."""
    tokenizer = tokenizer if tokenizer is not None else editor.tokenizer
    n = len(records)
    if n == 0:
        raise ValueError("no records to edit")
    if hasattr(editor, "__len__") and len(editor) != 0:
        raise ValueError(f"the editor already holds {len(editor)} edits; locality is measured against "
                         f"the unedited model, so start from a fresh editor")
    marks = sorted({c for c in (checkpoints or []) if 0 < c < n} | {n})
    t0 = time.perf_counter()
    loc_before = locality_reference(editor, tokenizer, records, batch_size=batch_size)
    reference_seconds = time.perf_counter() - t0

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="editing", unit="edit", file=sys.stderr)
    edit_info: list[dict] = []
    points: list[dict] = []
    per_record: list[dict] = []
    edit_seconds = eval_seconds = 0.0
    done = 0
    for mark in marks:
        t0 = time.perf_counter()
        while done < mark:
            # the editor's batched path (same result as one edit after another) unless a custom
            # edit_fn is measured; one progress step per chunk of edits
            chunk = records[done: min(mark, done + _EDIT_CHUNK)] if edit_fn is _edit_one else records[done: done + 1]
            te = time.perf_counter()
            if edit_fn is _edit_one:
                results = editor.edit_many([(r.prompt, r.target) for r in chunk], progress=False)
            else:
                results = [edit_fn(editor, chunk[0])]
            seconds = (time.perf_counter() - te) / len(chunk)
            for res in results:
                info = {"seconds": seconds}
                for field in ("id", "loss", "action", "replaced_id"):
                    if hasattr(res, field):
                        info[field] = getattr(res, field)
                edit_info.append(info)
            done += len(chunk)
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
    if bar is not None:
        bar.close()
    records_out = [{**r.to_dict(), **m, **{f"edit_{k}": v for k, v in e.items()}}
                   for r, m, e in zip(records, per_record, edit_info)]
    return {
        "checkpoints": points,
        "records": records_out,
        "timings": {"locality_reference_seconds": reference_seconds, "edit_seconds": edit_seconds,
                    "eval_seconds": eval_seconds, "seconds_per_edit": edit_seconds / n,
                    "total_seconds": reference_seconds + edit_seconds + eval_seconds},
    }


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def plot_report(report: dict, path) -> None:
    """Rel / Gen / Loc / OP against the number of sequential edits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = report["checkpoints"]
    xs = [p["n"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("rel", "Reliability"), ("gen", "Generalization"), ("loc", "Locality"), ("op", "OP")):
        ax.plot(xs, [p[key] for p in points], marker="o", label=label)
    if len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 20:
        ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(report.get("title", "HoReN sequential editing"))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def _parse_checkpoints(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        marks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"horen-fast eval: --checkpoints must be comma-separated integers, got {text!r}") from None
    if any(m < 1 for m in marks):
        raise SystemExit(f"horen-fast eval: checkpoints must be >= 1, got {text!r}")
    return marks


def _parse_layer(text: str | None):
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def build_editor(model_name: str, *, layer=None, config_path=None, threshold=None, progress=True):
    """(editor, config dict) for a model name or path: the recommended config for a known model,
    a YAML config file when given, then --layer / --threshold overrides."""
    from .calibrate import recommended_config
    from .config import HoReNConfig
    from .editor import HoReNEditor
    from .models import load_model
    model, tokenizer = load_model(model_name, progress=progress)
    if config_path:
        config = HoReNConfig.from_yaml(config_path)
    else:
        config = recommended_config(model_name, model)
    overrides = {}
    if layer is not None:
        overrides["layer"] = layer
    if threshold is not None:
        overrides["hopfield_key_match_threshold"] = threshold
    if overrides:
        config = HoReNConfig.from_dict({**config.to_dict(), **overrides})
    return HoReNEditor(model, tokenizer, config), config


def _cmd_eval(args) -> int:
    from .data import RecordsError, read_records
    try:
        records = read_records(args.data, args.n)
    except RecordsError as exc:
        print(f"horen-fast eval: {exc}", file=sys.stderr)
        return 2
    checkpoints = _parse_checkpoints(args.checkpoints)
    t0 = time.perf_counter()
    editor, config = build_editor(args.model, layer=_parse_layer(args.layer), config_path=args.config,
                                  threshold=args.threshold, progress=not args.no_progress)
    load_seconds = time.perf_counter() - t0
    body = run_sequential(editor, records, checkpoints, batch_size=args.batch_size, progress=not args.no_progress)
    last = body["checkpoints"][-1]
    report = {
        "title": f"HoReN on {Path(args.model).name if Path(args.model).exists() else args.model}, {Path(args.data).name}",
        **{k: last[k] for k in ("n", "rel", "gen", "loc", "op")},
        "model": args.model,
        "data": {"path": str(args.data), "n": len(records)},
        "config": config.to_dict(),
        "versions": package_versions(),
        **body,
    }
    report["timings"]["model_load_seconds"] = load_seconds
    if args.out:
        write_report(report, args.out)
    if args.plot:
        plot_report(report, args.plot)
    summary = {k: last[k] for k in ("n", "rel", "gen", "loc", "op")}
    summary.update(entries=last.get("entries"), edit_seconds=round(body["timings"]["edit_seconds"], 3),
                   eval_seconds=round(body["timings"]["eval_seconds"], 3))
    print(json.dumps(summary))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="edit records sequentially and measure Rel/Gen/Loc/OP (SPEC 6)",
                              description="Apply the records' edits one after another and measure "
                                          "Reliability, Generalization, Locality and OP at checkpoints. "
                                          "The last printed line is a JSON summary.")
    p.add_argument("--data", required=True, help="ZsRE / EasyEdit records: JSON array or JSON Lines")
    p.add_argument("--n", type=int, default=None, help="use the first N records (default: all)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a local Hugging Face folder")
    p.add_argument("--layer", default=None, help="layer index or module path of the wrapped projection")
    p.add_argument("--config", default=None, help="HoReN YAML config (published keys)")
    p.add_argument("--threshold", type=float, default=None, help="override the match threshold tau")
    p.add_argument("--checkpoints", default=None, help="comma-separated edit counts to evaluate at, e.g. 10,100")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch size (default 32)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="draw the metrics against the number of edits (PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)
