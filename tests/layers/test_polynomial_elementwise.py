"""Polynomial, Hermite and Elementwise(fn, nngp_fn): dual maps against independent oracles
(2-D Gauss-Hermite quadrature of the definition, exact for polynomial integrands; the
library's quadrature-tested Erf closed form; NT's unit-variance formulas) and Monte Carlo
from the finite networks."""
import math

import numpy as np
import pytest
import torch
from numpy.polynomial import hermite_e

from ntkit import layers as nl
from ntkit.testing import KernelTestCase, bivariate_expectation

POINTS = [(1.0, 1.0, 0.3), (1.3, 0.7, -0.5), (0.9, 0.4, 0.9999 * math.sqrt(0.36)),
          (0.5, 2.0, -0.97), (2.5, 1.7, 1.2)]


_Z, _W = hermite_e.hermegauss(24)   # exact for polynomial integrands of degree <= 47
_W = _W / math.sqrt(2 * math.pi)


def gh_expectation(f, g, v1, v2, c):
    """E[f(u) g(w)], u = s1 z1, w = s2 (rho z1 + sqrt(1 - rho^2) z2): product Gauss-Hermite,
    exact up to roundoff for polynomials (numpy evaluation, independent of the library)."""
    s1, s2 = math.sqrt(v1), math.sqrt(v2)
    rho = max(-1.0, min(1.0, c / (s1 * s2)))
    r = math.sqrt(max(0.0, 1 - rho * rho))
    z1, z2 = np.meshgrid(_Z, _Z, indexing="ij")
    w = np.outer(_W, _W)
    return float((f(s1 * z1) * g(s2 * (rho * z1 + r * z2)) * w).sum())


def _t(v):
    return torch.tensor([v], dtype=torch.float64)


def _poly(coef):
    d = [i * c for i, c in enumerate(coef)][1:] or [0.0]
    return (lambda x: np.polyval(coef[::-1], x), lambda x: np.polyval(d[::-1], x))


def _herm(n):
    p = hermite_e.herme2poly([0] * n + [1]) / math.sqrt(math.factorial(n))
    return _poly(list(p))


POLY_CASES = {
    "poly_quadratic": (nl.Polynomial((0.2, 1.0, 0.5)), *_poly([0.2, 1.0, 0.5])),
    "poly_cubic": (nl.Polynomial([-0.3, 0.0, 0.7, -0.4]), *_poly([-0.3, 0.0, 0.7, -0.4])),
    "poly_const": (nl.Polynomial((1.5,)), *_poly([1.5])),
    **{f"hermite{n}": (nl.Hermite(n), *_herm(n)) for n in (0, 1, 2, 3, 5)},
}


@pytest.mark.parametrize("name", sorted(POLY_CASES))
@pytest.mark.parametrize("point", POINTS)
def test_polynomial_dual_matches_quadrature(name, point):
    layer, f, df = POLY_CASES[name]
    v1, v2, c = point
    nngp, dot = layer.cross(_t(c), _t(v1), _t(v2), True)
    scale = max(1.0, gh_expectation(f, f, v1, v1, v1), gh_expectation(f, f, v2, v2, v2))
    assert float(nngp) == pytest.approx(gh_expectation(f, f, v1, v2, c), rel=1e-11,
                                        abs=1e-12 * scale)
    assert float(dot) == pytest.approx(gh_expectation(df, df, v1, v2, c), rel=1e-11,
                                       abs=1e-12 * scale)
    # one-point map (exact diagonal)
    e, ed = layer.self_map(_t(v1))
    assert float(e) == pytest.approx(gh_expectation(f, f, v1, v1, v1), rel=1e-12)
    assert float(ed) == pytest.approx(gh_expectation(df, df, v1, v1, v1), rel=1e-12, abs=1e-14)


def test_gauss_hermite_oracle_agrees_with_adaptive_quadrature():
    """The oracle itself, once, against the package's adaptive scipy quadrature."""
    f, _ = _herm(3)
    ref = bivariate_expectation(lambda x: float(f(x)), lambda x: float(f(x)), 1.3, 0.7, -0.5,
                                kinks=())
    assert gh_expectation(f, f, 1.3, 0.7, -0.5) == pytest.approx(ref, rel=1e-9, abs=1e-11)


