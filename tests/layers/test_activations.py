"""Every activation's dual maps against adaptive 2-D quadrature of its definition (float64).

Oracle: ``ntkit.testing.bivariate_expectation`` (nested scipy.quad with kink break points), applied
to the scalar function and its derivative written out independently here.
"""
import math

import numpy as np
import pytest
import torch
from scipy.special import erf as sp_erf, ndtr

from ntkit import layers as nl
from ntkit.testing import bivariate_expectation

SQ2PI = math.sqrt(2 * math.pi)


def step(x):
    return 1.0 if x > 0 else 0.0


def relu_like(a, b):
    return (lambda x: a * min(x, 0) + b * max(x, 0), lambda x: b if x > 0 else a)


def monomial(d):
    return (lambda x: x ** d, lambda x: d * x ** (d - 1) if d > 0 else 0.0)


def rect_monomial(d):
    return (lambda x: x ** d if x >= 0 else 0.0,
            lambda x: (d * x ** (d - 1) if x > 0 else 0.0) if d > 0 else 0.0)


CASES = {
    "Relu": (nl.Relu(), *relu_like(0, 1)),
    "LeakyRelu": (nl.LeakyRelu(0.1), *relu_like(0.1, 1)),
    "ABRelu": (nl.ABRelu(-0.3, 1.7), *relu_like(-0.3, 1.7)),
    "Abs": (nl.Abs(), *relu_like(-1, 1)),
    "Erf": (nl.Erf(1.3, 0.7, 0.2), lambda x: 1.3 * sp_erf(0.7 * x) + 0.2,
            lambda x: 1.3 * 0.7 * 2 / math.sqrt(math.pi) * math.exp(-(0.7 * x) ** 2)),
    "Sigmoid_like": (nl.Sigmoid_like(), lambda x: 0.5 * sp_erf(x / 2.4020563531719796) + 0.5,
                     lambda x: 0.5 / 2.4020563531719796 * 2 / math.sqrt(math.pi)
                     * math.exp(-(x / 2.4020563531719796) ** 2)),
    "Gelu": (nl.Gelu(), lambda x: x * ndtr(x),
             lambda x: ndtr(x) + x * math.exp(-x * x / 2) / SQ2PI),
    "Sin": (nl.Sin(0.9, 1.2, 0.3), lambda x: 0.9 * math.sin(1.2 * x + 0.3),
            lambda x: 0.9 * 1.2 * math.cos(1.2 * x + 0.3)),
    "Cos": (nl.Cos(1.1, 0.8, 0.2), lambda x: 1.1 * math.cos(0.8 * x + 0.2),
            lambda x: -1.1 * 0.8 * math.sin(0.8 * x + 0.2)),
    "Gaussian": (nl.Gaussian(1.2, -0.7), lambda x: 1.2 * math.exp(-0.7 * x * x),
                 lambda x: 1.2 * -1.4 * x * math.exp(-0.7 * x * x)),
    "Exp": (nl.Exp(0.8, 0.6), lambda x: 0.8 * math.exp(0.6 * x),
            lambda x: 0.48 * math.exp(0.6 * x)),
    "Rbf": (nl.Rbf(0.7), lambda x: math.sqrt(2) * math.sin(math.sqrt(1.4) * x + math.pi / 4),
            lambda x: math.sqrt(2) * math.sqrt(1.4) * math.cos(math.sqrt(1.4) * x + math.pi / 4)),
    **{f"Monomial{d}": (nl.Monomial(d), *monomial(d)) for d in range(5)},
    **{f"RectifiedMonomial{d}": (nl.RectifiedMonomial(d), *rect_monomial(d)) for d in range(5)},
}
# (v1, v2, c): generic, negative correlation, nearly collinear (rho = 0.9999), anti-collinear
POINTS = [(1.0, 1.0, 0.3), (1.3, 0.7, -0.5), (0.9, 0.4, 0.9999 * math.sqrt(0.36)),
          (0.5, 2.0, -0.97)]


