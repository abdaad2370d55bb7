"""Tests for ntkit.estimators and the fix-layer FC ReLU NTK (ntkit._uci_ntk).

Oracles: the core engine's kernels (independent recursion) for fix = 0 / fix = depth, a literal
port of the reference per-fix recursion (Arora et al. 2020 code) for the one-pass trick, Monte
Carlo empirical NTKs of finite networks with frozen first layers (error shrinking with width),
closed forms via scipy's matrix exponential / numpy solves for the predictions, brute-force
leave-one-out refits for the temperature's LOO outputs, and scikit-learn's own models.
"""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from ntkit import layers as nl  # noqa: E402
from ntkit._uci_ntk import iter_ntk_fix, ntk_fix  # noqa: E402
import ntkit  # noqa: E402
import ntkit.estimators as est_mod  # noqa: E402
from ntkit.estimators import (NTKClassifier, NTKGPKernel, NTKRegressor, ReluNTKFix,  # noqa: E402
                              default_family, kernel_callable, loo_kernel_ridge)

SMALL = nl.serial(nl.Dense(64, W_std=1.3, b_std=0.2), nl.Relu(), nl.Dense(1, W_std=1.3, b_std=0.2))


# ---------------------------------------------------------------------------------------
# scikit-learn's estimator checks
# ---------------------------------------------------------------------------------------

@parametrize_with_checks([NTKRegressor(), NTKRegressor(kernel="nngp", t=50.0, normalize_y=True),
                          NTKClassifier(), NTKClassifier(arch=ReluNTKFix(2, 1), t=20.0),
                          NTKRegressor(arch=ReluNTKFix(1, 0), features=16),
                          NTKClassifier(solver="svm", arch=ReluNTKFix(1, 0))])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---------------------------------------------------------------------------------------
# the fix-layer NTK
# ---------------------------------------------------------------------------------------

def _reference_per_fix(X, d_max):
    """Literal port of the paper's NTK.kernel_value_batch: one recursion per fix level."""
    n = X.shape[0]
    K = np.zeros((d_max, d_max, n, n))
    for fix in range(d_max):
        S = X @ X.T
        H = np.zeros_like(S)
        for dep in range(d_max):
            if fix <= dep:
                H += S
            K[dep][fix] = H
            L = np.diag(S)
            P = np.clip(np.sqrt(np.outer(L, L)), 1e-9, None)
            Sn = np.clip(S / P, -1, 1)
            S = (Sn * (math.pi - np.arccos(Sn)) + np.sqrt(1.0 - Sn * Sn)) * P / 2.0 / math.pi
            H = H * (math.pi - np.arccos(Sn)) / 2.0 / math.pi
    return K


def test_one_pass_matches_reference_per_fix_recursion():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6))
    ref = _reference_per_fix(X, 5)
    seen = []
    for h, f, K in iter_ntk_fix(X, max_depth=4):
        seen.append((h, f))
        np.testing.assert_allclose(K.numpy(), ref[h][f], rtol=1e-7, atol=1e-9 * np.abs(ref).max())
    # the reference code's loop order: depth, then fix ascending; 15 kernels
    assert seen == [(h, f) for h in range(5) for f in range(h + 1)]


def _arora_arch(h, width=512):
    layers = []
    for _ in range(h):
        layers += [nl.Dense(width, W_std=1.0), nl.Relu()]
    return nl.serial(*layers, nl.Dense(1, W_std=1.0))


@pytest.mark.parametrize("h", [0, 1, 3])
def test_fix0_is_full_ntk_and_fix_depth_is_nngp(h):
    """K[h][0] = d * NTK and K[h][h] = d * NNGP of the bias-free W_std=1 ReLU net (engine)."""
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.standard_normal((12, 5)))
    k = _arora_arch(h).kernel(X, get=("nngp", "ntk"))
    d = X.shape[1]
    np.testing.assert_allclose(ntk_fix(X, depth=h, fix=0).numpy(), d * k.ntk.numpy(), rtol=1e-10)
    np.testing.assert_allclose(ntk_fix(X, depth=h, fix=h).numpy(), d * k.nngp.numpy(),
                               rtol=1e-10)
    # cross kernel = block of the joint kernel
    X2 = torch.tensor(rng.standard_normal((7, 5)))
    joint = ntk_fix(torch.cat([X, X2]), depth=h, fix=min(1, h))
    np.testing.assert_allclose(ntk_fix(X, X2, depth=h, fix=min(1, h)).numpy(),
                               joint[:12, 12:].numpy(), rtol=1e-9, atol=1e-12)


def _empirical_fix_ntk(X, h, fix, width, seed):
    """Empirical NTK of a finite net (NTK parameterization) whose first `fix` layers are frozen."""
    net = _arora_arch(h).module(in_shape=X.shape[1], width=width, seed=seed)
    params = [p for _, p in net.named_parameters()]
    train = params[fix:]
    grads = []
    for i in range(X.shape[0]):
        out = net(X[i:i + 1]).sum()
        g = torch.autograd.grad(out, train)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(grads)
    return G @ G.T


def test_fix_matches_monte_carlo_network_with_frozen_layers():
    """Frozen first layer of a 2-hidden-layer net: MC error shrinks ~1/sqrt(width) to the kernel."""
    torch.manual_seed(0)
    X = torch.randn(4, 3, dtype=torch.float64)
    h, fix = 2, 1
    exact = ntk_fix(X, depth=h, fix=fix) / X.shape[1]        # engine scale (1/d input)
    wrong = ntk_fix(X, depth=h, fix=0) / X.shape[1]
    errs = []
    for w in (64, 1024):
        est = sum(_empirical_fix_ntk(X, h, fix, w, s) for s in range(12)) / 12
        errs.append(float(torch.linalg.norm(est - exact) / torch.linalg.norm(exact)))
    assert errs[1] < 0.5 * errs[0], errs                     # ~1/4 expected
    assert errs[1] < 0.05, errs
    # and it is not the full NTK (the frozen layer's term is visible)
    assert float(torch.linalg.norm(wrong - exact) / torch.linalg.norm(exact)) > 5 * errs[1]


