"""Activations with exact NNGP/NTK dual maps, and ``Elementwise`` for any torch function.

For pre-activations ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` an activation ``phi`` maps
``nngp' = E[phi(u) phi(v)]`` and ``ntk' = ntk * E[phi'(u) phi'(v)]``. Conventions (names,
arguments, defaults) follow neural-tangents' stax so numbers compare one to one.

Numerics: every two-point map is written in terms of the correlation ``rho = c / (sqrt(v1)
sqrt(v2))``, clipped into ``[-1, 1]`` (and snapped to +-1 within roundoff, see
:func:`ntkit.layers._ops.correlation`), and of bounded functions of the variances such as
``2 b^2 v / (1 + 2 b^2 v)``: no product ``v1 v2`` is ever formed, so results are right at any
input scale where they are representable (float32 ReLU kernels at input norm 1e10, float64 at
1e150), outputs always satisfy Cauchy-Schwarz, and an example paired with an identical one gets
exactly its diagonal value. Angles use ``atan2(sqrt((1 - rho)(1 + rho)), rho)``, never
``arccos``; on the batch diagonal of a symmetric kernel the exact one-point maps are used (no
cancellation in float32).

Cost per kernel entry: about ten elementwise passes (one ``atan2`` for the arc-cosine family,
one ``exp``/``sqrt`` for the others); ``Elementwise`` costs ``N^2`` evaluations of ``fn`` (and of
``fn'``), ``N`` chosen from the variances for the requested accuracy (see its docstring).
With numba installed, the arc-cosine family (``Relu``, ``LeakyRelu``, ``Abs``, ``ABRelu``),
``Gabor`` and ``ExpNormalized`` (their ``fused_map``) on every layout (FC and images) run as
one fused pass each (polynomial ``atan``/``exp``; :mod:`ntkit.layers._fused`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .._validation import all_finite, check_int, check_positive, check_real
from ..kernel import Kernel
from . import _fused
from ._base import BuildContext, Layer, frozen_layer
from ._masking import unwrap, wrap
from ._numeric import tu as _tu
from ._ops import act_memo_key, apply_elementwise, memo_self, normalized_cross, safe_sqrt
from . import _feature_ops as fo

__all__ = ["Relu", "LeakyRelu", "ABRelu", "Abs", "Erf", "Sigmoid_like", "Gelu", "Sin", "Cos",
           "Gaussian", "Exp", "Rbf", "Sign", "Monomial", "RectifiedMonomial", "Polynomial",
           "Hermite", "Elementwise", "Activation", "Gabor", "ExpNormalized"]

Tensor = torch.Tensor
# (E[phi(u) phi(v)], E[phi'(u) phi'(v)] or None): what `dual`, `cross` and `self_map` return
_Maps = Tuple[Tensor, Optional[Tensor]]
_PI = math.pi


class ActivationModule(nn.Module):
    """Finite-network counterpart of an activation layer."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, x):
        x, m = unwrap(x)
        return wrap(self.fn(x), m)

    def extra_repr(self):
        return self.name


def _check_params(layer, *names):
    """Each named field is a finite real number (strings, booleans, NaN and inf refused) whose
    square is representable in float64 (the dual maps scale with the squares: ``a=1e-200``
    would silently give a zero kernel, ``a=1e200`` an infinite one); then the constants the
    maps multiply by are checked too (:meth:`Activation._check_constants`)."""
    for n in names:
        v = check_real(getattr(layer, n), n)
        sq = v * v
        if v != 0 and not (np.finfo(np.float64).tiny <= sq < np.inf):
            raise ValueError(f"`{n}`={v!r}: its square is not representable in float64 (the "
                             f"kernel scales with it); use |{n}| between 1e-150 and 1e150, "
                             f"or 0")
    layer._check_constants(torch.float64)


