"""Activations with exact NNGP/NTK dual maps, and ``Elementwise`` for any torch function.

For pre-activations ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` an activation ``phi`` maps
``nngp' = E[phi(u) phi(v)]`` and ``ntk' = ntk * E[phi'(u) phi'(v)]``. Conventions (names,
arguments, defaults) follow neural-tangents' stax so numbers compare one to one. Angles use
``atan2(sqrt(max(v1 v2 - c^2, 0)), c)``, never ``arccos`` of a ratio; on the batch diagonal of a
symmetric kernel the exact one-point maps are used (no cancellation in float32).

Cost per kernel entry: about ten elementwise passes (one ``atan2`` for the arc-cosine family,
one ``exp``/``sqrt`` for the others); ``Elementwise`` costs ``2 deg^2`` evaluations of ``fn``.
With numba installed, the arc-cosine family (``Relu``, ``LeakyRelu``, ``Abs``, ``ABRelu``) on
every layout (FC and images) is one fused pass (one division, one square root, a polynomial ``atan``;
:mod:`ntkit.layers._fused`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .._validation import check_int, check_positive
from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._ops import apply_elementwise, safe_sqrt

__all__ = ["Relu", "LeakyRelu", "ABRelu", "Abs", "Erf", "Sigmoid_like", "Gelu", "Sin", "Cos",
           "Gaussian", "Exp", "Rbf", "Sign", "Monomial", "RectifiedMonomial", "Elementwise",
           "Activation"]

Tensor = torch.Tensor
_PI = math.pi


class ActivationModule(nn.Module):
    """Finite-network counterpart of an activation layer."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return self.name


class Activation(Layer):
    """Base: subclasses define ``fn`` (finite), ``cross`` and optionally ``self_map``."""

    def fn(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def cross(self, c: Tensor, v1: Tensor, v2: Tensor, need_dot: bool):  # pragma: no cover
        raise NotImplementedError

    def self_map(self, v: Tensor):
        """``(E[phi(u)^2], E[phi'(u)^2])`` for ``u ~ N(0, v)``; default: ``cross(v, v, v)``."""
        return self.cross(v, v, v, True)

    def fused_params(self):
        """``(f, h)`` when the dual map is ``nngp' = f s + (h - f theta) c`` (arc-cosine family,
        one fused pass available), else ``None``."""
        return None

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError(f"{type(self).__name__} received several branches; merge them first")
        return apply_elementwise(k, self.cross, self.self_map, self.fused_params())

    def build(self, in_shape, ctx: BuildContext, followed: bool):
        return ActivationModule(self.fn, repr(self)), in_shape


def _angle(c: Tensor, v1: Tensor, v2: Tensor):
    """``(sqrt(v1 v2 - c^2), atan2(that, c))`` with clipping; angle pi/2 where both vanish."""
    s = torch.addcmul(v1 * v2, c, c, value=-1.0).clamp_min_(0).sqrt_()
    theta = torch.atan2(s, c)
    if bool((v1 == 0).any()) or bool((v2 == 0).any()):
        theta = torch.where((s == 0) & (c == 0), torch.full_like(theta, _PI / 2), theta)
    return s, theta


@frozen_layer
class ABRelu(Activation):
    """``a * min(x, 0) + b * max(x, 0)``."""
    a: float
    b: float

    def fn(self, x):
        return self.a * torch.clamp(x, max=0) + self.b * torch.clamp(x, min=0)

    def cross(self, c, v1, v2, need_dot):
        s, theta = _angle(c, v1, v2)
        f = (self.a - self.b) ** 2 / (2 * _PI)
        h = (self.a ** 2 + self.b ** 2) / 2
        dot = theta.mul_(-f).add_(h)
        nngp = s.mul_(f).addcmul_(dot, c)
        return nngp, (dot if need_dot else None)

    def self_map(self, v):
        h = (self.a ** 2 + self.b ** 2) / 2
        return v * h, torch.full_like(v, h)

    def fused_params(self):
        return (self.a - self.b) ** 2 / (2 * _PI), (self.a ** 2 + self.b ** 2) / 2


def Relu() -> ABRelu:
    """ReLU, ``max(x, 0)``: the arc-cosine kernel of order 1."""
    return ABRelu(0.0, 1.0)


def LeakyRelu(alpha: float) -> ABRelu:
    """Leaky ReLU, ``alpha * min(x, 0) + max(x, 0)``."""
    return ABRelu(float(alpha), 1.0)


def Abs() -> ABRelu:
    """``|x|``."""
    return ABRelu(-1.0, 1.0)


@frozen_layer
class Erf(Activation):
    """``a * erf(b * x) + c``."""
    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def fn(self, x):
        return self.a * torch.erf(self.b * x) + self.c

    def cross(self, c, v1, v2, need_dot):
        b2 = self.b ** 2
        prod = (1 + 2 * b2 * v1) * (1 + 2 * b2 * v2)
        root = torch.addcmul(prod, c, c, value=-4 * b2 * b2).clamp_min_(0).sqrt_()
        nngp = torch.atan2(c * (2 * b2), root).mul_(self.a ** 2 * 2 / _PI).add_(self.c ** 2)
        dot = None
        if need_dot:
            dot = root.reciprocal_().mul_(self.a ** 2 * b2 * 4 / _PI)
        return nngp, dot

    def self_map(self, v):
        b2v = self.b ** 2 * v
        nngp = torch.atan2(2 * b2v, torch.sqrt(1 + 4 * b2v)) * (self.a ** 2 * 2 / _PI) + self.c ** 2
        dot = (self.a ** 2 * self.b ** 2 * 4 / _PI) / torch.sqrt(1 + 4 * b2v)
        return nngp, dot


def Sigmoid_like() -> Erf:
    """``0.5 * erf(x / 2.4020563531719796) + 0.5``, a sigmoid look-alike with a closed form."""
    return Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)


