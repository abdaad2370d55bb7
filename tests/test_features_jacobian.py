"""``features(method='jacobian')``: the sketched Jacobian of a random finite network.

Oracles: the empirical NTK of the same finite network computed by ``ntkit.empirical_ntk``
(autograd Jacobians, an independent code path) and the readout-layer formula for the NNGP part;
the exact infinite-width kernels with the ``dim^-1/2`` rate (fitted slope); CountSketch
unbiasedness (mean over sketches).
"""
import numpy as np
import pytest
import torch

import ntkit
from ntkit import features as nf
from ntkit import layers as nl

F64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _fc():
    return nl.serial(nl.Dense(64, W_std=1.4, b_std=0.1), nl.Relu(),
                     nl.Dense(64, W_std=1.4, b_std=0.1), nl.Relu(), nl.Dense(1, b_std=0.2))


def _cnn(top, stride=1, padding="SAME"):
    return nl.serial(nl.Conv(16, 3, padding=padding, W_std=1.4, b_std=0.1), nl.Relu(),
                     nl.Conv(16, 3, strides=stride, padding=padding, W_std=1.4), nl.Relu(),
                     top, nl.Dense(1, b_std=0.1))


ARCHS = {
    "fc": (_fc, (6,)),
    "cnn-flatten": (lambda: _cnn(nl.Flatten()), (3, 5, 5)),
    "cnn-gap": (lambda: _cnn(nl.GlobalAvgPool()), (3, 5, 5)),
    "cnn-strided-valid": (lambda: _cnn(nl.Flatten(), stride=2, padding="VALID"), (2, 7, 6)),
    "cnn-circular-1d": (lambda: _cnn(nl.GlobalAvgPool(), padding="CIRCULAR"), (2, 9)),
    "pool-residual": (lambda: nl.serial(
        nl.Conv(8, 3, padding="SAME", W_std=1.4), nl.Relu(), nl.AvgPool(2, 2),
        nl.FanOut(2), nl.parallel(nl.Identity(), nl.serial(nl.Conv(8, 3, padding="SAME"),
                                                           nl.Erf())),
        nl.FanInSum(), nl.LayerNorm(), nl.GlobalAvgPool(), nl.Dense(1)), (3, 6, 6)),
}


def _x(shape, n=5, seed=0):
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_gram_is_the_empirical_ntk_of_the_same_network(name):
    build, shape = ARCHS[name]
    arch, x = build(), _x(shape)
    phi = nf.features(arch, x, 12, method="jacobian", seed=3, dtype=F64)
    net = arch.module(shape, width=12, seed=3, dtype=F64)
    emp = ntkit.empirical_ntk(net, x, implementation="jacobian").reshape(len(x), len(x))
    torch.testing.assert_close(phi @ phi.T, emp, rtol=1e-10, atol=1e-12)


def test_nngp_features_are_the_readout_gradient():
    arch, x = _fc(), _x((6,), n=4)
    phi = nf.features(arch, x, 10, method="jacobian", get="nngp", seed=1, dtype=F64)
    net = arch.module(6, width=10, seed=1, dtype=F64)
    h = net[:-1](x)                               # the readout's input, (4, 10)
    expect = 1.0 ** 2 / 10 * (h @ h.T) + 0.2 ** 2   # W_std^2 / fan_in h.h' + b_std^2
    torch.testing.assert_close(phi @ phi.T, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["fc", "cnn-gap"])
def test_error_falls_like_dim_to_the_minus_half(name):
    build, shape = ARCHS[name]
    arch, x = build(), _x(shape, n=6)
    exact = arch.kernel(x, get="ntk")
    dims = [16, 64, 256] if name == "fc" else [8, 32, 128]
    errs = [np.mean([_rel(p @ p.T, exact) for p in (
        nf.features(arch, x, d, method="jacobian", seed=s, dtype=F64) for s in range(6))])
        for d in dims]
    slope = np.polyfit(np.log(dims), np.log(errs), 1)[0]
    assert -0.85 < slope < -0.3, (errs, slope)
    assert errs[-1] < 0.15, errs


