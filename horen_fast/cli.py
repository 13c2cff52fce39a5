"""The ``horen-fast`` command. Each subcommand lives in the module that owns the work; a module
joins the command by defining ``register_cli(subparsers)`` and being listed in _COMMAND_MODULES.

Errors: a command raises ``CommandError`` for a bad input (a model, config, layer or data file
that cannot be used); ``main`` prints it as one line, ``horen-fast COMMAND: what was wrong; what
to do``, and returns exit status 2. ``HOREN_FAST_DEBUG=1`` shows the traceback instead. Ctrl-C
returns 130 after the command has said how far it got.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from contextlib import contextmanager

__all__ = ["CommandError", "bad_input", "one_line", "busy_cores", "add_threads_option", "torch_threads",
           "build_parser", "main"]

_COMMAND_MODULES = [
    # module path, relative to horen_fast (each defines register_cli(subparsers))
    "evaluate",
    "calibrate",
    "demo",
    "benchmark",
    "stream",
]


class CommandError(ValueError):
    """A bad input to a command; its message says what was wrong and what to do."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines included, become one space)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _yaml_error():
    try:
        import yaml
        return yaml.YAMLError
    except ImportError:  # pragma: no cover - PyYAML is a dependency
        return ()


@contextmanager
def bad_input(what: str, hint: str = ""):
    """Turn the errors a bad ``what`` (e.g. "--model x") causes inside the block into a
    CommandError naming it: ValueError, TypeError, LookupError, OSError, ImportError, RuntimeError
    and YAML errors; a file that is not text says so."""
    try:
        yield
    except CommandError:
        raise
    except UnicodeDecodeError as exc:
        raise CommandError(f"{what}: not a UTF-8 text file (byte {exc.object[exc.start:exc.start + 1]!r} "
                           f"at offset {exc.start}); pass a text (YAML) file") from exc
    except (ValueError, TypeError, LookupError, OSError, ImportError, RuntimeError, _yaml_error()) as exc:
        detail = one_line(exc)
        if isinstance(exc, _yaml_error()):
            detail = f"not valid YAML ({detail}); fix the file"
        raise CommandError(f"{what}: {detail}{'; ' + hint if hint else ''}") from exc


def busy_cores(interval: float = 0.3) -> float | None:
    """How many cores other processes keep busy right now (sampled over ``interval`` seconds from
    /proc/stat; None where it cannot be read). Unlike the load average, which trails the last
    minute, this does not count a command that has just finished (such as the pip install before
    the demo in a chained command line)."""
    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]   # user .. steal
        return sum(fields), fields[3] + fields[4]                  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=int(os.environ.get("HOREN_FAST_THREADS", 0)) or None,
                        help="torch CPU threads (default: torch's choice, or 1 when other processes "
                             "already keep every core busy; env HOREN_FAST_THREADS)")


@contextmanager
def torch_threads(requested: int | None, command: str):
    """Run the block with ``requested`` torch CPU threads; when None, with 1 thread if other
    processes keep all cores but half of one busy right now (torch's worker threads would then wait
    on each other and a forward pass can take 10x longer), else torch's default. Restores the
    previous count afterwards."""
    import torch
    before = torch.get_num_threads()
    threads = requested
    if threads is not None and threads < 1:
        raise CommandError(f"--threads {threads}: must be at least 1")
    cores = os.cpu_count() or 1
    if threads is None and cores > 1 and before > 1:
        busy = busy_cores()
        if busy is not None and busy >= cores - 0.5:
            threads = 1
            print(f"horen-fast {command}: other processes keep {busy:.1f} of {cores} cores busy: "
                  f"using 1 torch thread (--threads N to choose)", file=sys.stderr)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _version() -> str:
    import torch

    from . import __version__
    from .retrieval import available_backends
    return (f"horen-fast {__version__} (torch {torch.__version__}; retrieval backends: "
            f"{', '.join(available_backends())})")


class _VersionAction(argparse.Action):
    """--version, computed only when asked for (it imports torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="horen-fast", description="HoReN model editing, fast.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version, torch's and the retrieval backends available, and exit")
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
    args.command_line = ["horen-fast", *(sys.argv[1:] if argv is None else argv)]
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        if os.environ.get("HOREN_FAST_DEBUG") == "1":
            raise
        print(f"horen-fast {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"horen-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":   # python -m horen_fast.cli: run the package's copy (one CommandError class)
    from horen_fast.cli import main as package_main
    sys.exit(package_main())
