"""gradient_descent_mse_ensemble: neural-tangents' argument order and the fast paths.

* ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)`` as in neural-tangents; calls in
  ntkit's old ``(x_test, t)`` order raise a TypeError that says how to call it now.
* ``t = inf`` with a test set and a provably nonsingular kernel: Cholesky solves, no
  eigendecomposition, same numbers as the pseudo-inverse (GP posterior) and as huge finite ``t``;
  a kernel with a mode under the numerical-null cutoff still goes through the eigen path.
* Finite ``t``: mean and covariance (both covariance forms: NNGP Cholesky factor, and its
  fallback for a singular NNGP) against a matrix-exponential reference in the data basis.
"""
import inspect
import math

import pytest
import torch

from ntkit import layers as nl
from ntkit import _linalg
from ntkit import predict as P

F64 = torch.float64


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=F64)
    xt = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.randn(12, 2, generator=g, dtype=F64)
    arch = nl.serial(nl.Dense(64, W_std=1.5, b_std=0.1), nl.Relu(),
                     nl.Dense(1, W_std=1.5, b_std=0.1))
    return arch, x, xt, y


def test_new_order_positional_equals_keywords(setup):
    arch, x, xt, y = setup
    ens = P.gradient_descent_mse_ensemble(arch, x, y)
    a = ens(2.0, xt, "ntk", True)
    b = ens(t=2.0, x_test=xt, get="ntk", compute_cov=True)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.covariance, b.covariance)
    ts = torch.tensor([0.5, 2.0], dtype=F64)                      # 1-D times are times
    assert ens(ts, xt, "ntk").shape == (2, 5, 2)


def test_the_factory_declares_the_predictor_protocol(setup):
    """The return type is ntkit._typing.PredictFn (NT's predict_fn shape), not a bare
    Callable, and the returned function's signature is that protocol's."""
    import inspect
    import typing

    from ntkit._typing import PredictFn
    hints = typing.get_type_hints(P.gradient_descent_mse_ensemble)
    assert hints["return"] is PredictFn
    arch, x, _, y = setup
    ens = P.gradient_descent_mse_ensemble(arch, x, y)
    got = [(p.name, p.default) for p in inspect.signature(ens).parameters.values()]
    want = [(p.name, p.default) for p in inspect.signature(PredictFn.__call__).parameters.values()
            if p.name != "self"]
    assert got == want == [("t", None), ("x_test", None), ("get", None), ("compute_cov", False)]


@pytest.mark.parametrize("factory, protocol, want", [
    ("gradient_descent_mse", "TimePredictFn",
     [("t", None), ("fx_train_0", 0.0), ("fx_test_0", None), ("k_test_train", None)]),
    ("gradient_descent_mse_discrete", "StepsPredictFn",
     [("steps", None), ("fx_train_0", 0.0), ("fx_test_0", None), ("k_test_train", None)]),
    ("gradient_descent", "ODEPredictFn",
     [("t", inspect.Parameter.empty), ("fx_train_0", 0.0), ("fx_test_0", None),
      ("k_test_train", None)]),
    ("gp_inference", "GPPredictFn", [("get", None), ("k_test_train", None),
                                     ("k_test_test", None)])])
def test_every_factory_declares_its_predictor_protocol(setup, factory, protocol, want):
    """Each factory's return type is a protocol of ntkit._typing (not a bare Callable) whose
    call signature is the returned function's, in neural-tangents' order."""
    import typing

    from ntkit import _typing
    proto = getattr(_typing, protocol)
    assert typing.get_type_hints(getattr(P, factory))["return"] is proto
    arch, x, _, y = setup
    k = arch.kernel(x)
    fn = {"gradient_descent_mse": lambda: P.gradient_descent_mse(k.ntk, y),
          "gradient_descent_mse_discrete": lambda: P.gradient_descent_mse_discrete(k.ntk, y, 0.1),
          "gradient_descent": lambda: P.gradient_descent("mse", k.ntk, y),
          "gp_inference": lambda: P.gp_inference(k, y)}[factory]()
    got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    declared = [(p.name, p.default) for p in inspect.signature(proto.__call__).parameters.values()
                if p.name != "self"]
    assert got == declared == want


