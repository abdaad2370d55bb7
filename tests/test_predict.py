"""Tests of ntkit.predict against independent oracles (float64 throughout).

Oracles: the matrix exponential of the (augmented) linear ODE; explicit linear models trained with
torch.optim.SGD (their NTK is exactly Phi Phi^T); direct linear solves; a line-by-line numpy
transcription of neural-tangents' einsum formulas; Monte Carlo over independently initialized
and trained finite networks; real networks at increasing width (distance ~ width^-1/2).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ntkit import predict as P
from ntkit import _linalg
from ntkit import layers as nl

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# fixtures / helpers
# ------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops: one intra-op thread avoids spin-wait overhead (and keeps a
    shared 2-core machine responsive); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def arch():
    return nl.serial(nl.Dense(512, W_std=1.5, b_std=0.1), nl.Relu(),
                     nl.Dense(512, W_std=1.5, b_std=0.1), nl.Erf(),
                     nl.Dense(1, W_std=1.2, b_std=0.2))


@pytest.fixture(scope="module")
def data(arch):
    g = _gen(0)
    x = torch.randn(12, 3, generator=g, dtype=F64)
    xt = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.randn(12, 2, generator=g, dtype=F64)
    xa = torch.cat([x, xt])
    ka = arch.kernel(xa, get=("nngp", "ntk"))
    n = 12
    return dict(x=x, xt=xt, y=y, n=n,
                nngp_all=ka.nngp, ntk_all=ka.ntk,
                nngp_dd=ka.nngp[:n, :n], nngp_td=ka.nngp[n:, :n], nngp_tt=ka.nngp[n:, n:],
                ntk_dd=ka.ntk[:n, :n], ntk_td=ka.ntk[n:, :n], ntk_tt=ka.ntk[n:, n:])


def _flow_oracle(theta_dd, theta_td, y, f0, g0, t_abs, size):
    """Matrix exponential of the joint linear ODE  d[r; g]/dt = -[Th_dd; Th_td] r / N."""
    n, m = theta_dd.shape[0], theta_td.shape[0]
    M = torch.zeros(n + m, n + m, dtype=F64)
    M[:n, :n] = -theta_dd / size
    M[n:, :n] = -theta_td / size
    E = torch.linalg.matrix_exp(M * t_abs)
    z = E @ torch.cat([f0 - y, g0])
    return z[:n] + y, z[n:], E


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# ------------------------------------------------------------------------------------------
# 1. gradient_descent_mse
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("diag_reg,absolute", [(0.0, False), (1e-2, False), (0.05, True)])
def test_flow_matches_matrix_exponential(data, diag_reg, absolute):
    n, y = data["n"], data["y"]
    g = _gen(1)
    f0 = torch.randn(n, 2, generator=g, dtype=F64)
    g0 = torch.randn(5, 2, generator=g, dtype=F64)
    lr = 0.7
    pf = P.gradient_descent_mse(data["ntk_dd"], y, learning_rate=lr, diag_reg=diag_reg,
                                diag_reg_absolute_scale=absolute)
    ridge = diag_reg if absolute else diag_reg * float(torch.diagonal(data["ntk_dd"]).mean())
    theta = data["ntk_dd"] + ridge * torch.eye(n, dtype=F64)
    ts = torch.tensor([0.0, 0.3, 5.0, 40.0, 700.0], dtype=F64)
    fr, fe = pf(ts, f0, g0, data["ntk_td"])
    assert fr.shape == (5, n, 2) and fe.shape == (5, 5, 2)
    for i, t in enumerate(ts):
        o_tr, o_te, _ = _flow_oracle(theta, data["ntk_td"], y, f0, g0, float(t) * lr, y.numel())
        assert _rel(fr[i], o_tr) < 1e-10
        assert _rel(fe[i], o_te) < 1e-10
    # scalar t -> no time axis; only train / only test
    assert pf(5.0, f0).shape == (n, 2)
    # fx_train_0=None: train outputs not returned, initial train outputs taken as 0 (as in NT)
    assert torch.allclose(pf(5.0, None, g0, data["ntk_td"]), pf(5.0, 0.0, g0, data["ntk_td"])[1],
                          rtol=1e-12, atol=1e-12)


def _linear_model(n=10, m=4, p=40, k=3, seed=2):
    g = _gen(seed)
    phi = torch.randn(n + m, p, generator=g, dtype=F64) / math.sqrt(p)
    theta0 = torch.randn(p, k, generator=g, dtype=F64)
    y = torch.randn(n, k, generator=g, dtype=F64)
    return phi[:n], phi[n:], theta0, y


def _train_linear(phi_tr, phi_te, theta0, y, lr, steps, momentum=0.0, loss="mse"):
    theta = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        f = phi_tr @ theta
        if loss == "mse":
            val = 0.5 * ((f - y) ** 2).mean()
        else:
            val = -(torch.log_softmax(f, -1) * y).mean()
        val.backward()
        opt.step()
    with torch.no_grad():
        return phi_tr @ theta, phi_te @ theta


def test_flow_matches_many_small_gd_steps():
    """Gradient flow is the small-step limit of real GD on a linear model (NTK = Phi Phi^T)."""
    phi_tr, phi_te, th0, y = _linear_model()
    K, Ktd = phi_tr @ phi_tr.T, phi_te @ phi_tr.T
    f0, g0 = phi_tr @ th0, phi_te @ th0
    t_abs = 60.0
    pf = P.gradient_descent_mse(K, y)
    want_tr, want_te = pf(t_abs, f0, g0, Ktd)
    errs = []
    for lr in (0.4, 0.1):
        got_tr, got_te = _train_linear(phi_tr, phi_te, th0, y, lr, int(round(t_abs / lr)))
        errs.append(_rel(torch.cat([got_tr, got_te]), torch.cat([want_tr, want_te])))
    assert errs[1] < 0.01
    assert errs[1] < errs[0] / 3          # first-order convergence in the step size


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_discrete_steps_exact_for_sgd(momentum):
    phi_tr, phi_te, th0, y = _linear_model(seed=3)
    K, Ktd = phi_tr @ phi_tr.T, phi_te @ phi_tr.T
    f0, g0 = phi_tr @ th0, phi_te @ th0
    lr = 0.3 * P.max_learning_rate(K, y.numel(), momentum=momentum)
    pf = P.gradient_descent_mse_discrete(K, y, learning_rate=lr, momentum=momentum)
    steps = torch.tensor([0, 1, 7, 50])
    fr, fe = pf(steps, f0, g0, Ktd)
    for i, s in enumerate(steps.tolist()):
        got_tr, got_te = _train_linear(phi_tr, phi_te, th0, y, lr, s, momentum)
        assert _rel(fr[i], got_tr) < 1e-10
        assert _rel(fe[i], got_te) < 1e-10


def test_max_learning_rate_is_the_stability_edge():
    phi_tr, phi_te, th0, y = _linear_model(seed=4)
    K = phi_tr @ phi_tr.T
    for mom in (0.0, 0.5):
        lr_max = P.max_learning_rate(K, y.numel(), momentum=mom)
        lam = float(torch.linalg.eigvalsh(K)[-1])
        assert lr_max == pytest.approx(2 * (1 + mom) * y.numel() / lam, rel=1e-12)
        loss = lambda f: float(((f - y) ** 2).mean())  # noqa: E731
        f_ok, _ = _train_linear(phi_tr, phi_te, th0, y, 0.97 * lr_max, 400, mom)
        f_bad, _ = _train_linear(phi_tr, phi_te, th0, y, 1.03 * lr_max, 400, mom)
        assert loss(f_ok) < loss(phi_tr @ th0)
        assert loss(f_bad) > 1e3 * loss(phi_tr @ th0)
    pf = P.gradient_descent_mse_discrete(K, y, learning_rate=1.03 * P.max_learning_rate(K, 30))
    with pytest.raises(ValueError, match="unstable"):
        pf(None, 0.0)


def test_t_infinity_is_kernel_regression(data):
    n, y = data["n"], data["y"]
    f0 = torch.randn(n, 2, generator=_gen(5), dtype=F64)
    g0 = torch.randn(5, 2, generator=_gen(6), dtype=F64)
    for reg in (0.0, 1e-3):
        pf = P.gradient_descent_mse(data["ntk_dd"], y, diag_reg=reg)
        scale = reg * float(torch.diagonal(data["ntk_dd"]).mean())
        theta = data["ntk_dd"] + scale * torch.eye(n, dtype=F64)
        direct = g0 + data["ntk_td"] @ torch.linalg.solve(theta, y - f0)
        fr, fe = pf(None, f0, g0, data["ntk_td"])
        assert torch.equal(fr, y)
        assert _rel(fe, direct) < 1e-10
        fr2, fe2 = pf(torch.tensor([1.0, math.inf]), f0, g0, data["ntk_td"])   # eigen path
        assert _rel(fe2[1], direct) < 1e-9
        assert torch.allclose(pf(math.inf, f0, g0, data["ntk_td"])[1], fe)
        if reg == 0:
            assert _rel(fr2[1], y) < 1e-9


# ------------------------------------------------------------------------------------------
# 2. the infinite ensemble, gp_inference
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("get,diag_reg", [("ntk", 0.0), ("ntk", 1e-2), ("nngp", 0.0)])
def test_ensemble_matches_linear_gaussian_oracle(arch, data, get, diag_reg):
    """f_0 ~ GP(0, NNGP) pushed through the flow ODE (matrix exponential) = predicted Gaussian."""
    n, y = data["n"], data["y"]
    lr = 0.5
    ens = P.gradient_descent_mse_ensemble(arch, data["x"], y, learning_rate=lr, diag_reg=diag_reg)
    ts = torch.tensor([0.0, 2.0, 30.0, 1e3], dtype=F64)
    res_te = ens(t=ts, x_test=data["xt"], get=get, compute_cov=True)
    res_tr = ens(t=ts, x_test=None, get=get, compute_cov=True)
    th_all = data["ntk_all"] if get == "ntk" else data["nngp_all"]
    ridge = diag_reg * float(torch.diagonal(th_all[:n, :n]).mean())
    th_dd = th_all[:n, :n] + ridge * torch.eye(n, dtype=F64)
    K = data["nngp_all"]
    for i, t in enumerate(ts):
        _, _, E = _flow_oracle(th_dd, th_all[n:, :n], y, torch.zeros(n, 2, dtype=F64),
                               torch.zeros(5, 2, dtype=F64), float(t) * lr, y.numel())
        mean = -E[:, :n] @ y + torch.cat([y, torch.zeros(5, 2, dtype=F64)])
        cov = E @ K @ E.T
        assert _rel(res_te.mean[i], mean[n:]) < 1e-9
        assert _rel(res_te.covariance[i], cov[n:, n:]) < 1e-9
        assert _rel(res_tr.mean[i], mean[:n]) < 1e-9
        assert _rel(res_tr.covariance[i], cov[:n, :n]) < 1e-9
    # t = None (solve path) equals the large-t limit of the eigen path
    inf = ens(t=None, x_test=data["xt"], get=get, compute_cov=True)
    big = ens(t=torch.tensor([math.inf]), x_test=data["xt"], get=get, compute_cov=True)
    assert _rel(inf.mean, big.mean[0]) < 1e-8
    assert _rel(inf.covariance, big.covariance[0]) < 1e-8


def _nt_reference(nngp_dd, ntk_dd, nngp_td, ntk_td, nngp_tt, y, t, get, diag_reg, lr):
    """Line-by-line numpy transcription of neural-tangents 0.6.5 gradient_descent_mse_ensemble
    (finite t, test set, mean and covariance): eigh per call, einsum as in their source."""
    k_dd = {"nngp": nngp_dd, "ntk": ntk_dd}[get]
    A = k_dd + diag_reg * np.trace(k_dd) / k_dd.shape[0] * np.eye(k_dd.shape[0])
    evals, evecs = np.linalg.eigh(A)
    evals = evals[None]
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1) * lr
    size = y.size

    def expm1(ev, tt):
        return np.expm1(-np.maximum(ev, 0.0) * tt / size)

    def inv_expm1(ev, tt):
        return expm1(ev, tt) / np.abs(ev)

    ktd_g = {"nngp": nngp_td, "ntk": ntk_td}[get]
    neg_inv_expm1 = -inv_expm1(evals, t)
    mean = np.einsum("lj,ji,ti,ki,k...->tl...", ktd_g, evecs, neg_inv_expm1, evecs, y,
                     optimize=True)
    nngp_tt_ = nngp_tt[None]
    if get == "nngp":
        cov = nngp_tt_ - np.einsum("mj,ji,ti,ki,lk->tml", ktd_g, evecs, -inv_expm1(evals, 2 * t),
                                   evecs, ktd_g, optimize=True)
    else:
        term_1 = np.einsum("mi,ti,ki,lk->tml", evecs, neg_inv_expm1, evecs, ktd_g, optimize=True)
        term_2 = np.einsum("mj,ji,ti,ki,lk->tml", ktd_g, evecs, neg_inv_expm1, evecs, nngp_td,
                           optimize=True)
        term_2 += np.moveaxis(term_2, 1, 2)
        cov = np.einsum("tji,jk,tkl->til", term_1, nngp_dd, term_1, optimize=True)
        cov += -term_2 + nngp_tt_
    return mean, cov


@pytest.mark.parametrize("get", ["ntk", "nngp"])
@pytest.mark.parametrize("diag_reg", [0.0, 1e-3])
def test_matches_neural_tangents_formulas(arch, data, get, diag_reg):
    y = data["y"]
    lr = 2.0
    ts = np.array([0.5, 3.0, 20.0, 150.0])
    ens = P.gradient_descent_mse_ensemble(arch.kernel, data["x"], y, learning_rate=lr,
                                          diag_reg=diag_reg)
    got = ens(x_test=data["xt"], t=torch.tensor(ts), get=get, compute_cov=True)
    np_ = {k: v.numpy() for k, v in data.items() if isinstance(v, torch.Tensor)}
    mean, cov = _nt_reference(np_["nngp_dd"], np_["ntk_dd"], np_["nngp_td"], np_["ntk_td"],
                              np_["nngp_tt"], np_["y"], ts, get, diag_reg, lr)
    assert np.linalg.norm(got.mean.numpy() - mean) <= 1e-8 * np.linalg.norm(mean)
    assert np.linalg.norm(got.covariance.numpy() - cov) <= 1e-8 * np.linalg.norm(cov)


def test_gp_inference_posteriors(data):
    y = data["y"]
    k_dd = {"nngp": data["nngp_dd"], "ntk": data["ntk_dd"]}
    k_td = {"nngp": data["nngp_td"], "ntk": data["ntk_td"]}
    k_tt = {"nngp": data["nngp_tt"], "ntk": data["ntk_tt"]}
    post = P.gp_inference(k_dd, y)
    res = post(("nngp", "ntk", "ntkgp"), k_td, k_tt)
    S = torch.linalg.solve
    K, Kt, Ktt = data["nngp_dd"], data["nngp_td"], data["nngp_tt"]
    T, Tt, Ttt = data["ntk_dd"], data["ntk_td"], data["ntk_tt"]
    assert _rel(res.nngp.mean, Kt @ S(K, y)) < 1e-9
    assert _rel(res.nngp.covariance, Ktt - Kt @ S(K, Kt.T)) < 1e-8
    assert _rel(res.ntkgp.mean, Tt @ S(T, y)) < 1e-9
    assert _rel(res.ntkgp.covariance, Ttt - Tt @ S(T, Tt.T)) < 1e-8
    Q = Tt @ torch.linalg.inv(T)
    assert _rel(res.ntk.covariance, Ktt + Q @ K @ Q.T - Q @ Kt.T - Kt @ Q.T) < 1e-8
    # train set: y with zero covariance; mean-only when k_test_test is None
    tr = post("nngp", None, True)
    assert torch.equal(tr.mean, y) and torch.count_nonzero(tr.covariance) == 0
    assert torch.equal(post("ntk", k_td), res.ntk.mean)
    with pytest.raises(ValueError, match="nngp"):
        P.gp_inference({"ntk": data["ntk_dd"]}, y)("ntk", {"ntk": data["ntk_td"]},
                                                  data["nngp_tt"])


def test_ensemble_kernel_fn_forms(arch, data):
    """An architecture, a kernel_fn returning a record, and one returning dicts agree."""
    y = data["y"]
    fn_dict = lambda a, b, get: {g: arch.kernel(a, b, get=g) for g in  # noqa: E731
                                 ((get,) if isinstance(get, str) else get)}
    outs = [P.gradient_descent_mse_ensemble(k, data["x"], y)(3.0, data["xt"], "ntk", True)
            for k in (arch, arch.kernel, fn_dict)]
    for o in outs[1:]:
        assert torch.allclose(o.mean, outs[0].mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(o.covariance, outs[0].covariance, rtol=1e-12, atol=1e-12)
    both = P.gradient_descent_mse_ensemble(arch, data["x"], y)(3.0, data["xt"])
    assert set(both._fields) == {"nngp", "ntk"} and torch.allclose(both.ntk, outs[0].mean)
    with pytest.raises(TypeError, match="order"):
        P.gradient_descent_mse_ensemble(arch, data["x"], y)(data["xt"], 3.0)


def _batched_nets(x_all, n_train, y, width, n_nets, lr, steps, seed):
    """n_nets independent 1-hidden-layer ReLU nets (NTK parameterization), trained in a batch by
    full-batch GD on 1/2 mean (f - y)^2; returns outputs on x_all after `steps` steps."""
    g = _gen(seed)
    d = x_all.shape[1]
    W1 = torch.randn(n_nets, width, d, generator=g, dtype=F64).requires_grad_()
    b1 = torch.randn(n_nets, 1, width, generator=g, dtype=F64).requires_grad_()
    W2 = torch.randn(n_nets, width, 1, generator=g, dtype=F64).requires_grad_()
    b2 = torch.randn(n_nets, 1, 1, generator=g, dtype=F64).requires_grad_()
    params = [W1, b1, W2, b2]

    def f(x):
        h = 1.5 / math.sqrt(d) * torch.einsum("bwd,nd->bnw", W1, x) + 0.1 * b1
        return 1.5 / math.sqrt(width) * torch.relu(h) @ W2 + 0.1 * b2     # (B, n, 1)

    x_tr = x_all[:n_train]
    for _ in range(steps):
        loss = 0.5 * ((f(x_tr) - y) ** 2).mean(dim=(1, 2)).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p_, g_ in zip(params, grads):
                p_ -= lr * g_
    with torch.no_grad():
        return f(x_all)[..., 0]                                           # (B, n_all)


def test_ensemble_matches_trained_finite_networks():
    """Mean and covariance over 400 independently initialized and trained width-1024 nets."""
    arch1 = nl.serial(nl.Dense(1024, W_std=1.5, b_std=0.1), nl.Relu(),
                      nl.Dense(1, W_std=1.5, b_std=0.1))
    g = _gen(7)
    n, m = 6, 4
    x_all = torch.randn(n + m, 3, generator=g, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    ntk = arch1.kernel(x_all[:n], get="ntk")
    lr = 0.1 * P.max_learning_rate(ntk, y.numel())
    steps = 100
    B = 400
    out = _batched_nets(x_all, n, y, 1024, B, lr, steps, seed=8)
    emp_mean = out.mean(0)
    emp_cov = torch.cov(out.T)
    ens = P.gradient_descent_mse_ensemble(arch1, x_all[:n], y)
    # the network took discrete steps; compare with flow at t = steps (time unit lr) and check the
    # discretization is negligible here by the exact discrete mean (f0 = 0 in expectation)
    pred = ens(t=steps * lr, x_test=x_all[n:], get="ntk", compute_cov=True)
    k_td = arch1.kernel(x_all[n:], x_all[:n], get="ntk")
    disc = P.gradient_descent_mse_discrete(ntk, y, lr)(steps, None, 0.0, k_td)
    assert _rel(pred.mean, disc) < 0.02
    se = (torch.diagonal(pred.covariance) / B).sqrt()
    z = (emp_mean[n:] - pred.mean[:, 0]) / se
    assert float(z.abs().max()) < 4.5, z
    err = _rel(emp_cov[n:, n:], pred.covariance)      # MC error ~ sqrt(2 / B) = 0.07
    assert err < 0.12, err
    # the comparison discriminates: the untrained prior covariance, and the mean of training only
    # the readout (NNGP dynamics), are far from what the networks did
    prior = arch1.kernel(x_all[n:], get="nngp")
    assert _rel(emp_cov[n:, n:], prior) > 4 * err
    wrong = ens(t=steps * lr, x_test=x_all[n:], get="nngp")
    assert float(((emp_mean[n:] - wrong[:, 0]) / se).abs().max()) > 6


# ------------------------------------------------------------------------------------------
# 3. other losses (ODE)
# ------------------------------------------------------------------------------------------

def test_ode_mse_matches_closed_form(data):
    y = data["y"]
    f0 = torch.randn(12, 2, generator=_gen(9), dtype=F64)
    ts = torch.tensor([3.0, 0.0, 40.0], dtype=F64)           # unsorted on purpose
    ode = P.gradient_descent("mse", data["ntk_dd"], y, learning_rate=0.5)
    cf = P.gradient_descent_mse(data["ntk_dd"], y, learning_rate=0.5)
    a_tr, a_te = ode(ts, f0, 0.0, data["ntk_td"])
    b_tr, b_te = cf(ts, f0, 0.0, data["ntk_td"])
    assert _rel(a_tr, b_tr) < 1e-7 and _rel(a_te, b_te) < 1e-7


def test_ode_cross_entropy_matches_trained_linear_model():
    phi_tr, phi_te, th0, _ = _linear_model(n=10, m=4, p=40, k=3, seed=10)
    labels = torch.randint(0, 3, (10,), generator=_gen(11))
    y = torch.nn.functional.one_hot(labels, 3).to(F64)
    K, Ktd = phi_tr @ phi_tr.T, phi_te @ phi_tr.T
    f0, g0 = phi_tr @ th0, phi_te @ th0
    lr, steps = 0.5, 400
    pf = P.gradient_descent("cross_entropy", K, y, learning_rate=lr)
    want_tr, want_te = pf(float(steps), f0, g0, Ktd)
    custom = P.gradient_descent(lambda f, yy: -(torch.log_softmax(f, -1) * yy).mean(), K, y, lr)
    assert torch.allclose(custom(float(steps), f0), want_tr, rtol=1e-10, atol=1e-12)
    errs = []
    for sub in (1, 4):            # GD with lr/sub for steps*sub steps -> flow as sub grows
        got_tr, got_te = _train_linear(phi_tr, phi_te, th0, y, lr / sub, steps * sub,
                                       loss="ce")
        errs.append(_rel(torch.cat([got_tr, got_te]), torch.cat([want_tr, want_te])))
    assert errs[1] < 2e-3 and errs[1] < errs[0] / 2.5
    # it really trained (loss decreased), so the comparison is not trivial
    assert float((torch.softmax(want_tr, -1) * y).sum(-1).mean()) > \
        float((torch.softmax(f0, -1) * y).sum(-1).mean()) + 0.1


def test_ode_momentum_is_the_heavy_ball_limit():
    """NT's continuous momentum ODE is the limit of heavy-ball GD with momentum 1 - c sqrt(lr)."""
    phi_tr, phi_te, th0, y = _linear_model(seed=12)
    K, Ktd = phi_tr @ phi_tr.T, phi_te @ phi_tr.T
    f0, g0 = phi_tr @ th0, phi_te @ th0
    c, T = 1.0, 8.0                          # friction, absolute time
    errs = []
    for lr in (1e-2, 1e-3):
        mom = 1.0 - c * math.sqrt(lr)
        steps = int(round(T / math.sqrt(lr)))
        ode = P.gradient_descent("mse", K, y, learning_rate=lr, momentum=mom)
        disc = P.gradient_descent_mse_discrete(K, y, learning_rate=lr, momentum=mom)
        a = torch.cat(ode(float(steps), f0, g0, Ktd))
        b = torch.cat(disc(steps, f0, g0, Ktd))
        errs.append(_rel(a, b))
    assert errs[1] < 0.02 and errs[1] < errs[0] / 2


