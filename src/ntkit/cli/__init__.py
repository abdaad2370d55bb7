"""The ``ntkit`` command line: one module per subcommand in this package.

``demo``, ``kernel``, ``solve``, ``predict`` and ``lazy`` each live in the module of that name;
what they share (reading arrays, checking output paths, :func:`print_written`) is in ``_io``.
Each command module exposes ``register(subparsers)``, which adds its parser with
``set_defaults(func=...)``; ``func(args)`` returns an exit code. Command modules never import
this one (imports point from here to them, see CONTRIBUTING.md), and only the module of the
command being run is imported, so ``ntkit --help`` and ``ntkit predict --help`` do not pay for
torch.

Errors: a user error (``ValueError``, ``TypeError``, ``OSError``, ``MemoryError`` raised while
running a command, or a bad flag caught by argparse) prints one paragraph
``ntkit COMMAND: error: ...`` on stderr and exits with code 2. Python argument names in a
message (`` `diag_reg` ``, ``diag_reg=``, ``compute_kernel(store=)``) are rewritten as the
command's flags (``--diag-reg``, ``--store``), and an ``OSError`` names the flag whose path it
concerns. Anything else is a bug in ntkit and propagates (traceback, exit code 1). Ctrl-C
exits with 130.

Example::

    $ ntkit predict --k-train-train k.npy --y-train y.npy --diag-reg -1
    ntkit predict: error: --diag-reg must be a finite number >= 0, got -1.0
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from types import ModuleType
from typing import Dict, Iterable, List, Optional

from ._io import CLIError, print_written

__all__ = ["main", "build_parser", "print_written", "CLIError"]

# (name, module that registers it, one-line help shown by `ntkit --help`), in help order. The
# help text repeats the module's own (a test keeps them equal) so that the top-level help needs
# no import at all.
COMMANDS = (
    ("demo", "ntkit.cli.demo",
     "main job: kernels vs networks on the embedded digits data, HTML report"),
    ("kernel", "ntkit.cli.kernel",
     "exact NNGP/NTK of an architecture on data (.npy/.npz or a Zarr store)"),
    ("solve", "ntkit.cli.solve",
     "kernel regression weights alpha = (K + ridge)^-1 y from a kernel store"),
    ("predict", "ntkit.cli.predict",
     "outputs of a network trained by GD, from its NTK (.npy files)"),
    ("lazy", "ntkit.cli.lazy",
     "lazy-training sweeps over width and output scale, with figures"),
)
COMMAND_MODULES = tuple(dict.fromkeys(m for _, m, _ in COMMANDS))

_USER_ERRORS = (ValueError, TypeError, OSError, MemoryError)


def _import_command_module(name: str) -> Optional[ModuleType]:
    """The module ``name`` of :data:`COMMANDS`, or ``None`` when that part of ntkit is not
    installed. The imports are spelled out (not built from the string) so that the import
    graph checked by tests/test_imports.py sees them."""
    try:
        if name == "ntkit.cli.demo":
            import ntkit.cli.demo as demo
            return demo
        if name == "ntkit.cli.kernel":
            import ntkit.cli.kernel as kernel
            return kernel
        if name == "ntkit.cli.solve":
            import ntkit.cli.solve as solve
            return solve
        if name == "ntkit.cli.predict":
            import ntkit.cli.predict as predict
            return predict
        if name == "ntkit.cli.lazy":
            import ntkit.cli.lazy as lazy
            return lazy
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise
    raise ValueError(f"{name!r} is not a command module of ntkit.cli.COMMANDS")


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``ntkit`` parser.

    ``commands=None`` imports every subcommand module and builds every parser in full; a
    collection of names builds only those in full (the others are listed, with their help, but
    take no arguments), which is what :func:`main` does to stay fast.
    """
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="ntkit", description="Neural Tangent Kernels in PyTorch: exact kernels, training "
        "dynamics and lazy-training diagnostics. Errors exit with code 2 and a message naming "
        "the flag.")
    parser.add_argument("--version", action="version", version=f"ntkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if commands is None else set(commands)
    modules = {m for n, m, _ in COMMANDS if wanted is None or n in wanted}
    done = set()
    for name, module, help_text in COMMANDS:
        if name in sub.choices:
            continue                        # registered together with an earlier command
        if module in modules:
            if module not in done:
                done.add(module)
                mod = _import_command_module(module)
                if mod is not None:
                    mod.register(sub)
            continue                        # (a missing module: not in this installation)
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> Optional[argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices.get(name)
    return None


def _flags(sub: Optional[argparse.ArgumentParser]):
    """``dest -> --flag`` of the options, and ``dest -> flag or METAVAR`` including positionals."""
    words: Dict[str, str] = {}
    paths: Dict[str, str] = {}
    if sub is None:
        return words, paths
    for a in sub._actions:
        if a.dest in (argparse.SUPPRESS, "help"):
            continue
        longs = [o for o in a.option_strings if o.startswith("--")]
        if longs:
            words[a.dest] = longs[0]
            paths[a.dest] = longs[0]
        elif not a.option_strings:
            paths[a.dest] = a.metavar if isinstance(a.metavar, str) else a.dest.upper()
    return words, paths


def _cli_words(msg: str, words: Dict[str, str]) -> str:
    """Rewrite Python argument names in ``msg`` as CLI flags: `` `diag_reg` `` and
    ``diag_reg=1e-6`` -> ``--diag-reg``, ``--diag-reg 1e-6``; ``compute_kernel(store=)`` ->
    ``--store``. Only names that are flags of this command are touched."""
    def call(m):
        return words.get(m.group(1), m.group(0))

    def tick(m):
        flag = words.get(m.group(1))
        if flag is None:
            return m.group(0)
        return flag + (f" {m.group(2)}" if m.group(2) else "")

    def bare(m):
        flag = words.get(m.group(1))
        return m.group(0) if flag is None else flag + " "

    msg = re.sub(r"\b[A-Za-z_][\w.]*\((\w+)=\)", call, msg)
    msg = re.sub(r"`(\w+)(?:=([^`\s]+))?`", tick, msg)
    msg = re.sub(r"(?<![\w`.-])([a-z]\w*_\w*)=(?=[^\s=])", bare, msg)
    return msg


def _flag_for_path(filename: str, args: argparse.Namespace, paths: Dict[str, str]):
    """The flag whose value is ``filename`` (or a folder holding it), if any."""
    try:
        f = os.path.abspath(filename)
    except (TypeError, ValueError):
        return None
    best, best_len = None, -1
    for dest, flag in paths.items():
        v = getattr(args, dest, None)
        if not isinstance(v, str) or not v:
            continue
        a = os.path.abspath(v)
        if (f == a or f.startswith(a.rstrip(os.sep) + os.sep)) and len(a) > best_len:
            best, best_len = flag, len(a)
    return best


def _message(e: BaseException, args: argparse.Namespace, words, paths) -> str:
    if isinstance(e, MemoryError) or _is_torch_oom(e):
        detail = str(e).strip()
        msg = "not enough memory" + (f" ({detail.splitlines()[0]})" if detail else "")
        msg += "; use smaller inputs" + (" or a smaller --memory-budget"
                                         if "memory_budget" in words else "")
    elif isinstance(e, OSError) and e.filename is not None:
        name = os.fsdecode(e.filename)
        flag = _flag_for_path(name, args, paths)
        reason = e.strerror or type(e).__name__
        msg = f"{flag + ': ' if flag else ''}{name}: {reason}"
        if isinstance(e, PermissionError):
            msg += " (check the permissions, or choose another path)"
    else:
        msg = str(e).strip() or type(e).__name__
    msg = _cli_words(msg, words)
    return " ".join(msg.split())                                    # one paragraph


def _is_torch_oom(e: BaseException) -> bool:
    s = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in s.lower()
                                            or "can't allocate memory" in s)


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``ntkit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    names = [c[0] for c in COMMANDS]
    if command is None:
        parser = build_parser(())
    elif command in names:
        module = dict((c[0], c[1]) for c in COMMANDS)[command]
        if _import_command_module(module) is None:
            print(f"ntkit {command}: error: this command is not part of this installation "
                  f"(module {module} is missing); reinstall ntkit", file=sys.stderr)
            return 2
        parser = build_parser((command,))
    else:
        parser = build_parser()             # unknown name: argparse lists the valid ones
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nntkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, RuntimeError) + _USER_ERRORS as e:
        if isinstance(e, RuntimeError) and not _is_torch_oom(e):
            raise                           # a bug in ntkit: keep the traceback
        words, paths = _flags(_subparser(parser, args.command))
        # a command may name more Python arguments (set as args._py_names, even while running)
        words.update(getattr(args, "_py_names", None) or {})
        print(f"ntkit {args.command}: error: {_message(e, args, words, paths)}",
              file=sys.stderr)
        return 2

