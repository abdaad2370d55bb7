"""Reliability of ntkit.predict (issue 13): one answer per quantity, no silent divergence, no
silent guess of a missing kernel, fast failure of stiff ODEs, clear errors for bad inputs.

Oracles are independent of ntkit's eigendecomposition: closed forms (duplicated inputs with
conflicting labels converge to the mean label), ``torch.linalg.pinv`` / ``lstsq`` on the feature
matrix (the range of ``K = Phi Phi^T`` is the column space of ``Phi``), and real SGD on a linear
model. Float64 throughout, tiny sizes.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from ntkit import predict as P
from ntkit import _linalg

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def _singular_problem(seed=0):
    """Features with duplicated training rows (conflicting labels) and a rank-deficient Phi:
    K = Phi Phi^T is PSD and singular; test rows share the feature space (joint PSD kernel)."""
    g = _gen(seed)
    phi = torch.randn(5, 3, generator=g, dtype=F64)          # 5 distinct rows in 3 dims
    phi_tr = torch.cat([phi, phi[:2]])                        # rows 5, 6 duplicate rows 0, 1
    phi_te = torch.randn(3, 3, generator=g, dtype=F64)
    y = torch.randn(7, 2, generator=g, dtype=F64)
    f0 = torch.randn(7, 2, generator=g, dtype=F64)
    g0 = torch.randn(3, 2, generator=g, dtype=F64)
    return phi_tr, phi_te, y, f0, g0


def _oracle_limit(phi_tr, phi_te, y, f0, g0):
    """Gradient flow from f0: train -> f0 + P_range(K) (y - f0), P = Phi Phi^+ (lstsq-based);
    test -> g0 + k_td K^+ (y - f0). Computed without ntkit's eigh."""
    r = y - f0
    coef = torch.linalg.lstsq(phi_tr, r, driver="gelsd").solution   # min-norm Phi^+ r
    train = f0 + phi_tr @ coef
    K = phi_tr @ phi_tr.T
    test = g0 + (phi_te @ phi_tr.T) @ torch.linalg.pinv(K, hermitian=True, rtol=1e-10) @ r
    return train, test


# ------------------------------------------------------------------------------------------
# 1. t = infinity: every spelling gives the one true limit
# ------------------------------------------------------------------------------------------

def test_every_spelling_of_t_inf_agrees_on_a_singular_kernel():
    phi_tr, phi_te, y, f0, g0 = _singular_problem()
    K, Ktd = phi_tr @ phi_tr.T, phi_te @ phi_tr.T
    assert int(torch.linalg.matrix_rank(K)) == 3              # 7 x 7, rank 3: singular
    want_tr, want_te = _oracle_limit(phi_tr, phi_te, y, f0, g0)
    assert _rel(want_tr, y) > 0.1                             # the limit is NOT y_train

    pf = P.gradient_descent_mse(K, y, learning_rate=0.7)
    spellings = [None, math.inf, float("inf"), np.inf, torch.tensor(math.inf),
                 np.array(np.inf)]
    got = [pf(t, f0, g0, Ktd) for t in spellings]
    vec = pf(torch.tensor([math.inf]), f0, g0, Ktd)
    got.append((vec[0][0], vec[1][0]))
    big = pf(torch.tensor([1e6, 1e300]), f0, g0, Ktd)          # large finite t
    got.append((big[0][1], big[1][1]))
    disc = P.gradient_descent_mse_discrete(K, y, learning_rate=0.5)
    got += [disc(None, f0, g0, Ktd), disc(math.inf, f0, g0, Ktd)]
    as_test = pf(None, f0, f0, K)[1]                          # x_test = x_train
    for tr, te in got:
        assert tr.shape == want_tr.shape and te.shape == want_te.shape
        assert _rel(tr, want_tr) < 1e-10
        assert _rel(te, want_te) < 1e-10
    assert _rel(as_test, want_tr) < 1e-10
    # the nullspace of K does not move: duplicated rows keep their initial difference
    assert torch.allclose(got[0][0][5] - got[0][0][0], f0[5] - f0[0], atol=1e-12)

    # GP inference and the infinite ensemble (prior mean f0 = 0)
    zero_tr, zero_te = _oracle_limit(phi_tr, phi_te, y, torch.zeros_like(f0),
                                     torch.zeros_like(g0))
    kd = {"nngp": K, "ntk": K}
    post = P.gp_inference(kd, y)
    assert _rel(post("ntk"), zero_tr) < 1e-10                 # no test kernel: train outputs
    assert _rel(post("nngp", kd), zero_tr) < 1e-10            # x_test = x_train
    assert _rel(post("ntk", {"nngp": Ktd, "ntk": Ktd}), zero_te) < 1e-10

    def kfn(a, b, get):
        b = a if b is None else b
        return {"nngp": a @ b.T, "ntk": a @ b.T}
    ens = P.gradient_descent_mse_ensemble(kfn, phi_tr, y)
    for x_test, want in ((None, zero_tr), (phi_tr, zero_tr), (phi_te, zero_te)):
        for t in (None, math.inf, torch.tensor([math.inf]), torch.tensor(1e300)):
            mean = ens(t, x_test, "ntk")
            mean = mean[0] if mean.ndim == 3 else mean
            assert _rel(mean, want) < 1e-10, (x_test is None, t)
    a = ens(None, None, "ntk", compute_cov=True)
    b = ens(None, phi_tr, "ntk", compute_cov=True)
    c = post("ntk", None, True)
    assert torch.allclose(a.covariance, b.covariance, atol=1e-10)
    assert torch.allclose(a.covariance, c.covariance, atol=1e-10)


