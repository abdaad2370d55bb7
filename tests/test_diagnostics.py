"""Lazy-training diagnostics: norms against independent oracles, scaling laws on real networks.

Oracles: the Jacobian norm against the SVD of the Jacobian built by ``torch.autograd.functional
.jacobian``; the Hessian norm against the exact operator norm of a model whose bilinear Hessian
is known in closed form, and against brute force (full Hessians of every output, maximized over
the output direction) on a tiny network; the relative weight change by hand. Scaling laws
(Chizat & Bach; Jacot et al.) are fitted on actually initialized / trained networks.
"""
import math

import pytest
import torch
from torch import nn

from ntkit import diagnostics as dg
from ntkit import layers as nl

F64 = torch.float64


# tiny networks: thread sync dominates on a busy 2-core box (fixture: tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=16, d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return x, torch.sin(x.sum(1, keepdim=True))


def lecun(d):
    def make(m):
        net = nn.Sequential(nn.Linear(d, m, bias=False), nn.Tanh(), nn.Linear(m, 1, bias=False))
        with torch.no_grad():
            net[0].weight.normal_(0, d ** -0.5)
            net[2].weight.normal_(0, m ** -0.5)        # output weights: variance 1 / width
        return net.double()
    return make


# ---------------------------------------------------------------------------- norms vs oracles
def _flat_fn(net, x):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def f(theta):
        parts = torch.split(theta, sizes)
        d = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return torch.func.functional_call(net, d, (x,)).reshape(-1)
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return f, theta0


def test_jacobian_norm_matches_svd():
    x, _ = data(6, 3)
    net = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    f, th = _flat_fn(net, x)
    J = torch.autograd.functional.jacobian(f, th)                     # (N, P)
    expected = float(torch.linalg.svdvals(J)[0]) / math.sqrt(J.shape[0])
    assert dg.jacobian_norm(net, x) == pytest.approx(expected, rel=1e-10)


class Bilinear(nn.Module):
    """h_i(u, v) = c_i * u . v for inputs i: D^2 h[(du, dv), (du, dv)] = 2 c_i du . dv, so the
    Hessian operator norm (RMS over outputs) is ||c||_rms exactly (sup of 2 du.dv = 1 at
    |du| = |dv| = 1/sqrt 2)."""

    def __init__(self, p=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.u = nn.Parameter(torch.randn(p, generator=g, dtype=F64))
        self.v = nn.Parameter(torch.randn(p, generator=g, dtype=F64))

    def forward(self, x):
        return x[:, :1] * (self.u @ self.v)


def test_hessian_norm_closed_form():
    x = torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64)
    c = x[:, 0]
    expected = float(torch.sqrt((c ** 2).mean()))
    assert dg.hessian_norm(Bilinear(), x) == pytest.approx(expected, rel=1e-8)


def test_hessian_norm_brute_force_tiny_network():
    # brute force: full Hessian H_i of every output; ||D^2 h|| = max_{||z||_rms=1} |eig|_max of
    # sum_i z_i H_i / N, maximized over many z on the sphere (a lower bound that converges)
    x, _ = data(3, 2, seed=3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    f, th = _flat_fn(net, x)
    H = torch.stack([torch.autograd.functional.hessian(lambda t, i=i: f(t)[i], th)
                     for i in range(6)])                                  # (N, P, P)
    N = H.shape[0]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, N, generator=g, dtype=F64)
    z = z / z.pow(2).mean(1, keepdim=True).sqrt()
    Hz = torch.einsum("bi,ipq->bpq", z, H) / N
    brute = float(torch.linalg.eigvalsh(Hz).abs().max())
    est = dg.hessian_norm(net, x, outer_iters=10)
    assert est >= brute * (1 - 1e-6)               # at least as good as 20000 random directions
    assert est <= brute * 1.02                     # and not above the true norm (brute ~ tight)


