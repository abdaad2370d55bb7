"""Random feature maps (ntkit.features) against the exact kernels they approximate.

Oracles: the exact NNGP/NTK of the same architecture (float64); the 1/sqrt(dim) Monte Carlo rate
(fitted slope); unbiasedness (the mean over seeds converges like 1/sqrt(seeds)); closed-form
ridge regression.
"""
import math

import numpy as np
import pytest
import torch

from ntkit import features as nf
from ntkit import layers as nl

F64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _gram(arch, x, dim, get, seed, **kw):
    p = nf.features(arch, x, dim, get=get, dtype=F64, seed=seed, **kw)
    return p @ p.T


def _fc():
    return nl.serial(nl.Dense(64, W_std=1.4, b_std=0.1), nl.Relu(),
                     nl.Dense(64, W_std=1.4, b_std=0.1), nl.Relu(), nl.Dense(1))


def _cnn(top):
    return nl.serial(nl.Conv(16, 3, padding="SAME", W_std=1.4, b_std=0.1), nl.Relu(),
                     nl.Conv(16, 3, padding="SAME", W_std=1.4), nl.Relu(), top, nl.Dense(1))


CASES = {
    "fc": (_fc, lambda g: torch.randn(16, 6, generator=g, dtype=F64)),
    "cnn-flatten": (lambda: _cnn(nl.Flatten()),
                    lambda g: torch.randn(5, 3, 5, 5, generator=g, dtype=F64)),
    "cnn-gap": (lambda: _cnn(nl.GlobalAvgPool()),
                lambda g: torch.randn(5, 3, 5, 5, generator=g, dtype=F64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_error_falls_like_dim_to_the_minus_half(case, get):
    build, data = CASES[case]
    arch, x = build(), data(torch.Generator().manual_seed(0))
    exact = arch.kernel(x, get=get)
    dims = [16, 64, 256, 1024] if case == "fc" else [8, 32, 128, 512]
    errs = [np.mean([_rel(_gram(arch, x, d, get, s), exact) for s in range(6)]) for d in dims]
    slope = np.polyfit(np.log(dims), np.log(errs), 1)[0]
    assert -0.75 < slope < -0.3, (errs, slope)
    assert errs[-1] < 0.12, errs


@pytest.mark.parametrize("arch", [
    nl.serial(nl.Dense(8, W_std=1.3, b_std=0.3), nl.Relu(), nl.Dense(1, b_std=0.1)),
    nl.serial(nl.Dense(8, W_std=1.3, b_std=0.3), nl.Erf(), nl.Dense(1)),
    nl.serial(nl.Conv(4, 3, padding="SAME", W_std=1.3, b_std=0.2), nl.Relu(), nl.AvgPool(2, 2),
              nl.GlobalAvgPool(), nl.Dense(1)),
], ids=["relu", "erf", "conv-gap"])
def test_one_hidden_layer_features_are_unbiased(arch):
    """Averaging S independent feature kernels must shrink the error like 1/sqrt(S): a biased
    estimator would stall at its bias."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 3, 4, 4, generator=g, dtype=F64) if isinstance(arch.layers[0], nl.Conv)
         else torch.randn(8, 5, generator=g, dtype=F64))
    k = arch.kernel(x)
    S = 256
    for get in ("nngp", "ntk"):
        grams = [_gram(arch, x, 64, get, s) for s in range(S)]
        rms = math.sqrt(np.mean([_rel(gm, getattr(k, get)) ** 2 for gm in grams]))
        mean_err = _rel(sum(grams) / S, getattr(k, get))
        # unbiased: ~ rms / sqrt(S) (measured 0.6x that); a bias of 1/40 of the kernel (e.g. a
        # dropped b_std^2 in the tangent) gives ~2x and fails
        assert mean_err < 1.5 * rms / math.sqrt(S), (get, rms, mean_err)


def test_every_activation_matches_its_dual_map():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 4, generator=g, dtype=F64)
    acts = [nl.Relu(), nl.LeakyRelu(0.2), nl.Abs(), nl.Erf(), nl.Gelu(), nl.Sin(), nl.Cos(),
            nl.Gaussian(), nl.Monomial(2), nl.RectifiedMonomial(2), nl.Sigmoid_like(),
            nl.Elementwise(torch.tanh)]
    for act in acts:
        arch = nl.serial(nl.Dense(8, W_std=1.2, b_std=0.2), act, nl.Dense(8, W_std=1.1), act,
                         nl.Dense(1))
        k = arch.kernel(x)
        errs = {}
        for dim in (64, 4096):   # Monte Carlo: 64x the width, ~1/8 the error; a wrong map stalls
            r = [nf.features(arch, x, dim, get=("nngp", "ntk"), dtype=F64, seed=s)
                 for s in range(2)]
            for get in ("nngp", "ntk"):
                errs[get, dim] = np.mean([_rel(q[get] @ q[get].T, getattr(k, get)) for q in r])
        for get in ("nngp", "ntk"):
            assert errs[get, 4096] < min(0.12, errs[get, 64] / 3), (act, errs)


def test_residual_layernorm_concat_and_pooling_compose():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 6, 6, generator=g, dtype=F64)
    block = nl.serial(nl.FanOut(2), nl.parallel(nl.Identity(), nl.serial(
        nl.Relu(), nl.Conv(8, 3, padding="SAME", W_std=1.3))), nl.FanInSum())
    arch = nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.3, b_std=0.1), block,
                     nl.LayerNorm(), nl.Relu(), nl.SumPool(2, 2),
                     nl.FanOut(2), nl.parallel(nl.Conv(4, 1), nl.Conv(12, 1, W_std=0.8)),
                     nl.FanInConcat(), nl.Gelu(), nl.GlobalAvgPool(), nl.Dense(1, b_std=0.3))
    k = arch.kernel(x)
    for get in ("nngp", "ntk"):
        errs = [np.mean([_rel(_gram(arch, x, d, get, s), getattr(k, get)) for s in range(3)])
                for d in (16, 1024)]
        assert errs[1] < 0.1 and errs[1] < errs[0] / 3, (get, errs)


def test_reproducible_from_seed_and_independent_of_chunking():
    arch, x = CASES["cnn-gap"][0](), CASES["cnn-gap"][1](torch.Generator().manual_seed(4))
    a = nf.features(arch, x, 32, dtype=F64, seed=7)
    b = nf.features(arch, x, 32, dtype=F64, seed=7, chunk=2)
    c = nf.features(arch, x[3:], 32, dtype=F64, seed=7)
    d = nf.features(arch, x, 32, dtype=F64, seed=8)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a[3:], c, rtol=1e-12, atol=1e-12)
    assert (a - d).abs().max() > 1e-3


def test_float32_default_and_float64_agree():
    arch, x = _fc(), torch.randn(10, 6, dtype=F64)
    p32 = nf.features(arch, x, 256, seed=0)
    p64 = nf.features(arch, x, 256, seed=0, dtype=F64)
    assert p32.dtype == torch.float32 and p64.dtype == F64
    assert _rel(p32.double() @ p32.double().T, p64 @ p64.T) < 1e-5


def test_count_sketch_out_dim_is_unbiased_and_exact_size():
    arch = CASES["cnn-flatten"][0]()
    x = CASES["cnn-flatten"][1](torch.Generator().manual_seed(5))
    full = nf.features(arch, x, 32, dtype=F64, seed=0)
    assert full.shape[1] > 300
    exact = full @ full.T
    sk = [nf.features(arch, x, 32, dtype=F64, seed=0, out_dim=300) for _ in range(1)]
    assert sk[0].shape == (5, 300)
    # unbiased over sketch seeds: vary the seed of the sketch only by comparing with the same
    # features (the sketch seed follows `seed`, so compare to each seed's own full features)
    errs, grams = [], []
    for s in range(40):
        f = nf.features(arch, x, 32, dtype=F64, seed=s)
        sks = nf.features(arch, x, 32, dtype=F64, seed=s, out_dim=300)
        grams.append(sks @ sks.T - f @ f.T)
        errs.append(float((grams[-1]).norm() / (f @ f.T).norm()))
    assert float((sum(grams) / 40).norm() / exact.norm()) < 2.5 * np.mean(errs) / math.sqrt(40)


def test_refusals_name_the_problem():
    x = torch.randn(4, 3)
    with pytest.raises(NotImplementedError, match="standard"):
        nf.features(nl.serial(nl.Dense(8, parameterization="standard"), nl.Relu(),
                              nl.Dense(1)), x, 8)
    with pytest.raises(ValueError, match="Flatten"):
        nf.features(nl.serial(nl.Conv(4, 3), nl.Relu()), torch.randn(2, 1, 5, 5), 8)
    with pytest.raises(ValueError, match="method"):
        nf.features(_fc(), x, 8, method="sketch")
    with pytest.raises(ValueError, match="dim"):
        nf.features(_fc(), x, 0)
    with pytest.raises(ValueError, match="memory_budget"):
        nf.features(_fc(), x, 8, memory_budget=float("nan"))
    with pytest.raises(ValueError, match="overflow"):     # exp(exp(.)) of large inputs
        nf.features(nl.serial(nl.Dense(8, W_std=3.0), nl.Exp(), nl.Dense(8, W_std=3.0),
                              nl.Exp(), nl.Dense(1)), 30 * x, 8)

    class Custom(nl.Layer):
        def kernel_map(self, k):
            return k
    with pytest.raises(NotImplementedError, match="Custom"):
        nf.features(nl.serial(nl.Dense(4), Custom(), nl.Dense(1)), x, 8)


def test_arch_features_method_and_feature_dim():
    arch, x = _fc(), torch.randn(3, 6)
    torch.testing.assert_close(arch.features(x, 16, seed=1), nf.features(arch, x, 16, seed=1))
    # readout Dense(1) without bias: [W phi (16), W psi (16)]
    assert nf.feature_dim(arch, 6, 16, "ntk") == arch.features(x, 16).shape[1] == 2 * 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    arch, x = CASES["cnn-gap"][0](), CASES["cnn-gap"][1](torch.Generator().manual_seed(6))
    a = nf.features(arch, x, 64, dtype=F64, seed=0)
    b = nf.features(arch, x.cuda(), 64, dtype=F64, seed=0)
    assert b.is_cuda
    torch.testing.assert_close(a, b.cpu(), rtol=1e-9, atol=1e-9)


# ---- ridge ----------------------------------------------------------------------------

def test_ridge_matches_the_closed_form_and_picks_the_best_validation_score():
    g = torch.Generator().manual_seed(7)
    phi = torch.randn(200, 12, generator=g, dtype=F64)
    w_true = torch.randn(12, 3, generator=g, dtype=F64)
    y = phi @ w_true + 0.5 * torch.randn(200, 3, generator=g, dtype=F64)
    for r in (1e-3, 1.0):
        fit = nf.ridge(phi, y, r, relative=False)
        w = torch.linalg.solve(phi.T @ phi + r * torch.eye(12, dtype=F64), phi.T @ y)
        torch.testing.assert_close(fit.weights, w, rtol=1e-10, atol=1e-10)
    # intercept: closed form on centred data
    fit = nf.ridge(phi + 3.0, y + 1.0, 0.1, relative=False, fit_intercept=True)
    pc, yc = phi - phi.mean(0), y - y.mean(0)
    w = torch.linalg.solve(pc.T @ pc + 0.1 * torch.eye(12, dtype=F64), pc.T @ yc)
    torch.testing.assert_close(fit.weights, w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fit.predict(phi + 3.0), pc @ w + (y + 1.0).mean(0), rtol=1e-9,
                               atol=1e-9)
    # validation choice equals brute force over the same grid
    pv, yv = phi[:50] + 0.1, y[:50]
    grid = [1e-4, 1e-2, 1.0, 100.0]
    fit = nf.ridge(phi[50:], y[50:], grid, phi_val=pv, y_val=yv)
    scale = float(torch.diagonal(phi[50:].T @ phi[50:]).mean())
    brute = {}
    for r in grid:
        w = torch.linalg.solve(phi[50:].T @ phi[50:] + r * scale * torch.eye(12, dtype=F64),
                               phi[50:].T @ y[50:])
        brute[r] = float(((pv @ w - yv) ** 2).mean())
    assert fit.scores.keys() == brute.keys()
    for r in grid:
        assert fit.scores[r] == pytest.approx(brute[r], rel=1e-9)
    assert fit.ridge == pytest.approx(min(brute, key=brute.get) * scale)


def test_dual_ridge_equals_the_primal_and_interpolates_at_zero():
    """n < D: the dual (n x n) solve gives the primal's weights, validation scores and chosen
    ridge (w = phi^T (phi phi^T + r)^-1 y = (phi^T phi + r)^-1 phi^T y for r > 0), with and
    without an intercept; at ridge 0 it is the minimum-norm interpolant (phi w = y, w in the
    row space of phi), where the primal system is singular."""
    g = torch.Generator().manual_seed(11)
    phi = torch.randn(30, 80, generator=g, dtype=F64)
    y = torch.randn(30, 2, generator=g, dtype=F64)
    pv, yv = torch.randn(10, 80, generator=g, dtype=F64), torch.randn(10, 2, generator=g,
                                                                       dtype=F64)
    grid = [1e-3, 1e-1, 10.0]
    for fi in (False, True):
        kw = dict(phi_val=pv, y_val=yv, fit_intercept=fi)
        fp = nf.ridge(phi + 2.0, y, grid, solver="primal", **kw)
        fd = nf.ridge(phi + 2.0, y, grid, solver="dual", **kw)
        fa = nf.ridge(phi + 2.0, y, grid, **kw)          # auto: n < D -> dual
        torch.testing.assert_close(fd.weights, fp.weights, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(fd.intercept, fp.intercept, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(fa.weights, fd.weights, rtol=0, atol=0)
        assert fd.ridge == pytest.approx(fp.ridge, rel=1e-12)
        for r in grid:
            assert fd.scores[r] == pytest.approx(fp.scores[r], rel=1e-9)
    fit = nf.ridge(phi, y, 0.0, relative=False, solver="dual")
    torch.testing.assert_close(phi @ fit.weights, y, rtol=1e-8, atol=1e-8)
    w_min = torch.linalg.pinv(phi) @ y
    torch.testing.assert_close(fit.weights, w_min, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="solver"):
        nf.ridge(phi, y, solver="qr")
    # singular systems at ridge 0 -- one duplicated row (dual), one repeated column (primal):
    # refused, not huge weights. The null eigenvalue comes out of eigh as roundoff of either
    # sign; this seed gives a positive one in both (a check for `<= 0` alone would pass it).
    g2 = torch.Generator().manual_seed(2)
    p1 = torch.randn(30, 80, generator=g2, dtype=F64)
    p2 = torch.randn(100, 11, generator=g2, dtype=F64)
    for ph, solver in ((torch.cat([p1, p1[:1]]), "dual"),
                       (torch.cat([p2, p2[:, :1]], 1), "primal")):
        with pytest.raises(ValueError, match="singular"):
            nf.ridge(ph, torch.randn(len(ph), 2, generator=g, dtype=F64), 0.0, relative=False,
                     solver=solver)


def test_ridge_refuses_bad_input():
    phi, y = torch.randn(10, 3), torch.randn(10)
    with pytest.raises(ValueError, match="validation"):
        nf.ridge(phi, y, [0.1, 1.0])
    with pytest.raises(ValueError, match="rows"):
        nf.ridge(phi, torch.randn(9))
    with pytest.raises(ValueError, match="ridge"):
        nf.ridge(phi, y, -1.0)
    with pytest.raises(ValueError, match="y_val"):
        nf.ridge(phi, y, phi_val=phi)


def test_features_plus_ridge_approach_kernel_regression():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(120, 4, generator=g, dtype=F64)
    y = torch.sin(x @ torch.randn(4, 1, generator=g, dtype=F64))
    arch = _fc()
    k = arch.kernel(x, get="ntk")
    r = 1e-2
    scale_k = float(torch.diagonal(k).mean())
    alpha = torch.linalg.solve(k[:80, :80] + r * scale_k * torch.eye(80, dtype=F64), y[:80])
    exact = k[80:, :80] @ alpha
    diffs = []
    for dim in (64, 2048):
        phi = nf.features(arch, x, dim, dtype=F64, seed=0)
        # the primal ridge with absolute value r * mean diag(K) equals kernel ridge on phi phi^T
        fit = nf.ridge(phi[:80], y[:80], r * float((phi[:80] ** 2).sum(1).mean()),
                       relative=False)
        diffs.append(_rel(fit.predict(phi[80:]), exact))
    assert diffs[1] < 0.25 and diffs[1] < diffs[0] / 3, diffs     # ~ 1/sqrt(32) = 1/5.7


def test_layernorm_over_channels_and_pixels():
    """NT's LayerNorm(axis=(1, 2, 3)): one norm per example, the mean of the per-pixel
    variances; a per-pixel rule would stall at ~20% error."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=F64) * torch.linspace(0.3, 2.0, 5,
                                                                         dtype=F64)
    arch = nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.3), nl.LayerNorm(axis=(1, 2, 3)),
                     nl.Relu(), nl.Conv(8, 3, padding="SAME"), nl.Relu(), nl.GlobalAvgPool(),
                     nl.Dense(1))
    k = arch.kernel(x)
    for get in ("nngp", "ntk"):
        errs = [np.mean([_rel(_gram(arch, x, d, get, s), getattr(k, get)) for s in range(3)])
                for d in (32, 2048)]
        assert errs[1] < 0.06 and errs[1] < errs[0] / 2.5, (get, errs)