# ------------------------------------------------------------------------------------------
# 4. eigenmodes
# ------------------------------------------------------------------------------------------

def test_eigenmodes_reconstruct_dynamics(data):
    y = data["y"]
    f0 = torch.randn(12, 2, generator=_gen(13), dtype=F64)
    modes = P.eigenmodes(data["ntk_dd"], y, f0, learning_rate=0.5)
    lam = modes.eigenvalues
    assert torch.all(lam[:-1] >= lam[1:])
    assert _rel(modes.eigenvectors @ torch.diag(lam) @ modes.eigenvectors.T, data["ntk_dd"]) < 1e-12
    ts = torch.tensor([0.0, 4.0, 50.0])
    fr = P.gradient_descent_mse(data["ntk_dd"], y, learning_rate=0.5)(ts, f0)
    res = modes.residual(ts)                                      # (3, n, k)
    assert _rel(torch.matmul(modes.eigenvectors, res), fr - y) < 1e-10
    total = 0.5 * ((fr - y) ** 2).mean(dim=(1, 2))
    assert torch.allclose(modes.loss(ts).sum(-1), total, rtol=1e-10)
    dec = modes.decay(ts)
    assert torch.all(dec[2, :-1] <= dec[2, 1:])             # large eigenvalues learned first
    assert torch.allclose(modes.decay(modes.timescales[0])[0],
                          torch.tensor(math.exp(-1), dtype=F64))