class Activation(Layer):
    """Base: subclasses define ``fn`` (finite), ``dual`` and optionally ``self_map``.

    ``dual(rho, v1, v2, need_dot) -> (E[phi(u) phi(v)], E[phi'(u) phi'(v)] or None)`` for
    ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` given the correlation ``rho = c / (sqrt(v1)
    sqrt(v2))`` in ``[-1, 1]`` and the variances (all broadcast against each other; ``v1``,
    ``v2`` are per-example, so functions of them alone are cheap). Write it without forming
    ``v1 * v2`` or ``c^2`` (they over/underflow long before the result does). A subclass may
    define ``cross(c, v1, v2, need_dot)`` instead (the covariance form); then it is called with
    ``c = rho sqrt(v1) sqrt(v2)``.
    """
    fully_connected = True
    samples_features = True
    supports_masking = True

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.ActOp(self, ctx), self.out_shape(in_shape)

    def fn(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        if type(self).cross is Activation.cross:  # pragma: no cover - abstract
            raise NotImplementedError(f"{type(self).__name__} defines neither dual nor cross")
        return self.cross(_scale(rho, v1, v2), v1, v2, need_dot)

    def cross(self, c: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        """The dual maps at covariance ``c`` (clipped to a valid correlation first), variances
        ``v1``, ``v2`` (broadcasting): ``(E[phi(u) phi(v)], E[phi'(u) phi'(v)] or None)``."""
        if type(self).dual is Activation.dual:  # pragma: no cover - abstract
            raise NotImplementedError(f"{type(self).__name__} defines neither dual nor cross")
        return normalized_cross(self.dual, c, v1, v2, need_dot)

    def self_map(self, v: Tensor) -> _Maps:
        """``(E[phi(u)^2], E[phi'(u)^2])`` for ``u ~ N(0, v)``; default: ``cross(v, v, v)``."""
        return self.cross(v, v, v, True)

    def fused_params(self) -> Optional[Tuple[float, float]]:
        """``(f, h)`` when the dual map is ``nngp' = sqrt(v1 v2) (f sqrt(1 - rho^2) +
        (h - f theta) rho)`` (arc-cosine family, one fused pass available), else ``None``."""
        return None

    def fused_map(self) -> Optional[Callable[..., Tuple[Tensor, Optional[Tensor]]]]:
        """The dual map as one fused numba pass, ``pair(c, v1, v2, ntk, need_dot, full,
        self_pairs)`` (see :func:`ntkit.layers._fused.relu`), or ``None`` (torch passes only).
        Default: the arc-cosine kernel of :meth:`fused_params`."""
        fp = self.fused_params()
        if fp is None:
            return None
        f, h = fp

        def pair(c, v1, v2, ntk, need_dot, full, self_pairs=False):
            return _fused.relu(c, v1, v2, f, h, ntk, need_dot, full, self_pairs=self_pairs)
        return pair

    def chain_stage(self, in_shape: Any, dtype: torch.dtype) -> Optional[Tuple[int, Tuple[float, ...]]]:
        fp = self.fused_params()
        if fp is None:
            return None
        self._check_constants(dtype)
        return 1, tuple(fp)

    def chain_self(self, cov: Tensor, k: Kernel) -> Tuple[Tensor, Optional[Tensor]]:
        return memo_self(act_memo_key(self.dual, self.self_map, k, True), cov, self.self_map)

    def constants(self) -> Dict[str, float]:
        """``{name: value}`` of the constants the dual maps multiply by (none by default)."""
        return {}

    def _check_constants(self, dtype: torch.dtype) -> None:
        """Refuse constants that are zero or infinite in ``dtype`` although they are not in
        exact arithmetic (``ABRelu(0, 1e-36)`` in float32 gave an all-zero kernel)."""
        info = torch.finfo(dtype)
        for name, v in self.constants().items():
            if v != 0 and not (info.tiny <= abs(v) <= info.max):
                raise ValueError(
                    f"{self!r}: the dual map's constant {name} = {v:.3g} is not representable "
                    f"in {str(dtype).replace('torch.', '')} (range {info.tiny:.3g} to "
                    f"{info.max:.3g}); compute in float64 or use parameters of moderate size")

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError(f"{type(self).__name__} received several branches; merge them first")
        if k.nngp is not None:
            self._check_constants(k.nngp.dtype)
        return apply_elementwise(k, self.dual, self.self_map, self.fused_map())

    def build(self, in_shape: Any, ctx: BuildContext,
              followed: bool) -> Tuple[nn.Module, Any]:
        return ActivationModule(self.fn, repr(self)), in_shape


_ONE: Dict[Any, Tensor] = {}  # dtype -> one


def _one(dtype) -> Tensor:
    t = _ONE.get(dtype)
    if t is None:
        # a 0-dim CPU tensor: torch treats it as a scalar next to tensors on any device
        t = _ONE.setdefault(dtype, torch.ones((), dtype=dtype, device="cpu"))
    return t


def _scale(t: Tensor, v1: Tensor, v2: Tensor, power: int = 1) -> Tensor:
    """``t * (sqrt(v1) sqrt(v2))^power``, applied one factor at a time: the product ``v1 v2``
    is never formed (it over/underflows where ``t sqrt(v1 v2)`` is representable)."""
    return _scale_(t.clone(), v1, v2, power)


def _scale_(t: Tensor, v1: Tensor, v2: Tensor, power: int = 1) -> Tensor:
    """In place :func:`_scale` (``t`` must already have the broadcast shape)."""
    if power == 0:
        return t
    a, b = v1.sqrt(), v2.sqrt()
    if power != 1:
        a, b = a.pow(power), b.pow(power)
    if tuple(torch.broadcast_shapes(t.shape, a.shape, b.shape)) != tuple(t.shape):
        return (t * a).mul_(b)
    return t.mul_(a).mul_(b)


def _one_minus_sq(rho: Tensor) -> Tensor:
    """``1 - rho^2`` as ``(1 - rho)(1 + rho)`` (exact near +-1), clipped at 0."""
    return (1 - rho).mul_(1 + rho).clamp_min_(0)


def _angle(rho: Tensor):
    """``(sqrt(1 - rho^2), atan2(that, rho))`` for ``rho`` in ``[-1, 1]`` (``1 - rho^2`` as
    ``(1 - rho)(1 + rho)``: exact near +-1)."""
    s = _one_minus_sq(rho).sqrt_()
    return s, torch.atan2(s, rho)


def _one_minus_kappa2(rho: Tensor, t1: Tensor, t2: Tensor, u1: Tensor, u2: Tensor) -> Tensor:
    """``1 - rho^2 t1 t2`` (``t = 1 - u`` in ``[0, 1]``) as ``t1 t2 (1 - rho)(1 + rho) +
    (u1 + t1 u2)``: a sum of non-negative terms, no cancellation (``1 - t1 t2 = u1 + t1 u2``;
    at variances ~1e20 it is ~1e-20, which ``1 - kappa^2`` would round to 0)."""
    return _one_minus_sq(rho).mul_(t1).mul_(t2).add_(torch.addcmul(u1, t1, u2))


@frozen_layer
class ABRelu(Activation):
    """``a * min(x, 0) + b * max(x, 0)``."""
    a: float
    b: float

    def keeps_masked_zeros(self) -> bool:
        # a zero variance gives correlation 0 and an output scaling with sqrt(v1) sqrt(v2)
        return type(self) is ABRelu

    def __post_init__(self):
        _check_params(self, "a", "b")

    def fn(self, x: Tensor) -> Tensor:
        if self.a == 0:       # ReLU: one op forward and one backward (threshold_backward)
            y = torch.relu(x)             # derivative 0 at 0, as torch.relu and jax.nn.relu
            return y if self.b == 1 else self.b * y
        return self.a * torch.clamp(x, max=0) + self.b * torch.clamp(x, min=0)

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        s, theta = _angle(rho)
        f = (self.a - self.b) ** 2 / (2 * _PI)
        h = (self.a ** 2 + self.b ** 2) / 2
        dot = theta.mul_(-f).add_(h)
        nngp = _scale_(s.mul_(f).addcmul_(dot, rho), v1, v2)
        return nngp, (dot if need_dot else None)

    def self_map(self, v: Tensor) -> _Maps:
        h = (self.a ** 2 + self.b ** 2) / 2
        return v * h, torch.full_like(v, h)

    def fused_params(self) -> Tuple[float, float]:
        return (self.a - self.b) ** 2 / (2 * _PI), (self.a ** 2 + self.b ** 2) / 2

    def constants(self) -> Dict[str, float]:
        f, h = self.fused_params()
        return {"(a - b)^2 / (2 pi)": f, "(a^2 + b^2) / 2": h}


def Relu() -> ABRelu:
    """ReLU, ``max(x, 0)``: the arc-cosine kernel of order 1."""
    return ABRelu(0.0, 1.0)


def LeakyRelu(alpha: float) -> ABRelu:
    """Leaky ReLU, ``alpha * min(x, 0) + max(x, 0)`` (``alpha`` a finite real number)."""
    return ABRelu(check_real(alpha, "alpha"), 1.0)


def Abs() -> ABRelu:
    """``|x|``."""
    return ABRelu(-1.0, 1.0)


@frozen_layer
class Erf(Activation):
    """``a * erf(b * x) + c``.

    NNGP ``(2 a^2 / pi) arcsin(rho sqrt(t1 t2)) + c^2`` with ``t = 2 b^2 v / (1 + 2 b^2 v)``,
    evaluated as an ``atan2`` whose cosine ``sqrt(1 - rho^2 t1 t2)`` is a sum of non-negative
    terms (no cancellation, no overflow at any variance).
    """
    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def __post_init__(self):
        _check_params(self, "a", "b", "c")

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.erf(self.b * x) + self.c

    def constants(self) -> Dict[str, float]:
        return {"2 a^2 / pi": 2 * self.a ** 2 / _PI, "2 b^2": 2 * self.b ** 2, "c^2": self.c ** 2,
                "8 a^2 b^2 / pi": 8 * self.a ** 2 * self.b ** 2 / _PI}

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        B = 2 * self.b ** 2
        t1, u1 = _tu(v1 * B)
        t2, u2 = _tu(v2 * B)
        # w = 0 only at infinite variances (u1 = u2 = 0), where the dot's numerator is 0 too
        w = _one_minus_kappa2(rho, t1, t2, u1, u2).clamp_min_(torch.finfo(rho.dtype).tiny)
        w = w.sqrt_()
        kappa = (rho * t1.sqrt()).mul_(t2.sqrt())
        nngp = torch.atan2(kappa, w).mul_(self.a ** 2 * 2 / _PI)
        if self.c:
            nngp.add_(self.c ** 2)
        dot = None
        if need_dot:
            dot = torch.div(u1.sqrt() * (self.a ** 2 * B * 2 / _PI), w).mul_(u2.sqrt())
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        B = 2 * self.b ** 2
        t, u = _tu(v * B)
        nngp = torch.atan2(t, (u * (1 + t)).sqrt()) * (self.a ** 2 * 2 / _PI) + self.c ** 2
        dot = (u / (1 + t)).sqrt() * (self.a ** 2 * B * 2 / _PI)
        return nngp, dot


def Sigmoid_like() -> Erf:
    """``0.5 * erf(x / 2.4020563531719796) + 0.5``, a sigmoid look-alike with a closed form."""
    return Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)


@frozen_layer
class Gelu(Activation):
    """``x * Phi(x)`` (exact kernel; ``approximate=True`` uses the tanh form in the finite net).

    Written with ``t = v / (1 + v)``, ``u = 1 / (1 + v)`` and the correlation, like ``Erf``."""
    approximate: bool = False

    def __post_init__(self):
        if not isinstance(self.approximate, (bool, np.bool_)):
            raise TypeError(f"`approximate` must be True or False, got {self.approximate!r}")

    def fn(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x, approximate="tanh" if self.approximate else "none")

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        t1, u1 = _tu(v1)
        t2, u2 = _tu(v2)
        w2 = _one_minus_kappa2(rho, t1, t2, u1, u2).clamp_min_(torch.finfo(rho.dtype).tiny)
        w = w2.sqrt()
        kappa = (rho * t1.sqrt()).mul_(t2.sqrt())
        d = (w / u1.sqrt()).div_(u2.sqrt())  # sqrt((1 + v1)(1 + v2)) w
        ang = torch.atan2(kappa, w)
        c = _scale(rho, v1, v2)
        nngp = ((kappa * kappa) / d + (t1 * t2) * d + c * ang) / (2 * _PI) + 0.25 * c
        dot = None
        if need_dot:
            first = ((u1 * u2) / w2 + u1 + u2) * (kappa / w) / (2 * _PI)
            dot = first + 0.25 + ang / (2 * _PI)
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        return self.dual(torch.ones_like(v), v, v, True)


def _exponents(rho, v1, v2):
    """``(v1 + v2 - 2c, v1 + v2 + 2c)`` as ``(sqrt(v1) - sqrt(v2))^2 + 2 sqrt(v1) sqrt(v2)
    (1 -+ rho)``: non-negative, without cancellation near rho = +-1, no product ``v1 v2``."""
    d = (v1.sqrt() - v2.sqrt()).square()
    return _scale_(1 - rho, v1, v2).mul_(2).add_(d), _scale_(1 + rho, v1, v2).mul_(2).add_(d)


@frozen_layer
class Sin(Activation):
    """``a * sin(b * x + c)``."""
    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def __post_init__(self):
        _check_params(self, "a", "b", "c")

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.sin(self.b * x + self.c)

    def constants(self) -> Dict[str, float]:
        return {"a^2 / 2": self.a ** 2 / 2, "b^2": self.b ** 2,
                "a^2 b^2 / 2": self.a ** 2 * self.b ** 2 / 2}

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        b2 = self.b ** 2
        dm, dp = _exponents(rho, v1, v2)
        s1 = torch.exp(dm * (-0.5 * b2))
        s2 = torch.exp(dp * (-0.5 * b2)) * math.cos(2 * self.c)
        h = self.a ** 2 / 2
        nngp = (s1 - s2) * h
        dot = (s1 + s2) * (h * b2) if need_dot else None
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        h, b2 = self.a ** 2 / 2, self.b ** 2
        e = torch.exp(-2 * b2 * v) * math.cos(2 * self.c)
        return h * (1 - e), h * b2 * (1 + e)


def Cos(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Sin:
    """``a * cos(b * x + c)``."""
    return Sin(a=a, b=b, c=check_real(c, "c") + _PI / 2)


@frozen_layer
class Rbf(Activation):
    """``sqrt(2) sin(sqrt(2 gamma) x + pi/4)``: NNGP ``exp(-gamma (v1 + v2 - 2c))``."""
    gamma: float = 1.0

    def __post_init__(self):
        check_positive(self.gamma, "gamma")
        self._check_constants(torch.float64)

    def constants(self) -> Dict[str, float]:
        return {"gamma": self.gamma, "2 gamma": 2 * self.gamma}

    def fn(self, x: Tensor) -> Tensor:
        return math.sqrt(2) * torch.sin(math.sqrt(2 * self.gamma) * x + _PI / 4)

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        d = (v1.sqrt() - v2.sqrt()).square()
        nngp = _scale_(1 - rho, v1, v2).mul_(2).add_(d).mul_(-self.gamma).exp_()
        return nngp, (nngp * (2 * self.gamma) if need_dot else None)

    def self_map(self, v: Tensor) -> _Maps:
        return torch.ones_like(v), torch.full_like(v, 2 * self.gamma)


@frozen_layer
class Gabor(Activation):
    """``exp(-x^2) sin(x)`` (neural-tangents' ``Gabor()``), exact dual maps.

    For ``(u, w) ~ N(0, S)``: ``E[exp(-u^2 - w^2) cos(u -+ w)] = det(I + 2S)^(-1/2)
    exp(-t' S (I + 2S)^-1 t / 2)``, so ``nngp' = exp(-E) sinh(B) / sqrt(D)`` with
    ``D = det(I + 2S) = (1 + 2 v1)(1 + 2 v2) w^2``, ``w^2 = 1 - rho^2 t1 t2``,
    ``t = 2v / (1 + 2v)``, ``u = 1 - t``, ``E = ((t1 u2 + t2 u1) / 4 + t1 t2 (1 - rho^2) / 2)
    / w^2``, ``B = rho sqrt(t1 t2 u1 u2) / (2 w^2)`` (NT's formula, rewritten in bounded
    quantities: no product of variances, ``w^2`` a sum of non-negative terms); the NTK term is
    its derivative in the covariance (Price's theorem), also closed form.
    """

    def fn(self, x: Tensor) -> Tensor:
        return torch.exp(-x * x) * torch.sin(x)

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        t1, u1 = _tu(v1 * 2)
        t2, u2 = _tu(v2 * 2)
        w2 = _one_minus_kappa2(rho, t1, t2, u1, u2).clamp_min_(torch.finfo(rho.dtype).tiny)
        tt = t1 * t2
        cross_u = t1 * u2 + t2 * u1
        e = torch.exp(-(cross_u * 0.25 + tt * _one_minus_sq(rho) * 0.5) / w2)
        r = (u1 / w2).mul_(u2)              # det(I + 2S)^-1, bounded; never u1 u2 alone
        b = rho * tt.sqrt() * u1.sqrt() * u2.sqrt() / (2 * w2)
        sh = torch.sinh(b)
        nngp = r.sqrt().mul_(e).mul_(sh)
        dot = None
        if need_dot:
            cosh_part = r * r.sqrt() * (1 + 2 * rho * rho * tt / w2) * torch.cosh(b)
            sinh_part = r * 2 * rho * tt.sqrt() * (1 + (u1 * u2 + cross_u * 0.5) / w2) * sh \
                / w2.sqrt()
            dot = (cosh_part + sinh_part) * e
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        return self.dual(torch.ones_like(v), v, v, True)

    def fused_map(self) -> Callable[..., Tuple[Tensor, Optional[Tensor]]]:
        # one pass per kernel entry (same arithmetic) instead of ~40 elementwise torch passes
        return _fused.gabor

    def chain_stage(self, in_shape: Any, dtype: torch.dtype) -> Optional[Tuple[int, Tuple[float, ...]]]:
        return 3, ()


@frozen_layer
class ExpNormalized(Activation):
    """neural-tangents' ``ExpNormalized(gamma=1, shift=-1, do_clip=False)``, the "Gaussian
    normalized kernel" (Shankar et al. 2020, arXiv:2003.02237):
    ``nngp' = sqrt(v1 v2) exp(gamma (rho + shift))``, ``ntk' = gamma exp(gamma (rho + shift))
    ntk``, ``v' = v exp(gamma (1 + shift))``, with ``rho`` the pre-activation correlation.

    ``do_clip`` is accepted for NT compatibility: ntkit always clips ``rho`` into ``[-1, 1]``
    (it differs from the unclipped value by roundoff only). ``gamma >= 0``.

    Finite network (NT has none): ``y = s a sqrt(2) sin(sqrt(gamma) x / s + pi / 4)`` with
    ``s`` the root mean square of the pre-activations over the channel axis (per example and
    pixel) and ``a^2 = exp(gamma (1 + shift))``: at infinite width ``s = sqrt(v)`` and
    ``E[y y'] = sqrt(v1 v2) a^2 exp(gamma (rho - 1))`` (the ``Rbf`` identity at unit variance);
    the normalizer's own gradient vanishes in the limit, as for ``LayerNorm``. ``fn`` (used by
    the random-feature path) detaches the normalizer, so its derivative is the elementwise one.

    Example: ``serial(Dense(512), ExpNormalized(gamma=2), Dense(1))``.
    """
    gamma: float = 1.0
    shift: float = -1.0
    do_clip: bool = False

    def __post_init__(self):
        g = check_real(self.gamma, "gamma")
        if g < 0:
            raise ValueError(f"ExpNormalized: `gamma` must be >= 0 (exp(gamma rho) with gamma < "
                             f"0 is not a covariance), got {self.gamma!r}")
        check_real(self.shift, "shift")
        if not isinstance(self.do_clip, (bool, np.bool_)):
            raise TypeError(f"ExpNormalized: `do_clip` must be True or False, got "
                            f"{self.do_clip!r}")
        self._check_constants(torch.float64)

    def constants(self) -> Dict[str, float]:
        with np.errstate(over="ignore"):
            a2 = float(np.exp(self.gamma * (1 + self.shift)))
        return {"exp(gamma (1 + shift))": a2, "gamma exp(gamma (1 + shift))": self.gamma * a2}

    def _apply(self, x, detach):
        s = x.pow(2).mean(1, keepdim=True).sqrt() if x.ndim > 1 else x.abs()
        if detach:
            s = s.detach()
        a = math.sqrt(2.0 * math.exp(self.gamma * (1 + self.shift)))
        safe = torch.where(s > 0, s, torch.ones_like(s))
        y = torch.sin(x / safe * math.sqrt(self.gamma) + _PI / 4) * a * s
        return torch.where(s > 0, y, torch.zeros_like(y))

    def fn(self, x: Tensor) -> Tensor:
        return self._apply(x, True)

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        e = torch.exp((rho + self.shift) * self.gamma)
        nngp = _scale(e, v1, v2)
        return nngp, (e * self.gamma if need_dot else None)

    def self_map(self, v: Tensor) -> _Maps:
        a2 = math.exp(self.gamma * (1 + self.shift))
        return v * a2, torch.full_like(v, self.gamma * a2)

    def fused_map(self) -> Callable[..., Tuple[Tensor, Optional[Tensor]]]:
        return functools.partial(_fused.exp_normalized, gamma=self.gamma, shift=self.shift)

    def chain_stage(self, in_shape: Any, dtype: torch.dtype) -> Optional[Tuple[int, Tuple[float, ...]]]:
        self._check_constants(dtype)
        return 2, (float(self.shift), float(self.gamma))

    def build(self, in_shape: Any, ctx: BuildContext,
              followed: bool) -> Tuple[nn.Module, Any]:
        return ActivationModule(lambda x: self._apply(x, False), repr(self)), in_shape


@frozen_layer
class Exp(Activation):
    """``a * exp(b * x)``."""
    a: float = 1.0
    b: float = 1.0

    def __post_init__(self):
        _check_params(self, "a", "b")

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x)

    def constants(self) -> Dict[str, float]:
        return {"a^2": self.a ** 2, "b^2": self.b ** 2, "a^2 b^2": self.a ** 2 * self.b ** 2}

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        b2 = self.b ** 2
        e = torch.exp(_scale(rho, v1, v2).add_(v1 * 0.5 + v2 * 0.5).mul_(b2))
        nngp = e * self.a ** 2
        return nngp, (e * (self.a ** 2 * b2) if need_dot else None)


@frozen_layer
class Gaussian(Activation):
    """``a * exp(b * x^2)`` (``b < 0`` for a bump; ``b > 0`` needs pre-activation variances
    ``v < 1 / (4 b)``, else ``E[phi(u)^2]`` is infinite and the kernel raises)."""
    a: float = 1.0
    b: float = -1.0

    def __post_init__(self):
        _check_params(self, "a", "b")

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x * x)

    def constants(self) -> Dict[str, float]:
        return {"a^2": self.a ** 2, "2 b": 2 * self.b, "4 a^2 b^2": 4 * self.a ** 2 * self.b ** 2}

    def _check(self, v):
        if self.b > 0 and bool((v * (4 * self.b) >= 1).any()):
            raise ValueError(f"Gaussian(b={self.b}): E[exp(2 b u^2)] is infinite for "
                             f"pre-activation variances >= 1/(4b) = {1 / (4 * self.b):.3g} (got "
                             f"up to {float(v.max()):.3g}); use b < 0 or smaller W_std/b_std")

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        x = -2 * self.b
        t1, u1 = _tu(v1 * x)
        t2, u2 = _tu(v2 * x)
        w = _one_minus_kappa2(rho, t1, t2, u1, u2).clamp_min_(0).sqrt_()
        su1, su2 = u1.sqrt(), u2.sqrt()  # su1 su2 = 1 / sqrt((1 - 2 b v1)(1 - 2 b v2))
        nngp = torch.div(su1 * self.a ** 2, w).mul_(su2)
        dot = None
        if need_dot:
            # c su1^3 su2^3 / w^3 with c = rho sqrt(v1) sqrt(v2), one factor at a time
            dot = _scale(rho, v1, v2).mul_(su1.pow(3) * (4 * self.b ** 2 * self.a ** 2))
            dot.mul_(su2.pow(3)).div_(w.pow(3))
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        self._check(v)
        return self.cross(v, v, v, True)