def test_duplicated_rows_converge_to_the_mean_label_closed_form():
    """x = (e1, e1, e2): K = [[1,1,0],[1,1,0],[0,0,1]]. Gradient flow moves only the sum of the
    duplicated pair, so both converge to f0 + mean of their residuals; the third to its label."""
    K = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=F64)
    y = torch.tensor([[1.0], [3.0], [5.0]], dtype=F64)
    pf = P.gradient_descent_mse(K, y)
    assert torch.allclose(pf(None), torch.tensor([[2.0], [2.0], [5.0]], dtype=F64), atol=1e-12)
    f0 = torch.tensor([[0.5], [-1.0], [2.0]], dtype=F64)
    shift = ((y[0] - f0[0]) + (y[1] - f0[1])) / 2                  # 2.25
    want = torch.stack([f0[0] + shift, f0[1] + shift, y[2]])       # 2.75, 1.25, 5
    for t in (None, math.inf, torch.tensor(math.inf)):
        assert torch.allclose(pf(t, f0), want, atol=1e-12)
    # finite t, closed form: the pair's mean residual decays as exp(-2 t / N), N = 3
    t = 0.9
    dec = math.exp(-2 * t / 3)
    got = pf(t, f0)
    assert float(got[0] - f0[0]) == pytest.approx(float(shift) * (1 - dec), rel=1e-12)
    assert float(got[2]) == pytest.approx(5 + (2 - 5) * math.exp(-t / 3), rel=1e-12)
    # GP inference on the training inputs: the mean of conflicting labels
    assert torch.allclose(P.gp_inference(K, y)("nngp"), pf(None), atol=1e-12)


def test_zero_kernel_nothing_moves():
    K = torch.zeros(2, 2, dtype=F64)
    y = torch.tensor([[1.0], [-2.0]], dtype=F64)
    f0 = torch.tensor([[0.3], [0.4]], dtype=F64)
    g0 = torch.tensor([[7.0]], dtype=F64)
    pf = P.gradient_descent_mse(K, y)
    for t in (None, 5.0, math.inf, torch.tensor([0.0, 1e9, math.inf])):
        tr, te = pf(t, f0, g0, torch.zeros(1, 2, dtype=F64))
        assert torch.allclose(tr, f0.expand_as(tr), rtol=0, atol=1e-15)
        assert torch.allclose(te, g0.expand_as(te), rtol=0, atol=1e-15)
    assert torch.equal(P.gp_inference(K, y)("nngp"), torch.zeros_like(y))
    assert P.max_learning_rate(K) == math.inf


