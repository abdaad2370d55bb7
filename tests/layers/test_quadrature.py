"""Elementwise(fn) quadrature (no closed form): the stated accuracy ``rtol`` is reached
automatically at variances 0.01..30 and correlations in [-1, 1] (exactly +-1 included), for
the NNGP and the NTK term, against independent references: the closed-form layers (Erf, Sin,
Gelu) on a vectorized grid, and nested adaptive scipy quadrature of the Gaussian expectation
(written here) for tanh / softplus. Kinked functions warn once and stay within a bounded
error. The fixed Gauss-Hermite rule (``deg=96``) failed these at variances >~ 3."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ntkit import layers as nl
from ntkit.layers.activations import _trap_plan

f64 = torch.float64
VARS = (0.01, 0.3, 1.0, 3.0, 10.0, 30.0)
RHOS = (-1.0, -0.999, -0.7, -0.2, 0.0, 0.4, 0.9, 0.99999, 1.0)


def _grid():
    """All (v1, v2, rho) combinations, flat float64 tensors (unequal variances included)."""
    v1, v2, r = torch.meshgrid(torch.tensor(VARS, dtype=f64), torch.tensor(VARS, dtype=f64),
                               torch.tensor(RHOS, dtype=f64), indexing="ij")
    return r.reshape(-1), v1.reshape(-1), v2.reshape(-1)


def _normalized_errors(layer, ref, rho, v1, v2):
    """max |err| / sqrt(E[f(u)^2] E[f(v)^2]) for the NNGP and the NTK term (the scale from
    the reference's own one-point map)."""
    q, qd = layer.dual(rho, v1, v2, True)
    e, ed = ref.dual(rho, v1, v2, True)
    s1, sd1 = ref.self_map(v1)
    s2, sd2 = ref.self_map(v2)
    return (float(((q - e).abs() / (s1 * s2).sqrt()).max()),
            float(((qd - ed).abs() / (sd1 * sd2).sqrt()).max()))


CLOSED = {
    "erf": (lambda: torch.erf, nl.Erf()),
    "erf_steep": (lambda: (lambda x: 0.7 * torch.erf(1.8 * x) + 0.2), nl.Erf(0.7, 1.8, 0.2)),
    "sin": (lambda: torch.sin, nl.Sin()),
    "gelu": (lambda: F.gelu, nl.Gelu()),
}


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_matches_closed_form_layers_to_rtol(name):
    fn, ref = CLOSED[name]
    rho, v1, v2 = _grid()
    for rtol in (1e-10, 1e-6):
        en, ed = _normalized_errors(nl.Elementwise(fn(), rtol=rtol), ref, rho, v1, v2)
        assert en <= rtol and ed <= rtol, (name, rtol, en, ed)


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_one_point_map_matches_closed_form(name):
    fn, ref = CLOSED[name]
    v = torch.tensor(VARS, dtype=f64)
    e, ed = nl.Elementwise(fn()).self_map(v)
    r, rd = ref.self_map(v)
    assert float(((e - r).abs() / r).max()) <= 1e-10
    assert float(((ed - rd).abs() / rd).max()) <= 1e-10


def test_user_derivative_path_matches_closed_form():
    """``df=`` given: f and f' on their own grids (no shared autograd pass)."""
    rho, v1, v2 = _grid()
    d_erf = lambda x: (2 / math.sqrt(math.pi)) * torch.exp(-x * x)  # noqa: E731
    en, ed = _normalized_errors(nl.Elementwise(torch.erf, df=d_erf), nl.Erf(), rho, v1, v2)
    assert en <= 1e-10 and ed <= 1e-10


# --- independent adaptive reference (scipy) for functions without a closed form ----------

def _expectation(f, g, v1, v2, rho, kinks=()):
    """E[f(u) g(v)], (u, v) ~ N(0, [[v1, c], [c, v2]]), c = rho sqrt(v1 v2): nested
    scipy.integrate.quad over u = s1 z1, v = s2 (rho z1 + sqrt(1 - rho^2) z2) (1-D at
    |rho| = 1), break points at the kinks."""
    from scipy import integrate
    s1, s2 = math.sqrt(v1), math.sqrt(v2)
    r = math.sqrt(max(0.0, (1 - rho) * (1 + rho)))
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    opts = dict(limit=200, epsabs=1e-14, epsrel=1e-13)
    lim = 12.0
    if r == 0.0:
        pts = sorted({k / s1 for k in kinks} | {k / (s2 * rho) for k in kinks}) or None
        return integrate.quad(lambda z: f(s1 * z) * g(s2 * rho * z) * phi(z), -lim, lim,
                              points=pts, **opts)[0]

    def inner(z1):
        pts = [(k / s2 - rho * z1) / r for k in kinks]
        pts = [p for p in pts if abs(p) < lim] or None
        return integrate.quad(lambda z2: g(s2 * (rho * z1 + r * z2)) * phi(z2), -lim, lim,
                              points=pts, **opts)[0]

    pts = [k / s1 for k in kinks] or None
    return integrate.quad(lambda z1: f(s1 * z1) * inner(z1) * phi(z1), -lim, lim,
                          points=pts, **opts)[0]


def _sig(x):
    return 0.5 * (1 + math.tanh(x / 2))


PY = {  # name: (torch fn, python f, python f')
    "tanh": (torch.tanh, math.tanh, lambda x: 1 - math.tanh(x) ** 2),
    "softplus": (F.softplus, lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x))), _sig),
}