@frozen_layer
class Gelu(Activation):
    """``x * Phi(x)`` (exact kernel; ``approximate=True`` uses the tanh form in the finite net)."""
    approximate: bool = False

    def fn(self, x):
        return nn.functional.gelu(x, approximate="tanh" if self.approximate else "none")

    def cross(self, c, v1, v2, need_dot):
        prod = v1 * v2
        prod1 = (v1 + 1) * (v2 + 1)
        d2 = torch.addcmul(prod1, c, c, value=-1.0).clamp_min_(1e-300)
        d = d2.sqrt()
        ang = torch.atan2(c, d)
        nngp = (torch.addcmul(c * c, prod, d2) / (prod1 * d) + c * ang) / (2 * _PI) + 0.25 * c
        dot = None
        if need_dot:
            first = (1 / d2 + (1 - prod) / prod1 + 1) * c / d / (2 * _PI)
            dot = first + 0.25 + ang / (2 * _PI)
        return nngp, dot

    def self_map(self, v):
        r = torch.sqrt(1 + 2 * v)
        nngp = (v / ((v + 1) * r) + torch.atan2(v, r) / 2) / _PI
        nngp = (nngp + 0.25) * v
        return nngp, self.cross(v, v, v, True)[1]


@frozen_layer
class Sin(Activation):
    """``a * sin(b * x + c)``."""
    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def fn(self, x):
        return self.a * torch.sin(self.b * x + self.c)

    def cross(self, c, v1, v2, need_dot):
        b2 = self.b ** 2
        half = -0.5 * b2 * (v1 + v2)
        s1 = torch.exp(half + b2 * c)
        s2 = torch.exp(half - b2 * c) * math.cos(2 * self.c)
        h = self.a ** 2 / 2
        nngp = (s1 - s2) * h
        dot = (s1 + s2) * (h * b2) if need_dot else None
        return nngp, dot

    def self_map(self, v):
        h, b2 = self.a ** 2 / 2, self.b ** 2
        e = torch.exp(-2 * b2 * v) * math.cos(2 * self.c)
        return h * (1 - e), h * b2 * (1 + e)


