"""Models derived from a model: its Taylor expansion in the parameters (``linearize``,
``taylor_expand``) and the lazy-training wrappers (``centered``, ``scaled``). Private: the public
surface is :mod:`ntkit.empirical`.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_map

from ._common import ParamFilter, check_model, jvp_any, select_params

__all__ = ["linearize", "taylor_expand", "centered", "scaled", "Linearized", "TaylorExpanded",
           "Centered", "Scaled"]


# ------------------------------------------------------------------------ linearization & Taylor
def _attr(module: nn.Module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class TaylorExpanded(nn.Module):
    """``sum_{m<=degree} D^m f(theta0)[theta - theta0]^m / m!`` with trainable ``theta``.

    ``self.model`` is a private copy of the model whose selected parameters are ``theta`` (start:
    ``theta0``, stored as buffers). Derivatives are nested ``torch.func.jvp`` (cost ~2^degree
    forward passes); no Jacobian is stored. Parameters not selected stay frozen at ``theta0``.
    """

    def __init__(self, model: nn.Module, degree: int, params: ParamFilter = None):
        super().__init__()
        check_model(model)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
            raise ValueError(f"`degree` must be an integer >= 0, got {degree!r}")
        names = select_params(model, params)
        self.degree = degree
        self.model = copy.deepcopy(model)
        self._names = names
        sel = set(names)
        for n, p in self.model.named_parameters():
            if n in sel:
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
        for i, n in enumerate(names):
            self.register_buffer(f"theta0_{i}", _attr(self.model, n).detach().clone())

    def theta0(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, f"theta0_{i}") for i, n in enumerate(self._names)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        theta0 = self.theta0()
        # by attribute path: under an outer functional_call these are plain tensors
        delta = {n: _attr(self.model, n) - theta0[n] for n in self._names}

        def f(p):
            return functional_call(self.model, p, args, kwargs)

        if self.degree == 0:
            with torch.no_grad():
                return f(theta0)
        if self.degree == 1:
            out, dout = jvp_any(f, theta0, delta)
            return tree_map(lambda a, b: a + b, out, dout) if not isinstance(out, torch.Tensor) \
                else out + dout

        def terms(p, m):
            if m == 0:
                return (f(p),)
            prim, tang = jvp(lambda q: terms(q, m - 1), (p,), (delta,))
            return tuple(prim) + (tang[-1],)

        ts = terms(theta0, self.degree)
        total = ts[0]
        for m in range(1, self.degree + 1):
            c = 1.0 / math.factorial(m)
            if isinstance(total, torch.Tensor):
                total = total + c * ts[m]
            else:
                total = tree_map(lambda a, b: a + c * b, total, ts[m])  # noqa: B023 (run now)
        return total

    def extra_repr(self) -> str:
        return f"degree={self.degree}, params={len(self._names)} tensors"


class Linearized(TaylorExpanded):
    """``f(theta0) + J(theta0) (theta - theta0)`` via one ``torch.func.jvp`` per forward."""

    def __init__(self, model: nn.Module, params: ParamFilter = None):
        super().__init__(model, 1, params)


def linearize(model: nn.Module, params: ParamFilter = None) -> Linearized:
    """First-order Taylor model ``f_lin(x; theta) = f(x; theta0) + J(x; theta0)(theta - theta0)``.

    Returns a module holding a copy of ``model`` whose (selected) parameters ``theta`` are
    trainable and start at ``theta0``; each forward costs one jvp (about 2-3 forward passes) and
    stores no Jacobian. Training it with gradient descent follows the empirical-NTK dynamics
    exactly. Example::

        >>> lin = linearize(net)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)   # trains theta, f stays linear in it
    """
    return Linearized(model, params)


def taylor_expand(model: nn.Module, degree: int, params: ParamFilter = None) -> TaylorExpanded:
    """Degree-``degree`` Taylor expansion of ``model`` in its parameters around their current
    values (``degree=1`` is :func:`linearize`; ``0`` is the frozen function at init)."""
    return TaylorExpanded(model, degree, params)


# ------------------------------------------------------------------------ lazy-training scales
class Centered(nn.Module):
    """``f(x; theta) - f(x; theta0)``: zero output at init, same NTK (``theta0`` is frozen)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = check_model(model)
        self._init_names = []
        for i, (n, t) in enumerate(list(model.named_parameters()) + list(model.named_buffers())):
            self._init_names.append(n)
            self.register_buffer(f"init_{i}", t.detach().clone())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        init = {n: getattr(self, f"init_{i}") for i, n in enumerate(self._init_names)}
        with torch.no_grad():
            f0 = functional_call(self.model, init, args, kwargs)
        out = self.model(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out - f0
        return tree_map(lambda a, b: a - b, out, f0)


class Scaled(nn.Module):
    """``alpha * f(x)`` (Chizat & Bach's lazy-training scale)."""

    def __init__(self, model: nn.Module, alpha: float):
        super().__init__()
        self.model = check_model(model)
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            raise TypeError(f"`alpha` must be a real number, got {alpha!r}") from None
        if not math.isfinite(a) or a == 0:
            raise ValueError(f"`alpha` must be finite and non-zero, got {alpha!r}")
        self.alpha = a

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.alpha * out
        return tree_map(lambda t: self.alpha * t, out)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


def centered(model: nn.Module) -> Centered:
    """Wrap ``model`` as ``f - f_init`` (a frozen copy of the initial parameters and buffers is
    kept; ``model`` itself stays trainable and shared). Output is exactly 0 at init, the NTK is
    unchanged. Use with :func:`scaled` for lazy training: ``scaled(centered(net), alpha)``."""
    return Centered(model)


def scaled(model: nn.Module, alpha: float) -> Scaled:
    """Wrap ``model`` as ``alpha * f``. Its NTK is ``alpha**2`` times ``model``'s. Training
    ``scaled(centered(net), alpha)`` with the loss divided by ``alpha**2`` (same learning rate)
    keeps the problem comparable across ``alpha``: the function moves at an ``alpha``-independent
    speed while parameters move ``O(1/alpha)``, so large ``alpha`` approaches the linearized
    (lazy) dynamics. Example::

        >>> lazy = scaled(centered(net), alpha=100.0)
        >>> loss = ((lazy(x) - y) ** 2).mean() / 100.0 ** 2
    """
    return Scaled(model, alpha)