@pytest.mark.parametrize("name,v1,v2,rho", [
    ("tanh", 3.0, 3.0, 0.5),        # the case: deg=96 gave 1e-7 / 2e-6
    ("tanh", 10.0, 10.0, 0.7),      # deg=96: 8e-5 / 3e-3
    ("tanh", 30.0, 30.0, 1.0),      # exactly on the diagonal
    ("tanh", 0.01, 30.0, -0.95),
    ("softplus", 20.0, 5.0, 0.9),
])
def test_matches_adaptive_scipy_reference(name, v1, v2, rho):
    tf, f, df = PY[name]
    t = lambda x: torch.tensor([x], dtype=f64)  # noqa: E731
    q, qd = nl.Elementwise(tf).dual(t(rho), t(v1), t(v2), True)
    for got, g in ((q, f), (qd, df)):
        ref = _expectation(g, g, v1, v2, rho)
        scale = math.sqrt(_expectation(g, g, v1, v1, 1.0) * _expectation(g, g, v2, v2, 1.0))
        assert abs(float(got) - ref) <= 1e-10 * scale, (name, float(got), ref)


def test_full_kernel_matches_erf_at_large_variance():
    """Through a whole network (two-point maps, exact diagonal, NTK recursion) at
    pre-activation variances ~10..20, where deg=96 was off by ~1e-4."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 3, generator=g, dtype=f64), torch.randn(4, 3, generator=g, dtype=f64)
    mk = lambda act: nl.serial(nl.Dense(8, 2.5, 0.3), act, nl.Dense(8, 3.0), act,  # noqa: E731
                               nl.Dense(1))
    for b in (None, x2):
        k, ref = mk(nl.Elementwise(torch.erf)).kernel(x1, b), mk(nl.Erf()).kernel(x1, b)
        torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-10, atol=1e-10)


def test_image_kernel_pixel_pairs_match_erf():
    """Full pixel-pair covariances (chunked spatial path, exact pixel diagonal) on images."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=f64)
    mk = lambda act: nl.serial(nl.Conv(4, 3, padding="SAME", W_std=2.0, b_std=0.1),  # noqa: E731
                               act, nl.Conv(4, 3, padding="SAME", W_std=1.5), act, nl.Flatten(),
                               nl.Dense(1))
    k, ref = mk(nl.Elementwise(torch.erf)).kernel(x), mk(nl.Erf()).kernel(x)
    torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-10, atol=1e-11)