def test_gradient_descent_mse_t_defaults_to_convergence(setup):
    """``predict_fn()`` = ``predict_fn(None)`` = ``predict_fn(inf)`` (float64, bitwise), the
    large-t limit of the flow, and the GP posterior mean at ``t = inf``."""
    arch, x, xt, y = setup
    k, k_td = arch.kernel(x), arch.kernel(xt, x)
    pf = P.gradient_descent_mse(k.ntk, y)
    a, b, c = pf(), pf(None), pf(math.inf)
    assert a.dtype == F64 and a.shape == y.shape
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.allclose(a, pf(1e9), rtol=0, atol=1e-9)            # the flow's limit
    assert torch.allclose(a, y, rtol=0, atol=1e-8)                   # nonsingular NTK: y
    te, te_none = pf(None, 0.0, 0.0, k_td.ntk), pf(fx_test_0=0.0, k_test_train=k_td.ntk)
    assert torch.equal(te[1], te_none[1]) and torch.equal(te[1], pf(math.inf, 0.0, 0.0,
                                                                   k_td.ntk)[1])
    assert torch.allclose(te[1], pf(1e9, 0.0, 0.0, k_td.ntk)[1], rtol=0, atol=1e-9)
    assert torch.allclose(te[1], P.gp_inference(k, y)("ntkgp", k_td), rtol=1e-8, atol=1e-10)
    d = P.gradient_descent_mse_discrete(k.ntk, y, 0.5 * P.max_learning_rate(k.ntk, y.numel()))
    assert torch.equal(d(), d(None)) and torch.equal(d(), a)


@pytest.mark.parametrize("call", [
    lambda ens, xt: ens(xt, 3.0),                 # old (x_test, t)
    lambda ens, xt: ens(xt),                      # old (x_test,) with t = None
    lambda ens, xt: ens(xt, t=3.0),               # old (x_test, t=...)
    lambda ens, xt: ens(None, 1.0, "ntk"),        # old (x_test=None, t=1.0)
    lambda ens, xt: ens(xt, torch.tensor([1.0, 2.0]), "ntk", True),
])
def test_old_order_raises_a_clear_type_error(setup, call):
    arch, x, xt, y = setup
    ens = P.gradient_descent_mse_ensemble(arch, x, y)
    with pytest.raises(TypeError, match=r"\(t=None, x_test=None, get=None, compute_cov=False\)"):
        call(ens, xt)


def _eigh_counter(monkeypatch):
    calls = []
    orig = _linalg.sym_eigh                  # every eigendecomposition goes through it

    def counting(*a, **k):
        calls.append(a[0].dtype)
        return orig(*a, **k)
    monkeypatch.setattr(_linalg, "sym_eigh", counting)
    return calls


def test_t_inf_uses_cholesky_and_equals_the_posterior(setup, monkeypatch):
    arch, x, xt, y = setup
    kd, ktd = arch.kernel(x), arch.kernel(xt, x)
    ktt = arch.kernel(xt, get="nngp")
    post = P.gp_inference(kd, y, diag_reg=1e-3)("ntk", ktd, ktt)   # pinv via the eigen path
    big = P.gradient_descent_mse_ensemble(arch, x, y, diag_reg=1e-3)(
        1e300, xt, "ntk", True)                                     # finite t: eigen path
    calls = _eigh_counter(monkeypatch)
    ens = P.gradient_descent_mse_ensemble(arch, x, y, diag_reg=1e-3)
    got = ens(None, xt, "ntk", True)
    assert calls == []                                              # no eigendecomposition
    for ref in (post, big):
        assert torch.allclose(got.mean, ref.mean, rtol=1e-9, atol=1e-10)
        assert torch.allclose(got.covariance, ref.covariance, rtol=1e-9, atol=1e-10)
    nn = ens(math.inf, xt, "nngp", True)
    ref = P.gp_inference(kd, y, diag_reg=1e-3)("nngp", ktd, ktt)
    assert torch.allclose(nn.mean, ref.mean, rtol=1e-9, atol=1e-10)
    assert torch.allclose(nn.covariance, ref.covariance, rtol=1e-9, atol=1e-10)


