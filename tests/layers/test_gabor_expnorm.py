"""Gabor and ExpNormalized: closed-form dual maps against Gaussian expectations written out
independently here (nested scipy quadrature of the definitions), and Monte Carlo from the
finite networks."""
import math

import pytest
import torch

from ntkit import layers as nl
from ntkit.testing import KernelTestCase, bivariate_expectation

POINTS = [(1.0, 1.0, 0.3), (0.2, 2.5, -0.5), (3.0, 3.0, 2.97), (0.7, 0.4, -0.52),
          (5.0, 0.05, 0.1), (1.5, 1.5, 1.5)]


def _t(v):
    return torch.tensor([v], dtype=torch.float64)


def gabor(x):
    return math.exp(-x * x) * math.sin(x)


def d_gabor(x):
    return math.exp(-x * x) * (math.cos(x) - 2 * x * math.sin(x))


@pytest.mark.parametrize("v1,v2,c", POINTS)
def test_gabor_dual_matches_quadrature(v1, v2, c):
    rho = c / math.sqrt(v1 * v2)
    nngp, dot = nl.Gabor().dual(_t(rho), _t(v1), _t(v2), True)
    ref = bivariate_expectation(gabor, gabor, v1, v2, c, kinks=())
    ref_d = bivariate_expectation(d_gabor, d_gabor, v1, v2, c, kinks=())
    assert abs(nngp.item() - ref) < 1e-11 * max(abs(ref), 1e-3)
    assert abs(dot.item() - ref_d) < 1e-11 * max(abs(ref_d), 1e-3)


@pytest.mark.parametrize("v", [0.0, 1e-3, 0.5, 2.0, 40.0])
def test_gabor_self_map_matches_quadrature(v):
    from scipy import integrate
    e, ed = nl.Gabor().self_map(_t(v))
    s = math.sqrt(v)
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    ref = integrate.quad(lambda z: gabor(s * z) ** 2 * phi(z), -12, 12, epsabs=1e-15,
                         epsrel=1e-13, limit=400)[0]
    ref_d = integrate.quad(lambda z: d_gabor(s * z) ** 2 * phi(z), -12, 12, epsabs=1e-15,
                           epsrel=1e-13, limit=400)[0]
    assert abs(e.item() - ref) <= 1e-11 * max(ref, 1e-300) + 1e-300
    assert abs(ed.item() - ref_d) <= 1e-11 * ref_d


def test_gabor_extreme_variances_finite():
    """No product of variances is formed: huge variances give tiny, finite, valid values."""
    g = nl.Gabor()
    v = torch.tensor([1e10, 1e150, 1e300], dtype=torch.float64)
    nngp, dot = g.dual(torch.full_like(v, 0.5), v, v, True)
    e, ed = g.self_map(v)
    for t in (nngp, dot, e, ed):
        assert torch.isfinite(t).all() and (t >= 0).all()
    # E[exp(-2u^2) sin(u)^2] = (1 - exp(-2v / (1 + 4v))) / (2 sqrt(1 + 4v)) (one-point form)
    for i, vv in enumerate((1e10, 1e150)):
        ref = -math.expm1(-2 * vv / (1 + 4 * vv)) / (2 * math.sqrt(1 + 4 * vv))
        assert abs(e[i].item() / ref - 1) < 1e-12
    assert e[2].item() > 0


def _expnorm_fn(gamma, shift, v):
    a = math.sqrt(2 * math.exp(gamma * (1 + shift)))
    s = math.sqrt(v)
    f = lambda u: s * a * math.sin(math.sqrt(gamma) * u / s + math.pi / 4)  # noqa: E731
    df = lambda u: a * math.sqrt(gamma) * math.cos(math.sqrt(gamma) * u / s + math.pi / 4)  # noqa
    return f, df


@pytest.mark.parametrize("gamma,shift", [(1.0, -1.0), (2.5, -0.3), (0.4, 0.2)])
@pytest.mark.parametrize("v1,v2,c", POINTS[:4])
def test_expnormalized_is_expectation_of_finite_function(gamma, shift, v1, v2, c):
    """The finite module at infinite width is y = sqrt(v) phi(u / sqrt(v)): its Gaussian
    expectation (quadrature) equals the dual map, and NT's formula written out here."""
    layer = nl.ExpNormalized(gamma, shift)
    rho = c / math.sqrt(v1 * v2)
    nngp, dot = layer.dual(_t(rho), _t(v1), _t(v2), True)
    f1, d1 = _expnorm_fn(gamma, shift, v1)
    f2, d2 = _expnorm_fn(gamma, shift, v2)
    ref = bivariate_expectation(f1, f2, v1, v2, c, kinks=())
    ref_d = bivariate_expectation(d1, d2, v1, v2, c, kinks=())
    nt = math.sqrt(v1 * v2) * math.exp(gamma * (c / math.sqrt(v1 * v2) + shift))
    assert abs(nngp.item() - nt) < 1e-13 * abs(nt)
    assert abs(dot.item() - gamma * math.exp(gamma * (rho + shift))) < 1e-13 * abs(dot.item())
    assert abs(nngp.item() - ref) < 1e-9 * max(abs(ref), 1e-3)
    assert abs(dot.item() - ref_d) < 1e-9 * max(abs(ref_d), 1e-3)


def test_expnormalized_self_map_and_validation():
    e, ed = nl.ExpNormalized(2.0, -0.5).self_map(_t(3.0))
    assert abs(e.item() - 3.0 * math.exp(1.0)) < 1e-14 * e.item()
    assert abs(ed.item() - 2.0 * math.exp(1.0)) < 1e-14 * ed.item()
    with pytest.raises(ValueError, match="gamma"):
        nl.ExpNormalized(gamma=-1.0)
    with pytest.raises(TypeError, match="do_clip"):
        nl.ExpNormalized(do_clip="yes")
    with pytest.raises(ValueError, match="not representable"):
        nl.ExpNormalized(gamma=1000.0, shift=0.0)


def test_finite_functions():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(nl.Gabor().fn(x), torch.exp(-x * x) * torch.sin(x))
    # ExpNormalized's module normalizes each example over the channel axis
    layer = nl.ExpNormalized(1.5, -0.7)
    mod, _ = layer.build((4,), None, False)
    h = torch.randn(3, 4, dtype=torch.float64)
    s = h.pow(2).mean(1, keepdim=True).sqrt()
    a = math.sqrt(2 * math.exp(1.5 * 0.3))
    torch.testing.assert_close(mod(h), s * a * torch.sin(math.sqrt(1.5) * h / s + math.pi / 4))
    assert torch.equal(mod(torch.zeros(2, 4, dtype=torch.float64)), torch.zeros(2, 4,
                                                                                 dtype=torch.float64))


class TestGaborMonteCarlo(KernelTestCase):
    widths = (16, 64, 256, 1024)

    def build(self):
        return nl.serial(nl.Dense(8, 1.5, 0.2), nl.Gabor(), nl.Dense(8, 2.0, 0.1), nl.Gabor(),
                         nl.Dense(1))


class TestExpNormalizedMonteCarlo(KernelTestCase):
    widths = (16, 64, 256, 1024)

    def build(self):
        return nl.serial(nl.Dense(8, 1.5, 0.2), nl.ExpNormalized(1.5, -0.8), nl.Dense(8, 1.2),
                         nl.ExpNormalized(), nl.Dense(1))
