"""Tests of ntkit.empirical: empirical NTK/NNGP, linearization, Taylor expansion, output scales.

Oracle for every kernel: an explicit loop over examples and outputs calling
``torch.autograd.grad`` on the model itself (no torch.func, no hooks), in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkit
import ntkit.empirical._structured as structured
from ntkit.empirical import (centered, empirical_nngp, empirical_ntk, linearize, scaled,
                             taylor_expand)
from ntkit.empirical._common import make_setup, select_params
from ntkit.empirical._ntk import _choose_implementation, _prepare

DT = torch.float64

# torch's own notices (functorch batching fallbacks for attention, jit deprecation inside MHA)
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


# ---------------------------------------------------------------------------------- the oracle
def loop_jacobian(model, x, names=None):
    """(n, k, P) per-example Jacobian by one autograd.grad call per (example, output)."""
    named = [(n, p) for n, p in model.named_parameters()
             if (p.requires_grad if names is None else n in names)]
    ps = [p for _, p in named]
    rows = []
    for i in range(x.shape[0]):
        with torch.enable_grad():
            out = model(x[i:i + 1]).reshape(-1)
            per_out = []
            for a in range(out.numel()):
                g = torch.autograd.grad(out[a], ps, retain_graph=True, allow_unused=True)
                per_out.append(torch.cat([(gi if gi is not None else torch.zeros_like(p))
                                          .reshape(-1) for gi, p in zip(g, ps)]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)


def loop_ntk(model, x1, x2=None, names=None):
    """Full (n1, n2, k, k) kernel from the loop Jacobians."""
    j1 = loop_jacobian(model, x1, names)
    j2 = j1 if x2 is None else loop_jacobian(model, x2, names)
    return torch.einsum("iap,jbp->ijab", j1, j2)


def reduce(full, output):
    if output == "full":
        return full
    diag = torch.diagonal(full, dim1=2, dim2=3)
    return diag if output == "diagonal" else diag.mean(-1)


def assert_close(a, b, tol=1e-10):
    scale = b.abs().max().clamp_min(1e-300)
    err = (a - b).abs().max() / scale
    assert err < tol, f"relative error {err:.3e}"


# ------------------------------------------------------------------------------------- models
class ResNet(nn.Module):
    """Two residual blocks sharing one Linear module (called twice per forward)."""

    def __init__(self, d=5, w=12, k=2):
        super().__init__()
        self.inp = nn.Linear(d, w)
        self.shared = nn.Linear(w, w)
        self.b1 = nn.Linear(w, w, bias=False)
        self.head = nn.Linear(w, k)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.shared(torch.tanh(h))
        h = h + self.b1(torch.relu(self.shared(h)))
        return self.head(h)


class SeqModel(nn.Module):
    """Linear over (b, T, d) sequences, attention (whose out_proj Linear is never *called*),
    a Linear applied sequence-first (T, b, d), mean over T, 3 outputs."""

    def __init__(self, d=6, k=3):
        super().__init__()
        self.emb = nn.Linear(4, d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        a, _ = self.att(h, h, h, need_weights=False)
        h = h + a
        h = self.mix(h.transpose(0, 1)).transpose(0, 1)   # batch on dim 1 inside `mix`
        return self.head(torch.sin(h).mean(1))


class Tied(nn.Module):
    """Weights used outside their own module: an autoencoder-style transpose tie and a weight
    registered under two names."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 7)
        self.mid = nn.Linear(7, 7)
        self.mid2 = nn.Linear(7, 7)
        self.mid2.weight = self.mid.weight            # registered twice
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        h = torch.tanh(self.mid2(torch.relu(self.mid(h))))
        back = F.linear(h, self.enc.weight.T)         # enc.weight used outside enc
        return self.out(torch.sin(back))


