"""The editing metrics (EasyEdit's "vanilla generation" token accuracy, the one the HoReN paper
reports), batched greedy generation, and which codebook entry a prompt retrieves.

Token-level details, as EasyEdit does them:
- prompts are tokenized the tokenizer's default way (special tokens such as BOS included);
  targets and answers without special tokens;
- Reliability (the edit prompt) / Generalization (its paraphrase): greedy-generate
  ``len(tokens(" " + target))`` tokens, decode them skipping special tokens, strip leading
  whitespace, re-encode, keep the first ``len(tokens(target))`` and score the mean token equality
  with the target tokens, 0 when the lengths differ (1 for an empty target);
- Locality (an unrelated prompt): greedy-generate ``len(tokens(" " + answer))`` tokens after the
  locality prompt; the compared tokens are the last ``len(tokens(answer))`` tokens of prompt +
  generation, before and after the edits; score = fraction equal;
- OP: the geometric mean of the three;
- generation stops at the model's end-of-sequence token, as ``generate`` does for one row.

Generation runs in left-padded batches (rows sorted by how many tokens they need) through
``generator.generate`` (a HoReNEditor, or any Hugging Face causal LM) with the KV cache.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .data import EditRecord, left_pad

__all__ = ["answer_lengths", "target_accuracy", "locality_tokens", "locality_score", "overall",
           "stop_ids", "generate_tokens", "locality_reference", "evaluate_records", "aggregate",
           "retrieved_entries", "failure_details"]


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

def stop_ids(generator, tokenizer) -> set[int]:
    """The end-of-sequence ids generation stops at: the generation config of ``generator`` itself
    (a Hugging Face causal LM), else of ``generator.model`` (an editor wrapping one), else the
    tokenizer's EOS token. (A causal LM's own ``.model`` is its inner decoder, which has no
    generation config, so the generator is asked first.)"""
    for obj in (generator, getattr(generator, "model", None)):
        eos = getattr(getattr(obj, "generation_config", None), "eos_token_id", None)
        if eos is not None:
            return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}


def _device(generator) -> torch.device:
    for obj in (generator, getattr(generator, "model", None)):
        try:
            return next(obj.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            continue
    return torch.device("cpu")


@torch.no_grad()
def generate_tokens(generator, tokenizer, prompts: Sequence[str], max_new: Sequence[int], *,
                    batch_size: int = 32) -> list[tuple[list[int], list[int]]]:
    """Greedy generation of ``max_new[i]`` tokens after ``prompts[i]`` for every i, in left-padded
    batches. Returns (prompt ids, generated ids) per prompt, generation cut after the first
    end-of-sequence token (as a one-row ``generate`` would stop there). A prompt that repeats with
    the same ``max_new`` (a stream's locality prompts) is generated once."""
    if len(prompts) != len(max_new):
        raise ValueError("prompts and max_new differ in length")
    first: dict[tuple[str, int], int] = {}
    where = [first.setdefault((p, int(k)), len(first)) for p, k in zip(prompts, max_new)]
    if len(first) < len(prompts):
        unique = _generate(generator, tokenizer, [p for p, _ in first], [k for _, k in first], batch_size)
        return [(list(unique[w][0]), list(unique[w][1])) for w in where]
    return _generate(generator, tokenizer, prompts, max_new, batch_size)


def _generate(generator, tokenizer, prompts, max_new, batch_size):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token")
    stops = stop_ids(generator, tokenizer)
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


def retrieved_entries(editor, prompts: Sequence[str], *, batch_size: int = 32) -> list[tuple[int, float]]:
    """For each prompt, the codebook entry its query matches best and that entry's final Hopfield
    score (the cosine compared with the threshold tau), whether or not it passes tau: (entry id,
    cosine), or (-1, nan) when the codebook is empty. The query is the one the editor builds at
    generation time (``calibrate.prompt_queries``: prompts tokenized the default way, the forward
    pass stopping at the edited layer)."""
    from .calibrate import prompt_queries
    if len(editor.codebook) == 0:
        return [(-1, float("nan"))] * len(prompts)
    q = prompt_queries(editor, editor.tokenizer, prompts, [editor.layer_path],
                       editor.config.query_selection_strategy, batch_size=batch_size)[editor.layer_path]
    res = editor.codebook.retrieve(q.to(editor.device), threshold=-1.0)
    return [(int(i), float(s)) for i, s in zip(res.index.tolist(), res.score.tolist())]


def failure_details(editor, body: dict, *, batch_size: int = 32) -> None:
    """Add to each record of ``body`` that did not score 1 on Rel, Gen and Loc a ``retrieved``
    field: for its edit prompt, paraphrase and unrelated prompt, the codebook entry the query
    matches best, the record that entry was made for, the cosine (final Hopfield score) and
    whether it passes the threshold tau."""
    records = body["records"]
    failed = [r for r in records if min(r["rel"], r["gen"], r["loc"]) < 1.0]
    if not failed or not hasattr(editor, "codebook"):
        return
    record_of = {}
    for i, r in enumerate(records):
        record_of.setdefault(r.get("edit_id"), i)
    tau = editor.config.hopfield_key_match_threshold
    prompts = [p for r in failed for p in (r["prompt"], r["rephrase"], r["loc_prompt"])]
    found = retrieved_entries(editor, prompts, batch_size=batch_size)
    for j, r in enumerate(failed):
        r["retrieved"] = {}
        for k, kind in enumerate(("prompt", "rephrase", "loc_prompt")):
            entry, cos = found[3 * j + k]
            r["retrieved"][kind] = {"entry": entry, "record": record_of.get(entry), "cosine": cos,
                                    "matched": bool(cos > tau)}