def test_ill_conditioned_finite_t_agrees_with_inf_and_is_continuous():
    """Condition ~1e18 (kernel eigenvalues 1 ... 1e-18): numerically-null modes are treated the
    same at finite t as at t = inf, so f(t) -> f(inf) as t grows (the reported bug: error 24 at
    t = 1e20 against 0.38 at t = inf)."""
    g = _gen(3)
    n, m, p = 8, 4, 8
    Q1, _ = torch.linalg.qr(torch.randn(n + m, n + m, generator=g, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))
    phi = Q1[:, :p] @ torch.diag(torch.logspace(0, -9, p, dtype=F64)) @ Q2.T
    K, Ktd = phi[:n] @ phi[:n].T, phi[n:] @ phi[:n].T
    y = torch.randn(n, 1, generator=g, dtype=F64)
    pf = P.gradient_descent_mse(K, y)
    inf_tr, inf_te = pf(None, 0.0, 0.0, Ktd)
    ts = torch.logspace(0, 30, 31, dtype=F64)
    tr, te = pf(ts, 0.0, 0.0, Ktd)
    d_tr = (tr - inf_tr).flatten(1).norm(dim=1)
    d_te = (te - inf_te).flatten(1).norm(dim=1)
    assert bool((d_tr[1:] <= d_tr[:-1] + 1e-12).all())             # monotone on train
    assert float(d_tr[-1]) < 1e-10 * float(inf_tr.norm())
    assert float(d_te[20]) < 1e-10 * float(inf_te.norm())           # t = 1e20
    assert float(d_te[-1]) < 1e-10 * float(inf_te.norm())
    # and the limit is what it should be: min-norm kernel regression on the resolvable modes
    eps = torch.finfo(F64).eps
    ref = Ktd @ torch.linalg.pinv(K, hermitian=True, rtol=n * eps) @ y
    # both solves amplify rounding by the condition number of the resolvable modes (~7e12
    # here: eigenvalues 1 ... 1.4e-13 kept, relative error ~ cond * eps ~ 2e-3 each, and
    # different LAPACK builds round differently): allow 20 cond eps; the bug was O(1)-O(100)
    lam = torch.linalg.eigvalsh(K)
    kept = lam[lam > n * eps * lam[-1]]
    cond = float(kept[-1] / kept[0])
    assert 1e12 < cond < 1e14
    assert _rel(inf_te, ref) < 20 * cond * eps
    # the discrete variant: numerically-null modes do not accumulate either
    lr = 0.5 * P.max_learning_rate(K, y.numel())
    d = P.gradient_descent_mse_discrete(K, y, lr)
    assert _rel(d(10 ** 15, 0.0, 0.0, Ktd)[1], inf_te) < 1e-8


# ------------------------------------------------------------------------------------------
# 2. divergence of discrete gradient descent
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unstable_learning_rate_raises_naming_the_limit(momentum):
    g = _gen(4)
    phi = torch.randn(6, 10, generator=g, dtype=F64) / math.sqrt(10)
    K = phi @ phi.T
    y = torch.randn(6, 2, generator=g, dtype=F64)
    lam = float(torch.linalg.eigvalsh(K)[-1])
    limit = 2 * (1 + momentum) * y.numel() / lam               # heavy ball: 2 (1 + mu) N / lam
    assert P.max_learning_rate(K, y.numel(), momentum) == pytest.approx(limit, rel=1e-12)
    bad = P.gradient_descent_mse_discrete(K, y, learning_rate=1.01 * limit, momentum=momentum)
    for steps in (None, 3, torch.tensor([1, 1000])):
        with pytest.raises(ValueError, match=r"learning_rate.*unstable.*stable limit") as e:
            bad(steps, 0.0, 0.0, K[:2])
        assert f"{limit:.6g}" in str(e.value)
    # just below the limit is fine and finite, and matches real SGD (same sign convention)
    ok = P.gradient_descent_mse_discrete(K, y, learning_rate=0.99 * limit, momentum=momentum)
    out = ok(torch.tensor([10, 2000]), 0.0)
    assert torch.isfinite(out).all()
    theta = torch.nn.Parameter(torch.zeros(10, 2, dtype=F64))
    opt = torch.optim.SGD([theta], lr=0.99 * limit, momentum=momentum)
    for _ in range(10):
        opt.zero_grad()
        (0.5 * ((phi @ theta - y) ** 2).mean()).backward()
        opt.step()
    assert _rel(out[0], (phi @ theta).detach()) < 1e-9
    if momentum:                    # the momentum limit is larger: no momentum would diverge
        with pytest.raises(ValueError, match="unstable"):
            P.gradient_descent_mse_discrete(K, y, learning_rate=0.99 * limit)(5, 0.0)