def make_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Tanh(),
                        nn.Conv2d(6, 6, 3, padding="same", padding_mode="circular"),
                        nn.Flatten(), nn.Linear(6 * 3 * 3, 2))
    conv1d = nn.Sequential(nn.Conv1d(3, 5, 3, dilation=2, padding="same", bias=False),
                           nn.GELU(), nn.Conv1d(5, 4, 2, stride=2, padding=1,
                                                padding_mode="reflect"),
                           nn.Flatten(), nn.Linear(4 * 5, 1))
    bn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                       nn.Linear(3 * 6 * 6, 2))
    bn[1].running_mean.uniform_(-1, 1)
    bn[1].running_var.uniform_(0.5, 2)
    bn.eval()
    layernorm = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 12),
                              nn.LayerNorm(12, elementwise_affine=False), nn.Tanh(),
                              nn.Linear(12, 4))
    models = {
        "mlp": (mlp, (5,)),
        "cnn": (cnn, (2, 8, 8)),
        "conv1d": (conv1d, (3, 9)),
        "bn_eval": (bn, (2, 8, 8)),
        "resnet": (ResNet(), (5,)),
        "layernorm": (layernorm, (5,)),
        "seq_attention": (SeqModel().eval(), (5, 4)),
        "tied": (Tied(), (5,)),
    }
    return {k: (m.to(DT), s) for k, (m, s) in models.items()}


MODELS = make_models()


def data(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape), generator=g, dtype=DT)


