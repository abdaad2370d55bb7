"""Fused Gabor and ExpNormalized dual maps (ntkit.layers._fused.gabor / exp_normalized) against
the torch path they replace (NTKIT_FUSED=0, itself checked against quadrature in
test_gabor_expnorm.py): whole networks (FC and conv + GAP, whose full pixel-pair
self-covariances go through the fused self-pair map), and the dual maps alone at extreme
variances and correlations at +-1."""
import math

import numpy as np
import pytest
import torch

from ntkit import layers as nl
from ntkit.layers import _fused
from tests._helpers import randn64

pytestmark = pytest.mark.skipif(not _fused.enabled(), reason="numba not installed")

ACTS = {"gabor": (nl.Gabor, (), "gabor"),
        "expnorm": (nl.ExpNormalized, (2.0, -0.5), "exp_normalized"),
        "expnorm_small_gamma": (nl.ExpNormalized, (0.3, 1.0), "exp_normalized")}


def _arch(act, conv):
    if conv:
        return nl.serial(nl.Conv(4, 3, padding="SAME", W_std=1.4, b_std=0.1), act,
                         nl.Conv(4, 3, padding="SAME", W_std=1.3), act, nl.GlobalAvgPool(),
                         nl.Dense(1))
    return nl.serial(nl.Dense(16, 1.5, 0.05), act, nl.Dense(16, 1.5, 0.05), act, nl.Dense(1))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _spy(monkeypatch, name):
    calls = []
    real = getattr(_fused, name)

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(_fused, name, spy)
    return calls


@pytest.mark.parametrize("conv", [False, True], ids=["fc", "conv_gap"])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_fused_matches_torch_path(monkeypatch, act, conv):
    """Random inputs at scales 1, 1e-4 and 1e4 (pre-activation variances ~1e-8 to 1e8), with
    x2 = None (exact batch diagonal) and given: fused == torch path to float64 roundoff."""
    cls, args, fname = ACTS[act]
    arch = _arch(cls(*args), conv)
    shape = (2, 5, 4) if conv else (6,)
    x1, x2 = randn64(4, *shape), randn64(3, *shape, seed=1)
    # (a fully-connected run of Dense and these layers goes through the fused FC chain)
    calls = _spy(monkeypatch, fname if conv else "fc_chain")
    for scale in (1.0, 1e-4, 1e4):
        for pair in ((x1 * scale, None), (x1 * scale, x2 * scale)):
            monkeypatch.setenv("NTKIT_FUSED", "0")
            ref = arch.kernel(*pair, dtype=torch.float64)
            assert not calls
            monkeypatch.setenv("NTKIT_FUSED", "1")
            got = arch.kernel(*pair, dtype=torch.float64)
            assert calls
            calls.clear()
            assert _rel(got.nngp, ref.nngp) < 1e-13 and _rel(got.ntk, ref.ntk) < 1e-13
            if pair[1] is None:
                assert torch.equal(got.ntk, got.ntk.T) and torch.equal(got.nngp, got.nngp.T)