def Cos(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Sin:
    """``a * cos(b * x + c)``."""
    return Sin(a=a, b=b, c=c + _PI / 2)


@frozen_layer
class Rbf(Activation):
    """``sqrt(2) sin(sqrt(2 gamma) x + pi/4)``: NNGP ``exp(-gamma (v1 + v2 - 2c))``."""
    gamma: float = 1.0

    def __post_init__(self):
        check_positive(self.gamma, "gamma")

    def fn(self, x):
        return math.sqrt(2) * torch.sin(math.sqrt(2 * self.gamma) * x + _PI / 4)

    def cross(self, c, v1, v2, need_dot):
        nngp = torch.exp((2 * c - v1 - v2) * self.gamma)
        return nngp, (nngp * (2 * self.gamma) if need_dot else None)

    def self_map(self, v):
        return torch.ones_like(v), torch.full_like(v, 2 * self.gamma)


@frozen_layer
class Exp(Activation):
    """``a * exp(b * x)``."""
    a: float = 1.0
    b: float = 1.0

    def fn(self, x):
        return self.a * torch.exp(self.b * x)

    def cross(self, c, v1, v2, need_dot):
        b2 = self.b ** 2
        e = torch.exp(((v1 + v2) * 0.5 + c) * b2)
        nngp = e * self.a ** 2
        return nngp, (e * (self.a ** 2 * b2) if need_dot else None)


@frozen_layer
class Gaussian(Activation):
    """``a * exp(b * x^2)`` (``b < 0`` for a bump; needs ``1 - 4 b v > 0``)."""
    a: float = 1.0
    b: float = -1.0

    def fn(self, x):
        return self.a * torch.exp(self.b * x * x)

    def cross(self, c, v1, v2, need_dot):
        prod = (1 - 2 * self.b * v1) * (1 - 2 * self.b * v2)
        det = torch.addcmul(prod, c, c, value=-4 * self.b ** 2).clamp_min_(0).sqrt_()
        nngp = det.reciprocal() * self.a ** 2
        dot = (c * (4 * self.b ** 2 * self.a ** 2)) / det.pow(3) if need_dot else None
        return nngp, dot


@frozen_layer
class Sign(Activation):
    """``sign(x)``: NNGP ``(2/pi) arcsin(rho)``; its NTK term is zero (derivative 0 a.e.),
    as in neural-tangents."""

    def fn(self, x):
        return torch.sign(x)

    def cross(self, c, v1, v2, need_dot):
        _, theta = _angle(c, v1, v2)
        nngp = theta.mul_(-2 / _PI).add_(1.0)
        return nngp, (torch.zeros_like(nngp) if need_dot else None)

    def self_map(self, v):
        return (v > 0).to(v.dtype), torch.zeros_like(v)


def _double_factorial(n: int) -> int:
    return 1 if n <= 0 else n * _double_factorial(n - 2)


def _monomial_moment(d: int, c: Tensor, prod: Tensor) -> Tensor:
    """``E[u^d v^d] = sum_m C_m c^(d-2m) (v1 v2)^m`` (Hermite expansion of ``x^d``)."""
    out = torch.zeros_like(c)
    for m in range(d // 2 + 1):
        coef = (math.factorial(d) / (math.factorial(m) * math.factorial(d - 2 * m) * 2 ** m)) ** 2
        coef *= math.factorial(d - 2 * m)
        out = out + coef * c.pow(d - 2 * m) * prod.pow(m)
    return out


@frozen_layer
class Monomial(Activation):
    """``x^degree``."""
    degree: int

    def __post_init__(self):
        check_int(self.degree, "degree", minimum=0)

    def fn(self, x):
        return x.pow(self.degree)

    def cross(self, c, v1, v2, need_dot):
        prod = v1 * v2
        d = self.degree
        nngp = _monomial_moment(d, c, prod)
        dot = None
        if need_dot:
            dot = d * d * _monomial_moment(d - 1, c, prod) if d > 0 else torch.zeros_like(nngp)
        return nngp, dot

    def self_map(self, v):
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

    def fn(self, x):
        return (x >= 0).to(x.dtype) * x.pow(self.degree)

    def _e(self, n, c, v1, v2):
        root = (v1 * v2).sqrt()
        s, theta = _angle(c, v1, v2)
        rs = torch.where(root > 0, root, torch.ones_like(root))
        sin, cos = s / rs, c / rs
        return root.pow(n) * _arccos_j(n, sin, cos, theta) / (2 * _PI)

    def cross(self, c, v1, v2, need_dot):
        d = self.degree
        nngp = self._e(d, c, v1, v2)
        dot = None
        if need_dot:
            dot = d * d * self._e(d - 1, c, v1, v2) if d > 0 else torch.zeros_like(nngp)
        return nngp, dot

    def self_map(self, v):
        d = self.degree
        nngp = _double_factorial(2 * d - 1) * v.pow(d) / 2
        dot = d * d * _double_factorial(2 * d - 3) * v.pow(d - 1) / 2 if d > 0 else \
            torch.zeros_like(v)
        return nngp, dot


# ---------------------------------------------------------------------------------------------
# Any elementwise function, by 2-D Gauss-Hermite quadrature

def _autograd_derivative(fn):
    def df(x):
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            y = fn(xx)
            (g,) = torch.autograd.grad(y.sum(), xx, allow_unused=True)
        return torch.zeros_like(x) if g is None else g
    return df


@frozen_layer
class Elementwise(Activation):
    """Any elementwise torch function, its dual maps by ``deg x deg`` Gauss-Hermite quadrature.

    ``E[f(u) g(v)]`` is evaluated on the product rule after the Cholesky change of variables
    ``u = sqrt(2 v1) x``, ``v = c sqrt(2 / v1) x + sqrt(2 (v2 - c^2 / v1)) y``; ``df`` defaults to
    autograd. Accuracy (float64, default ``deg=96``, measured in the tests): 1e-10 relative or
    better for smooth functions at pre-activation variances up to ~2 (erf, GELU, sin, exp,
    Gaussian; ``torch.tanh``: 2e-12 NNGP / 4e-11 NTK, vs 1e-9 / 2e-8 at ``deg=64`` and 1e-14
    at ``deg=128`` — the error falls geometrically in ``deg``); steep saturating functions at larger variances need more nodes (erf at
    variance 4.4: ~1e-7 absolute; error falls geometrically in ``deg``). Kinks converge only
    algebraically: use the closed-form layers for ReLU-like functions. Cost ``2 deg^2`` function evaluations per kernel entry.

    Example: ``serial(Dense(512), Elementwise(torch.tanh), Dense(1))``.
    """
    fn_: Callable = None
    df: Optional[Callable] = None
    deg: int = 96

    def __post_init__(self):
        if not callable(self.fn_):
            raise TypeError(f"Elementwise needs a callable torch function, got {self.fn_!r}")
        check_int(self.deg, "deg", minimum=2)
        if self.deg > 256:
            raise ValueError(f"`deg` must be <= 256 (Gauss-Hermite weights underflow beyond), "
                             f"got {self.deg}")

    def __repr__(self):
        name = getattr(self.fn_, "__name__", type(self.fn_).__name__)
        return f"Elementwise({name}, deg={self.deg})"

    def fn(self, x):
        return self.fn_(x)

    def _nodes(self, dtype, deg=None):
        x, w = np.polynomial.hermite.hermgauss(deg or self.deg)
        return torch.tensor(x, dtype=dtype), torch.tensor(w, dtype=dtype)

    def _quad2(self, funcs, c, v1, v2):
        shape = torch.broadcast_shapes(c.shape, v1.shape, v2.shape)
        c, v1, v2 = (t.expand(shape).reshape(-1) for t in (c, v1, v2))
        # E[f(u) f(v)] is symmetric in (u, v): put the smaller variance on the outer variable,
        # which is where Gauss-Hermite is least accurate for steep (saturating) functions.
        v1, v2 = torch.minimum(v1, v2), torch.maximum(v1, v2)
        x, w = self._nodes(c.dtype)
        deg = self.deg
        outs = [torch.empty_like(c) for _ in funcs]
        chunk = max(1, (1 << 22) // (deg * deg))
        for lo in range(0, c.numel(), chunk):
            cc, a1, a2 = c[lo:lo + chunk], v1[lo:lo + chunk].clamp_min(1e-300), v2[lo:lo + chunk]
            u = torch.sqrt(2 * a1)[None] * x[:, None]                               # (deg, m)
            slope = cc * torch.sqrt(2 / a1)
            rest = safe_sqrt(2 * (a2 - cc * cc / a1))
            v = slope[None, None] * x[:, None, None] + rest[None, None] * x[None, :, None]
            for out, f in zip(outs, funcs):
                fu, fv = f(u), f(v)
                out[lo:lo + chunk] = torch.einsum("i,j,im,ijm->m", w, w, fu, fv) / _PI
        return [o.reshape(shape) for o in outs]

    def cross(self, c, v1, v2, need_dot):
        df = self.df or _autograd_derivative(self.fn_)
        funcs = [self.fn_, df] if need_dot else [self.fn_]
        res = self._quad2(funcs, c, v1, v2)
        return res[0], (res[1] if need_dot else None)

    def self_map(self, v):
        x, w = self._nodes(v.dtype, min(4 * self.deg, 150))  # 1-D: cheap, use more nodes
        u = torch.sqrt(2 * v.clamp_min(0)).unsqueeze(-1) * x
        df = self.df or _autograd_derivative(self.fn_)
        e = (self.fn_(u) ** 2 * w).sum(-1) / math.sqrt(_PI)
        ed = (df(u) ** 2 * w).sum(-1) / math.sqrt(_PI)
        return e, ed