def test_finite_functions_match_definition():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for layer, f, _ in POLY_CASES.values():
        ref = torch.tensor(f(x.numpy()), dtype=torch.float64).expand(x.shape)
        torch.testing.assert_close(layer.fn(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_hermite_at_unit_variance_is_nt(n):
    """NT's Hermite maps (unit-variance inputs): nngp' = rho^n, E[phi' phi'] = n rho^(n-1)."""
    rho = torch.linspace(-1, 1, 11, dtype=torch.float64)
    one = torch.ones_like(rho)
    nngp, dot = nl.Hermite(n).cross(rho, one, one, True)
    torch.testing.assert_close(nngp, rho ** n, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(dot, n * rho ** (n - 1), rtol=1e-13, atol=1e-14)


def test_polynomial_equals_monomial_and_sums():
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mk = lambda act: nl.serial(nl.Dense(4, 1.3, 0.2), act, nl.Dense(1)).kernel(x)  # noqa: E731
    for d in range(4):
        a, b = mk(nl.Polynomial((0.0,) * d + (1.0,))), mk(nl.Monomial(d))
        torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad,err", [("ab", TypeError), ((), ValueError),
                                     ((1.0, float("nan")), ValueError),
                                     ((0.0,) * 40, ValueError)])
def test_polynomial_bad_coef(bad, err):
    with pytest.raises(err, match="coef"):
        nl.Polynomial(bad)


def test_hermite_bad_degree():
    with pytest.raises((TypeError, ValueError), match="degree"):
        nl.Hermite(-1)


# --- Elementwise(fn, nngp_fn) -------------------------------------------------------------

def erf_nngp(c, v1, v2):
    return (2 / math.pi) * torch.asin(2 * c / torch.sqrt((1 + 2 * v1) * (1 + 2 * v2)))


def erf_dot(c, v1, v2):
    return (4 / math.pi) / torch.sqrt((1 + 2 * v1) * (1 + 2 * v2) - 4 * c * c)


@pytest.mark.parametrize("d_fn", [None, erf_dot])
def test_elementwise_closed_form_matches_erf(d_fn):
    """NNGP from the user's closed form; NTK by autograd (or the given derivative) equals the
    library's Erf (a=1, b=1), itself checked against quadrature."""
    g = torch.Generator().manual_seed(2)
    x1, x2 = (torch.randn(4, 3, generator=g, dtype=torch.float64),
              torch.randn(3, 3, generator=g, dtype=torch.float64))
    ew = nl.Elementwise(torch.erf, erf_nngp, d_fn)
    ref_arch = nl.serial(nl.Dense(5, 1.4, 0.3), nl.Erf(), nl.Dense(5, 1.1), nl.Erf(), nl.Dense(1))
    arch = nl.serial(nl.Dense(5, 1.4, 0.3), ew, nl.Dense(5, 1.1), ew, nl.Dense(1))
    for b in (x2, None):
        k, ref = arch.kernel(x1, b), ref_arch.kernel(x1, b)
        torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-11, atol=1e-12)
    # and it does not silently use quadrature: a deliberately different closed form shows
    wrong = nl.Elementwise(torch.erf, lambda c, v1, v2: 0.5 * erf_nngp(c, v1, v2))
    kw = nl.serial(nl.Dense(5, 1.4, 0.3), wrong, nl.Dense(1)).kernel(x1)
    kr = nl.serial(nl.Dense(5, 1.4, 0.3), nl.Erf(), nl.Dense(1)).kernel(x1)
    torch.testing.assert_close(kw.nngp, 0.5 * kr.nngp, rtol=1e-12, atol=1e-13)


def test_elementwise_without_nngp_fn_is_quadrature():
    """Automatic accuracy control (default rtol=1e-10) or the explicit fixed Gauss-Hermite
    rule (deg=96): both agree with Erf at moderate variance (large variances:
    tests/layers/test_quadrature.py)."""
    for a, tail in ((nl.Elementwise(torch.erf), "rtol=1e-10)"),
                    (nl.Elementwise(torch.erf, deg=96), "deg=96)")):
        assert a.nngp_fn is None and repr(a).endswith(tail)
        rho, v1, v2 = _t(0.4), _t(1.2), _t(0.8)
        q, qd = a.dual(rho, v1, v2, True)
        e, ed = nl.Erf().dual(rho, v1, v2, True)
        assert float(q) == pytest.approx(float(e), rel=1e-10)
        assert float(qd) == pytest.approx(float(ed), rel=1e-10)


def test_elementwise_nngp_fn_validation():
    with pytest.raises(TypeError, match="nngp_fn"):
        nl.Elementwise(torch.erf, lambda x: torch.cos(x))  # a derivative passed positionally
    with pytest.raises(TypeError, match="nngp_fn"):
        nl.Elementwise(torch.erf, 3.0)
    with pytest.raises(ValueError, match="d_nngp_fn"):
        nl.Elementwise(torch.erf, d_nngp_fn=erf_dot)


class TestPolynomialMonteCarlo(KernelTestCase):
    widths = (16, 64, 256, 1024)

    """Measured (4 seeds, widths 16..1024): NNGP errors 0.46, 0.26, 0.15, 0.079 (slope
    -0.42); NTK 0.48, 0.30, 0.12, 0.060 (slope -0.51)."""

    def build(self):
        # Hermite after LayerNorm: the unit-variance regime NT's Hermite is meant for
        return nl.serial(nl.Dense(8, 1.0, 0.1), nl.Polynomial((0.1, 1.0, 0.4)), nl.Dense(8),
                         nl.LayerNorm(), nl.Hermite(2), nl.Dense(1))


class TestElementwiseClosedFormMonteCarlo(KernelTestCase):
    """Measured (4 seeds, widths 16..1024): NNGP 0.34, 0.17, 0.073, 0.054 (slope -0.46);
    NTK (autograd of nngp_fn) 0.33, 0.21, 0.076, 0.043 (slope -0.51)."""

    def build(self):
        return nl.serial(nl.Dense(8, 1.5, 0.2), nl.Elementwise(torch.erf, erf_nngp),
                         nl.Dense(8, 1.2), nl.Elementwise(torch.erf, erf_nngp), nl.Dense(1))