def test_t_inf_with_a_mode_under_the_cutoff_keeps_the_eigen_path(monkeypatch):
    """A float32 kernel whose smallest eigenvalue (1e-6 lam_max) is under the null cutoff
    n * eps32 * lam_max = 2.4e-6 lam_max: Cholesky succeeds, but the mode is null. The answer
    must drop it (pseudo-inverse), not divide by it."""
    n = 20
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.linspace(1.0, 0.5, n, dtype=F64)
    lam[-1] = 1e-6
    phi_tr = (U * lam.sqrt()).to(torch.float32)                    # K = phi phi^T = U lam U^T
    phi_te = torch.randn(4, n, generator=g, dtype=F64).to(torch.float32)
    y = U[:, -1:].to(torch.float32) + 0.1                          # a component on the null mode

    def kfn(a, b, get):
        b = a if b is None else b
        return {"nngp": a @ b.T, "ntk": a @ b.T}
    calls = _eigh_counter(monkeypatch)
    got = P.gradient_descent_mse_ensemble(kfn, phi_tr, y)(None, phi_te, "ntk")
    # certificate refused; the float32 eigendecomposition is tried first and rejected by its
    # conditioning check (lam_min < 1e-4 lam_max), the float64 one decides
    assert calls == [torch.float32, torch.float64]
    K = phi_tr.double() @ phi_tr.double().T
    ref = P.gp_inference(K.float(), y)("ntk", (phi_te.double() @ phi_tr.double().T).float())
    assert torch.allclose(got.double(), ref.double(), rtol=1e-4, atol=1e-4)
    kept = (phi_te.double() @ phi_tr.double().T) @ torch.linalg.solve(K, y.double())
    assert (got.double() - kept).abs().max() > 1.0                   # dividing by 1e-6 differs


def _expm_reference(kd, ktd, ktt_nngp, y, ts, ridge_rel):
    """Lee et al. 2019 eqs. 15-16 in the data basis with torch.linalg.matrix_exp."""
    th = kd.ntk + ridge_rel * torch.diagonal(kd.ntk).mean() * torch.eye(kd.ntk.shape[0], dtype=F64)
    N = y.numel()
    means, covs = [], []
    for t in ts:
        M = torch.eye(th.shape[0], dtype=F64) - torch.linalg.matrix_exp(-th * t / N)
        Q = ktd.ntk @ torch.linalg.solve(th, M)
        means.append(Q @ y)
        QK = Q @ ktd.nngp.T
        covs.append(ktt_nngp + Q @ kd.nngp @ Q.T - QK - QK.T)
    return torch.stack(means), torch.stack(covs)


@pytest.mark.parametrize("duplicate", [False, True])
def test_finite_t_mean_cov_match_matrix_exponential(setup, duplicate):
    """Both covariance forms: the NNGP's Cholesky factor (nonsingular) and, with a duplicated
    training input (singular NNGP), the V^T K V fallback."""
    arch, x, xt, y = setup
    if duplicate:
        x = torch.cat([x, x[:1]])
        y = torch.cat([y, y[:1]])
    kd, ktd = arch.kernel(x), arch.kernel(xt, x)
    ktt = arch.kernel(xt, get="nngp")
    ts = torch.tensor([0.3, 3.0, 30.0, 300.0], dtype=F64)
    got = P.gradient_descent_mse_ensemble(arch, x, y, diag_reg=1e-3)(ts, xt, "ntk", True)
    mean, cov = _expm_reference(kd, ktd, ktt, y, ts, 1e-3)
    scale = cov.abs().max()
    assert (got.mean - mean).abs().max() < 1e-8 * mean.abs().max()
    assert (got.covariance - cov).abs().max() < 1e-8 * scale