# ----------------------------------------------------------------- all implementations agree
IMPLS = [("jacobian", None), ("ntk_vp", None), ("structured", "A"), ("structured", "B"),
         ("structured", None), ("auto", None)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("impl,method", IMPLS)
def test_all_implementations_match_loop_oracle(name, impl, method):
    model, shape = MODELS[name]
    x1, x2 = data(shape, 4, 1), data(shape, 3, 2)
    ref = loop_ntk(model, x1, x2)
    ref_sym = loop_ntk(model, x1)
    with ntkit.settings(empirical_method=method):
        got = empirical_ntk(model, x1, x2, output="full", implementation=impl)
        got_sym = empirical_ntk(model, x1, output="full", implementation=impl)
    assert got.shape == ref.shape and got.dtype == DT
    assert_close(got, ref)
    assert_close(got_sym, ref_sym)


@pytest.mark.parametrize("output", ["trace", "diagonal"])
@pytest.mark.parametrize("impl,method", IMPLS)
@pytest.mark.parametrize("name", ["cnn", "seq_attention", "resnet"])
def test_reduced_outputs(name, impl, method, output):
    model, shape = MODELS[name]
    x1, x2 = data(shape, 3, 3), data(shape, 2, 4)
    ref = reduce(loop_ntk(model, x1, x2), output)
    with ntkit.settings(empirical_method=method):
        got = empirical_ntk(model, x1, x2, output=output, implementation=impl)
    assert_close(got, ref)


def test_trace_is_mean_over_outputs_like_neural_tangents():
    model, shape = MODELS["mlp"]
    x = data(shape, 3, 5)
    full = empirical_ntk(model, x, output="full")
    tr = empirical_ntk(model, x, output="trace")
    k = full.shape[-1]
    assert k == 3
    assert_close(tr, torch.einsum("ijaa->ij", full) / k, 1e-13)
    assert_close(tr, tr.T, 1e-13)  # symmetric, positive semi-definite
    assert torch.linalg.eigvalsh(tr).min() > -1e-10 * tr.diagonal().max()


def test_structured_falls_back_for_untraceable_weights():
    """out_proj (never called), the transpose-tied encoder and the twice-registered weight must
    be left to autograd; everything plain must be structured."""
    for name, must_fall_back, must_structure in [
            ("seq_attention", {"att.in_proj_weight", "att.out_proj.weight"},
             {"emb.weight", "mix.weight", "head.weight"}),
            # a flagged weight sends its whole module (bias included) to autograd
            ("tied", {"enc.weight", "enc.bias", "mid.weight"}, {"mid2.bias", "out.weight",
                                                                "out.bias"}),
            ("layernorm", {"1.weight", "1.bias"}, {"0.weight", "3.weight", "6.bias"})]:
        model, shape = MODELS[name]
        setup, x1, _ = _prepare(model, data(shape, 2, 0), None, None, None)
        plan = structured.make_plan(setup, x1)
        assert must_fall_back <= set(plan.leftover), (name, plan.leftover)
        assert not (must_structure & set(plan.leftover)), (name, plan.leftover)
    # `mix` sees the batch on dim 1
    model, shape = MODELS["seq_attention"]
    setup, x1, _ = _prepare(model, data(shape, 2, 0), None, None, None)
    lay = {l.name: l for l in structured.make_plan(setup, x1).layers}
    assert lay["mix"].bdim == 1 and lay["mix"].L == 5 and lay["emb"].bdim == 0


def test_ntkit_dense_modules_are_structured():
    nl = pytest.importorskip("ntkit.layers")
    arch = nl.serial(nl.Dense(16, W_std=1.5, b_std=0.3), nl.Erf(), nl.Dense(16, W_std=1.2),
                     nl.Relu(), nl.Dense(2, W_std=1.5, b_std=0.2))
    net = arch.module(in_shape=4, seed=1)
    x1, x2 = data((4,), 4, 6), data((4,), 3, 7)
    setup, xx, _ = _prepare(net, x1, None, None, None)
    plan = structured.make_plan(setup, xx)
    assert plan.leftover == [] and len(plan.layers) == 3
    ref = loop_ntk(net, x1, x2)
    for method in ("A", "B"):
        with ntkit.settings(empirical_method=method):
            got = empirical_ntk(net, x1, x2, output="full", implementation="structured")
        assert_close(got, ref)


# ------------------------------------------------------------------------- params, buffers, dtype
def test_params_filters_match_oracle_on_subsets():
    model, shape = MODELS["layernorm"]
    x1, x2 = data(shape, 3, 8), data(shape, 2, 9)
    names_all = [n for n, _ in model.named_parameters()]
    cases = {
        "last_layers": (["3", "6"], {"3.weight", "3.bias", "6.weight", "6.bias"}),
        "all_but_first": (lambda n: not n.startswith("0."),
                          set(names_all) - {"0.weight", "0.bias"}),
        "bias_only_and_ln": (["0.bias", "1"], {"0.bias", "1.weight", "1.bias"}),
    }
    for label, (flt, expect) in cases.items():
        assert set(select_params(model, flt)) == expect, label
        ref = loop_ntk(model, x1, x2, names=expect)
        for impl in ("jacobian", "ntk_vp", "structured"):
            for method in ("A", "B"):
                with ntkit.settings(empirical_method=method):
                    got = empirical_ntk(model, x1, x2, output="full", implementation=impl,
                                        params=flt)
                assert_close(got, ref)


def test_frozen_params_are_excluded_by_default():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    model[0].weight.requires_grad_(False)
    x = data((3,), 4, 1)
    ref = loop_ntk(model, x)  # oracle also uses requires_grad params only
    assert_close(empirical_ntk(model, x, output="full"), ref)
    everything = empirical_ntk(model, x, output="full", params=lambda n: True)
    assert (everything - ref).abs().max() > 1e-3  # the frozen weight does contribute when asked


def test_float64_on_request_from_float32_model():
    torch.manual_seed(2)
    m32 = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    x = torch.randn(5, 4)
    got = empirical_ntk(m32, x, output="full", dtype=DT)
    assert got.dtype == DT and next(m32.parameters()).dtype == torch.float32  # not modified
    m64 = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).to(DT)
    m64.load_state_dict({k: v.to(DT) for k, v in m32.state_dict().items()})
    assert_close(got, loop_ntk(m64, x.to(DT)))
    f32 = empirical_ntk(m32, x, output="full")
    assert f32.dtype == torch.float32
    assert_close(f32.to(DT), got, 1e-5)