def test_relu_ntk_fix_errors():
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match="fix"):
        ReluNTKFix(depth=2, fix=3).kernel(X)
    with pytest.raises(ValueError, match="depth"):
        ReluNTKFix(depth=-1, fix=0).kernel(X)
    with pytest.raises(ValueError, match="NaN"):
        ntk_fix(np.array([[np.nan, 1.0]]), depth=1)
    with pytest.raises(ValueError, match="same number of features"):
        ntk_fix(np.ones((2, 3)), np.ones((2, 4)), depth=1)


# ---------------------------------------------------------------------------------------
# regressor: closed forms
# ---------------------------------------------------------------------------------------

def _data(n=30, m=9, d=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    X, Xt = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    Y = np.stack([np.sin(X @ rng.standard_normal(d)) for _ in range(k)], 1)
    return X, Y, Xt


def _np_kernels(arch, X, Xt):
    kdd = arch.kernel(torch.tensor(X), get=("nngp", "ntk"))
    ktd = arch.kernel(torch.tensor(Xt), torch.tensor(X), get=("nngp", "ntk"))
    ktt = arch.kernel(torch.tensor(Xt), get="nngp")
    return ({g: getattr(kdd, g).numpy() for g in ("nngp", "ntk")},
            {g: getattr(ktd, g).numpy() for g in ("nngp", "ntk")}, ktt.numpy())


def test_regressor_converged_is_kernel_regression_with_ntk_posterior_cov():
    X, Y, Xt = _data()
    reg = 1e-3
    kdd, ktd, ktt = _np_kernels(SMALL, X, Xt)
    Th = kdd["ntk"] + reg * np.mean(np.diag(kdd["ntk"])) * np.eye(len(X))
    mean_ref = ktd["ntk"] @ np.linalg.solve(Th, Y)
    # Lee et al. 2019 eq. 16 at t = inf
    A = ktd["ntk"] @ np.linalg.inv(Th)
    cov_ref = ktt + A @ kdd["nngp"] @ A.T - (A @ ktd["nngp"].T + ktd["nngp"] @ A.T)
    est = NTKRegressor(arch=SMALL, diag_reg=reg).fit(X, Y)
    mean, cov = est.predict(Xt, return_cov=True)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cov[:, :, 0], cov_ref, rtol=1e-7, atol=1e-9)
    _, std = est.predict(Xt, return_std=True)
    np.testing.assert_allclose(std[:, 1], np.sqrt(np.clip(np.diag(cov_ref), 0, None)),
                               rtol=1e-6, atol=1e-8)


def test_regressor_finite_time_matches_matrix_exponential():
    from scipy.linalg import expm
    X, Y, Xt = _data(k=1)
    y = Y[:, 0]
    kdd, ktd, _ = _np_kernels(SMALL, X, Xt)
    t = 37.0
    for kind in ("ntk", "nngp"):
        K = kdd[kind]
        # df/dt = -K (f - y) / N with f_0 = 0 in mean; test: K_td K^-1 (I - e^{-K t / N}) y
        mean_ref = ktd[kind] @ np.linalg.solve(K, (np.eye(len(X)) - expm(-K * t / y.size)) @ y)
        est = NTKRegressor(arch=SMALL, kernel=kind, t=t, diag_reg=0.0).fit(X, y)
        np.testing.assert_allclose(est.predict(Xt), mean_ref, rtol=1e-6, atol=1e-8)
    # long training converges to kernel regression
    far = NTKRegressor(arch=SMALL, t=1e9, diag_reg=1e-3).fit(X, y).predict(Xt)
    conv = NTKRegressor(arch=SMALL, diag_reg=1e-3).fit(X, y).predict(Xt)
    np.testing.assert_allclose(far, conv, rtol=1e-6, atol=1e-8)


