"""A ZsRE-style record stream for scale: ``horen-fast stream --from FILE --n N --seed S --out F``.

Only a few hundred real ZsRE records are usually at hand, while the paper's claim is about 50,000
sequential edits. This module makes N records (up to 100,000) in the same format from any ZsRE
file (fields ``subject``, ``src``, ``rephrase``, ``alt``, ``loc``, ``loc_ans``):

- Relation templates come from the real records: in each record the subject is replaced by a slot
  in ``src`` and ``rephrase``; templates that appear in the same record belong to one relation, and
  relations that share a template are merged. A relation with several templates gives the
  paraphrase (a different template from the edit prompt's); one with two gives them in either order.
- Subjects are drawn from a pool of at least 10,000 distinct names: people, places and
  organisations made by the ``faker`` package (seeded), plus every real subject.
- Targets are the real answers (``alt`` and ``answers``) of records of the same relation.
- Locality questions (``loc``, ``loc_ans``) are drawn from the real locality pool.
- The real records are interleaved at known, evenly spread positions (in file order), so every
  checkpoint of a sequential run measures some of them; they keep their fields and get
  ``"synthetic": false`` and ``"real_index"``. Every generated record has ``"synthetic": true``.
- The same file, N and seed always give the same stream (with the same faker version, which the
  first line records as ``stream`` metadata on each record: ``stream_seed``, ``stream_faker``).

Sibling density (the fraction of records whose subject also appears with another relation) is
what makes ZsRE hard for a key-value editor: the prompts of siblings are close in activation
space. ``sibling_density`` measures it, and the command prints it for the source file and for the
stream. A generated record takes a fresh subject (each name is used once while the pool lasts; the
pool has at least max(12,000, N) names), except that a fraction ``--sibling-rate`` (default 0.5)
re-uses the subject of a recent record with another relation. At the default the stream's density
is about 0.70, close to the 374-record dev file's 0.66 (whose first records repeat subjects, as the
benchmark does); raise or lower the rate to stress more or less.
"""
from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["Relation", "relations_from_records", "subject_pool", "make_stream", "sibling_density"]

SLOT = "{subject}"
MAX_N = 100_000


class Relation:
    """One relation: its question templates (with ``{subject}``) and its answers."""

    def __init__(self):
        self.templates: list[str] = []
        self.answers: list[str] = []

    def add_template(self, t: str) -> None:
        if t not in self.templates:
            self.templates.append(t)

    def add_answer(self, a: str) -> None:
        if a and a not in self.answers:
            self.answers.append(a)


def _template(text: str, subject: str) -> str | None:
    if not subject or subject not in text or "{" in text or "}" in text:
        return None
    return text.replace(subject, SLOT)