def _t(v):
    return torch.tensor([v], dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("point", POINTS)
def test_cross_map_matches_quadrature(name, point):
    layer, f, df = CASES[name]
    v1, v2, c = point
    nngp, dot = layer.cross(_t(c), _t(v1), _t(v2), True)
    ref = bivariate_expectation(f, f, v1, v2, c)
    assert float(nngp) == pytest.approx(ref, rel=1e-10, abs=1e-11)
    if name.startswith("RectifiedMonomial0"):
        assert float(dot) == 0.0  # derivative is a delta at 0; zero by convention (as in NT)
        return
    dref = bivariate_expectation(df, df, v1, v2, c)
    assert float(dot) == pytest.approx(dref, rel=1e-10, abs=1e-11)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("v", [0.3, 1.0, 2.5])
def test_self_map_matches_quadrature(name, v):
    layer, f, df = CASES[name]
    e, ed = layer.self_map(_t(v))
    assert float(e) == pytest.approx(bivariate_expectation(f, f, v, v, v), rel=1e-10, abs=1e-11)
    if not name.startswith("RectifiedMonomial0"):
        ref = bivariate_expectation(df, df, v, v, v)
        assert float(ed) == pytest.approx(ref, rel=1e-10, abs=1e-11)


@pytest.mark.parametrize("point", POINTS)
def test_sign_nngp_and_zero_ntk(point):
    v1, v2, c = point
    nngp, dot = nl.Sign().cross(_t(c), _t(v1), _t(v2), True)
    ref = bivariate_expectation(np.sign, np.sign, v1, v2, c)
    assert float(nngp) == pytest.approx(ref, rel=1e-10, abs=1e-11)
    assert float(dot) == 0.0


def test_cross_is_vectorized_and_does_not_touch_inputs():
    layer = nl.Relu()
    c = torch.tensor([[0.1, -0.2], [0.3, 0.05]], dtype=torch.float64)
    c0 = c.clone()
    v1 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    v2 = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    nngp, dot = layer.cross(c, v1, v2, True)
    assert torch.equal(c, c0)
    for i in range(2):
        for j in range(2):
            n1, d1 = layer.cross(c[i, j:j + 1], v1[i], v2[0, j:j + 1], True)
            assert float(nngp[i, j]) == pytest.approx(float(n1), rel=1e-14)


# --- Elementwise(fn): numerical dual maps -------------------------------------------------
SMOOTH = {
    "Erf": (lambda x: 1.3 * torch.erf(0.7 * x) + 0.2, CASES["Erf"][0]),
    "Gelu": (lambda x: torch.nn.functional.gelu(x), CASES["Gelu"][0]),
    "Sin": (lambda x: 0.9 * torch.sin(1.2 * x + 0.3), CASES["Sin"][0]),
    "Gaussian": (lambda x: 1.2 * torch.exp(-0.7 * x * x), CASES["Gaussian"][0]),
    "Exp": (lambda x: 0.8 * torch.exp(0.6 * x), CASES["Exp"][0]),
}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_elementwise_quadrature_matches_closed_forms(name):
    fn, closed = SMOOTH[name]
    num = nl.Elementwise(fn)
    for v1, v2, c in POINTS:
        a = num.cross(_t(c), _t(v1), _t(v2), True)
        b = closed.cross(_t(c), _t(v1), _t(v2), True)
        assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-10, abs=1e-11)
        assert float(a[1]) == pytest.approx(float(b[1]), rel=1e-10, abs=1e-11)
    for v in (0.3, 2.5):
        a, b = num.self_map(_t(v)), closed.self_map(_t(v))
        assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-10, abs=1e-11)
        assert float(a[1]) == pytest.approx(float(b[1]), rel=1e-10, abs=1e-11)


def test_elementwise_tanh_matches_adaptive_quadrature():
    # documented accuracy for tanh (poles at +-i pi/2 slow Gauss-Hermite down): ~4e-11 at deg=96
    num = nl.Elementwise(torch.tanh)
    for v1, v2, c in POINTS:
        n, d = num.cross(_t(c), _t(v1), _t(v2), True)
        assert float(n) == pytest.approx(
            bivariate_expectation(math.tanh, math.tanh, v1, v2, c, kinks=()), rel=1e-10)
        dt = lambda x: 1 - math.tanh(x) ** 2  # noqa: E731
        assert float(d) == pytest.approx(bivariate_expectation(dt, dt, v1, v2, c, kinks=()),
                                         rel=1e-10)


def test_elementwise_architecture_matches_closed_form_network():
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x / x.norm(dim=1, keepdim=True) * 2.0  # pre-activation variances ~1.7 (see docstring)
    a = nl.serial(nl.Dense(8, W_std=1.3, b_std=0.1), nl.Elementwise(torch.erf), nl.Dense(1))
    b = nl.serial(nl.Dense(8, W_std=1.3, b_std=0.1), nl.Erf(), nl.Dense(1))
    ka, kb = a.kernel(x), b.kernel(x)
    torch.testing.assert_close(ka.nngp, kb.nngp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ka.ntk, kb.ntk, rtol=1e-10, atol=1e-12)


def test_elementwise_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        nl.Elementwise(3.0)