def test_kappa_definition_and_scale_invariance():
    x, y = data(8, 3)
    torch.manual_seed(0)
    net = lecun(3)(32)
    s = dg.lazy_scales(net, x, y)
    assert s.kappa == pytest.approx(s.residual * s.hessian_norm / s.jacobian_norm ** 2)
    with torch.no_grad():
        res = float(((net(x) - y) ** 2).mean().sqrt())
    assert s.residual == pytest.approx(res)
    # scaling outputs and targets by c leaves kappa unchanged (residual, D^2 h ~ c; Dh^2 ~ c^2)
    from ntkit.empirical import scaled
    s2 = dg.lazy_scales(scaled(net, 3.0), x, 3.0 * y)
    assert s2.kappa == pytest.approx(s.kappa, rel=1e-6)
    assert s2.jacobian_norm == pytest.approx(3.0 * s.jacobian_norm, rel=1e-10)


def test_relative_weight_change_by_hand():
    a = {"0.weight": torch.ones(2, 2, dtype=F64), "0.bias": torch.zeros(2, dtype=F64),
         "1.weight": torch.ones(3, dtype=F64)}
    b = {k: v.clone() for k, v in a.items()}
    b["0.weight"] = b["0.weight"] + 1.0               # |delta|^2 = 4
    b["0.bias"] = b["0.bias"] + 1.0                   # |delta|^2 = 2
    assert dg.relative_weight_change(b, a) == pytest.approx(math.sqrt(6 / 7))
    by = dg.relative_weight_change(b, a, by="layer")
    assert by["0"] == pytest.approx(math.sqrt(6 / 4)) and by["1"] == 0.0
    per = dg.relative_weight_change(b, a, by="parameter")
    assert per["0.weight"] == pytest.approx(1.0) and per["0.bias"] == math.inf


def test_fit_slope_exact_and_ci():
    s = dg.fit_slope([1, 2, 4, 8], [3 * w ** -0.5 for w in (1, 2, 4, 8)])
    assert s.slope == pytest.approx(-0.5) and s.intercept == pytest.approx(math.log(3))
    g = torch.Generator().manual_seed(0)
    xs = [2.0 ** k for k in range(10)] * 3
    noisy = [w ** 0.7 * math.exp(0.1 * float(torch.randn((), generator=g))) for w in xs]
    s = dg.fit_slope(xs, noisy)
    assert s.low < 0.7 < s.high and s.high - s.low < 0.1
    with pytest.raises(ValueError, match="positive"):
        dg.fit_slope([1, 2], [1, -1])


# ---------------------------------------------------------------------------- scaling laws
def test_standard_lecun_width_scaling():
    x, y = data()
    sw = dg.width_sweep(lecun(4), x, y, widths=(64, 256, 1024, 4096), seeds=(0, 1), steps=0,
                        parameterization="standard")
    assert sw.parameterization == "standard"
    assert sw.slope("jacobian_norm").slope == pytest.approx(0.5, abs=0.1)
    assert sw.slope("hessian_norm").slope == pytest.approx(0.0, abs=0.15)
    assert sw.slope("kappa").slope == pytest.approx(-1.0, abs=0.2)
    assert "parameterization: standard" in sw.to_text()


def test_ntk_parameterization_width_scaling_and_training():
    x, y = data()
    arch = nl.serial(nl.Dense(64), nl.Elementwise(torch.tanh), nl.Dense(1))
    sw = dg.width_sweep(arch, x, y, widths=(64, 256, 1024, 4096), seeds=(0, 1), steps=60,
                        learning_rate=1.0, linearization=True)
    assert sw.parameterization == "ntk"               # read from the architecture
    assert sw.slope("jacobian_norm").slope == pytest.approx(0.0, abs=0.06)
    k = sw.slope("kappa").slope
    assert -0.6 < k < -0.3                            # ~ -1/2 with a log factor (max over neurons)
    assert sw.slope("rel_weight_change").slope == pytest.approx(-0.5, abs=0.15)
    assert sw.slope("kernel_drift").slope < -0.5
    assert sw.slope("lin_gap").slope < -0.5
    # training actually happened at the fixed rate and reduced the loss
    assert all(r["learning_rate"] == 1.0 for r in sw.rows)
    assert all(c["loss"][-1] < 0.5 * c["loss"][0] for c in sw.curves)
    assert "parameterization: ntk" in sw.to_text()


