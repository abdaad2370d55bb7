"""The cheap path of masked kernels (``mask_constant``): ``Layer.masked_kernel_map`` skips the
remask after layers that keep the covariances of masked positions zero
(:func:`ntkit.layers._masking.keeps_zeros`) and ``remask`` reuses the pair masks of a tile
(``_cached_pair_mask``).

Oracles: the plain path (every layer remasks, pair masks rebuilt each time; selected by
monkeypatching both helpers back) gives exactly the same kernels on architectures with conv and
pooling, attention, Aggregate, and FanOut / parallel / Identity / FanInSum / FanInConcat; each
layer :func:`keeps_zeros` lists is checked to return exact zeros at masked positions.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ntkit import layers as nl
from ntkit.layers import _masking
from ntkit.layers._base import apply_kernel_map
from ntkit.layers._masking import _pair_mask, keeps_zeros
from ntkit.layers._ops import input_kernel
from tests._helpers import padded_graphs

DT = torch.float64
PAD = -1e9


def _padded(n, chans, length, seed):
    """``(n, chans, length)`` sequences, each keeping a random subset of >= 2 positions (the
    padding interleaved, not only at the end), the rest set to ``PAD``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chans, length, generator=g, dtype=DT)
    for i in range(n):
        keep = 2 + int(torch.randint(length - 2, (1,), generator=g))
        x[i, :, torch.randperm(length, generator=g)[keep:]] = PAD
    return x


ATT = nl.GlobalSelfAttention(8, 8, 8, 2, W_key_std=1.3, W_query_std=0.9, W_value_std=1.2,
                             W_out_std=1.1, b_std=0.1, attention_mechanism="SOFTMAX",
                             pos_emb_type="NONE")
ARCHS = {
    "attention": nl.serial(nl.Dense(8, 1.5, 0.1), ATT, nl.Relu(), nl.Dense(8, 1.2), nl.Abs(),
                           nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1)),
    "conv_pool": nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.3), nl.Relu(),
                           nl.Dense(8, 1.1, 0.2), nl.AvgPool(2), nl.Dense(8, 1.1),
                           nl.LeakyRelu(0.2),
                           nl.Conv(8, 3, padding="SAME", W_std=1.2, b_std=0.1), nl.Relu(),
                           nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1)),
    "residual": nl.serial(nl.Dense(8, 1.2, 0.1), nl.FanOut(2),
                          nl.parallel(nl.Identity(), nl.serial(nl.Relu(), nl.Dense(8, 1.1),
                                                               nl.Relu(), nl.Dense(8))),
                          nl.FanInSum(), nl.LayerNorm(), nl.FanOut(2),
                          nl.parallel(nl.Identity(), nl.Dense(8, 1.3, 0.0)), nl.FanInConcat(),
                          nl.Relu(), nl.Dense(8, 1.0, 0.3), nl.Identity(), nl.GlobalAvgPool(),
                          nl.Dense(1, 1.0, 0.1)),
    "aggregate": nl.serial(nl.Dense(8, 1.2, 0.1), nl.Relu(), nl.Aggregate(), nl.Dense(8, 1.0),
                           nl.Relu(), nl.Aggregate(), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1)),
}


def _plain(monkeypatch):
    """Switch to the plain path: remask after every layer, pair masks rebuilt each time."""
    monkeypatch.setattr(_masking, "keeps_zeros", lambda layer: False)
    monkeypatch.setattr(_masking, "_cached_pair_mask", _pair_mask)


def _inputs(name):
    if name == "aggregate":
        _, _, xp, ap = padded_graphs(4, 4, 7, PAD, seed=2)
        return xp[:2], xp[2:], {"pattern": (ap[:2], ap[2:])}, {"pattern": ap}
    x = _padded(5, 3, 7, seed=1)
    return x[:3], x[3:], {}, {}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_skip_and_cache_give_the_plain_results(name, monkeypatch):
    arch = ARCHS[name]
    xa, xb, kw_cross, kw_sym = _inputs(name)
    calls = []
    real = _masking.remask

    def counting(k, key=None):
        calls.append(key)
        return real(k, key)

    monkeypatch.setattr(_masking, "remask", counting)
    fast = [arch.kernel(xa, xb, mask_constant=PAD, tile=2, **kw_cross),
            arch.kernel(torch.cat([xa, xb]), mask_constant=PAD, tile=2, **kw_sym)]
    n_fast = len(calls)
    _plain(monkeypatch)
    plain = [arch.kernel(xa, xb, mask_constant=PAD, tile=2, **kw_cross),
             arch.kernel(torch.cat([xa, xb]), mask_constant=PAD, tile=2, **kw_sym)]
    assert n_fast < len(calls) - n_fast  # the skip was taken (the comparison is not vacuous)
    for f, p in zip(fast, plain):
        for g in ("nngp", "ntk"):
            assert torch.isfinite(getattr(p, g)).all()
            assert torch.equal(getattr(f, g), getattr(p, g)), (name, g)


