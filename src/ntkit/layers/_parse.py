"""Parse an architecture written as text (CLI flags, config files) without ``eval``.

The text is the Python expression a user would write, restricted to layer constructors from
:mod:`ntkit.layers` (``Dense``, ``Relu``, ``serial``, ...), numbers, strings, booleans, ``None``
and tuples/lists::

    >>> parse_arch("serial(Dense(512, W_std=1.4, b_std=0.1), Relu(), Dense(1))")
    >>> parse_arch("Dense(512), Relu(), Dense(1)")      # top-level commas mean serial(...)

Anything else (operators, variables, attribute access, ``*args``) raises ``ValueError`` quoting
the offending part of the text and the supported syntax.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import math
import sys

from . import (activations, attention, combinators, conv, conv_variants, dense, graph, misc,
               normalization, pooling)
from ._base import Layer, serial

__all__ = ["parse_arch"]

SYNTAX = ("layer calls like Dense(512, W_std=1.5) or Relu(), separated by commas (or nested "
          "in serial(...)/parallel(...)), with numbers, strings, True/False/None and "
          "tuples/lists as arguments")
# the modules whose constructors the text may call (what ntkit.layers re-exports; imported
# here directly, not through the package, which imports this module)
_FAMILIES = (activations, attention, combinators, conv, conv_variants, dense, graph, misc,
             normalization, pooling)
# exported by the family modules but not constructors a text may call: the classes serial(),
# parallel() and LayerNorm(axis=...) build, and the activation base classes (Elementwise
# needs a Python function); tests/test_cli_errors.py checks that what remains is exactly the
# public layer constructors of ntkit.layers
_NOT_PUBLIC = {"Serial", "Parallel", "LayerNormAxes", "Activation", "Elementwise"}


def _layer_names():
    """``{name: constructor}`` of the layer constructors the text may call: the classes of
    the layer families that are layers, and their functions annotated to return one."""
    out = {}
    for mod in _FAMILIES:
        for n in mod.__all__:
            obj = getattr(mod, n, None)
            if n in _NOT_PUBLIC or obj is None:
                continue
            cls = obj
            if not isinstance(obj, type) and callable(obj):
                ret = inspect.signature(obj).return_annotation
                cls = (getattr(sys.modules.get(obj.__module__), ret, None)
                       if isinstance(ret, str) else ret)
            if isinstance(cls, type) and issubclass(cls, Layer):
                out[n] = obj
    return out


def parse_arch(text: str) -> Layer:
    """Build an architecture from its textual form; raises ``ValueError`` on anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("architecture text is empty; example: 'Dense(512), Relu(), Dense(1)'")
    src = text.strip()
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        where = f" at column {e.offset}" if e.offset else ""
        raise ValueError(f"cannot parse architecture {text!r}: {e.msg}{where}; expected "
                         f"{SYNTAX}") from None
    names = _layer_names()

    def part(node) -> str:
        seg = ast.get_source_segment(src, node)
        return repr(seg if seg is not None else type(node).__name__)

    def unsupported(node, what: str):
        raise ValueError(f"unsupported {what} {part(node)} in architecture {text!r}; the "
                         f"text may contain only {SYNTAX}")

    def unknown(name: str, node):
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown layer {name!r} in architecture {text!r}{hint}; known layers: "
                         f"{', '.join(sorted(names))}")

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool,
                                                                      type(None))):
            if isinstance(node.value, float) and not math.isfinite(node.value):
                raise ValueError(f"number {part(node)} in architecture {text!r} is out of "
                                 f"range (not finite)")
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                unsupported(node, "expression")
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                unsupported(node.func, "call of")
            fname = node.func.id
            if fname not in names:
                unknown(fname, node)
            for a in node.args:
                if isinstance(a, ast.Starred):
                    unsupported(a, "argument")
            for k in node.keywords:
                if k.arg is None:
                    unsupported(k.value, "**argument")
            args = [ev(a) for a in node.args]
            kwargs = {k.arg: ev(k.value) for k in node.keywords}
            try:
                return names[fname](*args, **kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"bad arguments in {part(node)}: {e}") from None
        if isinstance(node, ast.Name):
            if node.id in names:
                raise ValueError(f"{node.id!r} in architecture {text!r} must be called: write "
                                 f"{node.id}(...)")
            if node.id in ("inf", "nan"):
                raise ValueError(f"number {node.id!r} in architecture {text!r} is not finite")
            unsupported(node, "name")
        unsupported(node, "expression")

    value = ev(tree.body)
    if isinstance(value, tuple):
        for v in value:
            if not isinstance(v, Layer):
                raise ValueError(f"architecture {text!r}: {v!r} is not a layer; the text may "
                                 f"contain only {SYNTAX}")
        return serial(*value)
    if not isinstance(value, Layer):
        raise ValueError(f"architecture {text!r} is {value!r}, not a layer; expected {SYNTAX}")
    return value