def test_overflowing_prediction_raises_instead_of_inf():
    K = torch.eye(2, dtype=F64)
    y = torch.full((2, 1), 1e200, dtype=F64)
    ktd = torch.full((1, 2), 1e200, dtype=F64)                 # not a joint PSD kernel with K
    pf = P.gradient_descent_mse(K, y)
    with pytest.raises(ValueError, match="not finite"):
        pf(None, 0.0, 0.0, ktd)
    with pytest.raises(ValueError, match="not finite"):
        P.gp_inference(K, y)("nngp", ktd)


# ------------------------------------------------------------------------------------------
# 3. gp_inference never guesses the NNGP
# ------------------------------------------------------------------------------------------

def test_gp_inference_single_matrix_refuses_the_ntk_covariance():
    g = _gen(5)
    a = torch.randn(7, 4, generator=g, dtype=F64)
    b = torch.randn(7, 4, generator=g, dtype=F64)
    nngp, ntk = a @ a.T, a @ a.T + b @ b.T                       # two different kernels
    y = torch.randn(5, 1, generator=g, dtype=F64)
    kdd = {"nngp": nngp[:5, :5], "ntk": ntk[:5, :5]}
    ktd = {"nngp": nngp[5:, :5], "ntk": ntk[5:, :5]}
    ktt = nngp[5:, 5:]
    right = P.gp_inference(kdd, y)("ntk", ktd, ktt)
    with pytest.raises(ValueError, match="single matrix.*NNGP.*NTK"):
        P.gp_inference(ntk[:5, :5], y)("ntk", ntk[5:, :5], ktt)
    with pytest.raises(ValueError, match="k_test_train.*single matrix"):
        P.gp_inference(kdd, y)("ntk", ntk[5:, :5], ktt)
    with pytest.raises(ValueError, match="single matrix"):
        P.gp_inference(ntk[:5, :5], y)("ntk", None, True)
    # the mean needs only the NTK: a single matrix is fine there, and equals the full answer
    assert torch.allclose(P.gp_inference(ntk[:5, :5], y)("ntk", ntk[5:, :5]), right.mean,
                          atol=1e-12)
    # the 'ntk' posterior covariance itself, against its formula with both kernels
    T, Tt, K, Kt = ntk[:5, :5], ntk[5:, :5], nngp[:5, :5], nngp[5:, :5]
    Q = Tt @ torch.linalg.inv(T)
    assert _rel(right.covariance, ktt + Q @ K @ Q.T - Q @ Kt.T - Kt @ Q.T) < 1e-9
    with pytest.raises(ValueError, match="same training set"):
        P.gp_inference({"nngp": nngp[:4, :4], "ntk": ntk[:5, :5]}, y)("nngp")


# ------------------------------------------------------------------------------------------
# 4. stiff ODEs fail fast
# ------------------------------------------------------------------------------------------

def test_stiff_ode_fails_fast_with_a_clear_message():
    g = _gen(6)
    phi = torch.randn(6, 12, generator=g, dtype=F64)
    phi = torch.cat([phi, phi[:2]])                            # duplicates, conflicting labels:
    K = 1e4 * phi @ phi.T                                      # cross-entropy cannot saturate
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 1, 2]), 3).to(F64)
    for loss, mom in (("cross_entropy", None), ("mse", None), ("cross_entropy", 0.9)):
        pf = P.gradient_descent(loss, K, y, momentum=mom)      # default max_steps = 200000
        start = time.perf_counter()
        with pytest.raises(ValueError, match="max_steps") as e:
            pf(torch.tensor([1.0, 1e7]), 0.0)
        assert time.perf_counter() - start < 5.0, loss
        assert "stiff" in str(e.value) and "lambda_max" in str(e.value)
        if loss == "mse":
            assert "gradient_descent_mse" in str(e.value)
    # a non-stiff request on the same kernel still succeeds (and trains)
    out = P.gradient_descent("cross_entropy", K, y)(1e-3, 0.0)
    assert torch.isfinite(out).all() and float(out.abs().max()) > 0