# ------------------------------------------------------------------------------------------
# 5. numerics
# ------------------------------------------------------------------------------------------

def test_float32_kernel_factorized_in_float64(data):
    y = data["y"]
    k32, td32 = data["ntk_dd"].float(), data["ntk_td"].float()
    a = P.gradient_descent_mse(k32, y.float())(torch.tensor([1.0, 100.0]), 0.0, 0.0, td32)[1]
    b = P.gradient_descent_mse(k32.double(), y)(torch.tensor([1.0, 100.0]), 0.0, 0.0,
                                                td32.double())[1]
    assert a.dtype == torch.float32
    assert _rel(a.double(), b) < 1e-6


def test_ill_conditioned_kernel_no_nan(arch):
    """Duplicated training points: singular NTK. Cholesky fails in float32 -> NaN in NT (#76)."""
    g = _gen(14)
    x = torch.randn(8, 3, generator=g, dtype=F64)
    x = torch.cat([x, x[:4], x[:4] + 1e-9])                   # exact + near duplicates
    xt = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.randn(8, 1, generator=g, dtype=F64)
    y = torch.cat([y, y[:4], y[:4]])                          # consistent labels
    k = arch.kernel(x, get=("nngp", "ntk"))
    ktd = arch.kernel(xt, x, get=("nngp", "ntk"))
    ktt = arch.kernel(xt, get="nngp")
    for kk in (k.ntk, k.ntk.float()):
        pf = P.gradient_descent_mse(kk, y.to(kk.dtype))
        out = pf(torch.tensor([0.0, 1.0, 1e6, math.inf]), 0.0, 0.0, ktd.ntk.to(kk.dtype))
        out_inf = pf(None, 0.0, 0.0, ktd.ntk.to(kk.dtype))
        for o in (*out, *out_inf):
            assert torch.isfinite(o).all()
        # the singular solve is the minimum-norm (pseudo-inverse) kernel regression
        ref = ktd.ntk @ torch.linalg.pinv(k.ntk, hermitian=True, rtol=1e-10) @ y
        assert _rel(out_inf[1].double(), ref) < (1e-5 if kk.dtype == F64 else 1e-3)
    ens = P.gradient_descent_mse_ensemble(arch, x, y)
    for t in (None, torch.tensor([1.0, 1e8])):
        r = ens(t=t, x_test=xt, get="ntk", compute_cov=True)
        assert torch.isfinite(r.mean).all() and torch.isfinite(r.covariance).all()
    post = P.gp_inference(k, y)("nngp", ktd, ktt)
    assert torch.isfinite(post.covariance).all()
    assert float(torch.linalg.eigvalsh(post.covariance)[0]) > -1e-8


