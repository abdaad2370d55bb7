"""Random features (``features(method='rf')``) of the layers added with attention / graphs /
conv variants: ConvTranspose, ConvLocal, Aggregate (call-time pattern), ImageResize, Index,
DotGeneral, Dropout(mode='test'), repeat, FanInProd; and the refusals of the others.

Oracle: the exact float64 kernel of the same architecture. The tolerance is derived from the
Monte Carlo error itself: with ``S`` seeds, the mean Gram's distance to the exact kernel must be
within ``3 / sqrt(S)`` of the measured per-seed spread (an unbiased rule; a wrong rule has an
O(1) error that does not average out), and the per-seed spread must be of the ``dim^-1/2``
order. Small inputs, float64.
"""
import math

import numpy as np
import pytest
import torch

from ntkit import features as nf
from ntkit import layers as nl

F64 = torch.float64
DIM, SEEDS = 128, 6


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _check(arch, x, dim=DIM, seeds=SEEDS, rate=4.0, **kw):
    """Mean over ``seeds`` feature Grams vs ``arch.kernel``; returns the measured errors.
    ``rate``: the bound on one seed's error in units of ``dim^-1/2``."""
    k = arch.kernel(x, get=("nngp", "ntk"), **kw)
    fs = [nf.features(arch, x, dim, get=("nngp", "ntk"), dtype=F64, seed=s, **kw)
          for s in range(seeds)]
    out = {}
    for get in ("nngp", "ntk"):
        exact = getattr(k, get)
        grams = [f[get] @ f[get].T for f in fs]
        mean = sum(grams) / seeds
        spread = float(np.mean([_rel(g, mean) for g in grams]))   # one seed's error, measured
        err = _rel(mean, exact)
        out[get] = (err, spread)
        assert spread < rate / math.sqrt(dim), (get, spread)   # the dim^-1/2 Monte Carlo rate
        assert err < 3.0 * spread / math.sqrt(seeds) + 1.0 / dim, (get, err, spread)
    return out


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_conv_transpose_features():
    x = torch.randn(3, 2, 3, 3, generator=_g(0), dtype=F64)
    arch = nl.serial(nl.ConvTranspose(8, 3, strides=2, padding="SAME", W_std=1.3, b_std=0.2),
                     nl.Relu(), nl.ConvTranspose(8, 2, padding="CIRCULAR", W_std=1.2),
                     nl.Relu(), nl.Flatten(), nl.Dense(1, W_std=1.1, b_std=0.1))
    _check(arch, x)
    x1 = torch.randn(3, 2, 4, generator=_g(1), dtype=F64)           # 1-D, VALID, stride 3
    arch1 = nl.serial(nl.ConvTranspose(8, 2, strides=3, W_std=1.4, b_std=0.3), nl.Erf(),
                      nl.GlobalAvgPool(), nl.Dense(1))
    _check(arch1, x1)


def test_conv_local_features_differ_from_conv_under_pooling():
    x = torch.randn(3, 2, 4, 4, generator=_g(2), dtype=F64)
    arch = nl.serial(nl.ConvLocal(8, 3, padding="SAME", W_std=1.3, b_std=0.2), nl.Relu(),
                     nl.ConvLocal(8, 2, strides=2, W_std=1.2), nl.Relu(), nl.GlobalAvgPool(),
                     nl.Dense(1, b_std=0.1))
    _check(arch, x)
    conv = nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.3, b_std=0.2), nl.Relu(),
                     nl.Conv(8, 2, strides=2, W_std=1.2), nl.Relu(), nl.GlobalAvgPool(),
                     nl.Dense(1, b_std=0.1))
    # the check is not vacuous: with pooling the two kernels differ by far more than the noise
    assert _rel(arch.kernel(x).ntk, conv.kernel(x).ntk) > 0.05


@pytest.mark.parametrize("impl", ["DENSE", "SPARSE"])
def test_aggregate_features_with_call_time_pattern(impl):
    n, v = 4, 5
    x = torch.randn(n, 3, v, generator=_g(3), dtype=F64)
    a = (torch.rand(n, v, v, generator=_g(4)) < 0.4).to(F64) + torch.eye(v, dtype=F64)
    a[0, 0, 1] = 2.0                                   # weighted, not symmetric
    a[0, 1, 0] = 0.0
    if impl == "DENSE":
        pat = a
    else:   # the same graph as weighted arcs (repeated arcs add up), tail -> head
        arcs = [[(i, j) for i in range(v) for j in range(v) for _ in range(int(a[b, i, j]))]
                for b in range(n)]
        e = max(len(r) for r in arcs)
        pat = torch.full((n, e, 2), -1, dtype=torch.long)
        for b, r in enumerate(arcs):
            pat[b, :len(r)] = torch.tensor(r)
    agg = nl.Aggregate(implementation=impl)
    arch = nl.serial(nl.Dense(8, W_std=1.3, b_std=0.1), nl.Relu(), agg,
                     nl.Dense(8, W_std=1.2), nl.Relu(), agg,
                     nl.GlobalSumPool(), nl.Dense(1, b_std=0.1))
    _check(arch, x, pattern=pat)
    # chunks read their own rows of the pattern: the same map whatever the chunking
    f1 = nf.features(arch, x, 16, dtype=F64, seed=1, pattern=pat)
    f2 = nf.features(arch, x, 16, dtype=F64, seed=1, chunk=1, pattern=pat)
    torch.testing.assert_close(f1, f2, rtol=1e-12, atol=1e-12)
    assert nf.feature_dim(arch, (3, v), 16, pattern=pat[:1]) == f1.shape[1]