def test_alpha_scaling_with_and_without_centering():
    x, y = data()
    arch = nl.serial(nl.Dense(128), nl.Elementwise(torch.tanh), nl.Dense(1))
    net = arch.module(in_shape=4, width=128, seed=0)
    sw = dg.alpha_sweep(net, x, y, alphas=(1, 4, 16, 64), steps=40)
    assert sw.centered and sw.slope("kappa").slope == pytest.approx(-1.0, abs=0.05)
    assert sw.slope("rel_weight_change").slope == pytest.approx(-1.0, abs=0.15)
    # the function-space dynamics do not depend on alpha when centered (loss / alpha^2)
    lr = {r["learning_rate"] for r in sw.rows}
    assert max(lr) == pytest.approx(min(lr), rel=1e-8)
    # without centering the initial output alpha f_0 grows: kappa stops falling
    raw = dg.alpha_sweep(net, x, y, alphas=(4, 16, 64), steps=0, center=False)
    assert abs(raw.slope("kappa").slope) < 0.2


def test_sgd_minibatches_and_snapshot():
    x, y = data()
    net = nl.serial(nl.Dense(64), nl.Erf(), nl.Dense(1)).module(4, seed=0)
    rec = dg.train(net, x, y, steps=40, learning_rate=0.5, batch_size=4, record_every=10,
                   snapshot="0.weight", linearization=False)
    assert rec.steps.tolist() == [0, 10, 20, 30, 40]
    assert sorted(rec.snapshots) == [0, 10, 20, 30, 40]
    assert rec.rel_weight_change[0] == 0 and rec.rel_weight_change[-1] > 0
    assert set(rec.rel_change_by_layer) == {"0", "2"}


def test_to_pandas_and_csv(tmp_path):
    x, y = data(8, 2)
    sw = dg.width_sweep(lecun(2), x, y, widths=(8, 16), seeds=(0,), steps=0)
    p = sw.to_csv(str(tmp_path / "s.csv"))
    text = open(p).read().splitlines()
    assert text[0].startswith("width,seed,") and len(text) == 3
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            sw.to_pandas()
    else:
        assert len(sw.to_pandas()) == 2


def test_bad_arguments():
    x, y = data(8, 2)
    with pytest.raises(ValueError, match="widths"):
        dg.width_sweep(lecun(2), x, y, widths=(8,))
    with pytest.raises(TypeError, match="architecture"):
        dg.width_sweep(nn.Linear(2, 1), x, y, widths=(8, 16))
    with pytest.raises(ValueError, match="y"):
        dg.lazy_scales(lecun(2)(8), x, torch.zeros(5))
    with pytest.raises(ValueError, match="learning_rate"):
        dg.train(lecun(2)(8), x, y, learning_rate="fast")
    with pytest.raises(ValueError, match="diverged"):
        dg.train(lecun(2)(8), x, y, steps=200, learning_rate=1e6)
    with pytest.raises(ValueError, match="one seed"):
        dg.alpha_sweep(lecun(2)(8), x, y, alphas=(1, 2), seeds=(0, 1))
    with pytest.raises(ValueError, match="metric"):
        dg.width_sweep(lecun(2), x, y, widths=(8, 16), steps=0, seeds=(0,)).slope("nope")


def test_hessian_norm_finite_difference_fallback(monkeypatch):
    # ops without forward-mode derivatives fall back to central differences for D^2 h[u, u]
    import torch.func

    def no_forward_ad(*a, **k):
        raise NotImplementedError("no forward AD")
    monkeypatch.setattr(torch.func, "jvp", no_forward_ad)
    x = torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64)
    expected = float(torch.sqrt((x[:, 0] ** 2).mean()))
    assert dg.hessian_norm(Bilinear(), x) == pytest.approx(expected, rel=1e-6)