def test_not_psd_raises_clear_error():
    g = _gen(15)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    bad = Q @ torch.diag(torch.tensor([3.0, 2, 1, 1, 0.5, -0.5], dtype=F64)) @ Q.T
    y = torch.randn(6, 1, generator=g, dtype=F64)
    with pytest.raises(ValueError, match="positive semi-definite.*diag_reg"):
        P.gradient_descent_mse(bad, y)(1.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        P.gradient_descent_mse(bad, y)(None, 0.0, 0.0, bad)      # Cholesky fails -> eigh check
    with pytest.raises(ValueError, match="not symmetric"):
        P.gradient_descent_mse(bad + torch.triu(torch.ones(6, 6, dtype=F64), 1), y)
    # rounding-level negative eigenvalues are clipped, not rejected
    ok = Q @ torch.diag(torch.tensor([3.0, 2, 1, 1, 0.5, -1e-13], dtype=F64)) @ Q.T
    assert torch.isfinite(P.gradient_descent_mse(ok, y)(5.0)).all()


def test_factorizations_are_cached(data, monkeypatch):
    calls = {"eigh": 0, "chol": 0}
    real_eigh, real_chol = _linalg.sym_eigh, torch.linalg.cholesky_ex

    def eigh(*a, **k):
        calls["eigh"] += 1
        return real_eigh(*a, **k)

    def chol(*a, **k):
        calls["chol"] += 1
        return real_chol(*a, **k)

    monkeypatch.setattr(_linalg, "sym_eigh", eigh)       # every eigh goes through it
    monkeypatch.setattr(torch.linalg, "cholesky_ex", chol)
    _linalg.clear_cache()
    k = data["ntk_dd"].clone()
    y = data["y"]
    pf = P.gradient_descent_mse(k, y, diag_reg=1e-4)
    for t in (1.0, torch.tensor([2.0, 3.0]), 7.0):
        pf(t, 0.0, 0.0, data["ntk_td"])
    pf(None, 0.0, 0.0, data["ntk_td"])
    pf(None, 0.0, 0.0, data["ntk_td"])
    P.gradient_descent_mse(k, y, diag_reg=1e-4)(5.0)        # new predict_fn, same kernel
    P.eigenmodes(k, y, diag_reg=1e-4)
    # one eigendecomposition serves every t, t = inf included (no separate Cholesky solve, so
    # finite t and t = inf treat numerically-null modes identically)
    assert calls == {"eigh": 1, "chol": 0}
    P.gradient_descent_mse(k, y, diag_reg=1e-3)(5.0)        # other ridge: new factorization
    assert calls["eigh"] == 2
    k.mul_(2.0)                                              # in-place change invalidates
    P.gradient_descent_mse(k, y, diag_reg=1e-4)(5.0)
    assert calls["eigh"] == 3


# ------------------------------------------------------------------------------------------
# 6. input validation
# ------------------------------------------------------------------------------------------

def test_bad_inputs_have_clear_errors(data):
    K, y, Ktd = data["ntk_dd"], data["y"], data["ntk_td"]
    with pytest.raises(ValueError, match="y_train"):
        P.gradient_descent_mse(K, y[:5])
    with pytest.raises(ValueError, match=r"y_train\[:, None\]"):
        P.gradient_descent_mse(K, y[:, 0])
    with pytest.raises(ValueError, match="square"):
        P.gradient_descent_mse(K[:, :5], y)
    with pytest.raises(TypeError, match="k.ntk"):
        P.gradient_descent_mse(type("Record", (), {"ntk": K})(), y)
    with pytest.raises(ValueError, match="learning_rate"):
        P.gradient_descent_mse(K, y, learning_rate=0.0)
    with pytest.raises(ValueError, match="diag_reg"):
        P.gradient_descent_mse(K, y, diag_reg=-1.0)
    pf = P.gradient_descent_mse(K, y)
    with pytest.raises(ValueError, match=">= 0"):
        pf(-1.0)
    with pytest.raises(ValueError, match="k_test_train"):
        pf(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"\(n_test, 12\)"):
        pf(1.0, 0.0, 0.0, Ktd[:, :4])
    with pytest.raises(ValueError, match="fx_train_0"):
        pf(1.0, torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="get"):
        P.gp_inference({"nngp": K}, y)("bogus")
    with pytest.raises(ValueError, match="whole numbers"):
        P.gradient_descent_mse_discrete(K, y, 0.1)(2.5)
    with pytest.raises(ValueError, match="momentum"):
        P.gradient_descent_mse_discrete(K, y, 0.1, momentum=1.0)
    with pytest.raises(ValueError, match="loss"):
        P.gradient_descent("hinge", K, y)
    with pytest.raises(ValueError, match="finite"):
        P.gradient_descent("mse", K, y)(None)
    with pytest.raises(TypeError, match="kernel_fn"):
        P.gradient_descent_mse_ensemble(42, data["x"], y)


# ------------------------------------------------------------------------------------------
# 7. real networks: distance to the prediction shrinks like width^-1/2
# ------------------------------------------------------------------------------------------

def test_real_networks_approach_prediction_with_width():
    from ntkit._dynamics_demo import train_and_compare
    arch1 = nl.serial(nl.Dense(512, W_std=1.5, b_std=0.1), nl.Relu(),
                      nl.Dense(1, W_std=1.5, b_std=0.1))
    g = _gen(16)
    x = torch.randn(16, 4, generator=g, dtype=F64)
    xt = torch.randn(8, 4, generator=g, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    res = train_and_compare(arch1, x, y, xt, widths=(256, 512, 1024, 2048, 4096, 8192),
                            steps=(10, 30, 100), seeds=(0, 1, 2))
    assert res.train_rms.shape == (6, 3) and torch.isfinite(res.train_rms).all()
    assert -0.75 < res.slope < -0.3, res.to_text()
    for s in (*res.slopes_train, *res.slopes_test):
        assert -0.9 < float(s) < -0.2, res.to_text()
    # the widest networks really are close to the kernel prediction (Lee et al.: ~0.05 at 512)
    assert float(res.test_rms[-1].max()) < 0.05
    assert "slope" in res.to_text()