def test_ode_rejects_invalid_kernels_and_controls():
    g = _gen(7)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    not_psd = Q @ torch.diag(torch.tensor([2.0, 1.0, 0.5, -0.5], dtype=F64)) @ Q.T
    y = torch.randn(4, 1, generator=g, dtype=F64)
    with pytest.raises(ValueError, match="positive semi-definite"):
        P.gradient_descent("mse", not_psd, y)
    with pytest.raises(ValueError, match="symmetric"):
        P.gradient_descent("mse", not_psd + torch.triu(torch.ones(4, 4, dtype=F64), 1), y)
    with pytest.raises(ValueError, match="rtol"):
        P.gradient_descent("mse", torch.eye(4, dtype=F64), y, rtol=float("nan"))
    with pytest.raises(ValueError, match="max_steps"):
        P.gradient_descent("mse", torch.eye(4, dtype=F64), y, max_steps=0)


# ------------------------------------------------------------------------------------------
# 5. other silent paths: shapes, NaN, huge ridge; one threshold in _linalg
# ------------------------------------------------------------------------------------------

def test_shape_and_value_errors_name_the_argument():
    K = torch.eye(3, dtype=F64)
    y = torch.ones(3, 1, dtype=F64)

    def kfn_bad(a, b, get):
        n = a.shape[0]
        return {"nngp": torch.eye(n, dtype=F64) if b is None else a @ b.T,
                "ntk": torch.eye(n + 1, dtype=F64) if b is None else a @ b.T}
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"kernel_fn\(x_train\)\.ntk"):
        P.gradient_descent_mse_ensemble(kfn_bad, x, y)(1.0, None, ("nngp", "ntk"))
    with pytest.raises(ValueError, match="NaN"):
        P.gradient_descent_mse(K, y)(1.0, torch.full((3, 1), math.nan, dtype=F64))
    with pytest.raises(ValueError, match="diag_reg"):
        P.gradient_descent_mse(K * 1e10, y, diag_reg=1e300)      # ridge overflows to inf
    with pytest.raises(ValueError, match="steps"):
        P.gradient_descent_mse_discrete(K, y, 0.1)(1e30)
    kdd = {"nngp": K, "ntk": K}
    with pytest.raises(ValueError, match=r"k_test_train\.nngp"):
        P.gp_inference(kdd, y)("ntk", {"nngp": torch.ones(2, 5, dtype=F64),
                                       "ntk": torch.ones(2, 3, dtype=F64)},
                               torch.eye(2, dtype=F64))


def test_one_null_threshold_and_pinv_solve():
    """cutoff = n * eps(kernel dtype) * lambda_max; pinv_solve = numpy-style pinv with it."""
    g = _gen(8)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
    lam = torch.tensor([1e-17, 1e-9, 1e-3, 0.5, 2.0], dtype=F64)
    K = Q @ torch.diag(lam) @ Q.T
    f = _linalg.Factorization(K)
    assert f.cutoff == pytest.approx(5 * 2.220446049250313e-16 * 2.0, rel=1e-6)
    evals, _, live = f.spectrum()
    assert live.tolist() == [False, True, True, True, True]
    assert float(evals[0]) == 0.0
    b = torch.randn(5, 2, generator=g, dtype=F64)
    ref = torch.linalg.pinv(K, hermitian=True, atol=f.cutoff) @ b
    assert _rel(f.pinv_solve(b), ref) < 1e-6
    # a float32 kernel: its own eps, so the 1e-9 mode (below float32 noise) is null too
    f32 = _linalg.Factorization(K.float())
    assert f32.spectrum()[2].tolist() == [False, False, True, True, True]
    modes = P.eigenmodes(K, torch.ones(5, 1, dtype=F64))
    assert float(modes.eigenvalues[-1]) == 0.0 and math.isinf(float(modes.timescales[-1]))


def test_discrete_step_zero_at_a_mode_with_unit_step_factor():
    """``c lam = 1`` (learning rate at half the stable limit for the top mode) once gave
    ``0 * log(0) = NaN`` at step 0. Oracle: real GD on the linearized model, step by step."""
    g = _gen(11)
    k = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=F64))
    y = torch.randn(3, 1, generator=g, dtype=F64)
    lr = 0.5 * P.max_learning_rate(k, y.numel())          # = 1.5: lr / N * 2 == 1 exactly
    assert lr / y.numel() * 2.0 == 1.0
    fn = P.gradient_descent_mse_discrete(k, y, lr)
    f0 = torch.randn(3, 1, generator=g, dtype=F64)
    f, want = f0.clone(), []
    for _ in range(4):
        want.append(f.clone())
        f = f - lr / y.numel() * (k @ (f - y))
    got = fn(torch.arange(4), fx_train_0=f0)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-9, atol=1e-9)