@pytest.mark.parametrize("impl", ["jacobian", "ntk_vp", "structured"])
def test_memory_budget_blocking_gives_same_kernel(impl):
    model, shape = MODELS["cnn"]
    x1, x2 = data(shape, 5, 10), data(shape, 3, 11)
    ref = loop_ntk(model, x1, x2)
    ref_sym = loop_ntk(model, x1)
    # 1 byte: one example and one parameter tensor per block (slow for vmap'd jacobians)
    for budget in (("40kB", 10**9) if impl == "jacobian" else (1, "40kB", 10**9)):
        assert_close(empirical_ntk(model, x1, x2, output="full", implementation=impl,
                                   memory_budget=budget), ref)
        assert_close(empirical_ntk(model, x1, output="full", implementation=impl,
                                   memory_budget=budget), ref_sym)


def test_parameter_chunks_respect_budget():
    from ntkit.empirical._common import chunk_names
    model, shape = MODELS["mlp"]
    setup = make_setup(model, [n for n, _ in model.named_parameters()], None)
    chunks = chunk_names(setup, setup.names, 100)
    assert [n for c in chunks for n in c] == setup.names
    for c in chunks:  # a chunk above the limit is a single tensor
        assert setup.numel(c) <= 100 or len(c) == 1


def test_auto_uses_the_cost_model():
    model, shape = MODELS["mlp"]
    setup, x1, _ = _prepare(model, data(shape, 50, 0), None, None, None)
    plan = structured.make_plan(setup, x1)
    assert _choose_implementation(setup, plan, 50, 50, True, "trace") == "structured"
    # no Linear/Conv at all: structured is not an option
    odd = nn.Sequential(nn.LayerNorm(5), nn.Tanh()).to(DT)
    setup, x1, _ = _prepare(odd, data((5,), 4, 0), None, None, None)
    plan = structured.make_plan(setup, x1)
    assert _choose_implementation(setup, plan, 4, 4, True, "full") in ("jacobian", "ntk_vp")
    got = empirical_ntk(odd, x1, output="full")
    assert_close(got, loop_ntk(odd, x1))


def test_layer_method_choice_follows_flops():
    """Gram (B) for a plain MLP layer, explicit Jacobian (A) for a conv with many pixels."""
    lin = structured._Layer("l", nn.Linear(512, 512), "linear", "w", "b", L=1, c=513, o=512)
    a, b = structured.layer_costs(lin, 500, 500, True, 1, "trace")
    assert b < a
    conv = structured._Layer("c", nn.Conv2d(64, 64, 3), "conv2d", "w", "b", L=1024, c=577, o=64)
    a, b = structured.layer_costs(conv, 100, 100, True, 10, "trace")
    assert a < b


# ---------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    model, shape = MODELS["mlp"]
    x = data(shape, 3, 0)
    with pytest.raises(ValueError, match="output"):
        empirical_ntk(model, x, output="sum")
    with pytest.raises(ValueError, match="implementation"):
        empirical_ntk(model, x, implementation="fast")
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, x, params=["nope"])
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, x, params=lambda n: False)
    with pytest.raises(TypeError, match="x1"):
        empirical_ntk(model, x.numpy())
    with pytest.raises(ValueError, match="x1"):
        empirical_ntk(model, x[:0])
    with pytest.raises(ValueError, match="NaN"):
        empirical_ntk(model, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="memory_budget"):
        empirical_ntk(model, x, memory_budget="lots")
    with pytest.raises(ValueError, match="memory_budget"):
        empirical_ntk(model, x, memory_budget=-1)
    with pytest.raises(TypeError, match="model"):
        empirical_ntk(lambda t: t, x)
    with pytest.raises(TypeError, match="dtype"):
        empirical_ntk(model, x, dtype=torch.int64)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT).train()
    with pytest.raises(ValueError, match="eval"):
        empirical_ntk(bn, x)
    drop = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 1)).to(DT).train()
    with pytest.raises(ValueError, match="eval"):
        empirical_ntk(drop, x)
    bn.eval()
    assert empirical_ntk(bn, x).shape == (3, 3)
    with pytest.raises(ValueError, match="x2"):
        empirical_ntk(_Reshaper(), x, data((7,), 2, 0))


