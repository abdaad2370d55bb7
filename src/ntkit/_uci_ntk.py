"""Fast fully-connected ReLU NTK with the first ``fix`` layers frozen (Arora et al. 2020).

"Harnessing the power of infinitely wide deep nets on small-data tasks" (arXiv:1910.01663) uses a
bias-free FC ReLU NTK on raw (standardised) features, computed from ``S = X1 X2^T`` with no
``1/d`` fan-in factor, and a variant in which the first ``fix`` layers are not trained, so their
terms are dropped from the NTK sum. With ``h`` hidden ReLU layers (``h = 0`` is the linear kernel
``X1 X2^T``) and ``0 <= fix <= h``::

    H = 0
    for l in 0 .. h:
        if l >= fix: H += S                       # layer l+1's weights are trained
        if l == h: return H
        S, H = relu_nngp(S), H * relu_dot(S)      # arc-cosine recursions, 1/(2 pi) scale

Equivalently: ``K[h][0] = d * NTK`` and ``K[h][h] = d * NNGP`` of
``serial(*[Dense(w, W_std=1), Relu()] * h, Dense(1, W_std=1))`` (no biases, NTK
parameterization) -- the ``d`` because ``ntkit``'s first Dense divides ``X X^T`` by the fan-in.

``bias=b`` (an extension; ``b = 0`` is the paper's kernel) gives every layer a bias of variance
``b^2`` on this un-normalised scale: ``S <- S + b^2`` at the input and after each ReLU step, so the
kernels equal ``d`` times those of the same network with ``b_std = b / sqrt(d)`` (the bias terms
of frozen layers are dropped with their weights).

The reference code recomputes the recursion once per ``fix``; :func:`iter_ntk_fix` gets every
``(h, fix)`` pair (15 kernels for 5 depths) in ONE pass: the ``S`` recursion does not depend on
``fix``, and each ``H_fix`` is updated with the same elementwise factor. Kernels are yielded one
depth at a time, in the reference code's loop order (``h`` ascending, then ``fix`` ascending), so
memory stays at ``(max_depth + 3)`` matrices of size ``n1 x n2`` whatever the number of kernels.

Internal module (used by :mod:`ntkit.estimators` and ``bench/bench_uci.py``); float64 torch.

Example::

    >>> for h, fix, K in iter_ntk_fix(X, max_depth=5):   # K: (n, n) float64 tensor
    ...     ...
    >>> K = ntk_fix(X, depth=3, fix=1)                     # one kernel
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Tuple, Union, overload

import numpy as np
import torch

from ._typing import Get
from ._validation import as_matrix, check_int, check_positive, parse_get
from . import layers as nl

if TYPE_CHECKING:
    from .layers import Layer

#: keys of a kernel dict: a tuple or list of ``'nngp'``/``'ntk'``, or None (both)
_Keys = Union[Tuple[str, ...], List[str], None]

__all__ = ["ReluNTKFix", "iter_ntk_fix", "ntk_fix", "all_ntk_fix"]


def iter_ntk_fix(x1, x2=None, max_depth: int = 4, copy: bool = True, bias: float = 0.0
                 ) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield ``(h, fix, K)`` for every ``h in 0..max_depth`` and ``fix in 0..h``, in that order.

    ``h`` = number of hidden ReLU layers (the paper's "depth" is ``h + 1`` weight layers), ``K``
    the ``(n1, n2)`` float64 kernel. With ``copy=True`` the yielded tensors are fresh copies (safe
    to keep); ``copy=False`` saves one ``n1 x n2`` copy per kernel but a yielded tensor is only
    valid until the next one is requested (it is updated in place).
    ``max_depth=4`` gives the paper's 15 kernels (depths 1..5). ``bias``: every layer's bias std
    (see the module docstring; 0 = the paper's bias-free kernel).
    """
    max_depth = check_int(max_depth, "max_depth", minimum=0, what="number of hidden ReLU layers")
    b2 = check_positive(bias, "bias", allow_zero=True) ** 2
    a = as_matrix(x1, "x1")
    b = a if x2 is None else as_matrix(x2, "x2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"`x1` and `x2` must have the same number of features, got "
                         f"{a.shape[1]} and {b.shape[1]}")
    S = a @ b.T
    d1 = (a * a).sum(1)
    d2 = d1 if x2 is None else (b * b).sum(1)
    if b2:
        S += b2
        d1 = d1 + b2
        d2 = d1 if x2 is None else d2 + b2
    H: List[torch.Tensor] = []                # H[f] for f = 0..h
    inv2pi = 1.0 / (2.0 * math.pi)
    for h in range(max_depth + 1):
        for f in range(h):
            H[f] += S
        H.append(S)                           # fix = h: only this layer's term (S is not
        for f in range(h + 1):                # modified in place below, only replaced)
            yield h, f, (H[f].clone() if copy else H[f])
        if h == max_depth:
            return
        # in-place arithmetic: 4 temporaries of size n1 x n2 per layer (memory-bound code)
        P = torch.outer(d1, d2).sqrt_().clamp_min_(1e-9)
        Sn = torch.div(S, P).clamp_(-1.0, 1.0)
        if x2 is None:                        # x with itself: exactly 1 (not 1 - ulp, whose
            Sn.diagonal().fill_(1.0)          # arccos would be ~1e-8 instead of 0)
        pm = torch.arccos(Sn).neg_().add_(math.pi)           # pi - theta
        S = torch.mul(Sn, Sn).neg_().add_(1.0).clamp_min_(0.0).sqrt_()   # sin(theta)
        S.addcmul_(Sn, pm).mul_(P).mul_(inv2pi)              # E[relu(u) relu(v)]
        if b2:
            S += b2
        dot = pm.mul_(inv2pi)                                # E[relu'(u) relu'(v)]
        for f in range(h + 1):
            H[f].mul_(dot)
        del Sn, pm, P, dot
        if x2 is None:                        # as the reference: diag of the matrix itself
            d1 = d2 = torch.diagonal(S).clone()
        else:                                 # x with itself has Sn = 1: variance halves
            d1, d2 = d1 * 0.5 + b2, d2 * 0.5 + b2