def relations_from_records(records: list[dict]) -> list[Relation]:
    """Group the records' templates into relations (union of templates seen in one record)."""
    parent: dict[str, str] = {}

    def find(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    usable = []
    for r in records:
        subj = r.get("subject") or ""
        ts = [t for t in (_template(r.get("src", ""), subj), _template(r.get("rephrase", ""), subj)) if t]
        if not ts:
            continue
        for t in ts:
            parent.setdefault(t, t)
        for t in ts[1:]:
            parent[find(t)] = find(ts[0])
        usable.append((r, ts))
    groups: dict[str, Relation] = defaultdict(Relation)
    for r, ts in usable:
        rel = groups[find(ts[0])]
        for t in ts:
            rel.add_template(t)
        rel.add_answer(r.get("alt"))
        for a in r.get("answers") or []:
            rel.add_answer(a)
    return [rel for rel in groups.values() if rel.answers]


def subject_pool(real_subjects, seed: int, size: int = 12_000) -> list[str]:
    """At least ``size`` distinct subject names: faker people, cities and companies, plus the real
    subjects (deterministic for a seed and a faker version)."""
    try:
        from faker import Faker
    except ImportError:
        raise SystemExit("horen-fast stream needs the faker package: pip install 'horen-fast[stream]'") from None
    fake = Faker(["en_US", "de_DE", "fr_FR", "es_ES", "it_IT"])
    fake.seed_instance(seed)
    pool = dict.fromkeys(s for s in real_subjects if s)
    makers = [fake.name, fake.city, fake.company, fake.name, fake.last_name]
    attempts = 0
    while len(pool) < size and attempts < size * 20:
        name = makers[attempts % len(makers)]()
        attempts += 1
        if "{" not in name and "}" not in name:
            pool.setdefault(name, None)
    return list(pool)


def _faker_version() -> str:
    try:
        import faker
        return faker.VERSION
    except ImportError:
        return "none"


def make_stream(records: list[dict], n: int, seed: int = 0, *, sibling_rate: float = 0.5,
                pool_size: int | None = None) -> list[dict]:
    """N records: the real ones at evenly spread positions, generated ones elsewhere."""
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n must be between 1 and {MAX_N}, got {n}")
    if not 0 <= sibling_rate < 1:
        raise ValueError(f"sibling_rate must be in [0, 1), got {sibling_rate}")
    rels = relations_from_records(records)
    locs = [(r["loc"], r["loc_ans"]) for r in records if r.get("loc") and r.get("loc_ans")]
    if not rels or not locs:
        raise ValueError("the source file has no usable record (each needs subject, src with the "
                         "subject in it, alt, loc and loc_ans)")
    rng = random.Random(seed)
    pool = subject_pool([r.get("subject") for r in records], seed, pool_size or max(12_000, n))
    rng.shuffle(pool)
    fresh = 0
    real = records[:n]
    real_at = {round(i * n / len(real)): i for i in range(len(real))} if real else {}
    meta = {"stream_seed": seed, "stream_faker": _faker_version()}
    out, recent = [], []
    for pos in range(n):
        if pos in real_at:
            out.append({**real[real_at[pos]], "synthetic": False, "real_index": real_at[pos], **meta})
            continue
        rel_i = rng.randrange(len(rels))
        if recent and rng.random() < sibling_rate:
            subject, last_rel = recent[rng.randrange(len(recent))]
            if len(rels) > 1 and rel_i == last_rel:
                rel_i = (rel_i + 1 + rng.randrange(len(rels) - 1)) % len(rels)
        else:
            subject = pool[fresh % len(pool)]
            fresh += 1
        rel = rels[rel_i]
        src_t = rng.choice(rel.templates)
        others = [t for t in rel.templates if t != src_t] or [src_t]
        loc, loc_ans = locs[rng.randrange(len(locs))]
        out.append({"subject": subject, "src": src_t.replace(SLOT, subject),
                    "rephrase": rng.choice(others).replace(SLOT, subject), "alt": rng.choice(rel.answers),
                    "loc": loc, "loc_ans": loc_ans, "synthetic": True, "relation": rel_i, **meta})
        recent.append((subject, rel_i))
        recent = recent[-64:]
    return out


def sibling_density(records: list[dict]) -> float:
    """Fraction of records whose subject also appears in a record with another prompt template
    (another relation), the ZsRE "siblings" a key-value editor must keep apart."""
    by_subject: dict[str, set] = defaultdict(set)
    for r in records:
        s = r.get("subject")
        t = _template(r.get("src", ""), s or "")
        if s and t:
            by_subject[s].add(t)
    hits = sum(1 for r in records if len(by_subject.get(r.get("subject"), ())) > 1)
    return hits / max(len(records), 1)


def _read_zsre(path: str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(stripped)
    else:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError("expected a JSON array of objects or JSON Lines of objects")
    return data


def _cmd_stream(args) -> int:
    try:
        records = _read_zsre(args.source)
        stream = make_stream(records, args.n, args.seed, sibling_rate=args.sibling_rate)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(f"horen-fast stream: {args.source}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in stream:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    n_real = sum(not r["synthetic"] for r in stream)
    print(json.dumps({"out": str(out), "n": len(stream), "real": n_real, "synthetic": len(stream) - n_real,
                      "relations": len(relations_from_records(records)), "seed": args.seed,
                      "sibling_density_source": round(sibling_density(records), 4),
                      "sibling_density_stream": round(sibling_density(stream), 4)}))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("stream", help="make a ZsRE-style record stream of N records (synthetic)",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, help="a ZsRE-format file (JSON or JSON Lines)")
    p.add_argument("--n", type=int, required=True, help=f"number of records (1..{MAX_N})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sibling-rate", type=float, default=0.5,
                   help="fraction of generated records that re-use a recent subject with another relation")
    p.add_argument("--out", required=True, help="output JSON Lines file")
    p.set_defaults(func=_cmd_stream)