def test_float32_multi_output_model_is_measured_in_float64():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    f, th = _flat_fn(net.double(), x.double())
    J = torch.autograd.functional.jacobian(f, th)
    net = net.float()
    s = dg.lazy_scales(net, x, y)
    assert s.n_outputs == 15 and s.jacobian_norm == pytest.approx(
        float(torch.linalg.svdvals(J)[0]) / math.sqrt(15), rel=1e-5)
    assert next(net.parameters()).dtype == torch.float32            # the model is untouched


def test_diverged_runs_raise_instead_of_fitting_slopes():
    """``ntkit lazy --lr 1e6``: losses of 1e231 used to be fitted and printed next to theory."""
    x, y = data(12, 4)
    arch = nl.serial(nl.Dense(64), nl.Erf(), nl.Dense(1))
    hess = dict(hessian_steps=2, hessian_outer=1)
    with pytest.raises(ValueError, match=r"width=8, seed=0.*diverged.*learning_rate.*stable "
                                         r"limit.*no slopes"):
        dg.width_sweep(arch, x, y, widths=(8, 16), seeds=(0,), steps=5, learning_rate=1e6,
                       **hess)
    net = arch.module(in_shape=4, width=16, seed=0)
    with pytest.raises(ValueError, match="alpha=1.*diverged"):
        dg.alpha_sweep(net, x, y, alphas=(1, 4), steps=5, learning_rate=1e6, **hess)
    # moderately above the stable limit: the linearized network provably diverges (its top mode
    # grows by |1 - 3| = 2 per step), so no lin_gap is measured against a blown-up model
    from ntkit.empirical import empirical_ntk
    limit = 2 * x.shape[0] / float(torch.linalg.eigvalsh(empirical_ntk(net, x, dtype=F64))[-1])
    with pytest.raises(ValueError, match=r"diverged.*learning_rate") as e:
        dg.train(arch.module(in_shape=4, width=16, seed=0), x, y, steps=40,
                 learning_rate=1.5 * limit, measure_kernel_drift=False)
    assert f"{limit:.4g}" in str(e.value)
    # just below the limit nothing is flagged
    rec = dg.train(arch.module(in_shape=4, width=16, seed=0), x, y, steps=40,
                   learning_rate=0.9 * limit, measure_kernel_drift=False)
    assert rec.loss[-1] < rec.loss[0]


def test_fit_slope_groups_matches_least_squares_with_dummies():
    """A common slope with an intercept per group = one regression on log x plus one indicator
    column per group (independent implementation: lstsq), CI on n - groups - 1 dof."""
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    xs = [torch.tensor([64.0, 256.0, 1024.0, 4096.0], dtype=F64),
          torch.tensor([32.0, 128.0, 512.0], dtype=F64),           # groups need not share x
          torch.tensor([100.0, 300.0, 900.0, 2700.0, 8100.0], dtype=F64)]
    series = [c * w ** -0.5 * torch.exp(0.05 * torch.randn(len(w), generator=g, dtype=F64))
              for c, w in zip((0.3, 1.0, 2.0), xs)]
    labels = [i for i, w in enumerate(xs) for _ in w]
    fit = dg.fit_slope(torch.cat(xs).tolist(), torch.cat(series).tolist(), groups=labels)
    lx = torch.log(torch.cat(xs))
    ind = torch.nn.functional.one_hot(torch.tensor(labels), 3).to(F64)
    X = torch.cat([lx[:, None], ind], dim=1)
    yv = torch.log(torch.cat(series))
    beta = torch.linalg.lstsq(X, yv[:, None]).solution[:, 0]
    resid = yv - X @ beta
    n = len(labels)
    dof = n - 4
    se = math.sqrt(float((resid ** 2).sum()) / dof * float(torch.linalg.inv(X.T @ X)[0, 0]))
    q = stats.t.ppf(0.975, dof)
    b = float(beta[0])
    assert fit.slope == pytest.approx(b, rel=1e-10) and fit.n_points == n
    assert (fit.low, fit.high) == pytest.approx((b - q * se, b + q * se), rel=1e-6)
    assert fit.intercept == pytest.approx(float(beta[1]), rel=1e-9)     # the first group's
    # one group is the plain fit
    one = dg.fit_slope(xs[0].tolist(), series[0].tolist(), groups=[7] * 4)
    plain = dg.fit_slope(xs[0].tolist(), series[0].tolist())
    assert one == pytest.approx(plain, rel=1e-12)
    with pytest.raises(ValueError, match="groups"):
        dg.fit_slope([1, 2, 4], [1, 2, 3], groups=[0, 1])


