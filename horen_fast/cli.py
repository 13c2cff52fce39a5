"""The ``horen-fast`` command. Each subcommand lives in the module that owns the work; a module
joins the command by defining ``register_cli(subparsers)`` and being listed in _COMMAND_MODULES."""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = [
    # module path, relative to horen_fast (each defines register_cli(subparsers))
    "evaluate",
    "calibrate",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="horen-fast", description="HoReN model editing, fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"horen_fast.{name}").register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
