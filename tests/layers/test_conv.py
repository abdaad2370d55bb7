"""Conv / pooling kernels: hand-derived special cases (more to come: see the issue-3 report)."""
import torch

from ntkit import layers as nl
from tests._helpers import randn64, randn64_pair


def test_1x1_conv_is_dense_per_pixel():
    x1, x2 = randn64(3, 4, 5, 6), randn64(2, 4, 5, 6, seed=1)
    conv = nl.serial(nl.Conv(8, 1, W_std=1.3, b_std=0.2), nl.Relu(), nl.Conv(1, 1), nl.Flatten())
    dense = nl.serial(nl.Dense(8, 1.3, 0.2), nl.Relu(), nl.Dense(1))
    k = conv.kernel(x1, x2)
    f = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    kd = dense.kernel(f(x1), f(x2))
    # Flatten averages the per-pixel kernels: mean over pixel p of K_dense(x1[:, :, p], x2[:, :, p])
    idx = torch.arange(30)
    ref_nngp = kd.nngp.reshape(3, 30, 2, 30)[:, idx, :, idx].mean(0)
    ref_ntk = kd.ntk.reshape(3, 30, 2, 30)[:, idx, :, idx].mean(0)
    torch.testing.assert_close(k.nngp, ref_nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, ref_ntk, rtol=1e-12, atol=1e-12)


def test_gap_over_constant_image_is_fc_kernel():
    v1, v2 = randn64(3, 4), randn64(2, 4, seed=1)
    img = lambda v: v[:, :, None, None].expand(-1, -1, 5, 5).contiguous()  # noqa: E731
    cnn = nl.serial(nl.Conv(8, 3, padding="CIRCULAR", W_std=1.4, b_std=0.1), nl.Relu(),
                    nl.GlobalAvgPool(), nl.Dense(1, 1.1))
    fc = nl.serial(nl.Dense(8, 1.4, 0.1), nl.Relu(), nl.Dense(1, 1.1))
    k, kf = cnn.kernel(img(v1), img(v2)), fc.kernel(v1, v2)
    torch.testing.assert_close(k.nngp, kf.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, kf.ntk, rtol=1e-12, atol=1e-12)


