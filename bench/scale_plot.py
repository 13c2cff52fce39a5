"""The routing-exact curve of a stream with the fully trained run's checkpoints on the same axes
(issue 14, item 4), and the table of both.

    python -m bench.scale_plot --routing r50k.json [--full full10k.json ...] --out bench/results/scale.png

``--routing``: a ``horen-fast eval --routing-only --out`` report; ``--full`` (repeatable): a
``horen-fast eval --out`` report of the same stream, or any JSON with its ``checkpoints`` (finished
or not: its finished checkpoints are drawn; where two files hold the same checkpoint, the later
file's is used). Solid lines: Rel_r / Gen_r / Loc_r / OP_r; markers without lines: the full run's
Rel / Gen / Loc / OP.
Prints a Markdown table of both at every checkpoint of the routing run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = (("rel", "Rel", "tab:blue"), ("gen", "Gen", "tab:orange"), ("loc", "Loc", "tab:green"), ("op", "OP", "black"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", required=True)
    ap.add_argument("--full", action="append", default=[])
    ap.add_argument("--out", default=None, help="PNG to write")
    args = ap.parse_args(argv)
    routing = json.loads(Path(args.routing).read_text())
    rpts = routing["checkpoints"]
    fpts = {c["n"]: c for path in args.full for c in json.loads(Path(path).read_text())["checkpoints"]}
    print("| edits | entries | Rel_r | Gen_r | Loc_r | OP_r | real records: n, OP_r | full run: Rel | Gen | Loc | OP |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in rpts:
        sub = c.get("subset") or {}
        real = f"{sub['n']}, {sub['op']:.3f}" if "op" in sub else ""
        f = fpts.get(c["n"])
        tail = " | ".join(f"{f[k]:.3f}" for k, _, _ in KEYS) if f else " | | |"
        print(f"| {c['n']} | {c['entries']} | " + " | ".join(f"{c[k]:.3f}" for k, _, _ in KEYS) + f" | {real} | {tail} |")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        xs = [c["n"] for c in rpts]
        for key, label, color in KEYS:
            ax.plot(xs, [c[key] for c in rpts], color=color, label=f"{label}_r (routing only)", linewidth=1.8)
            if fpts:
                fx = sorted(fpts)
                ax.plot(fx, [fpts[n][key] for n in fx], color=color, marker="o", linestyle="none",
                        markersize=7, markerfacecolor="none", label=f"{label} (trained)")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("number of sequential edits")
        ax.set_ylabel("score")
        ax.set_title(routing.get("title", "HoReN"), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize=7, ncol=2)
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
