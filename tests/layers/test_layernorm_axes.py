"""LayerNorm over channels and spatial axes jointly (NT's ``LayerNorm(axis=(1, 2, 3))``).

Reference: for a bias-free first Conv (linear in x), LayerNorm over (C, H, W) right after it
divides by sqrt(m(x) + eps), m(x) = mean over pixels of the per-pixel pre-activation variance;
that equals feeding the rescaled input x / sqrt(m(x) + eps) to the same architecture without
the LayerNorm. m(x) is computed here by hand from the Conv's definition (unfold). Monte Carlo
from the finite module checks the partial case axis=(1, 2) (channels and rows).
"""
import pytest
import torch

from ntkit import layers as nl
from ntkit.testing import mc_error_slope
from tests._helpers import randn64


W1 = 1.4


def _conv_mean_variance(x, k=2):
    """mean over output pixels of W1^2 |patch|^2 / (C k^2): VALID 2x2 Conv, NTK param."""
    patches = torch.nn.functional.unfold(x, k)          # (n, C k k, P)
    return W1 ** 2 * patches.pow(2).sum(1).mean(1) / patches.shape[1]


def _head():
    return (nl.Relu(), nl.Conv(6, 2, W_std=1.1, b_std=0.2), nl.Erf(), nl.Flatten(),
            nl.Dense(1, 0.9))


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_joint_layernorm_equals_rescaled_input(pool, eps):
    x1, x2 = randn64(3, 2, 5, 5), randn64(2, 2, 5, 5, seed=1)
    conv = nl.Conv(6, 2, W_std=W1)
    tail = (nl.AvgPool(2, 1),) if pool else ()  # pooling forces the full pixel-pair layout
    head = _head()
    arch = nl.serial(conv, nl.LayerNorm(axis=(1, 2, 3), eps=eps), *tail, *head)
    ref_arch = nl.serial(conv, *tail, *head)
    s1 = (_conv_mean_variance(x1) + eps).rsqrt().reshape(-1, 1, 1, 1)
    s2 = (_conv_mean_variance(x2) + eps).rsqrt().reshape(-1, 1, 1, 1)
    for a, b in ((x1, x2), (x1, None)):
        k = arch.kernel(a, b)
        ref = ref_arch.kernel(a * s1, None if b is None else b * s2)
        torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-11, atol=1e-12)


def test_channel_only_axis_spellings_agree_and_joint_differs():
    x = randn64(3, 2, 4, 4)
    base = nl.serial(nl.Conv(4, 2, W_std=1.3, b_std=0.3))

    def ker(ln):
        return nl.serial(base, ln, nl.Relu(), nl.Flatten(), nl.Dense(1)).kernel(x)

    k0 = ker(nl.LayerNorm())
    for ax in (1, (1,), -3, [1]):
        k = ker(nl.LayerNorm(axis=ax))
        assert torch.equal(k.nngp, k0.nngp) and torch.equal(k.ntk, k0.ntk)
    kj = ker(nl.LayerNorm(axis=(1, 2, 3)))
    assert float((kj.nngp - k0.nngp).abs().max()) > 1e-3
    # FC inputs: the only non-batch axis is the channel axis, -1 spells it
    xf = randn64(4, 3)

    def fc(ln):
        return nl.serial(nl.Dense(5, 1.2, 0.1), ln, nl.Relu(), nl.Dense(1)).kernel(xf)

    assert torch.equal(fc(nl.LayerNorm(axis=-1)).ntk, fc(nl.LayerNorm()).ntk)


def test_finite_module_normalizes_over_the_axes():
    x = randn64(2, 3, 4, 5)
    mod = nl.LayerNorm(axis=(1, 3), eps=0.0).module((3, 4, 5))
    y = mod(x)
    torch.testing.assert_close(y.mean((1, 3)), torch.zeros(2, 4, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var((1, 3), unbiased=False),
                               torch.ones(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("axis,msg", [((2, 3), "channel axis"), ((0, 1), "batch axis"),
                                      ((1, 4), "out of range")])
def test_bad_axis_raises(axis, msg):
    arch = nl.serial(nl.Conv(4, 2), nl.LayerNorm(axis=axis), nl.Flatten(), nl.Dense(1))
    with pytest.raises(ValueError, match=msg):
        arch.kernel(randn64(2, 2, 4, 4))
    with pytest.raises(ValueError, match=msg):
        arch.module((2, 4, 4))


def test_axis_type_checked():
    with pytest.raises(TypeError, match="axis"):
        nl.LayerNorm(axis="1")
    with pytest.raises(TypeError, match="axis"):
        nl.LayerNorm(axis=())


@pytest.mark.parametrize("axis", [(1, 2), (1, 2, 3)])
def test_monte_carlo_partial_and_joint_axes(axis):
    """Finite module vs kernel: relative error falls like width^-1/2 (a wrong normalizer,
    e.g. channels only, plateaus). Measured, widths 32/128/512 (NNGP), 16/64/256 (NTK), 2
    seeds: axis=(1, 2) NNGP 0.14, 0.12, 0.034, NTK 0.19, 0.068, 0.037; axis=(1, 2, 3) NNGP
    0.22, 0.14, 0.042, NTK 0.30, 0.091, 0.052; the channel-only kernel against the same
    modules: 0.16-0.34 with no decrease (slopes -0.05..-0.11)."""
    arch = nl.serial(nl.Conv(8, 2, W_std=1.5, b_std=0.2), nl.LayerNorm(axis=axis, eps=0.01),
                     nl.Relu(), nl.Conv(8, 2, W_std=1.2), nl.Flatten(), nl.Dense(1))
    # pixel scales 0.04..9 in variance: a per-pixel (channel-only) normalizer is far off
    # (measured: it plateaus at 15-25% error, slope ~ -0.05, on these inputs)
    ramp = torch.tensor([0.2, 0.5, 1.5, 3.0], dtype=torch.float64)
    x = (torch.cat([randn64(3, 2, 4, 4), 0.3 * randn64(2, 2, 4, 4, seed=5)])
         * ramp.reshape(4, 1) * ramp)
    for get, widths in (("nngp", (32, 128, 512)), ("ntk", (16, 64, 256))):
        slope, errs = mc_error_slope(arch, x, widths, get=get, n_samples=2, seeds=2)
        assert -0.95 < slope < -0.25, (get, slope, errs)
        assert errs[-1] < 0.1, (get, errs)


def test_axes_variant_class_repr_pickle_and_features():
    import pickle
    from ntkit.layers.normalization import LayerNormAxes
    assert type(nl.LayerNorm()) is nl.LayerNorm and type(nl.LayerNorm(axis=(1,))) is nl.LayerNorm
    j = nl.LayerNorm(axis=(1, 2, 3), eps=0.1)
    assert type(j) is LayerNormAxes and j == nl.LayerNorm(0.1, (1, 2, 3))
    assert repr(j) == "LayerNorm(eps=0.1, axis=(1, 2, 3))"
    for obj in (j, nl.LayerNorm(eps=0.2)):
        assert pickle.loads(pickle.dumps(obj)) == obj
    # random features support the joint variant (tests/test_features.py checks the values)
    arch = nl.serial(nl.Conv(4, 2), j, nl.Relu(), nl.Flatten(), nl.Dense(1))
    assert arch.features(randn64(2, 2, 4, 4), dim=16).shape[0] == 2