def test_sketch_is_unbiased_and_reproducible():
    arch, x = ARCHS["cnn-gap"][0](), _x((3, 5, 5), n=6)
    raw = nf.features(arch, x, 16, method="jacobian", seed=0, dtype=F64)
    g_raw = raw @ raw.T
    # the sketch's hash is drawn from the seed, and so is the network: compare sketches of the
    # same network by fixing the network (seed 0) and varying only the sketch through out_dim
    # chunks of the same map -> reproducible; unbiasedness over sketch seeds below
    a = nf.features(arch, x, 16, method="jacobian", seed=0, dtype=F64, out_dim=256, chunk=2)
    b = nf.features(arch, x, 16, method="jacobian", seed=0, dtype=F64, out_dim=256)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (6, 256)
    from ntkit.layers._feature_ops import count_sketch as _count_sketch
    grams = [(lambda s: s @ s.T)(_count_sketch(raw, 256, seed)) for seed in range(200)]
    single = np.mean([_rel(gm, g_raw) for gm in grams])
    mean_err = _rel(sum(grams) / len(grams), g_raw)
    assert mean_err < 2.0 * single / np.sqrt(len(grams)), (single, mean_err)


def test_refusals_name_the_problem():
    x = torch.randn(3, 3, 6)
    attn = nl.serial(nl.Dense(8), nl.GlobalSelfAttention(8, 8, 8, 1), nl.GlobalAvgPool(),
                     nl.Dense(1))
    with pytest.raises(NotImplementedError, match="method='rf'|empirical_ntk"):
        nf.features(attn, x, 8, method="jacobian")
    with pytest.raises(ValueError, match="out_dim"):
        nf.features(_fc(), torch.randn(2, 6), 1200, method="jacobian")
    no_readout = nl.serial(nl.Dense(8), nl.Relu(), nl.Dense(8), nl.Relu())
    with pytest.raises(ValueError, match="Dense readout"):
        nf.features(no_readout, torch.randn(2, 6), 8, method="jacobian", get="nngp")
    with pytest.raises(ValueError, match="jacobian"):
        nf.features(_fc(), torch.randn(2, 6), 8, method="sketch")
    with pytest.raises(NotImplementedError, match="standard"):
        nf.features(nl.serial(nl.Dense(8, parameterization="standard"), nl.Relu(),
                              nl.Dense(1)), torch.randn(2, 6), 8, method="jacobian")


def _trainable_names(net, frozen):
    """Parameter names of the net's Dense/Conv layers (forward order) not in ``frozen``."""
    mods = [m for m in net.modules()
            if any(True for _ in m.parameters(recurse=False))]
    keep = set(range(len(mods))) - {i % len(mods) for i in frozen}
    ids = {id(p) for i in keep for p in mods[i].parameters(recurse=False)}
    return [n for n, p in net.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("name,frozen", [("fc", (0, -1)), ("cnn-gap", (0, -1)),
                                         ("cnn-flatten", (1,)), ("fc", (-1,))])
def test_frozen_layers_give_the_empirical_ntk_of_the_others(name, frozen):
    build, shape = ARCHS[name]
    arch, x = build(), _x(shape)
    phi = nf.features(arch, x, 12, method="jacobian", seed=3, dtype=F64, frozen=frozen)
    net = arch.module(shape, width=12, seed=3, dtype=F64)
    names = _trainable_names(net, frozen)
    emp = ntkit.empirical_ntk(net, x, implementation="jacobian", params=names)
    torch.testing.assert_close(phi @ phi.T, emp.reshape(len(x), len(x)), rtol=1e-10,
                               atol=1e-12)
    full = nf.features(arch, x, 12, method="jacobian", seed=3, dtype=F64)
    assert phi.shape[1] < full.shape[1]
    # sketched: unbiased for the same Gram, reproducible across chunks
    a = nf.features(arch, x, 12, method="jacobian", seed=3, dtype=F64, frozen=frozen,
                    out_dim=64, chunk=2)
    b = nf.features(arch, x, 12, method="jacobian", seed=3, dtype=F64, frozen=frozen,
                    out_dim=64)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)   # batch-size roundoff only