@frozen_layer
class Sign(Activation):
    """``sign(x)``: NNGP ``(2/pi) arcsin(rho)``; its NTK term is zero (derivative 0 a.e.),
    as in neural-tangents."""

    def fn(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        _, theta = _angle(rho)
        nngp = theta.mul_(-2 / _PI).add_(1.0)
        return nngp, (torch.zeros_like(nngp) if need_dot else None)

    def self_map(self, v: Tensor) -> _Maps:
        return (v > 0).to(v.dtype), torch.zeros_like(v)


def _double_factorial(n: int) -> int:
    return 1 if n <= 0 else n * _double_factorial(n - 2)


def _monomial_moment(d: int, rho: Tensor) -> Tensor:
    """``E[u^d v^d] / gm^d = sum_m C_m rho^(d-2m)`` (Hermite expansion of ``x^d``)."""
    out = torch.zeros_like(rho)
    for m in range(d // 2 + 1):
        coef = (math.factorial(d) / (math.factorial(m) * math.factorial(d - 2 * m) * 2 ** m)) ** 2
        coef *= math.factorial(d - 2 * m)
        out = out + coef * rho.pow(d - 2 * m)
    return out


@frozen_layer
class Monomial(Activation):
    """``x^degree``."""
    degree: int

    def __post_init__(self):
        check_int(self.degree, "degree", minimum=0)

    def fn(self, x: Tensor) -> Tensor:
        return x.pow(self.degree)

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        d = self.degree
        nngp = _scale_(_monomial_moment(d, rho), v1, v2, d)
        dot = None
        if need_dot:
            dot = _scale_(d * d * _monomial_moment(d - 1, rho), v1, v2, d - 1) if d > 0 else \
                torch.zeros_like(nngp)
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        d = self.degree
        nngp = _double_factorial(2 * d - 1) * v.pow(d)
        dot = d * d * _double_factorial(2 * d - 3) * v.pow(d - 1) if d > 0 else torch.zeros_like(v)
        return nngp, dot


def _arccos_j(n: int, s: Tensor, cth: Tensor, theta: Tensor) -> Tensor:
    """Cho & Saul's ``J_n(theta)``: ``J_0 = pi - theta``, ``J_1 = sin + (pi - theta) cos``,
    ``J_n = (2n - 1) cos J_{n-1} + (n - 1)^2 sin^2 J_{n-2}``."""
    j0 = _PI - theta
    if n == 0:
        return j0
    j1 = s + j0 * cth
    for m in range(2, n + 1):
        j0, j1 = j1, (2 * m - 1) * cth * j1 + (m - 1) ** 2 * s * s * j0
    return j1


@frozen_layer
class RectifiedMonomial(Activation):
    """``(x >= 0) * x^degree``: the arc-cosine kernel of order ``degree``."""
    degree: int

    def __post_init__(self):
        check_int(self.degree, "degree", minimum=0)

    def fn(self, x: Tensor) -> Tensor:
        return (x >= 0).to(x.dtype) * x.pow(self.degree)

    def _e(self, n, rho, v1, v2):
        s, theta = _angle(rho)
        return _scale_(_arccos_j(n, s, rho, theta) / (2 * _PI), v1, v2, n)

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        d = self.degree
        nngp = self._e(d, rho, v1, v2)
        dot = None
        if need_dot:
            dot = d * d * self._e(d - 1, rho, v1, v2) if d > 0 else torch.zeros_like(nngp)
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        d = self.degree
        nngp = _double_factorial(2 * d - 1) * v.pow(d) / 2
        dot = d * d * _double_factorial(2 * d - 3) * v.pow(d - 1) / 2 if d > 0 else \
            torch.zeros_like(v)
        return nngp, dot


# ---------------------------------------------------------------------------------------------
# Any elementwise function, by 2-D quadrature with automatic accuracy control

_Q_NMAX = 401          # most trapezoid nodes per axis (cost N^2 evaluations per kernel entry)
_Q_SCAN_STEP = 0.125   # grid of the tail scan that fixes the integration range
_Q_SCAN_MAX = 38.0     # |z| beyond which the Gaussian density underflows in float64
_Q_CHUNK = 1 << 21     # elements of one (entries, N, N) evaluation block
_SQRT_2PI = math.sqrt(2 * _PI)


def _autograd_derivative(fn):
    def df(x):
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            y = fn(xx)
            (g,) = torch.autograd.grad(y.sum(), xx, allow_unused=True)
        return torch.zeros_like(x) if g is None else g.detach()
    return df


def _gauss_density(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / _SQRT_2PI


def _trap_nodes(h: float, L: float, dtype, offset: float = 0.0, device=None):
    """Nodes ``(k + offset) h`` with ``|z| <= L`` and trapezoid weights ``h phi(z)`` (the
    integrand is negligible at the ends, so end corrections do not matter); built on the host
    in float64, returned on ``device`` (the kernel's tensors' device)."""
    k = int(L / h) + 1
    z = (torch.arange(-k, k + 1, dtype=torch.float64, device="cpu") + offset) * h
    z = z[z.abs() <= L]
    return (z.to(dtype=dtype, device=device),
            (h * _gauss_density(z)).to(dtype=dtype, device=device))


def _trap_plan(g, s: float, tol: float, what: str):
    """``(h, L, err)``: step and half-width of a trapezoid rule in the standard-normal variable
    ``z`` for ``E[g(s z) ...]`` whose estimated error, normalized by ``E[g(s z)^2]``, is at most
    ``tol`` (``err``: the estimate at the chosen step; above ``tol`` only when the node cap
    :data:`_Q_NMAX` is reached).

    Why the trapezoid rule: for an integrand analytic in a strip ``|Im z| < d`` and decaying like
    a Gaussian it converges like ``exp(-2 pi d / h)`` (Poisson summation), geometrically in the
    node count, while Gauss-Hermite converges only like ``exp(-c d sqrt(n))``: ``tanh(s z)`` has
    poles at ``|Im z| = pi / (2 s)``, so at variance 10 Gauss-Hermite at 256 nodes was still
    off by 1e-5.

    Range: the smallest ``L`` (scan step 1/8) beyond which the tails of ``g(s z)^2 phi(z)``,
    ``|g(s z)| phi(z)`` and ``phi(z)`` are below ``tol / 100`` of ``E[g^2]``, ``sqrt(E[g^2])``
    and 1 (``L ~ 7.1`` for ``tol = 1e-10`` and bounded ``g``). Step: the largest ``h`` of a
    ``2^(-1/4)`` ladder from 1 down at which the trapezoid sums of ``E[g(s z)^2]`` and
    ``E[g(s z)]`` on grids shifted by ``0.13 h``, ``0.41 h``, ``0.77 h`` (so odd integrands do
    not cancel, and the sawtooth error of a jump shows) agree with those at ``h / 2`` to
    ``tol / 4``, at this step and the next finer one (two passes: no chance agreement).
    ``E[g^2]`` along one axis has the worst-case singularity distance of the 2-D integrand
    ``g(s1 z1) g(s2 (rho z1 + r z2))`` (``s1, s2 <= s``), so the 1-D check sets the 2-D step.
    """
    f64 = torch.float64
    with torch.no_grad():
        zs = torch.arange(-_Q_SCAN_MAX, _Q_SCAN_MAX + _Q_SCAN_STEP / 2, _Q_SCAN_STEP, dtype=f64,
                          device="cpu")      # the plan is host work, once per variance bucket
        gz = g(s * zs).to(f64)
        a = gz * gz * _gauss_density(zs)
        if not all_finite(a):
            bad = float(zs[~torch.isfinite(a)].abs().min()) * s
            raise ValueError(f"Elementwise: {what}(x)^2 times the Gaussian density is not finite "
                             f"at |x| = {bad:.3g} (pre-activation variance {s * s:.3g}): the "
                             f"expectation does not exist in float64; use a function that grows "
                             f"more slowly or smaller variances")
        total = float(a.sum()) * _Q_SCAN_STEP
        if total == 0.0:                  # g vanishes (e.g. the derivative of a constant)
            return 1.0, 1.0, 0.0
        # tails beyond |z| > z_j = j * step (both sides) of g^2 phi, |g| phi and phi: each
        # bounds a part of the 2-D truncation error (at rho = +-1 the inner variable sees only
        # the Gaussian weight, at rho = 0 the product of two |g| phi tails)
        half = a.numel() // 2
        dens = _gauss_density(zs)

        def outside(t):
            right = torch.flip(torch.cumsum(torch.flip(t[half + 1:], [0]), 0), [0])
            return (right + torch.flip(torch.cumsum(t[:half], 0), [0])) * _Q_SCAN_STEP

        thr = tol * 1e-2
        ok = ((outside(a) <= thr * total) & (outside(gz.abs() * dens) <= thr * math.sqrt(total))
              & (outside(dens) <= thr)).nonzero()
        L = float(zs[half + int(ok[0])]) if ok.numel() else _Q_SCAN_MAX

        def sums(h, off):
            z, w = _trap_nodes(h, L, f64, off)
            y = g(s * z).to(f64)
            return float((y * y * w).sum()), float((y * w).sum())

        def err(h):
            b2, b1 = sums(h / 2, 1 / 3)
            e = 0.0
            for off in (0.13, 0.41, 0.77):   # several shifts: the sawtooth of a jump is seen
                a2, a1 = sums(h, off)
                e = max(e, abs(a2 - b2) / total, abs(a1 - b1) / math.sqrt(total))
            return e

        h_min = 2 * L / (_Q_NMAX - 1)
        h, prev = min(1.0, L / 3), None
        while h >= h_min:
            e = err(h)
            if e <= tol / 4:
                if prev is not None:
                    return prev[0], L, max(prev[1], e)
                prev = (h, e)
            else:
                prev = None
            h *= 2 ** -0.25
        if prev is not None:
            return prev[0], L, prev[1]
        return h_min, L, err(h_min)


def _var_bucket(v: Tensor) -> Tensor:
    """Half-octave bucket ``ceil(2 log2 v)`` of a variance (``v`` clamped to ``[2^-100,
    2^100]``); a bucket's plan is made at its top variance ``2^(b/2) >= v``."""
    return torch.ceil(2 * torch.log2(v.double().clamp(2.0 ** -100, 2.0 ** 100))).long()


@frozen_layer
class Elementwise(Activation):
    """Any elementwise torch function; its dual maps by 2-D quadrature to a stated accuracy.

    ``E[f(u) g(v)]`` (``g = f`` for the NNGP, ``f'`` for the NTK term) is written in standard
    normal variables, ``u = sqrt(v1) z1``, ``v = sqrt(v2) (rho z1 + sqrt(1 - rho^2) z2)``, and
    summed on a product trapezoid grid ``z = k h``, ``|z| <= L`` (weights ``h phi(z)``). For an
    integrand analytic in a strip around the real axis this converges geometrically in the
    number of nodes (much faster than Gauss-Hermite, whose error for ``tanh`` at variance 10
    was still 1e-5 at 256 nodes). ``df`` defaults to autograd of ``fn``.

    Accuracy control (``rtol``, default ``1e-10``): kernel entries are grouped by the larger of
    their two variances (half-octave buckets); for each bucket and each of ``f``, ``f'`` the
    step ``h`` and range ``L`` are chosen once (then cached on the layer) by a 1-D convergence
    check at the bucket's top variance (see :func:`_trap_plan`), so an entry's value depends
    only on its own ``(rho, v1, v2)``, not on the rest of the call. The target is a
    *normalized* error: ``|error of E[f(u) f(v)]| <= rtol * sqrt(E[f(u)^2] E[f(v)^2])`` (the
    Cauchy-Schwarz scale, i.e. relative to the diagonal; a plain relative error is unbounded
    where the expectation crosses zero), the same for the NTK term with ``f'``. Measured
    (float64, ``rtol=1e-10``; tests/layers/test_quadrature.py): ``erf``, steep ``erf``,
    ``sin``, GELU against the closed-form layers, ``tanh``, sigmoid, softplus against nested
    adaptive ``scipy`` quadrature, at variances 0.01 to 30 (also unequal) and correlations in
    ``[-1, 1]`` including exactly +-1: all within 2e-11 (NNGP and NTK term).

    Limits: (1) the guarantee is an *estimate*: the step is certified on the 1-D integrals
    ``E[g(s z)^2]``, ``E[g(s z)]``, which carry the 2-D integrand's singularities, not proven;
    (2) a kink or jump in ``f`` or ``f'`` (ELU, hardtanh, ReLU-like) converges only
    algebraically, and a steep function at a large variance (``tanh`` beyond variance ~100)
    needs more than the cap of 401 nodes per axis: then the cap is used and one
    ``RuntimeWarning`` per layer states the estimated accuracy reached (ELU ~1e-7 NNGP / 1e-4
    NTK, hardtanh ~1e-4 / 1e-2 at variance 2; measured errors below those; the old
    ``deg=96`` rule was 10x-100x worse there, silently): use the closed-form layers (``Relu``,
    ``Erf``, ``Gelu``, ...) or ``nngp_fn=``; (3) float32 inputs are computed to ``max(rtol,
    100 eps)``. Cost per kernel entry: ``N^2`` evaluations of ``f`` (with autograd ``f'`` from
    the same pass), ``N = 2 L / h + 1`` on the finer of the two grids: for ``tanh`` at
    ``rtol=1e-10``, N = 67 up to variance 1.4, 115 up to 4, 191 up to 11, 323 up to 32
    (``rtol=1e-6``: 39, 65, 109, 185); the old fixed ``deg=96`` rule cost 2 x 96^2 at every
    variance, so moderate variances got faster (a 500 x 500 FC ``tanh`` kernel at variance 1:
    ~8x) and large ones slower but right.

    ``deg=`` (an int, 2..256) overrides the automatic choice with the previous fixed
    ``deg x deg`` Gauss-Hermite product rule (no accuracy control; ``rtol`` is then ignored).

    Closed form instead of quadrature (neural-tangents' ``Elementwise(fn, nngp_fn,
    d_nngp_fn)``): ``nngp_fn(c, v1, v2) -> E[fn(u) fn(w)]`` for ``(u, w) ~ N(0, [[v1, c],
    [c, v2]])``, elementwise in torch tensors (broadcasting). The NTK term
    ``E[fn'(u) fn'(w)] = d nngp_fn / dc`` (Price's theorem) is ``d_nngp_fn(c, v1, v2)`` if given,
    else autograd of ``nngp_fn`` w.r.t. ``c``. ``fn`` still defines the finite network. The
    numbers are only as right as ``nngp_fn``: it is called once at construction on a small
    probe (a wrong signature fails there), not checked against ``fn``.

    Example: ``serial(Dense(512), Elementwise(torch.tanh), Dense(1))``, to 1e-6 (cheaper)
    ``Elementwise(torch.tanh, rtol=1e-6)``, or with a closed form::

        erf_nngp = lambda c, v1, v2: (2 / math.pi) * torch.asin(
            2 * c / torch.sqrt((1 + 2 * v1) * (1 + 2 * v2)))
        serial(Dense(512), Elementwise(torch.erf, erf_nngp), Dense(1))
    """
    fn_: Callable = None  # type: ignore[assignment]  # None: __post_init__ raises TypeError
    nngp_fn: Optional[Callable] = None
    d_nngp_fn: Optional[Callable] = None
    df: Optional[Callable] = None
    deg: Optional[int] = None
    rtol: float = 1e-10
    if TYPE_CHECKING:  # set in __post_init__; declared for type checkers only (at run time
        # they are plain instance attributes, not dataclass fields)
        _plans: Dict[Tuple[int, int, float], Any] = dataclasses.field(init=False)
        _warned: List[bool] = dataclasses.field(init=False)

    def __post_init__(self):
        if not callable(self.fn_):
            raise TypeError(f"Elementwise needs a callable torch function, got {self.fn_!r}")
        if self.deg is not None:
            check_int(self.deg, "deg", minimum=2)
            if self.deg > 256:
                raise ValueError(f"`deg` must be <= 256 (Gauss-Hermite weights underflow "
                                 f"beyond), got {self.deg}; or leave it None for automatic "
                                 f"accuracy control (`rtol`)")
        r = check_real(self.rtol, "rtol")
        if not 1e-14 <= r <= 0.1:
            raise ValueError(f"Elementwise: `rtol` must be between 1e-14 (float64 roundoff) and "
                             f"0.1, got {self.rtol!r}")
        if self.d_nngp_fn is not None and self.nngp_fn is None:
            raise ValueError("Elementwise: `d_nngp_fn` given without `nngp_fn`; pass both (or "
                             "neither, for quadrature)")
        for name in ("nngp_fn", "d_nngp_fn"):
            if getattr(self, name) is not None:
                self._probe(name)
        object.__setattr__(self, "_plans", {})     # (bucket, which, tol) -> (h, L, err)
        object.__setattr__(self, "_warned", [False])

    def _probe(self, name):
        f = getattr(self, name)
        if not callable(f):
            raise TypeError(f"Elementwise: `{name}` must be a callable (c, v1, v2) -> tensor, "
                            f"got {f!r}")
        t = lambda *v: torch.tensor(v, dtype=torch.float64, device="cpu")  # noqa: E731
        c, v1, v2 = t(0.3, -0.2), t(1.0, 0.5), t(0.5, 2.0)
        try:
            out = f(c, v1, v2)
        except Exception as e:
            raise TypeError(f"Elementwise: `{name}` must accept torch tensors (c, v1, v2) "
                            f"(covariance, variance of u, variance of w) and return "
                            f"E[...] elementwise; calling it on a probe failed: {e!r}. (A "
                            f"derivative of fn goes in `df=`, by keyword.)") from e
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2,):
            raise TypeError(f"Elementwise: `{name}(c, v1, v2)` must return a tensor of the "
                            f"broadcast shape of its inputs (elementwise), got {out!r} for "
                            f"inputs of shape (2,)")

    def __repr__(self):
        name = getattr(self.fn_, "__name__", type(self.fn_).__name__)
        if self.nngp_fn is not None:
            nf = getattr(self.nngp_fn, "__name__", type(self.nngp_fn).__name__)
            return f"Elementwise({name}, nngp_fn={nf})"
        if self.deg is not None:
            return f"Elementwise({name}, deg={self.deg})"
        return f"Elementwise({name}, rtol={self.rtol:g})"

    def fn(self, x: Tensor) -> Tensor:
        return self.fn_(x)

    def _funcs(self, need_dot):
        df = self.df or _autograd_derivative(self.fn_)
        return [self.fn_, df] if need_dot else [self.fn_]

    # -- automatic: trapezoid rule in standard-normal variables ------------------------------
    def _tol(self, dtype) -> float:
        return max(float(self.rtol), 100 * torch.finfo(dtype).eps)

    def _plan(self, which: int, g, bucket: int, tol: float):
        key = (bucket, which, tol)
        plan = self._plans.get(key)
        if plan is None:
            name = getattr(self.fn_, "__name__", "fn") + ("'" if which else "")
            plan = _trap_plan(g, 2.0 ** (bucket / 4), tol, name)  # s = sqrt(2^(b/2))
            self._plans[key] = plan
        return plan

    def _warn_unreached(self, reached, tol: float):
        """One ``RuntimeWarning`` per layer if a rule at the node cap missed ``tol``
        (``reached``: ``{(term, variance): estimated error}``)."""
        bad = {k: e for k, e in reached.items() if e > tol}
        if not bad or self._warned[0]:
            return
        self._warned[0] = True
        worst: Dict[Any, Tuple[float, float]] = {}
        for (term, var), e in bad.items():
            if e > worst.get(term, (0.0, 0.0))[0]:
                worst[term] = (e, var)
        what = ", ".join(f"{t} ~{e:.0e} (variance {v:.3g})" for t, (e, v) in worst.items())
        warnings.warn(
            f"{self!r}: the quadrature cannot reach rtol={tol:g} with the cap of {_Q_NMAX} "
            f"nodes per axis; estimated normalized error {what} (a rough estimate). fn (or its "
            f"derivative) has a kink or jump, which converges only algebraically, or is too "
            f"steep at this variance. For exact numbers use a closed-form layer (Relu, Erf, "
            f"Gelu, ...) or nngp_fn=.",
            RuntimeWarning, stacklevel=5)

    def _value_and_grad(self, x: Tensor):
        """``(fn(x), fn'(x))`` from one autograd pass."""
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            y = self.fn_(xx)
            (g,) = torch.autograd.grad(y.sum(), xx, allow_unused=True)
        return y.detach(), (torch.zeros_like(x) if g is None else g)

    def _by_bucket(self, vmax: Tensor, compute):
        """Run ``compute(idx, bucket)`` on each group of flat entries sharing the half-octave
        bucket of ``vmax`` (``idx`` ``None`` when all do); entries with a non-finite variance
        stay NaN."""
        b = _var_bucket(vmax)
        finite = torch.isfinite(vmax)
        ub = torch.unique(b[finite]).tolist()
        if len(ub) == 1 and bool(finite.all()):
            compute(None, int(ub[0]))
            return
        for bk in ub:
            compute(((b == bk) & finite).nonzero().squeeze(1), int(bk))

    def _trap2(self, funcs, rho, v1, v2):
        shape = torch.broadcast_shapes(rho.shape, v1.shape, v2.shape)
        rho, v1, v2 = (t.expand(shape).reshape(-1) for t in (rho, v1, v2))
        dtype, tol = rho.dtype, self._tol(rho.dtype)
        outs = [torch.full_like(rho, float("nan")) for _ in funcs]
        s1, s2 = v1.clamp_min(0).sqrt(), v2.clamp_min(0).sqrt()
        a, b = s2 * rho, s2 * _one_minus_sq(rho).sqrt_()

        reached = {}

        fused = len(funcs) == 2 and self.df is None

        def compute(idx, bucket):
            sel = (lambda t: t) if idx is None else (lambda t: t[idx])
            ss1, aa, bb = sel(s1), sel(a), sel(b)
            plans = []
            for which, g in enumerate(funcs):
                plans.append(self._plan(which, g, bucket, tol))
                reached[("NTK" if which else "NNGP", 2.0 ** (bucket / 2))] = plans[-1][2]
            if fused:   # f and autograd f' in one pass, on the finer of the two grids
                jobs = [((0, 1), min(plans[0][0], plans[1][0]), max(plans[0][1], plans[1][1]),
                         self._value_and_grad)]
            else:
                jobs = [((i,), plans[i][0], plans[i][1], (lambda x, g=g: (g(x),)))
                        for i, g in enumerate(funcs)]
            for which, h, L, ev in jobs:
                z, w = _trap_nodes(h, L, dtype, device=ss1.device)
                n = z.numel()
                res = [torch.empty_like(ss1) for _ in which]
                chunk = max(1, _Q_CHUNK // (n * n))
                for lo in range(0, ss1.numel(), chunk):
                    c = slice(lo, lo + chunk)
                    fu = ev(ss1[c, None] * z)                                      # (m, N)
                    v = (aa[c, None] * z)[:, :, None] + (bb[c, None] * z)[:, None, :]  # (m,N,N)
                    for r, gu, gv in zip(res, fu, ev(v)):
                        r[c] = (gu * (gv @ w)) @ w
                for i, r in zip(which, res):
                    if idx is None:
                        outs[i].copy_(r)
                    else:
                        outs[i][idx] = r

        self._by_bucket(torch.maximum(v1, v2), compute)
        self._warn_unreached(reached, tol)
        return [o.reshape(shape) for o in outs]

    def _trap1(self, v):
        """``(E[f(u)^2], E[f'(u)^2])``, ``u ~ N(0, v)``, on the bucket's 1-D trapezoid grids."""
        shape, v = v.shape, v.reshape(-1)
        dtype, tol = v.dtype, self._tol(v.dtype)
        funcs = self._funcs(True)
        outs = [torch.full_like(v, float("nan")) for _ in funcs]
        s = v.clamp_min(0).sqrt()
        reached = {}

        def compute(idx, bucket):
            ss = s if idx is None else s[idx]
            for which, (out, g) in enumerate(zip(outs, funcs)):
                h, L, e = self._plan(which, g, bucket, tol)
                reached[("NTK" if which else "NNGP", 2.0 ** (bucket / 2))] = e
                z, w = _trap_nodes(h, L, dtype, device=ss.device)
                y = g(ss[:, None] * z)
                res = (y * y) @ w
                if idx is None:
                    out.copy_(res)
                else:
                    out[idx] = res

        self._by_bucket(v, compute)
        self._warn_unreached(reached, tol)
        return tuple(o.reshape(shape) for o in outs)

    # -- deg=: the fixed Gauss-Hermite product rule (explicit override) ---------------------
    def _nodes(self, dtype, deg=None, device=None):
        x, w = np.polynomial.hermite.hermgauss(deg or self.deg)
        return (torch.tensor(x, dtype=dtype, device=device),
                torch.tensor(w, dtype=dtype, device=device))

    def _quad2(self, funcs, rho, v1, v2):
        shape = torch.broadcast_shapes(rho.shape, v1.shape, v2.shape)
        rho, v1, v2 = (t.expand(shape).reshape(-1) for t in (rho, v1, v2))
        # E[f(u) f(v)] is symmetric in (u, v): put the smaller variance on the outer variable,
        # which is where Gauss-Hermite is least accurate for steep (saturating) functions.
        v1, v2 = torch.minimum(v1, v2), torch.maximum(v1, v2)
        x, w = self._nodes(rho.dtype, device=rho.device)
        deg = self.deg
        outs = [torch.empty_like(rho) for _ in funcs]
        chunk = max(1, (1 << 22) // (deg * deg))
        for lo in range(0, rho.numel(), chunk):
            r, a1, a2 = rho[lo:lo + chunk], v1[lo:lo + chunk], v2[lo:lo + chunk]
            u = torch.sqrt(2 * a1)[None] * x[:, None]                               # (deg, m)
            s2 = torch.sqrt(2 * a2)
            slope = r * s2
            rest = safe_sqrt((1 - r) * (1 + r)) * s2
            v = slope[None, None] * x[:, None, None] + rest[None, None] * x[None, :, None]
            for out, f in zip(outs, funcs):
                fu, fv = f(u), f(v)
                out[lo:lo + chunk] = torch.einsum("i,j,im,ijm->m", w, w, fu, fv) / _PI
        return [o.reshape(shape) for o in outs]

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        if self.nngp_fn is not None:
            return self._user_cross(_scale(rho, v1, v2), v1, v2, need_dot)
        funcs = self._funcs(need_dot)
        quad = self._quad2 if self.deg is not None else self._trap2
        res = quad(funcs, rho, v1, v2)
        return res[0], (res[1] if need_dot else None)

    def self_map(self, v: Tensor) -> _Maps:
        if self.nngp_fn is not None:
            return self._user_cross(v, v, v, True)
        if self.deg is None:
            return self._trap1(v)
        x, w = self._nodes(v.dtype, min(4 * self.deg, 150), v.device)  # 1-D: more nodes
        u = torch.sqrt(2 * v.clamp_min(0)).unsqueeze(-1) * x
        df = self.df or _autograd_derivative(self.fn_)
        e = (self.fn_(u) ** 2 * w).sum(-1) / math.sqrt(_PI)
        ed = (df(u) ** 2 * w).sum(-1) / math.sqrt(_PI)
        return e, ed

    # -- closed-form NNGP supplied by the user (neural-tangents' Elementwise(fn, nngp_fn)) ----
    def _user_cross(self, c, v1, v2, need_dot):
        nngp = self.nngp_fn(c, v1, v2)
        if not need_dot:
            return nngp, None
        if self.d_nngp_fn is not None:
            return nngp, self.d_nngp_fn(c, v1, v2)
        # Price's theorem: E[f'(u) f'(v)] = d E[f(u) f(v)] / dc
        with torch.enable_grad():
            cc = c.detach().clone().requires_grad_(True)
            y = self.nngp_fn(cc, v1, v2)
            (g,) = torch.autograd.grad(y.sum(), cc, allow_unused=True)
        dot = torch.zeros_like(c) if g is None else g.detach()
        return nngp, dot


# ---------------------------------------------------------------------------------------------
# Polynomials: exact dual maps through the Hermite expansion


def _power_to_hermite(coef, s: Tensor):
    """``sum_i coef[i] (s a)^i = sum_m A_m He_m(a)`` (``a`` standard normal): the list of
    ``A_m`` tensors (shape of ``s``), from ``a^i = sum_k i! / (k! (i - 2k)! 2^k) He_{i-2k}``."""
    deg = len(coef) - 1
    A = [torch.zeros_like(s) for _ in range(deg + 1)]
    for i, ci in enumerate(coef):
        if ci == 0:
            continue
        si = s.pow(i) * ci
        for k in range(i // 2 + 1):
            m = i - 2 * k
            A[m] = A[m] + si * (math.factorial(i) / (math.factorial(k) * math.factorial(m)
                                                     * 2 ** k))
    return A


def _hermite_scaled(n: int, weight: float, s: Tensor):
    """``weight He_n(s a) = sum_m A_m He_m(a)`` by the multiplication theorem
    ``He_n(s a) = sum_k n! / (k! (n - 2k)!) s^(n-2k) ((s^2 - 1) / 2)^k He_{n-2k}(a)``: at
    ``s = 1`` only ``k = 0`` survives (no cancellation)."""
    A = [torch.zeros_like(s) for _ in range(max(n, 0) + 1)]
    if n < 0:
        return A
    h = (s - 1) * (s + 1) / 2
    for k in range(n // 2 + 1):
        m = n - 2 * k
        c = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(m + 1)) * weight
        A[m] = A[m] + s.pow(m) * h.pow(k) * c
    return A


def _hermite_pair(A1, A2, rho: Tensor) -> Tensor:
    """``sum_m m! A1_m A2_m rho^m`` (``E[He_m(a) He_n(b)] = delta_mn m! rho^m``), by Horner."""
    out = None
    for m in range(len(A1) - 1, -1, -1):
        term = A1[m] * A2[m] * float(math.factorial(m))
        out = term if out is None else out * rho + term
    return out if out is not None else torch.zeros_like(rho)


class _HermiteExpanded(Activation):
    """Activations whose dual maps follow from the Hermite coefficients of ``phi(s a)`` and of
    ``phi'(s a)`` (subclasses define ``_expand(s)`` and ``_expand_d(s)``)."""
    if TYPE_CHECKING:  # declared for type checkers only: the Hermite coefficients (one tensor
        # of the shape of ``s`` per degree) of phi(s a) and phi'(s a)
        def _expand(self, s: Tensor) -> List[Tensor]: ...

        def _expand_d(self, s: Tensor) -> List[Tensor]: ...

    def dual(self, rho: Tensor, v1: Tensor, v2: Tensor, need_dot: bool) -> _Maps:
        s1, s2 = v1.sqrt(), v2.sqrt()
        nngp = _hermite_pair(self._expand(s1), self._expand(s2), rho)
        nngp = nngp.expand(torch.broadcast_shapes(rho.shape, v1.shape, v2.shape)).clone()
        dot = None
        if need_dot:
            dot = _hermite_pair(self._expand_d(s1), self._expand_d(s2), rho)
            dot = dot.expand(nngp.shape).clone()
        return nngp, dot

    def self_map(self, v: Tensor) -> _Maps:
        s = v.sqrt()
        one = torch.ones_like(v)
        A, D = self._expand(s), self._expand_d(s)
        return _hermite_pair(A, A, one), _hermite_pair(D, D, one)


@frozen_layer
class Polynomial(_HermiteExpanded):
    """``sum_i coef[i] x^i`` (neural-tangents' ``Polynomial(coef)``), exact dual maps.

    With ``u = sqrt(v) a`` (``a`` standard normal), ``phi(u) = sum_m A_m(v) He_m(a)`` and
    ``E[phi(u) phi(w)] = sum_m m! A_m(v1) A_m(v2) rho^m`` (the NTK term the same with
    ``phi'``). Cost per kernel entry: ``~2 deg`` multiply-adds.

    Example: ``serial(Dense(512), Polynomial((0.0, 1.0, 0.5)), Dense(1))`` for ``x + x^2 / 2``.
    """
    coef: tuple = (0.0, 1.0)

    def __post_init__(self):
        coef = self.coef
        if isinstance(coef, (torch.Tensor, np.ndarray)):
            coef = coef.tolist()
        if isinstance(coef, (str, bytes)) or not hasattr(coef, "__iter__"):
            raise TypeError(f"Polynomial: `coef` must be a sequence of real coefficients "
                            f"(coef[i] multiplies x^i), got {self.coef!r}")
        coef = tuple(check_real(c, f"coef[{i}]") for i, c in enumerate(coef))
        if not coef:
            raise ValueError("Polynomial: `coef` is empty; give at least one coefficient")
        if len(coef) > 33:
            raise ValueError(f"Polynomial: `coef` has degree {len(coef) - 1} > 32, not supported (the "
                             f"moments E[x^2d] overflow and cancel); use a lower degree")
        object.__setattr__(self, "coef", coef)

    def fn(self, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for c in reversed(self.coef):
            out = out * x + c
        return out

    def _expand(self, s):
        return _power_to_hermite(self.coef, s)

    def _expand_d(self, s):
        d = tuple(i * c for i, c in enumerate(self.coef))[1:] or (0.0,)
        return _power_to_hermite(d, s)


@frozen_layer
class Hermite(_HermiteExpanded):
    """``He_n(x) / sqrt(n!)``, the probabilists' Hermite polynomial of ``degree`` n normalized to
    unit norm under N(0, 1) (neural-tangents' ``Hermite(degree)``).

    At unit pre-activation variances (e.g. after ``LayerNorm``) the maps are NT's:
    ``nngp' = rho^n``, ``E[phi' phi'] = n rho^(n-1)``. NT assumes unit variance (and returns
    ``c^n`` whatever the variances); here the maps are exact at any variance (multiplication
    theorem for ``He_n(s a)``), so the two differ when the variances are not 1.
    """
    degree: int = 1

    def __post_init__(self):
        check_int(self.degree, "degree", minimum=0)
        if self.degree > 60:
            raise ValueError(f"Hermite: `degree` must be <= 60, got {self.degree}")

    def _norm(self):
        return math.exp(-0.5 * math.lgamma(self.degree + 1))

    def fn(self, x: Tensor) -> Tensor:
        n = self.degree
        h0, h1 = torch.ones_like(x), x
        if n == 0:
            return h0
        for k in range(1, n):
            h0, h1 = h1, x * h1 - k * h0
        return h1 * self._norm()

    def _expand(self, s):
        return _hermite_scaled(self.degree, self._norm(), s)

    def _expand_d(self, s):
        n = self.degree
        if n == 0:
            return [torch.zeros_like(s)]
        return _hermite_scaled(n - 1, n * self._norm(), s)
