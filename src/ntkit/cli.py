"""The ``ntkit`` command line.

Subcommands live next to what they run; each module below exposes ``register(subparsers)``
which adds its parser(s) with ``set_defaults(func=...)``. ``func(args)`` returns an exit code.
Bad arguments print a one-line error and exit with code 2 (argparse's convention).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

__all__ = ["main", "build_parser", "print_written"]

# modules contributing subcommands, in help order
COMMAND_MODULES = (
    "ntkit._demo",          # demo
    "ntkit.scale._cli",     # kernel, solve
    "ntkit._cli_predict",   # predict
    "ntkit._cli_lazy",      # lazy
)


def print_written(paths) -> None:
    """End of a subcommand: the absolute paths of the files it wrote, one per line."""
    import os
    print("wrote:")
    for p in paths:
        print(f"  {os.path.abspath(p)}")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntkit", description="Neural Tangent Kernels in PyTorch: exact kernels, training "
        "dynamics and lazy-training diagnostics.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"ntkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue            # that part is not present in this installation
            raise
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, MemoryError) as e:
        print(f"ntkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