@pytest.mark.parametrize("name", ["fc", "cnn-gap"])
def test_frozen_readout_and_hidden_layers_match_closed_forms(name):
    """Infinite width: training only the readout gives the NNGP (its gradient is the last
    hidden layer's features); freezing only the readout gives NTK - NNGP."""
    build, shape = ARCHS[name]
    arch, x = build(), _x(shape, n=6)
    k = arch.kernel(x, get=("nngp", "ntk"))
    dim = 256 if name == "fc" else 128
    n_lin = 3
    cases = {(0, 1): k.nngp, (-1,): k.ntk - k.nngp}
    for frozen, exact in cases.items():
        grams = [p @ p.T for p in (nf.features(arch, x, dim, method="jacobian", seed=s,
                                               dtype=F64, frozen=frozen) for s in range(4))]
        err = _rel(sum(grams) / len(grams), exact)
        assert err < 0.1, (frozen, err)
    assert n_lin == len([m for m in arch.module(shape, width=4).modules()
                         if any(True for _ in m.parameters(recurse=False))])


def test_frozen_is_validated():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="no layer trained"):
        nf.features(_fc(), x, 8, method="jacobian", frozen=(0, 1, 2))
    with pytest.raises(ValueError, match="3 Dense/Conv layers"):
        nf.features(_fc(), x, 8, method="jacobian", frozen=(3,))
    with pytest.raises(TypeError, match="sequence of layer indices"):
        nf.features(_fc(), x, 8, method="jacobian", frozen=0)
    with pytest.raises(ValueError, match="method='jacobian'"):
        nf.features(_fc(), x, 8, frozen=(0,))


@pytest.mark.parametrize("name,frozen", [("fc", ()), ("cnn-gap", (0, -1))])
def test_sign_readout_is_the_empirical_ntk_of_the_rademacher_net(name, frozen):
    """``readout='sign'``: the Jacobian of the same network with its readout weights replaced
    by their signs (oracle: ``empirical_ntk`` of that network, built independently)."""
    build, shape = ARCHS[name]
    arch, x = build(), _x(shape)
    phi = nf.features(arch, x, 12, method="jacobian", seed=3, dtype=F64, frozen=frozen,
                      readout="sign")
    net = arch.module(shape, width=12, seed=3, dtype=F64)
    mods = [m for m in net.modules() if any(True for _ in m.parameters(recurse=False))]
    with torch.no_grad():
        mods[-1].weight.copy_(torch.sign(mods[-1].weight))
    assert set(mods[-1].weight.abs().flatten().tolist()) == {1.0}
    emp = ntkit.empirical_ntk(net, x, implementation="jacobian",
                              params=_trainable_names(net, frozen))
    torch.testing.assert_close(phi @ phi.T, emp.reshape(len(x), len(x)), rtol=1e-10,
                               atol=1e-12)


def test_sign_readout_keeps_the_mean_and_lowers_the_variance():
    """Hidden layer trained, readout frozen (the part the readout weights ``v`` multiply),
    32 networks of width 128: both readouts average to the exact ``NTK - NNGP`` and the sign
    readout's Gram entries vary far less (``v_k^2`` weights hidden unit ``k``: variance 2 for
    Gaussian weights, 0 for signs; for ``a_k = relu'(h_k) relu'(h'_k)`` the entry's variance
    is ``(3 E a^2 - E[a]^2) / w`` against ``(E a^2 - E[a]^2) / w``, ratio ~0.2-0.3)."""
    arch = nl.serial(nl.Dense(128, W_std=1.4, b_std=0.1), nl.Relu(), nl.Dense(1))
    x = _x((6,), n=6)
    k = arch.kernel(x, get=("nngp", "ntk"))
    exact = k.ntk - k.nngp
    out = {}
    for readout in ("gaussian", "sign"):
        grams = torch.stack([p @ p.T for p in (
            nf.features(arch, x, 128, method="jacobian", seed=s, dtype=F64, readout=readout,
                        frozen=(-1,))
            for s in range(32))])
        out[readout] = (_rel(grams.mean(0), exact), float(grams.var(0).mean()))
    assert out["gaussian"][0] < 0.06 and out["sign"][0] < 0.06, out
    assert out["sign"][1] < 0.45 * out["gaussian"][1], out


def test_readout_is_validated():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="'gaussian' or 'sign'"):
        nf.features(_fc(), x, 8, method="jacobian", readout="rademacher")
    with pytest.raises(ValueError, match="method='jacobian'"):
        nf.features(_fc(), x, 8, readout="sign")