class _Reshaper(nn.Module):
    """Output size depends on the input size (to test the x1/x2 output check)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=DT))

    def forward(self, x):
        return self.w * x


# --------------------------------------------------------------------------------- empirical NNGP
def test_empirical_nngp_is_readout_feature_gram():
    model, shape = MODELS["layernorm"]
    x1, x2 = data(shape, 4, 1), data(shape, 3, 2)
    with torch.no_grad():
        def phi(x):
            return torch.tanh(model[4](model[3](F.gelu(model[1](model[0](x))))))
        ref = phi(x1) @ phi(x2).T / 12
    assert_close(empirical_nngp(model, x1, x2), ref, 1e-13)
    with torch.no_grad():
        h = F.gelu(model[1](model[0](x1)))
        ref_mid = h @ h.T / 12
    assert_close(empirical_nngp(model, x1, readout="3"), ref_mid, 1e-13)
    assert_close(empirical_nngp(model, x1, readout=model[3]), ref_mid, 1e-13)
    with pytest.raises(ValueError, match="readout"):
        empirical_nngp(model, x1, readout="nope")
    with pytest.raises(ValueError, match="readout"):
        empirical_nngp(nn.Sequential(nn.Tanh()), x1)


def test_empirical_nngp_finds_the_dense_readout_by_type_not_by_class_name():
    """The default readout is an nn.Linear or ntkit's Dense module (a subclass included); a
    user module that merely shares the class name ``AffineModule`` is not taken for one."""
    from ntkit import layers as nl
    from ntkit.layers.dense import AffineModule
    x = data((3,), 4, 1)
    net = nl.serial(nl.Dense(6), nl.Erf(), nl.Dense(1)).module(3, seed=0, dtype=DT)
    with torch.no_grad():
        h = torch.erf(net[0](x))                                 # the readout's input
    ref = h @ h.T / 6
    assert_close(empirical_nngp(net, x), ref, 1e-13)

    class Readout(AffineModule):                                 # a subclass is still Dense
        pass
    net[2].__class__ = Readout
    assert_close(empirical_nngp(net, x), ref, 1e-13)

    class Impostor(nn.Module):                                   # same name, not ntkit's
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=DT))

        def forward(self, z):
            return self.w * z
    Impostor.__name__ = Impostor.__qualname__ = "AffineModule"
    with pytest.raises(ValueError, match="no nn.Linear"):
        empirical_nngp(nn.Sequential(nn.Tanh(), Impostor()), x)


# --------------------------------------------------------------------------------- linearization
def _perturbed(module, direction, eps):
    with torch.no_grad():
        for p, d in zip(module.parameters(), direction):
            p.add_(eps * d)


def test_linearize_is_first_order_with_quadratic_error():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 20), nn.Tanh(), nn.Linear(20, 20), nn.Softplus(),
                        nn.Linear(20, 2)).to(DT)
    x = data((4,), 6, 3)
    lin = linearize(net)
    with torch.no_grad():
        assert_close(lin(x), net(x), 1e-14)  # exact at theta0
    direction = [torch.randn_like(p) for p in net.parameters()]
    epss = [0.2 * 2.0 ** -i for i in range(6)]
    errs = []
    for eps in epss:
        a = linearize(net)                      # a fresh copy at theta0
        _perturbed(a, direction, eps)           # theta = theta0 + eps * v (in the linear model)
        moved = [p.detach().clone() for p in a.model.parameters()]
        ref = __import__("copy").deepcopy(net)
        with torch.no_grad():
            for p, m in zip(ref.parameters(), moved):
                p.copy_(m)
            errs.append((a(x) - ref(x)).abs().max().item())
    slope = torch.tensor([math.log(e) for e in errs]).diff().mean().item() / math.log(0.5)
    assert 1.85 < slope < 2.15, (slope, errs)
    # the linear model is linear in theta: second differences vanish
    with torch.no_grad():
        lin2 = linearize(net)
        outs = []
        for _ in range(3):
            outs.append(lin2(x))
            _perturbed(lin2, direction, 0.3)
        second = (outs[2] - 2 * outs[1] + outs[0]).abs().max()
        assert second < 1e-12 * outs[0].abs().max(), second


def test_linearized_gd_reproduces_closed_form_trajectory():
    """GD on 1/2 ||f_lin(X) - y||^2 with step eta: residuals r_t = (I - eta Theta)^t r_0 and
    test outputs f_t(x*) = f_0(x*) - eta sum_s Theta(x*, X) r_s, with Theta the loop-oracle NTK."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1)).to(DT)
    X, Xs = data((3,), 8, 20), data((3,), 5, 21)
    y = torch.sin(X.sum(1, keepdim=True))
    theta = loop_ntk(net, X)[:, :, 0, 0]
    theta_s = loop_ntk(net, Xs, X)[:, :, 0, 0]
    eta = 1.0 / torch.linalg.eigvalsh(theta).max().item()
    lin = linearize(net)
    opt = torch.optim.SGD(lin.parameters(), lr=eta)
    with torch.no_grad():
        r = lin(X) - y
        fs = lin(Xs)
    for _ in range(25):
        opt.zero_grad()
        loss = 0.5 * ((lin(X) - y) ** 2).sum()
        loss.backward()
        opt.step()
        fs = fs - eta * theta_s @ r
        r = r - eta * theta @ r
    with torch.no_grad():
        assert_close(lin(X) - y, r, 1e-9)
        assert_close(lin(Xs), fs, 1e-9)
        assert (r.norm() < 0.9 * (net(X) - y).norm())  # it did train


