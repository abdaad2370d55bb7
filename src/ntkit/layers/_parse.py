"""Parse an architecture written as text (CLI flags, config files) without ``eval``.

The text is the Python expression a user would write, restricted to layer constructors from
:mod:`ntkit.layers`, numbers, strings, booleans, ``None`` and tuples/lists::

    >>> parse_arch("serial(Dense(512, W_std=1.4, b_std=0.1), Relu(), Dense(1))")
    >>> parse_arch("Dense(512), Relu(), Dense(1)")      # top-level commas mean serial(...)
"""
from __future__ import annotations

import ast

__all__ = ["parse_arch"]


def _names():
    from . import __all__ as names
    import ntkit.layers as L
    return {n: getattr(L, n) for n in names if n not in ("Layer", "Activation", "Elementwise")}


def parse_arch(text: str):
    """Build an architecture from its textual form; raises ``ValueError`` on anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("architecture text is empty; example: 'Dense(512), Relu(), Dense(1)'")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse architecture {text!r}: {e.msg}") from None
    names = _names()

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool,
                                                                      type(None))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id not in names:
                raise ValueError(f"unknown layer {node.func.id!r} in architecture; known: "
                                 f"{', '.join(sorted(names))}")
            args = [ev(a) for a in node.args]
            kwargs = {k.arg: ev(k.value) for k in node.keywords}
            try:
                return names[node.func.id](*args, **kwargs)
            except TypeError as e:
                raise ValueError(f"bad arguments for {node.func.id}: {e}") from None
        raise ValueError(f"unsupported expression in architecture: {ast.dump(node)[:80]}")

    value = ev(tree.body)
    from .combinators import serial
    if isinstance(value, tuple):
        return serial(*value)
    return value