def test_train_records_at_given_steps_and_measures():
    x, y = data(6, 2)
    net = lecun(2)(8)
    seen = []

    def measure(step, model):
        seen.append(step)
        with torch.no_grad():
            return model(x).clone()

    rec = dg.train(net, x, y, steps=9, learning_rate=0.3, record_steps=(2, 5),
                   linearization=False, measure_kernel_drift=False, record_outputs=True,
                   measure=measure)
    assert rec.steps.tolist() == [0, 2, 5, 9] == seen
    assert len(rec.measured) == 4
    for out, m in zip(rec.outputs, rec.measured):       # measured after the step's update
        assert torch.equal(out, m)
    with pytest.raises(ValueError, match="record_steps"):
        dg.train(net, x, y, steps=3, record_steps=(5,))
    with pytest.raises(ValueError, match="not both"):
        dg.train(net, x, y, steps=3, record_steps=(1,), record_every=1)
    with pytest.raises(TypeError, match="measure"):
        dg.train(net, x, y, steps=3, measure=3)


def test_parameterization_label_follows_layer_fields():
    """The label comes from the layers' declared fields, whatever a combinator calls them."""
    from ntkit.layers import Layer
    from ntkit.layers._base import frozen_layer

    @frozen_layer
    class Wrapped(Layer):                  # a layer holding another under its own field name
        body: Layer

    std = nl.Dense(4, parameterization="standard")
    assert dg.arch_parameterization(Wrapped(std)) == "standard"
    assert dg.arch_parameterization(nl.serial(Wrapped(std), nl.Relu(), nl.Dense(1))) == "mixed"
    assert dg.arch_parameterization(nl.serial(nl.Dense(3), nl.Relu(), nl.Dense(1))) == "ntk"
    assert dg.arch_parameterization(nl.Relu()) == "unknown"


def test_counts_and_models_use_the_shared_validators():
    """Integer arguments and models go through ntkit._validation (issue 17): a numpy integer
    is an integer there, as everywhere else in ntkit; a bool is not."""
    import numpy as np
    x, y = data(6, 2)
    arch = nl.serial(nl.Dense(8), nl.Erf(), nl.Dense(1))
    net = arch.module(2, seed=0)                     # train() trains it in place: one per run
    a = dg.train(net, x, y, steps=np.int64(3), learning_rate=0.5, record_every=np.int64(1),
                 linearization=False)
    b = dg.train(arch.module(2, seed=0), x, y, steps=3, learning_rate=0.5, record_every=1,
                 linearization=False)
    assert a.steps.tolist() == b.steps.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`steps` must be an integer >= 0"):
        dg.train(net, x, y, steps=True)
    with pytest.raises(TypeError, match="wrap a plain function in an nn.Module"):
        dg.train(lambda z: z, x, y, steps=1)
    from ntkit import _dynamics_demo as dd
    init = dd.init_functions(nl.serial(nl.Dense(4), nl.Erf(), nl.Dense(1)), width=4,
                             n_nets=np.int64(2))
    assert len(init.outputs) == 2
    with pytest.raises(ValueError, match="`n_nets` must be an integer >= 1"):
        dd.init_functions(n_nets=0)