ZERO_KEEPERS = [nl.Identity(), nl.Relu(), nl.LeakyRelu(0.3), nl.Abs(), nl.ABRelu(-0.5, 2.0),
                nl.Dense(6, 1.4), nl.Dense(6, 1.4, 0.0),
                nl.Dense(6, 1.4, parameterization="standard"), nl.Dense(6, 1.4, 0.1),
                nl.Dense(6, 1.4, 0.3, parameterization="standard"),
                nl.Dense(6, 1.4, 0.0, parameterization="standard"), ATT,
                nl.GlobalSelfAttention(8, 8, 8, 2, W_key_std=1.3, b_std=0.2,
                                       attention_mechanism="RELU", pos_emb_type="SUM",
                                       val_pos_emb=True)]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("layer", ZERO_KEEPERS, ids=repr)
def test_listed_layers_keep_masked_covariances_zero(layer, symmetric, full):
    """What the skip relies on: from a record that is zero at masked positions (a biased Dense,
    remasked), the layer's own map returns exact zeros there, with the masks unchanged."""
    assert keeps_zeros(layer)
    if isinstance(layer, nl.GlobalSelfAttention) and not full:
        pytest.skip("attention needs the pixel-pair layout")
    x = _padded(5, 3, 6, seed=4)
    xz = torch.where(x == PAD, torch.zeros((), dtype=DT), x)
    m = (x == PAD).all(1)
    xa, xb = (xz, None) if symmetric else (xz[:3], xz[3:])
    k = input_kernel(xa, xb, True, full)
    k = k.replace(mask1=m if symmetric else m[:3], mask2=None if symmetric else m[3:])
    k = apply_kernel_map(nl.Dense(5, 1.3, 0.4), k)  # nonzero at masked positions, remasked
    out = layer.kernel_map(k)
    assert layer.mask_map(k.mask1, k.shape1) is k.mask1
    m1 = k.mask1
    m2 = m1 if k.mask2 is None else k.mask2
    pm = _pair_mask(m1, m2, 2, 1, full)
    assert bool(pm.any())
    for t in (out.nngp, out.ntk):
        at = pm.expand_as(t)
        assert torch.equal(t[at], torch.zeros_like(t[at]))
        assert bool((t[~at] != 0).any())
    for cov, mm in ((out.cov1, m1), (out.cov2, k.mask2)):
        if cov is not None:
            ps = _pair_mask(mm, mm, 1, 1, full).expand_as(cov)
            assert torch.equal(cov[ps], torch.zeros_like(cov[ps]))


@pytest.mark.parametrize("layer", [nl.Erf(), nl.Gelu(), nl.LayerNorm(), nl.Conv(4, 3),
                                   nl.GlobalSelfAttention(8, 8, 8, 2, linear_scaling=False,
                                                          attention_mechanism="IDENTITY"),
                                   nl.GlobalAvgPool(), nl.Aggregate(), nl.AvgPool(2)],
                         ids=repr)
def test_other_layers_always_remask(layer):
    """Other activations and layers that move or read positions are not on the list (Dense
    is: its bias terms go only where no position is masked)."""
    assert not keeps_zeros(layer)


def test_subclasses_are_not_trusted():
    """A subclass may override the kernel map: only the listed classes themselves skip."""
    @dataclasses.dataclass(frozen=True)
    class Shifted(nl.ABRelu):
        pass

    assert keeps_zeros(nl.ABRelu(0.0, 1.0)) and not keeps_zeros(Shifted(0.0, 1.0))


def test_pair_mask_cache_is_per_partner():
    """The cache on a mask keys its partner by identity: an equal-shaped different partner gets
    its own mask, the symmetric case holds no reference cycle."""
    g = torch.Generator().manual_seed(0)
    ma, mb, mc = (torch.rand(3, 5, generator=g) < 0.4 for _ in range(3))
    for full in (False, True):
        for partner in (mb, mc, ma):
            got = _masking._cached_pair_mask(ma, partner, 2, 1, full)
            assert torch.equal(got, _pair_mask(ma, partner, 2, 1, full))
            assert _masking._cached_pair_mask(ma, partner, 2, 1, full) is got
        assert torch.equal(_masking._cached_pair_mask(ma, ma, 1, 1, full),
                           _pair_mask(ma, ma, 1, 1, full))
    assert all(v[0] is not ma for v in ma._ntkit_pair_masks.values())