def _extreme_inputs(dtype):
    """Variances over many decades (and 0) paired with every other; covariances at
    correlation 0, +-0.3, +-(1 - a few ulp), +-1 and just beyond +-1 (clipped)."""
    v = torch.tensor([0.0, 1e-8, 1e-3, 0.7, 1.0, 3.0, 1e3, 1e8], dtype=torch.float64)
    if dtype == torch.float64:
        v = torch.cat([v, torch.tensor([1e-150, 1e150, 1e300], dtype=torch.float64)])
    eps = torch.finfo(dtype).eps
    rho = torch.tensor([0.0, 0.3, -0.3, 1 - 2 * eps, -(1 - 2 * eps), 1 - 64 * eps, 1.0, -1.0,
                        1 + eps, 0.999], dtype=torch.float64)
    n = v.numel()
    v1 = v.repeat_interleave(rho.numel())
    r1 = rho.repeat(n)
    c = (r1[:, None] * v1.sqrt()[:, None]) * v.sqrt()[None, :]  # (n * nrho, n)
    return c.to(dtype), v1.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_dual_map_extremes_entrywise(act, dtype, tol):
    """Each entry (not only the largest) agrees with the torch path's ``cross``, relative to
    itself, in both modes (ntk given; dot alone)."""
    cls, args, fname = ACTS[act]
    layer = cls(*args)
    c, v1, v2 = _extreme_inputs(dtype)
    ntk = torch.rand(c.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ntk = ntk.to(dtype) + 0.5
    kw = {} if not args else {"gamma": args[0], "shift": args[1]}
    fused = getattr(_fused, fname)
    out, nt = fused(c, v1, v2, ntk, False, True, **kw)
    out1, dot = fused(c, v1, v2, None, True, True, **kw)
    out2, none = fused(c, v1, v2, None, False, True, **kw)
    ref, ref_dot = layer.cross(c, v1[:, None], v2[None, :], True)
    assert none is None and torch.equal(out, out1) and torch.equal(out, out2)
    tiny = torch.finfo(dtype).tiny
    for a, b in ((out, ref), (dot, ref_dot), (nt, ntk * ref_dot)):
        assert torch.isfinite(a).all()
        err = (a.double() - b.double()).abs()
        assert (err <= tol * b.double().abs() + 1e3 * tiny).all(), float(
            (err / b.double().abs().clamp_min(tiny)).max())


def test_self_pairs_full_layout():
    """The full pixel-pair self map: entries (i, p, i, q) of the cross map of x with itself."""
    v = torch.rand(3, 2, 3, dtype=torch.float64) + 0.5
    g = randn64(3, 6, 6)
    cov = (g @ g.transpose(1, 2) / 6).reshape(3, 2, 3, 2, 3)  # PSD per example
    v = cov.reshape(3, 6, 6).diagonal(dim1=1, dim2=2).reshape(3, 2, 3)
    for fn, kw in ((_fused.gabor, {}), (_fused.exp_normalized, {"gamma": 1.5, "shift": -0.2})):
        out, d = fn(cov, v, v, None, True, True, self_pairs=True, **kw)
        layer = nl.Gabor() if not kw else nl.ExpNormalized(**kw)
        ref, ref_d = layer.cross(cov, v[:, :, :, None, None], v[:, None, None, :, :], True)
        assert _rel(out, ref) < 1e-14 and _rel(d, ref_d) < 1e-14


def test_float32_close_to_float64():
    x = randn64(5, 6)
    for act in (nl.Gabor(), nl.ExpNormalized(1.5, -0.8)):
        arch = _arch(act, False)
        k64 = arch.kernel(x, dtype=torch.float64)
        k32 = arch.kernel(x, dtype=torch.float32)
        assert _rel(k32.nngp.double(), k64.nngp) < 2e-6 and _rel(k32.ntk.double(), k64.ntk) < 2e-6


@pytest.mark.parametrize("name,lo,hi,ref", [
    ("EXP_TAYLOR", -0.5, 0.5, lambda z: np.exp(z)),
    ("SINH_TAYLOR", -0.5, 0.5, lambda b: np.sinh(b) / np.where(b == 0, 1, b) + (b == 0)),
    ("COSH_TAYLOR", -0.5, 0.5, np.cosh)])
def test_gabor_polynomials(name, lo, hi, ref):
    """The Taylor polynomials of the Gabor kernel on twice the ranges they are used on
    (exp: z = 1/2 - X, X in [0, 1]; sinh(B) / B and cosh(B) for |B| <= 1/2), in t^2 for the
    hyperbolic ones, against numpy, in float64."""
    from ntkit.layers import _fused_kernels as fk
    coef = getattr(fk, name)
    x = np.linspace(lo, hi, 20001)
    arg = x if name == "EXP_TAYLOR" else x * x
    u = np.zeros_like(x)
    for a in coef:
        u = u * arg + a
    assert np.max(np.abs(u / ref(x) - 1)) < 4e-16


def test_gabor_argument_bounds():
    """The ranges the polynomials rely on: 0 <= X <= 1/2 and |B| <= 1/4 for t = 1 - u in
    [0, 1] and any correlation (random and corner values, float64)."""
    g = np.random.default_rng(0)
    t1, t2 = (np.concatenate([g.random(200000), [0, 1, 1, 0.5]]) for _ in range(2))
    rho = np.concatenate([g.uniform(-1, 1, 200000), [1, -1, 1, 1]])
    u1, u2 = 1 - t1, 1 - t2
    om = (1 - rho) * (1 + rho)
    w2 = np.maximum(om * t1 * t2 + (u1 + t1 * u2), np.finfo(float).tiny)
    x = ((t1 * u2 + t2 * u1) / 4 + t1 * t2 * om / 2) / w2
    b = rho * np.sqrt(t1 * t2 * u1 * u2) / (2 * w2)
    assert x.min() >= 0 and x.max() <= 0.5 + 1e-15 and np.abs(b).max() <= 0.25 + 1e-15
    assert x.max() > 0.4 and np.abs(b).max() > 0.2  # the bounds are nearly reached


def test_fused_results_do_not_depend_on_threads(monkeypatch):
    monkeypatch.setenv("NTKIT_FUSED", "1")
    x = randn64(9, 6)
    prev = torch.get_num_threads()
    for act in (nl.Gabor(), nl.ExpNormalized()):
        arch = _arch(act, False)
        try:
            torch.set_num_threads(1)
            k1 = arch.kernel(x)
            torch.set_num_threads(2)
            k2 = arch.kernel(x)
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(k1.ntk, k2.ntk) and torch.equal(k1.nngp, k2.nngp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fexp_matches_numpy(dtype):
    """The library-call-free exp of the ExpNormalized kernel (fexp), through the kernel with
    unit variances (nngp' = exp((rho + shift) gamma)): within 1 ulp of numpy's exp (in float64,
    rounded to the dtype) over the whole range, subnormal results within one subnormal unit,
    exactly 0 / inf beyond it."""
    f32 = dtype == torch.float32
    gamma, shift = (103.0, -0.07) if f32 else (740.0, -0.03)  # x from below XLO to above XHI
    rho = torch.cat([torch.linspace(-1 + 1e-6, 1 - 1e-6, 200001, dtype=dtype),
                     torch.linspace(-0.01, 0.01, 2001, dtype=dtype) - shift])
    one = torch.ones(1, dtype=dtype)
    got, _ = _fused.exp_normalized(rho[:, None], torch.ones(rho.numel(), dtype=dtype), one,
                                   None, False, True, gamma=gamma, shift=shift)
    x = ((rho + shift) * gamma).numpy()  # the kernel's argument, rounded the same way
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(x.dtype).astype(np.float64)
    got = got[:, 0].double().numpy()
    info = np.finfo(x.dtype)
    normal = np.isfinite(ref) & (ref >= info.tiny)
    assert np.max(np.abs(got[normal] / ref[normal] - 1)) <= 1.01 * info.eps
    sub = ~normal & np.isfinite(ref)
    assert np.max(np.abs(got[sub] - ref[sub])) <= float(info.smallest_subnormal)
    assert np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    assert (ref[sub] == 0).any() and np.isinf(ref).any() and (ref[sub] > 0).any()
    sat, _ = _fused.exp_normalized(rho[:, None], torch.ones(rho.numel(), dtype=dtype), one,
                                   None, False, True, gamma=1e30, shift=-0.5)
    assert torch.equal(sat[:, 0], torch.where(rho > 0.5, math.inf, 0.0).to(dtype))
