"""``mask_constant`` passed through the functions that run finite networks or tile kernels:
``monte_carlo_kernel``, ``features(method='jacobian')`` and ``ntkit.scale.compute_kernel``.

Oracles: padding invariance (the finite networks drawn with the same seed have the same
parameters at any sequence length / graph size, so the estimate on padded inputs equals the
estimate on the unpadded ones, exactly); ``ntkit.empirical_ntk`` of the same network run with
the mask; convergence to ``arch.kernel(..., mask_constant=c)`` as the width grows; the tiled
store against ``arch.kernel`` itself.
"""
from __future__ import annotations

import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.empirical import empirical_ntk
from ntkit.layers._features import features
from tests._helpers import padded_graphs, padded_sequences

DT = torch.float64
PAD = -1e9


def _padded(n=4, real=3, length=6, chans=3, seed=0, c=PAD):
    """``(unpadded (n, C, real), padded (n, C, length))``: each sequence at random sorted
    positions of its padded copy, the padding interleaved."""
    return padded_sequences(n, chans, real, length, c, seed)


def _ragged(seed=1):
    """Sequences of lengths 5, 2, 4, 3 padded to 5 (padding anywhere), plus a fully padded
    example last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 5, generator=g, dtype=DT)
    for i, m in enumerate([5, 2, 4, 3]):
        drop = torch.randperm(5, generator=g)[m:]
        x[i][:, drop] = PAD
    x[4] = PAD
    return x


ATTN = nl.serial(nl.Dense(8, 1.2, 0.1),
                 nl.GlobalSelfAttention(8, 8, 8, 2, W_key_std=1.3, b_std=0.1),
                 nl.Relu(), nl.Dense(8, 1.0, 0.1), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))
FC = nl.serial(nl.Dense(8, 1.2, 0.1), nl.Relu(), nl.Dense(8, 1.1, 0.2), nl.Erf(),
               nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))
GAP = nl.serial(nl.Dense(8, 1.2, 0.1), nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))
GNN = nl.serial(nl.Dense(8, 1.2, 0.1), nl.Relu(), nl.Aggregate(), nl.Dense(8, 1.0, 0.1),
                nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- monte_carlo_kernel ------------------------------------------------------------------
def test_monte_carlo_padding_leaves_the_estimate_unchanged():
    """Attention + GlobalAvgPool: the estimate on padded sequences is the estimate on the
    unpadded ones (same networks), symmetric and cross (the scalar is shared by x1 and x2,
    not split like a per-example argument)."""
    xu, xp = _padded()
    kw = dict(width=16, n_samples=2, seed=0)
    est = ntkit.monte_carlo_kernel(ATTN, xp, mask_constant=PAD, **kw)
    ref = ntkit.monte_carlo_kernel(ATTN, xu, **kw)
    for key in ("nngp", "ntk", "cov1"):
        _close(getattr(est, key), getattr(ref, key))
    cross = ntkit.monte_carlo_kernel(ATTN, xp[:2], xp[2:], get="ntk", mask_constant=PAD, **kw)
    _close(cross, ntkit.monte_carlo_kernel(ATTN, xu[:2], xu[2:], get="ntk", **kw))


def test_monte_carlo_masked_graphs_with_per_example_patterns():
    """Call-time arguments and mask_constant together: padded graphs (padding nodes wired to
    the real ones) give the estimate of the unpadded graphs."""
    x, a, xp, ap = padded_graphs(4, 3, 5, PAD, seed=5)
    kw = dict(width=8, n_samples=1, seed=3)
    est = ntkit.monte_carlo_kernel(GNN, xp[:2], xp[2:], mask_constant=PAD,
                                   pattern=(ap[:2], ap[2:]), **kw)
    ref = ntkit.monte_carlo_kernel(GNN, x[:2], x[2:], pattern=(a[:2], a[2:]), **kw)
    _close(est.nngp, ref.nngp)
    _close(est.ntk, ref.ntk)


def test_monte_carlo_converges_to_the_masked_kernel():
    """The error against arch.kernel(mask_constant=c) falls with the width; a fully padded
    example has a zero kernel row, as in arch.kernel; NaN padding gives the same numbers."""
    x = _ragged()
    exact = GAP.kernel(x, mask_constant=PAD)
    assert bool((exact.ntk[4] == 0).all())

    def err(width):
        est = ntkit.monte_carlo_kernel(GAP, x, width=width, n_samples=2, mask_constant=PAD)
        assert bool((est.nngp[4] == 0).all()) and bool((est.ntk[:, 4] == 0).all())
        return max(float((getattr(est, k) - getattr(exact, k)).abs().max()
                         / getattr(exact, k).abs().max()) for k in ("nngp", "ntk"))
    coarse, fine = err(8), err(2048)
    assert fine < 0.06 and fine < coarse / 2, (coarse, fine)
    xn = torch.where(x == PAD, torch.full((), float("nan"), dtype=DT), x)
    a = ntkit.monte_carlo_kernel(FC, x, width=16, n_samples=1, mask_constant=PAD)
    b = ntkit.monte_carlo_kernel(FC, xn, width=16, n_samples=1, mask_constant=float("nan"))
    _close(a.nngp, b.nngp)
    _close(a.ntk, b.ntk)


def test_monte_carlo_mask_refusals():
    x = _ragged()
    with pytest.raises(ValueError, match="Dropout does not support `mask_constant`"):
        ntkit.monte_carlo_kernel(nl.serial(nl.Dense(4), nl.Dropout(0.5), nl.GlobalAvgPool(),
                                           nl.Dense(1)), x, width=4, mask_constant=PAD)
    with pytest.raises(TypeError, match="mask_constant"):
        ntkit.monte_carlo_kernel(FC, x, width=4, mask_constant="pad")


# ---- features(method='jacobian') -----------------------------------------------------------
def test_jacobian_features_are_the_masked_empirical_ntk():
    """Conv (masked by window centre) + GlobalAvgPool: the raw Jacobian features are the
    empirical NTK of the same network run with mask_constant."""
    arch = nl.serial(nl.Conv(6, 3, padding="SAME", b_std=0.1), nl.Relu(),
                     nl.Dense(6, 1.1, 0.1), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))
    x = _ragged()
    phi = features(arch, x, 6, method="jacobian", seed=3, dtype=DT, mask_constant=PAD)
    net = arch.module((3, 5), width=6, seed=3, dtype=DT)
    emp = empirical_ntk(net, x, mask_constant=PAD)
    _close(phi @ phi.T, emp)
    assert bool((phi[4] == 0).all())


def test_jacobian_features_ignore_padding_and_converge():
    """Padding leaves the features unchanged (exactly, sketched or not); their Gram matrix,
    averaged over seeds, approaches arch.kernel(mask_constant=c)."""
    xu, xp = _padded(seed=2)
    for out_dim in (None, 64):
        kw = dict(method="jacobian", get=("nngp", "ntk"), seed=1, dtype=DT, out_dim=out_dim)
        fp = features(FC, xp, 16, mask_constant=PAD, **kw)
        fu = features(FC, xu, 16, **kw)
        _close(fp["ntk"], fu["ntk"])
        _close(fp["nngp"], fu["nngp"])
    x = _ragged()
    exact = FC.kernel(x, mask_constant=PAD)
    seeds = 4
    for key in ("nngp", "ntk"):
        phi = torch.cat([features(FC, x, 256, key, method="jacobian", seed=s, dtype=DT,
                                  mask_constant=PAD) for s in range(seeds)], 1)
        ref = getattr(exact, key)
        err = float((phi @ phi.T / seeds - ref).abs().max() / ref.abs().max())
        assert err < 0.12, (key, err)


def test_rf_features_refuse_masks():
    with pytest.raises(ValueError, match="method='rf'.*mask_constant.*method='jacobian'"):
        features(FC, _ragged(), 16, mask_constant=PAD)


# ---- ntkit.scale.compute_kernel ------------------------------------------------------------
def test_compute_kernel_masked_store(tmp_path):
    """The tiled store equals arch.kernel(mask_constant=c); the constant is part of the
    fingerprint: a store is resumed with the same constant only."""
    from ntkit.scale import compute_kernel
    x = _ragged()
    exact = GAP.kernel(x, mask_constant=PAD)
    path = tmp_path / "k.zarr"
    h = compute_kernel(GAP, x, store=path, tile=2, progress=False, mask_constant=PAD)
    for key in ("nngp", "ntk"):
        torch.testing.assert_close(h.load(key), getattr(exact, key), rtol=1e-12, atol=1e-14)
    h = compute_kernel(GAP, x, store=path, tile=2, progress=False, mask_constant=PAD)  # resume
    torch.testing.assert_close(h.load("ntk"), exact.ntk, rtol=1e-12, atol=1e-14)
    for other in ({"mask_constant": -1e8}, {}):
        with pytest.raises(ValueError, match="mask_constant"):
            compute_kernel(GAP, x, store=path, tile=2, progress=False, **other)
    # cross kernel, NaN padding, in memory
    xn = torch.where(x == PAD, torch.full((), float("nan"), dtype=DT), x)
    h = compute_kernel(GAP, xn, xn[:3], get="ntk", store=None, tile=2, progress=False,
                       mask_constant=float("nan"))
    torch.testing.assert_close(h.load("ntk"), exact.ntk[:, :3], rtol=1e-12, atol=1e-14)


def test_compute_kernel_mask_refusals(tmp_path):
    from ntkit.scale import compute_kernel
    x = _ragged()
    path = tmp_path / "k.zarr"
    drop = nl.serial(nl.Dense(4), nl.Dropout(0.5), nl.GlobalAvgPool(), nl.Dense(1))
    with pytest.raises(ValueError, match="Dropout does not support `mask_constant`"):
        compute_kernel(drop, x, store=path, progress=False, mask_constant=PAD)
    with pytest.raises(TypeError, match="mask_constant.*architectures"):
        compute_kernel(lambda a, b: a.flatten(1) @ b.flatten(1).T, x, store=path,
                       progress=False, mask_constant=PAD)
    # float64 data whose entries collide with the constant once rounded to float32
    y = x.clone()
    y[0, 0, 0] = 0.1
    y[1] = torch.where(y[1] == PAD, torch.full((), 0.1 + 1e-12, dtype=DT), y[1])
    with pytest.raises(ValueError, match="differ from it in the input's own dtype"):
        compute_kernel(FC, y, store=path, progress=False, mask_constant=0.1 + 1e-12,
                       dtype=torch.float32)
    assert not path.exists()   # refused before anything was touched