def test_circular_padding_is_translation_invariant():
    x1, x2 = randn64(3, 2, 6, 5), randn64(2, 2, 6, 5, seed=1)
    arch = nl.serial(nl.Conv(8, 3, padding="CIRCULAR", b_std=0.1), nl.Relu(),
                     nl.Conv(8, 3, padding="CIRCULAR"), nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))
    k = arch.kernel(x1, x2)
    ks = arch.kernel(torch.roll(x1, (2, 1), (2, 3)), torch.roll(x2, (2, 1), (2, 3)))
    torch.testing.assert_close(k.ntk, ks.ntk, rtol=1e-12, atol=1e-12)
    kz = nl.serial(nl.Conv(8, 3, padding="SAME"), nl.Relu(), nl.GlobalAvgPool(),
                   nl.Dense(1)).kernel(x1, x2, get="ntk")  # zero padding is not invariant
    kzs = nl.serial(nl.Conv(8, 3, padding="SAME"), nl.Relu(), nl.GlobalAvgPool(),
                    nl.Dense(1)).kernel(torch.roll(x1, 2, 2), torch.roll(x2, 2, 2), get="ntk")
    assert not torch.allclose(kz, kzs, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Agreement with the independent loop-based reference (tests/layers/_cntk_reference.py)

import pytest  # noqa: E402

from ntkit.testing import KernelTestCase, mc_error_slope  # noqa: E402

from ._cntk_reference import cntk  # noqa: E402


def _res(*layers):
    return nl.serial(nl.FanOut(2), nl.parallel(nl.Identity(), nl.serial(*layers)), nl.FanInSum())


# name -> (architecture, reference spec, per-example input shape)
CASES = {
    "valid_flatten": (
        nl.serial(nl.Conv(8, (3, 2), W_std=1.3, b_std=0.1), nl.Relu(), nl.Conv(8, 2, W_std=1.2),
                  nl.Relu(), nl.Flatten(), nl.Dense(1, 0.9, 0.2)),
        [("conv", 8, 1.3, 0.1, (3, 2), (1, 1), "VALID"), ("relu",),
         ("conv", 8, 1.2, None, (2, 2), (1, 1), "VALID"), ("relu",), ("flatten",),
         ("dense", 1, 0.9, 0.2)], (2, 5, 5)),
    "same_strided_gap": (
        nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.3, b_std=0.1), nl.Relu(),
                  nl.Conv(8, (3, 2), strides=2, padding="SAME"), nl.Relu(), nl.GlobalAvgPool(),
                  nl.Dense(1)),
        [("conv", 8, 1.3, 0.1, (3, 3), (1, 1), "SAME"), ("relu",),
         ("conv", 8, 1.0, None, (3, 2), (2, 2), "SAME"), ("relu",), ("gap",),
         ("dense", 1, 1.0, None)], (2, 5, 6)),
    "circular_avgpool_flatten": (
        nl.serial(nl.Conv(8, 3, padding="CIRCULAR", b_std=0.2), nl.Relu(), nl.AvgPool(2, 2),
                  nl.Conv(8, 2, padding="SAME", W_std=1.4), nl.Relu(), nl.Flatten(), nl.Dense(1)),
        [("conv", 8, 1.0, 0.2, (3, 3), (1, 1), "CIRCULAR"), ("relu",),
         ("avgpool", (2, 2), (2, 2), "VALID"), ("conv", 8, 1.4, None, (2, 2), (1, 1), "SAME"),
         ("relu",), ("flatten",), ("dense", 1, 1.0, None)], (2, 5, 5)),
    "explicit_padding_sumpool_gsp": (
        nl.serial(nl.Conv(8, 3, strides=(1, 2), padding=1, b_std=0.3), nl.Relu(),
                  nl.SumPool(3, padding="SAME"), nl.Conv(8, 1), nl.Relu(), nl.GlobalSumPool(),
                  nl.Dense(1, 0.5)),
        [("conv", 8, 1.0, 0.3, (3, 3), (1, 2), 1), ("relu",),
         ("sumpool", (3, 3), (1, 1), "SAME"), ("conv", 8, 1.0, None, (1, 1), (1, 1), "VALID"),
         ("relu",), ("gsp",), ("dense", 1, 0.5, None)], (2, 4, 5)),
    "conv1d_strided_circular": (
        nl.serial(nl.Conv(8, 3, strides=2, W_std=1.5, b_std=0.1), nl.Relu(),
                  nl.Conv(8, 4, padding="CIRCULAR"), nl.Relu(), nl.AvgPool(2, padding="SAME"),
                  nl.GlobalAvgPool(), nl.Dense(1)),
        [("conv", 8, 1.5, 0.1, (3,), (2,), "VALID"), ("relu",),
         ("conv", 8, 1.0, None, (4,), (1,), "CIRCULAR"), ("relu",),
         ("avgpool", (2,), (1,), "SAME"), ("gap",), ("dense", 1, 1.0, None)], (3, 11)),
    "residual_block": (
        nl.serial(nl.Conv(8, 3, padding="SAME", b_std=0.1), _res(nl.Relu(), nl.Conv(8, 3,
                  padding="SAME", W_std=1.3)), _res(nl.Relu(), nl.Conv(8, 2, padding="SAME")),
                  nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1)),
        [("conv", 8, 1.0, 0.1, (3, 3), (1, 1), "SAME"),
         ("residual", [("relu",), ("conv", 8, 1.3, None, (3, 3), (1, 1), "SAME")]),
         ("residual", [("relu",), ("conv", 8, 1.0, None, (2, 2), (1, 1), "SAME")]),
         ("relu",), ("gap",), ("dense", 1, 1.0, None)], (2, 4, 4)),
    "layernorm_channels": (
        nl.serial(nl.Conv(8, 2, W_std=1.7, b_std=0.4), nl.LayerNorm(), nl.Relu(),
                  nl.Conv(8, 2, padding="SAME"), nl.LayerNorm(), nl.Relu(), nl.AvgPool(2),
                  nl.Flatten(), nl.Dense(1)),
        [("conv", 8, 1.7, 0.4, (2, 2), (1, 1), "VALID"), ("layernorm", 1e-12), ("relu",),
         ("conv", 8, 1.0, None, (2, 2), (1, 1), "SAME"), ("layernorm", 1e-12), ("relu",),
         ("avgpool", (2, 2), (1, 1), "VALID"), ("flatten",), ("dense", 1, 1.0, None)],
        (2, 5, 5)),
    "standard_parameterization": (
        nl.serial(nl.Conv(6, 2, W_std=1.3, b_std=0.2, parameterization="standard"), nl.Relu(),
                  nl.Conv(5, 3, padding="SAME", parameterization="standard"), nl.Relu(),
                  nl.Flatten(), nl.Dense(1, 1.1, 0.1, parameterization="standard")),
        [("conv", 6, 1.3, 0.2, (2, 2), (1, 1), "VALID", "standard"), ("relu",),
         ("conv", 5, 1.0, None, (3, 3), (1, 1), "SAME", "standard"), ("relu",), ("flatten",),
         ("dense", 1, 1.1, 0.1, "standard")], (3, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_loop_reference(name):
    """Cross kernels (x1 != x2) against the explicit pixel-pair / filter-tap loops, 1e-9."""
    arch, spec, shape = CASES[name]
    x1, x2 = randn64_pair(shape)
    k = arch.kernel(x1, x2)
    nngp, ntk = cntk(x1.numpy(), x2.numpy(), spec)
    for got, ref in ((k.nngp, nngp), (k.ntk, ntk)):
        ref = torch.from_numpy(ref)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_symmetric_full_spatial_diagonal_is_exact():
    """x2=None: the batch diagonal of a GAP network (full layout) must be as exact as the rest
    (same example, same pixel: correlation exactly 1; the two-point map's sqrt(v1 v2 - c^2)
    cancellation used to give ~1e-9 relative NTK errors there)."""
    arch, spec, shape = CASES["circular_avgpool_flatten"]
    arch = nl.serial(*arch.layers[:-2], nl.GlobalAvgPool(), nl.Dense(1))
    spec = spec[:-2] + [("gap",), ("dense", 1, 1.0, None)]
    x = torch.cat(randn64_pair(shape))
    k = arch.kernel(x)
    nngp, ntk = cntk(x.numpy(), None, spec)
    torch.testing.assert_close(k.nngp, torch.from_numpy(nngp), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, torch.from_numpy(ntk), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Shared battery: symmetry, tiles, float32, reference, Monte Carlo error ~ width^-1/2

class _ConvBattery(KernelTestCase):
    """Small images; reference from the loop implementation. Monte Carlo (runtime-bound, the
    empirical NTK of a conv net costs ~0.3 s): NNGP at widths 32..512 (3 seeds), NTK at widths
    16..256 (2 seeds), 2 networks per estimate; the error must fall like width^-1/2."""
    nngp_widths = (32, 128, 512)
    ntk_widths = (16, 64, 256)
    n_samples = 2
    ntk_seeds = 2
    rtol_ref = 1e-9
    case = None
    shape = (2, 4, 4)

    def build(self):
        return CASES[self.case][0] if self.case else self.arch()

    def inputs(self):
        shape = CASES[self.case][2] if self.case else self.shape
        return randn64_pair(shape)

    def test_symmetric_matches_explicit(self):
        arch = self.build()
        x1, _ = self.inputs()
        ks, kx = arch.kernel(x1), arch.kernel(x1, x1)
        asym = 0.0
        for a, b in ((ks.nngp, kx.nngp), (ks.ntk, kx.ntk)):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
            torch.testing.assert_close(a, a.T, rtol=1e-15, atol=0)
            asym = max(asym, float((a - a.T).abs().max()))
        assert asym == 0.0

    def test_monte_carlo_converges(self):
        arch = self.build()
        x = torch.cat(self.inputs())
        for get, widths, seeds in (("nngp", self.nngp_widths, 3),
                                   ("ntk", self.ntk_widths, self.ntk_seeds)):
            slope, errs = mc_error_slope(arch, x, widths, get=get, n_samples=self.n_samples,
                                         seeds=seeds)
            # a wrong kernel map plateaus (slope ~ 0); at the smallest widths the error may fall
            # faster than width^-1/2 (pre-asymptotic), so only the plateau side is tight
            assert -0.9 < slope < -0.25, (get, slope, errs)
            assert errs[-1] < 0.15 and errs[-1] < 0.6 * errs[0], (get, errs)

    def reference(self, x1, x2):
        if not self.case:
            return None
        nngp, ntk = cntk(x1.numpy(), x2.numpy(), CASES[self.case][1])
        return torch.from_numpy(nngp), torch.from_numpy(ntk)


class TestBatteryValidFlatten(_ConvBattery):
    case = "valid_flatten"


class TestBatterySameStridedGap(_ConvBattery):
    case = "same_strided_gap"


class TestBatteryCircularAvgPool(_ConvBattery):
    case = "circular_avgpool_flatten"


class TestBatteryConv1d(_ConvBattery):
    case = "conv1d_strided_circular"


class TestBatteryResidual(_ConvBattery):
    case = "residual_block"


class TestBatteryLayerNormGelu(_ConvBattery):
    """LayerNorm over channels, Gelu and SumPool + GlobalSumPool (no loop reference)."""
    shape = (2, 4, 4)
    ntk_seeds = 3  # LayerNorm's finite-width NTK is noisier

    def arch(self):
        return nl.serial(nl.Conv(8, 2, padding="SAME", W_std=1.5, b_std=0.2), nl.LayerNorm(),
                         nl.Gelu(), nl.SumPool(2), nl.Conv(8, 2, W_std=0.8), nl.Erf(),
                         nl.GlobalSumPool(), nl.Dense(1))


# ---------------------------------------------------------------------------------------------
# Hand-derived special cases and agreement between the two spatial layouts

_BODY = (nl.Conv(8, 3, padding="SAME", W_std=1.4, b_std=0.1), nl.Relu(),
         nl.Conv(8, 2, strides=(1, 2), W_std=1.2), nl.Erf())


def test_flatten_is_mean_over_pixels_of_the_diagonal_kernel():
    """Flatten's definition: K_flat = mean_p K(p, p), checked against the per-pixel kernel of the
    architecture truncated before Flatten, in both layouts (diagonal, and full forced by a
    1x1 AvgPool, whose kernel map is the identity but needs pixel pairs)."""
    x1, x2 = randn64_pair((2, 5, 6))
    top = nl.serial(*_BODY, nl.Dense(8, 0.9))  # Gaussian per-pixel readout below Flatten
    flat = nl.serial(top, nl.Flatten()).kernel(x1, x2)
    diag = top.kernel(x1, x2)                          # (n1, n2, H', W')
    full = nl.serial(top, nl.AvgPool(1)).kernel(x1, x2)  # (n1, n2, H', W', H', W')
    assert diag.nngp.shape == (3, 2, 4, 3) and full.nngp.shape == (3, 2, 4, 3, 4, 3)
    for key in ("nngp", "ntk"):
        d, f = getattr(diag, key), getattr(full, key)
        f_diag = f.reshape(3, 2, 12, 12).diagonal(dim1=-2, dim2=-1).reshape(3, 2, 4, 3)
        torch.testing.assert_close(f_diag, d, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(getattr(flat, key), d.mean((2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top", ["flatten", "gap_free_dense"])
def test_diagonal_and_full_spatial_paths_agree(top):
    """The same Flatten network evaluated with the per-pixel diagonal layout (automatic) and with
    the full pixel-pair layout (forced by an identity AvgPool(1) before Flatten)."""
    x1, x2 = randn64_pair((2, 5, 6))
    tail = (nl.Flatten(), nl.Dense(1)) if top == "flatten" else (nl.Flatten(), nl.Dense(8),
                                                                  nl.Relu(), nl.Dense(1))
    a_diag = nl.serial(*_BODY, *tail)
    a_full = nl.serial(*_BODY, nl.AvgPool(1), *tail)
    assert not a_diag.needs_full_spatial(False) and a_full.needs_full_spatial(False)
    for args in ((x1, x2), (torch.cat([x1, x2]),)):
        kd, kf = a_diag.kernel(*args), a_full.kernel(*args)
        torch.testing.assert_close(kd.nngp, kf.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kd.ntk, kf.ntk, rtol=1e-12, atol=1e-12)


def test_linear_conv_net_ntk_by_hand():
    """Two linear 1-D convs (filter 2, VALID) on length-3 single-channel signals, then Flatten.

    f(x) = w2 / sqrt(2) * sum_t v_t h_t + b2 * beta2,  h_t = w1 / sqrt(2) sum_s u_s x_{t+s} +
    b1 * beta1 (t, s in {0, 1}; u, v, beta ~ N(0, 1); one channel per layer, the NTK limit
    is the same for any width). Writing G = x0 x0' + 2 x1 x1' + x2 x2' (the taps met by both
    layers: x1 twice), the output covariance is
    nngp = w2^2 / 2 (w1^2 / 2 G + 2 b1^2) + b2^2, and the NTK adds the first layer's gradient
    part w2^2 / 2 * (w1^2 / 2 G + 2 b1^2) (sum over t of the layer-1 NTK = its NNGP).
    """
    x1, x2 = randn64(4, 1, 3, seed=3), randn64(3, 1, 3, seed=4)
    w1, b1, w2, b2 = 1.3, 0.4, 0.8, 0.3
    arch = nl.serial(nl.Conv(5, 2, W_std=w1, b_std=b1), nl.Conv(1, 2, W_std=w2, b_std=b2),
                     nl.Flatten())
    a, b = x1[:, 0], x2[:, 0]
    G = torch.outer(a[:, 0], b[:, 0]) + 2 * torch.outer(a[:, 1], b[:, 1]) \
        + torch.outer(a[:, 2], b[:, 2])
    inner = w1 ** 2 / 2 * G + 2 * b1 ** 2
    nngp = w2 ** 2 / 2 * inner + b2 ** 2
    ntk = nngp + w2 ** 2 / 2 * inner
    k = arch.kernel(x1, x2)
    torch.testing.assert_close(k.nngp, nngp, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(k.ntk, ntk, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["valid_flatten", "same_strided_gap"])
def test_get_nngp_only_and_ntk_only_match_both(name):
    arch, _, shape = CASES[name]
    x1, x2 = randn64_pair(shape)
    for args in ((x1, x2), (x1,)):
        both = arch.kernel(*args)
        nngp = arch.kernel(*args, get="nngp")
        ntk = arch.kernel(*args, get="ntk")
        only = arch.kernel(*args, get=("nngp",))
        assert only.ntk is None
        torch.testing.assert_close(nngp, both.nngp, rtol=0, atol=0)
        torch.testing.assert_close(only.nngp, both.nngp, rtol=0, atol=0)
        torch.testing.assert_close(ntk, both.ntk, rtol=0, atol=0)


def test_tiled_symmetric_kernel_is_exactly_symmetric():
    """With x2=None and several tiles, every diagonal tile of a pooled kernel is made exactly
    symmetric (pooling sums the (p, q) and (q, p) halves in different orders), and the tiled
    result matches the one-tile result."""
    arch = nl.serial(nl.Conv(4, (3, 3), padding="SAME"), nl.Relu(), nl.AvgPool((2, 2)),
                     nl.Conv(4, (2, 2)), nl.Erf(), nl.GlobalAvgPool(), nl.Dense(1))
    x = torch.randn(7, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = arch.kernel(x)
    for tile in (3, 4):
        k = arch.kernel(x, tile=tile)
        for a, b in ((k.nngp, whole.nngp), (k.ntk, whole.ntk)):
            assert torch.equal(a, a.T)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