def test_resize_index_dotgeneral_features():
    x = torch.randn(3, 2, 4, 4, generator=_g(5), dtype=F64)
    w = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=F64)
    arch = nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.3, b_std=0.1), nl.Relu(),
                     nl.ImageResize((6, 5), "linear"), nl.Index(nl.Slice[:, :, 1:5, ::-1]),
                     nl.Conv(8, 2, W_std=1.2), nl.Relu(),
                     nl.DotGeneral(rhs=w[:3], dimension_numbers=(((2,), (0,)), ((), ()))),
                     nl.ImageResize((6,), "nearest"), nl.Flatten(), nl.Dense(1, b_std=0.1))
    _check(arch, x)


def test_dropout_test_mode_and_repeat_features():
    x = torch.randn(4, 3, generator=_g(6), dtype=F64)
    arch = nl.serial(nl.repeat(nl.serial(nl.Dense(8, W_std=1.3, b_std=0.1), nl.Relu(),
                                         nl.Dropout(0.7, mode="test")), 2), nl.Dense(1))
    _check(arch, x)


def test_fan_in_prod_features():
    x = torch.randn(4, 3, generator=_g(7), dtype=F64)
    arch = nl.serial(nl.Dense(8, W_std=1.1, b_std=0.2), nl.FanOut(3),
                     nl.parallel(nl.Dense(8, W_std=1.2, b_std=0.3),
                                 nl.Dense(8, W_std=1.4, b_std=0.3), nl.Identity()),
                     nl.FanInProd(), nl.Dense(1, b_std=0.1))
    # a product of three Gaussian samples has a heavier tail: a larger constant, same rate
    _check(arch, x, dim=512, rate=10.0)
    xi = torch.randn(3, 2, 3, 3, generator=_g(8), dtype=F64)     # per pixel pair
    conv = nl.serial(nl.FanOut(2), nl.parallel(
        nl.Conv(8, 2, padding="SAME"),
        nl.serial(nl.Conv(8, 3, padding="SAME", b_std=0.2), nl.Relu(), nl.Conv(8, 1))),
                     nl.FanInProd(), nl.Conv(8, 2), nl.Relu(), nl.Flatten(), nl.Dense(1))
    _check(conv, xi)


@pytest.mark.parametrize("act", [
    nl.Hermite(3), nl.Polynomial((0.1, 1.0, 0.5)), nl.Gabor(), nl.ExpNormalized(gamma=1.5),
    nl.Elementwise(torch.sin, nngp_fn=lambda c, v1, v2: torch.exp(-(v1 + v2) / 2) * torch.sinh(c)),
], ids=["hermite", "polynomial", "gabor", "expnormalized", "elementwise-nngp_fn"])
def test_new_activations_use_the_generic_rule(act):
    """fn(z) / sqrt(dim) and fn'(z) t / sqrt(dim) (fn' by autograd) for the activations of
    issue 16 (ExpNormalized's fn normalizes over the sample's channels, detached)."""
    x = torch.randn(4, 3, generator=_g(9), dtype=F64) * 0.7
    _check(nl.serial(nl.Dense(8, W_std=1.1, b_std=0.2), act, nl.Dense(1, b_std=0.1)), x,
           dim=512, rate=8.0)


def test_refusals_name_the_layer_and_the_alternative():
    x = torch.randn(3, 3, 5, dtype=F64)
    attn = nl.serial(nl.Dense(8), nl.GlobalSelfAttention(8, 8, 8, 1), nl.GlobalAvgPool(),
                     nl.Dense(1))
    with pytest.raises(NotImplementedError, match="GlobalSelfAttention.*method='jacobian'"):
        nf.features(attn, x, 8)
    drop = nl.serial(nl.Dense(8), nl.Relu(), nl.Dropout(0.8), nl.Dense(1))
    with pytest.raises(NotImplementedError, match="Dropout.*train.*mode='test'"):
        nf.features(drop, torch.randn(3, 4), 8)
    # rate 1 is the identity in either mode
    assert nf.features(nl.serial(nl.Dense(8), nl.Relu(), nl.Dropout(1.0), nl.Dense(1)),
                       torch.randn(3, 4), 8).shape[0] == 3