def test_entries_do_not_depend_on_their_neighbours():
    """Each entry's rule depends only on its own variances (half-octave buckets), not on the
    other entries of the call (chunking/tiling does not change the numbers)."""
    rho, v1, v2 = _grid()
    ew = nl.Elementwise(torch.tanh)
    q, qd = ew.dual(rho, v1, v2, True)
    for i in (0, 17, len(rho) - 1):
        a, ad = ew.dual(rho[i:i + 1], v1[i:i + 1], v2[i:i + 1], True)
        torch.testing.assert_close(a, q[i:i + 1], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(ad, qd[i:i + 1], rtol=1e-14, atol=1e-15)


def test_cost_follows_variance_and_rtol():
    """The node count grows with the variance (steeper integrand) and shrinks with a looser
    rtol; at variance ~1 it is far below the old fixed 96 x 96 rule."""
    n = lambda s, tol: round(2 * _trap_plan(torch.tanh, s, tol, "tanh")[1]  # noqa: E731
                             / _trap_plan(torch.tanh, s, tol, "tanh")[0]) + 1
    assert n(1.0, 1e-10) < 60 < n(math.sqrt(30), 1e-10)
    assert n(math.sqrt(30), 1e-6) < n(math.sqrt(30), 1e-10)


# --- kinks, overrides, validation ---------------------------------------------------------

@pytest.mark.parametrize("fn,f,df,kinks", [
    (F.elu, lambda x: x if x > 0 else math.expm1(x), lambda x: 1.0 if x > 0 else math.exp(x),
     (0.0,)),
    (F.hardtanh, lambda x: max(-1.0, min(1.0, x)), lambda x: 1.0 if abs(x) < 1 else 0.0,
     (-1.0, 1.0)),
])
def test_kinked_function_warns_once_with_bounded_error(fn, f, df, kinks):
    ew = nl.Elementwise(fn)
    t = lambda x: torch.tensor([x], dtype=f64)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="kink") as rec:
        q, qd = ew.dual(t(0.6), t(2.0), t(1.5), True)
    assert len(rec) == 1 and "NNGP ~" in str(rec[0].message) and "NTK ~" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ew.dual(t(0.3), t(2.0), t(1.5), True)          # once per layer
    # algebraic convergence at the node cap: the kink (NNGP) O(h^2), the jump of f' (NTK) O(h)
    for got, g, bound in ((q, f, 1e-3), (qd, df, 3e-2)):
        ref = _expectation(g, g, 2.0, 1.5, 0.6, kinks)
        scale = math.sqrt(_expectation(g, g, 2.0, 2.0, 1.0, kinks)
                          * _expectation(g, g, 1.5, 1.5, 1.0, kinks))
        assert abs(float(got) - ref) <= bound * scale


def test_deg_override_keeps_gauss_hermite():
    ew = nl.Elementwise(torch.erf, deg=96)
    assert repr(ew).endswith("deg=96)") and repr(nl.Elementwise(torch.erf)).endswith(
        "rtol=1e-10)")
    t = lambda x: torch.tensor([x], dtype=f64)  # noqa: E731
    q, qd = ew.dual(t(0.4), t(1.2), t(0.8), True)
    e, ed = nl.Erf().dual(t(0.4), t(1.2), t(0.8), True)
    assert float(q) == pytest.approx(float(e), rel=1e-10)
    assert float(qd) == pytest.approx(float(ed), rel=1e-10)
    # and it is really the fixed rule: a tiny degree is visibly inaccurate
    q2, _ = nl.Elementwise(torch.erf, deg=4).dual(t(0.4), t(1.2), t(0.8), True)
    assert abs(float(q2) - float(e)) > 1e-6


def test_float32_reaches_float32_accuracy():
    rho, v1, v2 = _grid()
    ew = nl.Elementwise(torch.erf)
    q, qd = ew.dual(rho.float(), v1.float(), v2.float(), True)
    e, ed = nl.Erf().dual(rho, v1, v2, True)
    s1, s2 = nl.Erf().self_map(v1)[0], nl.Erf().self_map(v2)[0]
    assert q.dtype == torch.float32
    assert float(((q.double() - e).abs() / (s1 * s2).sqrt()).max()) < 1e-5


@pytest.mark.parametrize("bad", [0.0, 1e-16, 0.5, float("nan"), "1e-8"])
def test_bad_rtol(bad):
    with pytest.raises((TypeError, ValueError), match="rtol"):
        nl.Elementwise(torch.tanh, rtol=bad)


def test_non_finite_variance_gives_nan_not_a_number():
    ew = nl.Elementwise(torch.tanh)
    q, qd = ew.dual(torch.tensor([0.5, 0.5], dtype=f64), torch.tensor([1.0, float("nan")],
                    dtype=f64), torch.tensor([1.0, 1.0], dtype=f64), True)
    assert torch.isfinite(q[0]) and torch.isnan(q[1]) and torch.isnan(qd[1])
