"""Turn a pytest-benchmark JSON into a table (median times, ratio to the published algorithm,
achieved key bandwidth) and a PNG plot of latency against N, one line per implementation.

    pytest bench/ --benchmark-json out.json
    python -m bench.report out.json --plot latency.png
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "impl" not in info or "n" not in info:
            continue  # not a retrieval benchmark
        rows.append({**info, "median_s": bench["stats"]["median"], "group": bench.get("group") or ""})
    return rows


def table(rows: list[dict]) -> str:
    groups = defaultdict(dict)
    for r in rows:
        groups[r["group"]][r["impl"]] = r
    lines = ["| case | impl | median ms | vs published | key GB/s |", "|---|---|---:|---:|---:|"]
    for group in sorted(groups, key=lambda g: (min(r["n"] for r in groups[g].values()), g)):
        impls = groups[group]
        base = impls.get("published", {}).get("median_s")
        for impl, r in sorted(impls.items(), key=lambda kv: kv[1]["median_s"]):
            ratio = f"{base / r['median_s']:.2f}x" if base else "-"
            gbs = r.get("key_bytes", 0) / r["median_s"] / 1e9 if r.get("key_bytes") else float("nan")
            lines.append(f"| {group} | {impl} | {r['median_s'] * 1e3:.2f} | {ratio} | {gbs:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["d"], r["b"], r.get("dtype", "")) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (d, b, dtype) in zip(axes[0], panels):
        series = defaultdict(list)
        for r in rows:
            if (r["d"], r["b"], r.get("dtype", "")) == (d, b, dtype):
                series[r["impl"]].append((r["n"], r["median_s"] * 1e3))
        for impl, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("codebook entries N")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"d={d} B={b} {dtype.replace('torch.', '')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a file written by pytest --benchmark-json")
    parser.add_argument("--plot", help="write a PNG plot of latency against N here")
    args = parser.parse_args(argv)
    rows = load_rows(args.json)
    if not rows:
        parser.error(f"{args.json} holds no retrieval benchmarks (extra_info with impl and n)")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