def test_linearize_params_subset_trains_only_those():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    lin = linearize(net, params=["2"])
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["model.2.weight",
                                                                          "model.2.bias"]
    x = data((3,), 4, 0)
    lin(x).sum().backward()
    assert lin.model[0].weight.grad is None and lin.model[2].weight.grad is not None
    # last-layer-only linearization of a net linear in its last layer is exact
    with torch.no_grad():
        lin.model[2].weight.add_(1.0)
        ref = __import__("copy").deepcopy(net)
        ref[2].weight.add_(1.0)
        assert_close(lin(x), ref(x), 1e-13)
    assert all(p.grad is None for p in net.parameters())  # the original is untouched


class Cubic(nn.Module):
    """f(x) = sum(w * x) * a^2 + b: a polynomial of degree 3 in the parameters."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, generator=g, dtype=DT))
        self.a = nn.Parameter(torch.randn((), generator=g, dtype=DT))
        self.b = nn.Parameter(torch.randn((), generator=g, dtype=DT))

    def forward(self, x):
        return ((x * self.w).sum(-1) * self.a ** 2 + self.b)[:, None]


def test_taylor_expand_exact_for_polynomial_and_orders():
    x = data((3,), 4, 0)
    model = Cubic()
    dirs = [torch.randn_like(p) for p in model.parameters()]
    exp3 = taylor_expand(model, 3)
    _perturbed(exp3, dirs, 0.7)
    ref = __import__("copy").deepcopy(model)
    _perturbed(ref, dirs, 0.7)
    with torch.no_grad():
        assert_close(exp3(x), ref(x), 1e-12)          # degree-3 expansion of a cubic is exact
        assert_close(taylor_expand(model, 0)(x), model(x), 1e-15)
    # error of the degree-2 expansion of a smooth net is O(eps^3)
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 1)).to(DT)
    d = [torch.randn_like(p) for p in net.parameters()]
    errs = []
    for eps in (0.2, 0.1, 0.05, 0.025):
        e2 = taylor_expand(net, 2)
        _perturbed(e2, d, eps)
        r = __import__("copy").deepcopy(net)
        _perturbed(r, d, eps)
        with torch.no_grad():
            errs.append((e2(x) - r(x)).abs().max().item())
    slope = torch.tensor([math.log(e) for e in errs]).diff().mean().item() / math.log(0.5)
    assert 2.7 < slope < 3.3, (slope, errs)
    with pytest.raises(ValueError, match="degree"):
        taylor_expand(net, -1)


# ------------------------------------------------------------------------- centered and scaled
def test_centered_and_scaled_kernels_and_outputs():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(DT)
    x = data((3,), 5, 0)
    c = centered(net)
    with torch.no_grad():
        assert c(x).abs().max() == 0.0
    k_net = empirical_ntk(net, x, output="full")
    assert_close(empirical_ntk(c, x, output="full"), k_net, 1e-12)
    for impl in ("jacobian", "structured"):
        assert_close(empirical_ntk(scaled(c, 3.0), x, output="full", implementation=impl),
                     9.0 * k_net, 1e-12)
    f0 = net(x).detach()
    with torch.no_grad():
        net[0].weight.add_(0.1)
        assert_close(c(x), net(x) - f0, 1e-13)   # shares the live model, init copy frozen
    assert sorted(n for n, _ in c.named_parameters()) == ["model.0.bias", "model.0.weight",
                                                         "model.2.bias", "model.2.weight"]
    with pytest.raises(ValueError, match="alpha"):
        scaled(net, 0.0)
    with pytest.raises(TypeError, match="alpha"):
        scaled(net, "big")


def test_lazy_training_approaches_linearized_dynamics_as_alpha_grows():
    """Train alpha*(f - f0) with loss/alpha^2 and its linearization the same way: the gap
    between the two trained functions shrinks ~1/alpha (Chizat & Bach)."""
    X = data((3,), 10, 30)
    y = torch.cos(2 * X[:, :1])
    gaps = []
    for alpha in (1.0, 10.0, 100.0):
        torch.manual_seed(8)
        net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)
        models = [scaled(centered(net), alpha),
                  scaled(centered(linearize(net)), alpha)]
        outs = []
        for m in models:
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
            for _ in range(60):
                opt.zero_grad()
                (0.5 * ((m(X) - y) ** 2).sum() / alpha ** 2).backward()
                opt.step()
            with torch.no_grad():
                outs.append(m(X) / alpha)     # function scale comparable across alpha
        gaps.append((outs[0] - outs[1]).norm().item())
    assert gaps[0] > 1e-3
    assert gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5, gaps


# --------------------------------------------------------- convergence to the infinite width
def test_empirical_kernels_converge_to_arch_kernel_with_width():
    nl = pytest.importorskip("ntkit.layers")
    x = data((4,), 6, 40)
    x = x / x.norm(dim=1, keepdim=True) * 2.0
    errs_ntk, errs_nngp = [], []
    widths = (32, 512)
    for width in widths:
        arch = nl.serial(nl.Dense(width, W_std=1.5, b_std=0.2), nl.Relu(),
                         nl.Dense(width, W_std=1.5, b_std=0.2), nl.Erf(),
                         nl.Dense(1, W_std=1.5, b_std=0.2))
        exact = arch.kernel(x, get=("nngp", "ntk"), dtype=DT)
        e_ntk, e_nngp = [], []
        for seed in range(4):
            net = arch.module(in_shape=4, seed=seed, dtype=DT)
            ntk = empirical_ntk(net, x)
            nngp = 1.5 ** 2 * empirical_nngp(net, x) + 0.2 ** 2
            e_ntk.append(((ntk - exact.ntk).norm() / exact.ntk.norm()).item())
            e_nngp.append(((nngp - exact.nngp).norm() / exact.nngp.norm()).item())
        errs_ntk.append(sum(e_ntk) / len(e_ntk))
        errs_nngp.append(sum(e_nngp) / len(e_nngp))
    # Monte Carlo error ~ 1/sqrt(width): x16 in width -> /4 in error (allow /2.2)
    assert errs_ntk[1] < errs_ntk[0] / 2.2 and errs_ntk[1] < 0.1, errs_ntk
    assert errs_nngp[1] < errs_nngp[0] / 2.2 and errs_nngp[1] < 0.1, errs_nngp