def test_nngp_regressor_equals_sklearn_gpr_with_ntkgp_kernel():
    from sklearn.gaussian_process import GaussianProcessRegressor
    X, Y, Xt = _data(k=1)
    y = Y[:, 0]
    kern = NTKGPKernel(arch=SMALL, get="nngp")
    K = kern(X)
    np.testing.assert_allclose(kern.diag(Xt), np.diag(kern(Xt)), rtol=1e-12)
    rel = 1e-2
    gpr = GaussianProcessRegressor(kernel=kern, alpha=rel * np.mean(np.diag(K)),
                                   optimizer=None).fit(X, y)
    mean_g, std_g = gpr.predict(Xt, return_std=True)
    mean, std = NTKRegressor(arch=SMALL, kernel="nngp", diag_reg=rel).fit(X, y).predict(
        Xt, return_std=True)
    np.testing.assert_allclose(mean, mean_g, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(std, std_g, rtol=1e-6, atol=1e-8)


def test_gp_kernel_composes_and_recovers_prior_scale_and_noise():
    """Sample y from the GP prior 2 * K_nngp + 0.05 I; marginal likelihood recovers both."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 3))
    K = NTKGPKernel(SMALL)(X)
    K = K / np.mean(np.diag(K))
    scale, noise = 2.0, 0.05
    L = np.linalg.cholesky(scale * K + noise * np.eye(200))
    ests = []
    for _s in range(3):
        y = L @ rng.standard_normal(200)
        gpr = GaussianProcessRegressor(ConstantKernel() * NTKGPKernel(SMALL) + WhiteKernel(),
                                       random_state=0).fit(X, y)
        c = gpr.kernel_.k1.k1.constant_value * np.mean(np.diag(NTKGPKernel(SMALL)(X)))
        ests.append((c, gpr.kernel_.k2.noise_level))
    c_hat, n_hat = np.mean(ests, 0)
    assert 1.0 < c_hat < 4.0, ests          # true 2
    assert 0.025 < n_hat < 0.1, ests        # true 0.05


# ---------------------------------------------------------------------------------------
# classifier
# ---------------------------------------------------------------------------------------

def test_classifier_loo_outputs_match_brute_force_refits():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((15, 3))
    y = (X[:, 0] + 0.3 * rng.standard_normal(15) > 0).astype(int) + (X[:, 1] > 1)
    clf = NTKClassifier(arch=SMALL, diag_reg=1e-2).fit(X, y)
    c = len(clf.classes_)
    Y = np.eye(c)[np.searchsorted(clf.classes_, y)] - 1.0 / c
    loo = clf._heldout_outputs(Y)
    for i in range(len(X)):
        keep = np.arange(len(X)) != i
        # refit with the SAME absolute ridge as the full fit (relative to the full mean diag)
        K = SMALL.kernel(torch.tensor(X), get="ntk").numpy()
        ridge = 1e-2 * np.mean(np.diag(K))
        Kk = K[np.ix_(keep, keep)] + ridge * np.eye(keep.sum())
        ref = K[i, keep] @ np.linalg.solve(Kk, Y[keep])
        np.testing.assert_allclose(loo[i], ref, rtol=1e-7, atol=1e-9)
    assert clf.temperature_ > 0


def test_classifier_proba_and_decision_consistency():
    from sklearn.datasets import load_breast_cancer, load_iris
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler
    for loader in (load_iris, load_breast_cancer):
        X, y = loader(return_X_y=True)
        X = StandardScaler().fit_transform(X)
        Xa, ya, Xb, yb = X[::2], y[::2], X[1::2], y[1::2]
        clf = NTKClassifier(arch=ReluNTKFix(2, 0), diag_reg=1e-2).fit(Xa, ya)
        P = clf.predict_proba(Xb)
        np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-12)
        np.testing.assert_array_equal(clf.classes_[P.argmax(1)], clf.predict(Xb))
        np.testing.assert_allclose(np.exp(clf.predict_log_proba(Xb)), P, rtol=1e-10)
        # the LOO-fitted temperature beats a fixed T = 1 and an over-confident T = 0.01 on
        # held-out log-loss
        ll = log_loss(yb, P, labels=clf.classes_)
        for T in (1.0, 0.01):
            other = NTKClassifier(arch=ReluNTKFix(2, 0), diag_reg=1e-2, temperature=T)
            assert ll < log_loss(yb, other.fit(Xa, ya).predict_proba(Xb), labels=clf.classes_)


def test_pipeline_gridsearch_and_accuracy_vs_svc():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import GridSearchCV, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.5, random_state=0, stratify=y)
    pipe = make_pipeline(StandardScaler(), NTKClassifier())
    grid = GridSearchCV(pipe, {"ntkclassifier__arch": [ReluNTKFix(1, 0), ReluNTKFix(3, 1)],
                               "ntkclassifier__diag_reg": [1e-3, 1e-1]}, cv=3).fit(Xtr, ytr)
    acc = grid.score(Xte, yte)
    svc = make_pipeline(StandardScaler(), SVC()).fit(Xtr, ytr).score(Xte, yte)
    assert acc >= svc - 0.03, (acc, svc)
    assert acc > max(np.mean(yte), 1 - np.mean(yte)) + 0.2       # far above majority class
    # regressor in a pipeline, arch given as text
    reg = make_pipeline(StandardScaler(), NTKRegressor(arch="Dense(64, W_std=1.4, b_std=0.1), "
                                                           "Relu(), Dense(1, W_std=1.4)"))
    assert reg.fit(Xtr, ytr.astype(float)).score(Xte, yte.astype(float)) > 0.5


def test_svc_callable_kernel_matches_precomputed_and_pickles():
    from sklearn.svm import SVC
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5))
    y = (np.sin(X[:, 0] * 2) + X[:, 1] > 0).astype(int)
    Xt = rng.standard_normal((25, 5))
    kc = kernel_callable(ReluNTKFix(depth=3, fix=1))
    a = SVC(kernel=kc, C=10.0).fit(X, y)
    K = ntk_fix(X, depth=3, fix=1).numpy()
    Kt = ntk_fix(Xt, X, depth=3, fix=1).numpy()
    b = SVC(kernel="precomputed", C=10.0).fit(K, y)
    np.testing.assert_allclose(a.decision_function(Xt), b.decision_function(Kt), rtol=1e-6,
                               atol=1e-8)
    a2 = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(a2.predict(Xt), a.predict(Xt))


# ---------------------------------------------------------------------------------------
# clear errors
# ---------------------------------------------------------------------------------------

def test_clear_errors():
    X = np.random.default_rng(0).standard_normal((10, 3))
    y = np.arange(10) % 2
    Xn = X.copy()
    Xn[2, 1] = np.nan
    for est in (NTKRegressor(arch=SMALL), NTKClassifier(arch=SMALL)):
        with pytest.raises(ValueError, match="NaN"):
            est.fit(Xn, y)
        with pytest.raises(ValueError, match="2D array"):
            est.fit(X[:, 0], y)
        with pytest.raises(ValueError, match="inconsistent numbers of samples"):
            est.fit(X, y[:5])
        est.fit(X, y)
        with pytest.raises(ValueError, match="3 features"):
            est.predict(X[:, :2])
        with pytest.raises(ValueError, match="NaN"):
            est.predict(Xn)
    with pytest.raises(ValueError, match="at least 2 classes"):
        NTKClassifier(arch=SMALL).fit(X, np.zeros(10))
    with pytest.raises(ValueError, match="Unknown label type"):
        NTKClassifier(arch=SMALL).fit(X, np.linspace(0, 1, 10))
    with pytest.raises(ValueError, match="`kernel`"):
        NTKRegressor(kernel="rbf").fit(X, y)
    with pytest.raises(TypeError, match="`arch`"):
        NTKRegressor(arch=42).fit(X, y)
    with pytest.raises(ValueError, match="`t`"):
        NTKRegressor(arch=SMALL, t=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="`diag_reg`"):
        NTKRegressor(arch=SMALL, diag_reg=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="temperature"):
        NTKClassifier(arch=SMALL, temperature=0.0).fit(X, y)
    with pytest.raises(ValueError, match="at most one"):
        NTKRegressor(arch=SMALL).fit(X, y).predict(X, return_std=True, return_cov=True)


# ---------------------------------------------------------------------------------------
# bias, one-pass kernels for every depth, model selection by exact leave-one-out
# ---------------------------------------------------------------------------------------

def _np_relu_fix(X1, X2, h, fix, b):
    """Independent numpy recursion for ONE (depth, fix, bias): cross kernel via the joint
    Gram matrix (no shared code with ntkit._uci_ntk)."""
    Z = X1 if X2 is None else np.concatenate([X1, X2])
    S = Z @ Z.T + b * b
    H = np.zeros_like(S)
    for l in range(h + 1):
        if l >= fix:
            H = H + S
        if l == h:
            break
        dg = np.sqrt(np.diag(S))
        P = np.outer(dg, dg)
        c = np.clip(S / P, -1, 1)
        np.fill_diagonal(c, 1.0)      # x with itself: exactly 1 (arccos(1 - ulp) ~ 1e-8)
        th = np.arccos(c)
        S_new = P * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi) + b * b
        H = H * (np.pi - th) / (2 * np.pi)
        S = S_new
    return H if X2 is None else H[:len(X1), len(X1):]


def test_one_pass_kernels_equal_single_depth_computations_with_bias():
    rng = np.random.default_rng(5)
    X, X2 = rng.standard_normal((9, 4)), rng.standard_normal((6, 4))
    for b in (0.0, 1.7):
        seen = {}
        for h, f, K in iter_ntk_fix(X, X2, max_depth=4, bias=b):
            seen[(h, f)] = K.numpy()
            ref = _np_relu_fix(X, X2, h, f, b)
            np.testing.assert_allclose(K.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
        assert len(seen) == 15
        # the selection's one pass (per bias) gives exactly the single-kernel computations
        cands = [ReluNTKFix(h, f, bias=b) for h in range(5) for f in range(h + 1)]
        Xt = torch.tensor(X)
        got = {i: K.clone() for i, K in est_mod._kernel_blocks(cands, Xt, None, "ntk")}
        for i, a in enumerate(cands):
            single = a.kernel(Xt, get="ntk")
            np.testing.assert_allclose(got[i].numpy(), single.numpy(), rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(single.numpy(), _np_relu_fix(X, None, a.depth, a.fix, b),
                                       rtol=1e-12, atol=1e-12 * float(single.abs().max()))


@pytest.mark.parametrize("h", [1, 2])
def test_bias_kernel_is_d_times_engine_kernel_with_b_std(h):
    """ReluNTKFix(bias=b) = d * kernel of the ntkit net with W_std = 1, b_std = b / sqrt(d)."""
    rng = np.random.default_rng(2)
    X = torch.tensor(rng.standard_normal((8, 3)))
    a = ReluNTKFix(h, 0, bias=0.8)
    k = a.as_layers(3).kernel(X, get=("nngp", "ntk"))
    np.testing.assert_allclose(a.kernel(X, get="ntk").numpy(), 3 * k.ntk.numpy(), rtol=1e-10)
    np.testing.assert_allclose(ReluNTKFix(h, h, bias=0.8).kernel(X, get="ntk").numpy(),
                               3 * k.nngp.numpy(), rtol=1e-10)


def test_loo_kernel_ridge_matches_brute_force_refits():
    rng = np.random.default_rng(0)
    n = 11
    X, Xh = rng.standard_normal((n, 3)), rng.standard_normal((4, 3))
    Y = rng.standard_normal((n, 2))
    K = ntk_fix(X, depth=2, fix=1).numpy()
    Kh = ntk_fix(Xh, X, depth=2, fix=1).numpy()
    ridges = [1e-4, 1e-1, 3.0]
    loo, pred = loo_kernel_ridge(K, Y, ridges, K_test_train=Kh)
    for j, r in enumerate(ridges):
        for i in range(n):
            keep = np.arange(n) != i
            ref = K[i, keep] @ np.linalg.solve(K[np.ix_(keep, keep)] + r * np.eye(n - 1), Y[keep])
            np.testing.assert_allclose(loo[j, i].numpy(), ref, rtol=1e-8, atol=1e-10)
        full = Kh @ np.linalg.solve(K + r * np.eye(n), Y)
        np.testing.assert_allclose(pred[j].numpy(), full, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="> 0"):
        loo_kernel_ridge(K, Y, [0.0])


@pytest.mark.parametrize("D", [5, 20])          # primal (D < n) and dual (D >= n) paths
def test_primal_loo_matches_brute_force_refits(D):
    rng = np.random.default_rng(1)
    phi = torch.tensor(rng.standard_normal((14, D)))
    Y = torch.tensor(rng.standard_normal((14, 1)))
    loo, solve, scale = est_mod._primal_loo(phi, Y, [1e-2, 1.0])
    P, y = phi.numpy(), Y.numpy()
    assert scale == pytest.approx(np.trace(P.T @ P) / 14)
    for j, rel in enumerate([1e-2, 1.0]):
        r = rel * scale
        w = np.linalg.solve(P.T @ P + r * np.eye(D), P.T @ y)
        np.testing.assert_allclose(solve(j).numpy(), w, rtol=1e-8, atol=1e-12)
        for i in range(14):
            keep = np.arange(14) != i
            wi = np.linalg.solve(P[keep].T @ P[keep] + r * np.eye(D), P[keep].T @ y[keep])
            np.testing.assert_allclose(loo[j, i].numpy(), P[i] @ wi, rtol=1e-8, atol=1e-10)


def test_selection_picks_known_best_and_reports_loo_table():
    """Noise-free linear targets: the linear kernel (depth 0) with the smallest ridge has ~0 LOO
    error, every ReLU kernel a visible one -- the selection must find it."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 3))
    y = X @ np.array([1.0, -2.0, 0.5])
    reg = NTKRegressor().fit(X, y)
    best = reg.best_params_
    assert best["arch"].depth == 0 and best["diag_reg"] == min(est_mod.DEFAULT_RIDGES)
    tab = reg.loo_scores_
    assert len(tab["params"]) == len(tab["mse"]) == 30 * len(est_mod.DEFAULT_RIDGES)
    k = int(np.argmin(tab["mse"]))
    assert tab["params"][k] == best
    # the table's LOO error is the brute-force LOO error of that configuration
    Xs = (X - X.mean(0)) / X.std(0)
    for idx in (k, 77):
        p = tab["params"][idx]
        K = p["arch"].kernel(torch.tensor(Xs), get="ntk").numpy()
        r = p["diag_reg"] * np.mean(np.diag(K))
        errs = []
        for i in range(40):
            keep = np.arange(40) != i
            f = K[i, keep] @ np.linalg.solve(K[np.ix_(keep, keep)] + r * np.eye(39), y[keep])
            errs.append((f - y[i]) ** 2)
        np.testing.assert_allclose(tab["mse"][idx], np.mean(errs) / np.var(y), rtol=1e-6,
                                   atol=1e-12)
    assert reg.score(X[:5] + 0.1, (X[:5] + 0.1) @ np.array([1.0, -2.0, 0.5])) > 0.999


def test_best_params_reproduce_and_fixed_config_bypasses_selection(monkeypatch):
    from sklearn.datasets import load_iris
    X, y = load_iris(return_X_y=True)
    clf = NTKClassifier().fit(X[::2], y[::2])
    assert set(clf.best_params_) == {"arch", "diag_reg"}
    assert clf.selection_size_ == 75 and "accuracy" in clf.loo_scores_
    fixed = NTKClassifier(**clf.best_params_)

    def boom(*a, **k):
        raise AssertionError("selection ran for a fixed configuration")
    monkeypatch.setattr(est_mod, "_select", boom)
    fixed.fit(X[::2], y[::2])
    assert fixed.loo_scores_ is None
    np.testing.assert_allclose(fixed.decision_function(X[1::2]),
                               clf.decision_function(X[1::2]), rtol=1e-9, atol=1e-12)
    # its temperature (exact LOO via the inverse) equals the one from the selection's LOO
    assert fixed.temperature_ == pytest.approx(clf.temperature_, rel=1e-6)
    # a list of archs / ridges is a user-defined search space
    with pytest.raises(AssertionError, match="selection ran"):
        NTKClassifier(diag_reg=[1e-3, 1e-1], arch=ReluNTKFix(1, 0)).fit(X, y)


def test_subsampled_selection_scores_heldout_rows(monkeypatch):
    """Beyond the cost budget, LOO on m rows + held-out predictions for the rest."""
    monkeypatch.setattr(est_mod, "_COST_FLOOR_S", 0.0)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((120, 3))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    with ntkit.settings(selection_budget=1.2):
        clf = NTKClassifier(random_state=3).fit(X, y)
    m = clf.selection_size_
    assert 10 <= m < 120
    assert clf.score(X, y) > 0.8
    # the table's score = LOO on the first m rows of the (stratified) order + held-out on the
    # others
    order = est_mod._selection_order(120, y, 3)
    idx = 5
    p = clf.loo_scores_["params"][idx]
    order = order[:min(120, 2 * m)]                  # at most m held-out rows are scored
    Xs = torch.tensor((X - X.mean(0)) / X.std(0))[torch.as_tensor(order)]
    Y = np.eye(2)[y[order]] - 0.5
    K = p["arch"].kernel(Xs[:m], Xs, get="ntk").numpy()
    Kaa = K[:, :m]
    r = p["diag_reg"] * np.mean(np.diag(Kaa))
    F = np.empty_like(Y)
    for i in range(m):
        keep = np.arange(m) != i
        F[i] = Kaa[i, keep] @ np.linalg.solve(Kaa[np.ix_(keep, keep)] + r * np.eye(m - 1),
                                              Y[:m][keep])
    F[m:] = K[:, m:].T @ np.linalg.solve(Kaa + r * np.eye(m), Y[:m])
    np.testing.assert_allclose(clf.loo_scores_["mse"][idx], np.mean(((F - Y) ** 2).sum(1)),
                               rtol=1e-6)
    np.testing.assert_allclose(clf.loo_scores_["accuracy"][idx],
                               np.mean(F.argmax(1) == y[order]))


def test_selection_plan_respects_cost_model():
    k = est_mod._COST
    for n in (300, 1000, 3000):
        m, n_full = est_mod._selection_plan(n, 30, 2, 15, 3)
        single = k["F"] + k["A"] * n * n + k["B"] * n ** 3
        assert m < n and 1 <= n_full < 30
        # screening (m rows, 30 kernels) + n_full exact eighs on all rows within the budget
        sel = 30 * k["E3"] * m ** 3 + n_full * k["E3"] * n ** 3
        # ... planned to _COST_MARGIN of it (the model's measured error is about +-15%)
        assert sel <= max(est_mod._COST_MARGIN * 3 * single - k["A"] * n * n,
                          est_mod._COST_FLOOR_S)
    # the whole modelled cost (screening, held-out rows, stage 2, final fit) stays within the
    # margin's share of the budget, and fills most of it
    for n in (1000, 3000):
        ratio = _modelled_selection_ratio(n, 3, 0, 0)[2]
        assert 0.8 * est_mod._COST_MARGIN * 3 <= ratio <= est_mod._COST_MARGIN * 3 * (1 + 1e-9)
    assert est_mod._selection_plan(60, 30, 2, 15, 3) == (60, 0)
    # classification: at least 3 rows per class in the screening, whatever the budget
    m, _ = est_mod._selection_plan(1200, 30, 2, 15, 100)
    assert m < 300
    assert est_mod._selection_plan(1200, 30, 2, 15, 100, min_rows=300)[0] == 300
    assert est_mod._selection_plan(250, 30, 2, 15, 100, min_rows=300) == (250, 0)


def _modelled_selection_ratio(n, c_scored, min_rows, c_out, n_kernels=30, n_ridges=15):
    """Selection + final fit over one single fit, from the cost model's terms (stage 1: every
    kernel's eigh + held-out rows on ``m`` rows; stage 2: ``n_full`` kernels on all rows)."""
    k = est_mod._COST
    m, n_full = est_mod._selection_plan(n, n_kernels, 2, n_ridges, c_scored, min_rows, c_out)

    def per_kernel(mm):
        rest = min(n - mm, mm)
        return (k["P"] + k["E2"] * mm ** 2 + k["E3"] * mm ** 3
                + k["FLOP"] * (mm * mm * n_ridges * (c_scored - 2) + mm * mm * rest
                               + rest * mm * n_ridges * c_scored + (mm + rest) * mm * c_out))
    single = k["F"] + k["A"] * n * n + k["B"] * n ** 3
    sel = n_kernels * per_kernel(m) + 2 * k["A"] * m * n + n_full * (per_kernel(n)
                                                                      + k["A"] * n * n)
    return m, n_full, (sel + k["F"] + k["A"] * n * n) / single


def test_selection_plan_within_budget_for_100_classes():
    """100 classes: with the targets projected on 16 directions the plan fits 3 single fits
    from n = 1600 on (3 rows per class); with all 100 columns it cannot, and at n = 1200
    (plant-shape's training folds, where the 3-rows floor binds) projection still cuts the
    modelled cost by more than a third."""
    c, k = 100, est_mod._PROJ_CLASSES
    floor = est_mod._MIN_ROWS_PROJ * c
    for n in (1600, 3000):
        m, n_full, ratio = _modelled_selection_ratio(n, k, floor, c)
        assert floor <= m < n and n_full >= 1
        assert ratio <= est_mod._COST_BUDGET * (1 + 1e-9), (n, m, ratio)
    assert _modelled_selection_ratio(1600, c, floor, 0)[2] > 4.0
    assert (_modelled_selection_ratio(1200, k, floor, c)[2]
            < 0.65 * _modelled_selection_ratio(1200, c, floor, 0)[2])
    # the budget is ntkit.settings.selection_budget when set
    with ntkit.settings(selection_budget=6.0):
        m6, _, ratio6 = _modelled_selection_ratio(3000, k, floor, c)
        assert ratio6 <= 6.0 * (1 + 1e-9)
    assert m6 > _modelled_selection_ratio(3000, k, floor, c)[0]
    with pytest.raises(ValueError, match="selection_budget"):
        with ntkit.settings(selection_budget=0):
            pass


def test_class_projection_is_unbiased_for_the_summed_squared_error():
    """E |E Q'|^2 = |E|^2 over the draw, for residuals with centred rows (Monte Carlo)."""
    rng = np.random.default_rng(0)
    c, k = 12, 4
    E = rng.standard_normal((7, c))
    E -= E.mean(1, keepdims=True)                    # rows of one-hot residuals sum to 0
    vals = np.array([np.sum((E @ est_mod._class_projection(c, k, s).numpy()) ** 2)
                     for s in range(3000)])
    target = np.sum(E ** 2)
    assert abs(vals.mean() - target) < 4 * vals.std() / math.sqrt(len(vals))
    Q = est_mod._class_projection(c, k, 5).numpy()
    np.testing.assert_allclose(Q.sum(0), 0.0, atol=1e-12)                  # centred directions
    np.testing.assert_allclose(Q.T @ Q, (c - 1) / k * np.eye(k), atol=1e-12)


def _many_class_problem(n=150, c=20, seed=0):
    """``c`` Gaussian blobs of ``n / c`` rows each (centres further apart than the noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    X = 1.5 * rng.standard_normal((c, 6))[y] + rng.standard_normal((n, 6))
    return X, y


def test_projected_selection_agrees_with_exhaustive_loo(monkeypatch):
    """More than _PROJ_CLASSES classes: the selection scores projected targets (no
    'accuracy' column, the MSE an unbiased estimate) and picks the same kernel as exhaustive
    LOO on all classes; the winner's held-out outputs (temperature) are its exact LOO outputs
    for all classes."""
    X, y = _many_class_problem()
    c = len(np.unique(y))
    assert c > est_mod._PROJ_CLASSES
    cands = [ReluNTKFix(0, 0), ReluNTKFix(3, 3), ReluNTKFix(1, 0)]
    ridges = [1e-3, 1e-2, 1e-1, 1.0]
    proj = NTKClassifier(arch=cands, diag_reg=ridges).fit(X, y)
    assert "accuracy" not in proj.loo_scores_
    monkeypatch.setattr(est_mod, "_PROJ_CLASSES", 10 ** 6)
    exact = NTKClassifier(arch=cands, diag_reg=ridges).fit(X, y)
    assert "accuracy" in exact.loo_scores_
    assert proj.best_params_["arch"] == exact.best_params_["arch"]
    # per-kernel best scores: same ranking, each estimate close to the exact value
    def best_per_arch(tab):
        out = {}
        for p, v in zip(tab["params"], tab["mse"]):
            out[repr(p["arch"])] = min(out.get(repr(p["arch"]), np.inf), v)
        return out
    bp, be = best_per_arch(proj.loo_scores_), best_per_arch(exact.loo_scores_)
    assert sorted(bp, key=bp.get) == sorted(be, key=be.get)
    for a in be:
        assert bp[a] == pytest.approx(be[a], rel=0.25)
    # temperature from the selection = that of the fixed model (exact LOO via the inverse)
    fixed = NTKClassifier(**proj.best_params_).fit(X, y)
    assert fixed.temperature_ == pytest.approx(proj.temperature_, rel=1e-6)


def test_projected_two_stage_selection_keeps_two_rows_per_class(monkeypatch):
    """Two-stage selection with many classes: the screening has at least 3 rows per class,
    the refined (all-row) scores are projected too, and the temperature's outputs are the exact
    all-class LOO outputs of the winner."""
    monkeypatch.setattr(est_mod, "_COST_FLOOR_S", 0.0)
    X, y = _many_class_problem(n=240, seed=1)
    c = len(np.unique(y))
    with ntkit.settings(selection_budget=1.0):
        clf = NTKClassifier(arch=[ReluNTKFix(0, 0), ReluNTKFix(2, 0), ReluNTKFix(2, 2)],
                            diag_reg=[1e-2, 1e-1]).fit(X, y)
    assert est_mod._MIN_ROWS_PROJ * c <= clf.selection_size_ < len(y)
    assert "refined" in clf.loo_scores_ and "accuracy" not in clf.loo_scores_["refined"]
    fixed = NTKClassifier(**clf.best_params_).fit(X, y)
    assert fixed.temperature_ == pytest.approx(clf.temperature_, rel=1e-6)
    np.testing.assert_array_equal(clf.predict(X), fixed.predict(X))


def test_selection_order_is_stratified():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    rng = np.random.default_rng(0)
    y = y[rng.permutation(len(y))]
    order = est_mod._selection_order(len(y), y, seed=7)
    assert sorted(order) == list(range(len(y)))
    counts = np.bincount(y)
    for m in (10, 20, 37, 60):
        got = np.bincount(y[order[:m]], minlength=4)
        # every prefix holds each class in proportion, within one row
        assert np.all(np.abs(got - m * counts / len(y)) <= 1.0 + 1e-9), (m, got)
    # regression (no classes): a plain permutation of the seed
    np.testing.assert_array_equal(est_mod._selection_order(20, None, 3),
                                  np.random.default_rng(3).permutation(20))


def test_two_stage_selection_rescores_top_kernels_on_all_rows(monkeypatch):
    """Beyond the budget: screening on m rows, then exact LOO on ALL rows for the best
    kernels; the winner and its ridge come from the full-n scores, and its held-out outputs
    (temperature) are the exact full-n LOO outputs."""
    monkeypatch.setattr(est_mod, "_COST_FLOOR_S", 0.0)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((120, 3))
    y = (X[:, 0] * X[:, 1] + 0.3 * rng.standard_normal(120) > 0).astype(int)
    with ntkit.settings(selection_budget=1.2):
        clf = NTKClassifier().fit(X, y)
    assert clf.selection_size_ < 120
    ref = clf.loo_scores_["refined"]
    n_full = len(ref["mse"]) // len(est_mod.DEFAULT_RIDGES)
    assert n_full >= 1
    k = int(np.argmin(ref["mse"]))
    assert ref["params"][k] == clf.best_params_
    # the refined kernels are the screening's best ones (by their best ridge)
    scr = clf.loo_scores_
    per_arch = {}
    for p, v in zip(scr["params"], scr["mse"]):
        per_arch[p["arch"]] = min(per_arch.get(p["arch"], np.inf), v)
    top = sorted(per_arch, key=per_arch.get)[:n_full]
    assert {p["arch"] for p in ref["params"]} == set(top)
    # the refined score is the brute-force LOO on all 120 rows
    p = ref["params"][k]
    Xs = (X - X.mean(0)) / X.std(0)
    Y = np.eye(2)[y] - 0.5
    K = p["arch"].kernel(torch.tensor(Xs), get="ntk").numpy()
    r = p["diag_reg"] * np.mean(np.diag(K))
    F = np.empty_like(Y)
    for i in range(120):
        keep = np.arange(120) != i
        F[i] = K[i, keep] @ np.linalg.solve(K[np.ix_(keep, keep)] + r * np.eye(119), Y[keep])
    np.testing.assert_allclose(ref["mse"][k], np.mean(((F - Y) ** 2).sum(1)), rtol=1e-6)
    # temperature from those outputs = the fixed configuration's exact-LOO temperature
    fixed = NTKClassifier(**clf.best_params_).fit(X, y)
    assert fixed.temperature_ == pytest.approx(clf.temperature_, rel=1e-6)
    # the final fit's train kernels are stage 2's (same recursion pass, not recomputed) and
    # equal the winner's own NNGP and NTK
    own = p["arch"].kernel(torch.tensor(Xs))
    for g in ("nngp", "ntk"):
        np.testing.assert_allclose(clf.k_train_train_[g].numpy(), own[g].numpy(),
                                   rtol=1e-12, atol=1e-12)
    calls = []
    real = est_mod._kernels
    monkeypatch.setattr(est_mod, "_kernels", lambda *a, **k: calls.append(1) or real(*a, **k))
    with ntkit.settings(selection_budget=1.2):
        NTKClassifier().fit(X, y)
    assert calls == []


# ---------------------------------------------------------------------------------------
# solver='svm'
# ---------------------------------------------------------------------------------------

def test_svm_solver_is_svc_on_the_precomputed_kernel():
    from sklearn.svm import SVC
    rng = np.random.default_rng(8)
    X, Xt = rng.standard_normal((60, 4)), rng.standard_normal((20, 4))
    y = (X[:, 0] + X[:, 1] ** 2 > 0.8).astype(int) + (X[:, 2] > 1)
    arch = ReluNTKFix(2, 1)
    clf = NTKClassifier(arch=arch, solver="svm", C=10.0).fit(X, y)
    assert clf.loo_scores_ is None and clf.best_params_["C"] == 10.0 == clf.C_
    mu, sd = X.mean(0), X.std(0)
    K = arch.kernel(torch.tensor((X - mu) / sd), get="ntk").numpy()
    Kt = arch.kernel(torch.tensor((Xt - mu) / sd), torch.tensor((X - mu) / sd), get="ntk").numpy()
    ref = SVC(kernel="precomputed", C=10.0, break_ties=True).fit(K, y)
    np.testing.assert_allclose(clf.decision_function(Xt), ref.decision_function(Kt),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(clf.predict(Xt), ref.predict(Kt))
    P = clf.predict_proba(Xt)
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(clf.classes_[P.argmax(1)], clf.predict(Xt))
    # binary: decision_function is SVC's, outputs +-f/2
    yb = (y > 0).astype(int)
    cb = NTKClassifier(arch=arch, solver="svm", C=1.0).fit(X, yb)
    rb = SVC(kernel="precomputed", C=1.0).fit(K, yb)
    np.testing.assert_allclose(cb.decision_function(Xt), rb.decision_function(Kt), rtol=1e-6,
                               atol=1e-8)


def test_svm_solver_chooses_C_by_internal_cv_on_training_rows():
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC
    rng = np.random.default_rng(9)
    X = rng.standard_normal((60, 3))
    y = (np.sin(2 * X[:, 0]) + X[:, 1] + 0.4 * rng.standard_normal(60) > 0).astype(int)
    clf = NTKClassifier(solver="svm", random_state=2).fit(X, y)      # kernel chosen by LOO
    arch = clf.best_params_["arch"]
    Xs = (X - X.mean(0)) / X.std(0)
    K = arch.kernel(torch.tensor(Xs), get="ntk").numpy()
    accs = []
    for C in est_mod.DEFAULT_SVM_C:
        hit = 0
        for tr, va in StratifiedKFold(3, shuffle=True, random_state=2).split(X, y):
            s = SVC(kernel="precomputed", C=C).fit(K[np.ix_(tr, tr)], y[tr])
            hit += np.sum(s.predict(K[np.ix_(va, tr)]) == y[va])
        accs.append(hit / 60)
    np.testing.assert_allclose(clf.cv_scores_["accuracy"], accs)
    assert clf.C_ == est_mod.DEFAULT_SVM_C[int(np.argmax(accs))]
    # the kernel is the krr solver's LOO choice
    assert NTKClassifier(random_state=2).fit(X, y).best_params_["arch"] == arch


def test_svm_solver_errors():
    X = np.random.default_rng(0).standard_normal((12, 3))
    y = np.arange(12) % 2
    with pytest.raises(ValueError, match="solver"):
        NTKClassifier(solver="lbfgs").fit(X, y)
    with pytest.raises(ValueError, match="C"):
        NTKClassifier(C=1.0).fit(X, y)
    with pytest.raises(ValueError, match="> 0"):
        NTKClassifier(solver="svm", C=[1.0, 0.0]).fit(X, y)
    with pytest.raises(ValueError, match="`t`"):
        NTKClassifier(solver="svm", t=3.0).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        NTKClassifier(solver="svm", features=8, arch=ReluNTKFix(1, 0)).fit(X, y)
    with pytest.raises(ValueError, match="empty"):
        NTKClassifier(solver="svm", C=[]).fit(X, y)
    y1 = np.array([0] * 11 + [1])
    with pytest.warns(UserWarning, match="cross-validated"):
        c = NTKClassifier(solver="svm", arch=ReluNTKFix(1, 0)).fit(X, y1)
    assert c.C_ == 1.0


def test_default_family_contents():
    fam = default_family(4)
    assert len(fam) == 30 and ReluNTKFix(4, 2, bias=2.0) in fam and ReluNTKFix(0, 0) in fam
    assert all(a.fix == a.depth for a in default_family(4, "nngp"))


def test_features_predictions_approach_exact_kernel_estimator():
    rng = np.random.default_rng(6)
    X, Xt = rng.standard_normal((40, 3)), rng.standard_normal((15, 3))
    y = np.sin(X[:, 0]) + X[:, 1] ** 2
    arch = ReluNTKFix(1, 0, bias=1.0)
    exact = NTKRegressor(arch=arch, diag_reg=1e-2).fit(X, y).predict(Xt)
    errs = []
    for dim in (32, 2048):
        pred = NTKRegressor(arch=arch, diag_reg=1e-2, features=dim).fit(X, y).predict(Xt)
        errs.append(np.linalg.norm(pred - exact) / np.linalg.norm(exact))
    assert errs[1] < 0.4 * errs[0], errs           # ~ dim^-1/2: 1/8 expected
    assert errs[1] < 0.05, errs
    # selection of the ridge by primal LOO; the nngp kernel (fix = depth) has features too
    reg = NTKRegressor(arch=[ReluNTKFix(1, 0), ReluNTKFix(2, 2)], features=256).fit(X, y)
    assert reg.best_params_["diag_reg"] in est_mod.DEFAULT_RIDGES
    assert len(reg.loo_scores_["mse"]) == 2 * len(est_mod.DEFAULT_RIDGES)
    clf = NTKClassifier(features=64, arch=SMALL).fit(X, y > 1)
    assert clf.predict_proba(Xt).shape == (15, 2)


def test_selection_errors():
    X = np.random.default_rng(0).standard_normal((10, 3))
    y = np.arange(10) % 2
    with pytest.raises(ValueError, match="t=None"):
        NTKRegressor(t=10.0, diag_reg=[1e-3, 1e-2], arch=SMALL).fit(X, y)
    with pytest.raises(ValueError, match="> 0"):
        NTKRegressor(diag_reg=[0.0, 1e-2]).fit(X, y)
    with pytest.raises(ValueError, match="empty"):
        NTKRegressor(arch=[]).fit(X, y)
    with pytest.raises(ValueError, match="standardize"):
        NTKRegressor(standardize="yes").fit(X, y)
    with pytest.raises(ValueError, match="random_state"):
        NTKRegressor(random_state=-1).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        NTKRegressor(features=0).fit(X, y)
    with pytest.raises(ValueError, match="fix=0 or fix=depth"):
        NTKRegressor(arch=ReluNTKFix(3, 1), features=8).fit(X, y)
    with pytest.raises(ValueError, match="return_std"):
        NTKRegressor(arch=SMALL, features=8, diag_reg=1e-2).fit(X, y).predict(X, return_std=True)
    with pytest.raises(ValueError, match="bias"):
        ReluNTKFix(1, 0, bias=-1.0).kernel(X)
    # a finite t keeps the old defaults (no selection): default_arch and diag_reg 1e-4
    r = NTKRegressor(t=5.0).fit(X, y.astype(float))
    assert r.loo_scores_ is None and r.diag_reg_ == 1e-4