def all_ntk_fix(x1, x2=None, max_depth: int = 4, bias: float = 0.0) -> dict:
    """``{(h, fix): K}`` for all pairs (holds ``(max_depth+1)(max_depth+2)/2`` matrices)."""
    return {(h, f): K for h, f, K in iter_ntk_fix(x1, x2, max_depth, bias=bias)}


def ntk_fix(x1, x2=None, depth: int = 1, fix: int = 0, bias: float = 0.0) -> torch.Tensor:
    """The single kernel with ``depth`` hidden ReLU layers, first ``fix`` layers frozen.

    ``0 <= fix <= depth``; shapes ``(n1, d)``, ``(n2, d)`` -> ``(n1, n2)`` float64.
    """
    depth = check_int(depth, "depth", minimum=0, what="number of hidden ReLU layers")
    if isinstance(fix, bool) or not isinstance(fix, (int, np.integer)) or not 0 <= fix <= depth:
        raise ValueError(f"`fix` (number of frozen first layers) must be an integer in "
                         f"[0, depth={depth}], got {fix!r}")
    for h, f, K in iter_ntk_fix(x1, x2, depth, copy=False, bias=bias):
        if h == depth and f == fix:
            return K.clone()
    raise AssertionError("unreachable")


class ReluNTKFix:
    """Bias-free FC ReLU NTK of Arora et al. (2020) with the first ``fix`` layers not trained.

    ``depth`` = number of hidden ReLU layers (the paper's depth minus one; ``depth=0`` is the
    linear kernel ``X1 X2^T``), ``0 <= fix <= depth``. Computed from ``S = X1 X2^T`` with no
    ``1/d`` factor, exactly as the paper's code: ``ntk`` drops the terms of the first ``fix``
    weight layers; ``nngp`` is the prior covariance of the readout's input (independent of
    ``fix``). ``bias`` (default 0 = the paper's kernel) adds a bias of std ``bias`` to every
    layer on that scale (``S <- S + bias^2``; see :mod:`ntkit._uci_ntk`). Use it as ``arch=`` of
    the estimators or in :func:`kernel_callable`.

    Example::

        >>> k = ReluNTKFix(depth=2, fix=1).kernel(x1, x2, get="ntk")      # (n1, n2) float64
    """

    def __init__(self, depth: int = 2, fix: int = 0, bias: float = 0.0):
        self.depth = depth
        self.fix = fix
        self.bias = bias

    def _check(self) -> Tuple[int, int]:
        d, f = self.depth, self.fix
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ValueError(f"`depth` must be an integer >= 0 (hidden ReLU layers), got {d!r}")
        if isinstance(f, bool) or not isinstance(f, numbers.Integral) or not 0 <= f <= d:
            raise ValueError(f"`fix` must be an integer in [0, depth={d}], got {f!r}")
        check_positive(self.bias, "bias", allow_zero=True)
        return int(d), int(f)

    @overload
    def kernel(self, x1: Any, x2: Any = ..., *, get: str, **_: Any) -> torch.Tensor: ...

    @overload
    def kernel(self, x1: Any, x2: Any, get: str, **_: Any) -> torch.Tensor: ...

    @overload
    def kernel(self, x1: Any, x2: Any = ..., get: _Keys = ...,
               **_: Any) -> Dict[str, torch.Tensor]: ...

    @overload   # `get` of a type known only as str-or-sequence: either
    def kernel(self, x1: Any, x2: Any = ..., get: Get = ...,
               **_: Any) -> Union[torch.Tensor, Dict[str, torch.Tensor]]: ...

    def kernel(self, x1: Any, x2: Any = None, get: Get = ("nngp", "ntk"),
               **_: Any) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(n1, n2)`` float64 kernel between the rows of ``x1`` and ``x2`` (None: ``x1``):
        a tensor for a string ``get``, else a dict ``{key: tensor}``; other keyword arguments
        (those of ``Layer.kernel``) are accepted and ignored."""
        depth, fix = self._check()
        keys, single = parse_get(get)
        out: Dict[str, torch.Tensor] = {}
        for h, f, K in iter_ntk_fix(x1, x2, max_depth=depth, copy=False,
                                    bias=float(self.bias)):
            if h != depth:
                continue
            if f == fix and "ntk" in keys:
                out["ntk"] = K.clone()
            if f == depth and "nngp" in keys:
                out["nngp"] = K.clone()
        return out[keys[0]] if single else out

    def as_layers(self, d: int, width: int = 512) -> Layer:
        """The ``ntkit.layers`` network whose NTK/NNGP, times ``d`` (the input dimension), is
        this kernel -- for ``fix = 0`` (NTK) and the NNGP; used for random features."""
        depth, fix = self._check()
        b_std = float(self.bias) / math.sqrt(d)
        layers = []
        for _ in range(depth):
            layers += [nl.Dense(width, W_std=1.0, b_std=b_std), nl.Relu()]
        return nl.serial(*layers, nl.Dense(1, W_std=1.0, b_std=b_std))

    def __repr__(self) -> str:
        b = "" if not self.bias else f", bias={self.bias!r}"
        return f"ReluNTKFix(depth={self.depth!r}, fix={self.fix!r}{b})"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other.depth == self.depth
                and other.fix == self.fix and other.bias == self.bias)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.depth, self.fix, self.bias))
