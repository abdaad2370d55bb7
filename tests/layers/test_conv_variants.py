"""ConvTranspose, ConvLocal, ImageResize: kernels against independently derived references,
Monte Carlo batteries from the finite modules, and the from_torch mappings."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkit
from ntkit import empirical_ntk
from ntkit import layers as nl
from ntkit.layers._ops import input_kernel
from ntkit.testing import KernelTestCase, mc_error_slope
from tests._helpers import randn64, randn64_pair

D = torch.float64


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def _full_map(arch, x1, x2):
    """The full pixel-pair kernel record of ``arch`` (which keeps spatial axes) on raw inputs."""
    return arch.kernel_map(input_kernel(x1, x2, True, True))


def _check_exact_pixel_kernels(arch, x1, x2, in_shape):
    """For a network linear in N(0, 1) parameters with ONE output channel (NTK
    parameterization), ``E[f_p(x1) f_q(x2)] = J_p(x1) J_q(x2)^T`` for output pixels ``p, q``:
    the exact pixel-pair NNGP (= NTK for one layer) from autograd on the finite module, with no
    Monte Carlo error. Checked on the full layout and on the per-pixel diagonal layout."""
    net = arch.module(in_shape, seed=0, dtype=D)
    th = empirical_ntk(net, x1, x2, output="full", implementation="jacobian")
    n1, n2 = x1.shape[0], x2.shape[0]
    sp = arch.out_shape(in_shape)[1:]
    P = math.prod(sp)
    ref = th.reshape(n1, n2, *sp, *sp)
    kf = _full_map(arch, x1, x2)
    _close(kf.nngp, ref)
    _close(kf.ntk, ref)
    if not arch.needs_full_spatial(False):
        kd = arch.kernel_map(input_kernel(x1, x2, True, False))
        ref_d = th.reshape(n1, n2, P, P).diagonal(dim1=-2, dim2=-1).reshape(n1, n2, *sp)
        _close(kd.nngp, ref_d)
        _close(kd.ntk, ref_d)


# ---------------------------------------------------------------------------------------------
# ConvTranspose

@pytest.mark.parametrize("padding,filt,strides", [
    ("VALID", (3, 2), (2, 2)), ("SAME", (3, 3), (2, 1)), ("SAME", (4, 2), (3, 2)),
    ("CIRCULAR", (3, 3), (2, 2)), ("CIRCULAR", (5, 2), (1, 3)), ("CIRCULAR", (4, 1), (2, 1)),
    ("VALID", (1, 2), (3, 3)), (((2, 1), (0, 3)), (3, 2), (2, 2))])
def test_conv_transpose_single_layer_is_exact_jacobian_gram(padding, filt, strides):
    """One ConvTranspose (one output channel, bias): pixel-pair kernel == J J^T of the module."""
    x1, x2 = randn64_pair((2, 4, 5))
    arch = nl.ConvTranspose(1, filt, strides, padding, W_std=1.3, b_std=0.4)
    _check_exact_pixel_kernels(arch, x1, x2, (2, 4, 5))


def test_conv_transpose_output_shapes():
    """jax.lax.conv_transpose's sizes: VALID N s + max(f - s, 0), SAME/CIRCULAR N s."""
    for f, s in ((3, 2), (1, 3), (4, 2), (2, 2), (5, 1)):
        for pad, size in (("VALID", 5 * s + max(f - s, 0)), ("SAME", 5 * s),
                          ("CIRCULAR", 5 * s)):
            layer = nl.ConvTranspose(3, f, s, pad)
            assert layer.out_shape((2, 5)) == (3, size)
            net = layer.module((2, 5), seed=0)
            assert net(randn64(1, 2, 5)).shape == (1, 3, size)


@pytest.mark.parametrize("f", [2, 3, 4])
def test_conv_transpose_stride1_is_conv_with_mirrored_padding(f):
    """Stride 1: y[o] = sum_t w_t x[o + t - lo] is a correlation with the filter and padding
    (lo, hi) of the input, i.e. Conv with explicit padding (lo, hi) (the filter flip does not
    change the distribution). VALID: (f-1, f-1); SAME: (ceil((f-1)/2), floor((f-1)/2)), the
    mirror of Conv's SAME."""
    x1, x2 = randn64_pair((2, 5, 6))
    body = (nl.Relu(), nl.Conv(4, 2, padding="SAME", W_std=1.2), nl.Relu(), nl.GlobalAvgPool(),
            nl.Dense(1))
    lo, hi = -(-(f - 1) // 2), (f - 1) // 2
    for pad, conv_pad in (("VALID", ((f - 1, f - 1),) * 2), ("SAME", ((lo, hi),) * 2)):
        kt = nl.serial(nl.ConvTranspose(4, f, 1, pad, 1.4, 0.2), *body).kernel(x1, x2)
        kc = nl.serial(nl.Conv(4, f, 1, conv_pad, 1.4, 0.2), *body).kernel(x1, x2)
        _close(kt.nngp, kc.nngp)
        _close(kt.ntk, kc.ntk)


def test_conv_transpose_module_formula():
    """The finite module is jax.lax.conv_transpose: y[o] = sum_t w[t] x[(o + t - lo) / s]
    (pixels at non-integer or outside positions are zero), up to a flip of the filter."""
    layer = nl.ConvTranspose(2, 3, 2, ((2, 1),), W_std=1.0, parameterization="standard")
    net = layer.module((1, 4), seed=3)
    x = randn64(1, 1, 4)
    w = net.weight.detach()[0, :, :].flip(-1)  # (out, taps) in correlation order
    y = net(x)[0]
    n_out = y.shape[-1]
    ref = torch.zeros(2, n_out, dtype=D)
    for o in range(n_out):
        for t in range(3):
            j = o + t - 2
            if j % 2 == 0 and 0 <= j // 2 < 4:
                ref[:, o] += w[:, t] * x[0, 0, j // 2]
    _close(y, ref)


class TestConvTransposeBattery(KernelTestCase):
    """Strided SAME + CIRCULAR transposed convs, GAP readout; Monte Carlo from the modules."""
    widths = (32, 128, 512)
    seeds = 3
    n_samples = 2
    rtol_ref = 1e-12

    def build(self):
        return nl.serial(nl.ConvTranspose(8, 3, 2, "SAME", W_std=1.3, b_std=0.1), nl.Relu(),
                         nl.ConvTranspose(8, 2, 1, "CIRCULAR"), nl.Relu(), nl.GlobalAvgPool(),
                         nl.Dense(1))

    def inputs(self):
        return randn64_pair((2, 3, 3))

    def reference(self, x1, x2):  # stride-1 CIRCULAR ConvTranspose f=2 == Conv CIRCULAR f=2
        ref = nl.serial(nl.ConvTranspose(8, 3, 2, "SAME", W_std=1.3, b_std=0.1), nl.Relu(),
                        nl.Conv(8, 2, 1, "CIRCULAR"), nl.Relu(), nl.GlobalAvgPool(),
                        nl.Dense(1)).kernel(x1, x2)
        return ref.nngp, ref.ntk

    def test_monte_carlo_converges(self):
        _mc(self)


def _mc(case):
    arch = case.build()
    x = torch.cat(case.inputs())
    for get, widths, seeds in (("nngp", case.widths, case.seeds), ("ntk", (16, 64, 256), 2)):
        slope, errs = mc_error_slope(arch, x, widths, get=get, n_samples=case.n_samples,
                                     seeds=seeds)
        # a wrong kernel map plateaus (slope ~ 0); small widths may fall faster than -1/2
        assert -0.9 < slope < -0.25, (get, slope, errs)
        assert errs[-1] < 0.15 and errs[-1] < 0.6 * errs[0], (get, errs)


# ---------------------------------------------------------------------------------------------
# ConvLocal

def test_conv_local_equals_conv_on_per_pixel_diagonal():
    """Without pixel mixing above (Flatten), unshared weights give Conv's kernel exactly."""
    x1, x2 = randn64_pair((2, 5, 6))

    def arch(layer):
        return nl.serial(nl.Conv(4, 2, padding="SAME", b_std=0.1), nl.Relu(),
                         layer(4, (3, 2), strides=(2, 1), padding="SAME", W_std=1.3, b_std=0.2),
                         nl.Erf(), nl.Flatten(), nl.Dense(1))
    for parameterization in ("ntk", "standard"):
        local = functools.partial(nl.ConvLocal, parameterization=parameterization)
        conv = functools.partial(nl.Conv, parameterization=parameterization)
        kl, kc = arch(local).kernel(x1, x2), arch(conv).kernel(x1, x2)
        _close(kl.nngp, kc.nngp)
        _close(kl.ntk, kc.ntk)


def test_conv_local_gap_formula_and_differs_from_conv():
    """ConvLocal -> Relu -> GlobalAvgPool -> Dense, derived by hand: pre-activations at pixels
    p != q are independent (covariance 0), so E[relu(u_p) relu(v_q)] = sqrt(V1_p V2_q) / (2 pi)
    (product of the means) and the NTK there is 0; at p = q the arc-cosine maps of the conv
    covariance K(p) = W^2 <patch1_p, patch2_p> / (C |F|) + b^2 (patches by F.unfold)."""
    x1, x2 = randn64_pair((2, 4, 5))
    w, b, wo, bo = 1.3, 0.3, 0.9, 0.2
    arch = nl.serial(nl.ConvLocal(4, 3, padding="SAME", W_std=w, b_std=b), nl.Relu(),
                     nl.GlobalAvgPool(), nl.Dense(1, wo, bo))
    k = arch.kernel(x1, x2)

    def patches(x):
        return F.unfold(x, 3, padding=1)  # (n, C*9, P)

    p1, p2 = patches(x1), patches(x2)
    c_f = p1.shape[1]
    K = w ** 2 * torch.einsum("ifp,jfp->ijp", p1, p2) / c_f + b ** 2
    V1 = w ** 2 * p1.pow(2).sum(1) / c_f + b ** 2
    V2 = w ** 2 * p2.pow(2).sum(1) / c_f + b ** 2
    s = V1.sqrt()[:, None, :] * V2.sqrt()[None, :, :]
    rho = (K / s).clamp(-1, 1)
    th = torch.arccos(rho)
    diag_nngp = s * (torch.sin(th) + (math.pi - th) * rho) / (2 * math.pi)
    diag_dot = (math.pi - th) / (2 * math.pi)
    P = K.shape[-1]
    off = V1.sqrt()[:, None, :, None] * V2.sqrt()[None, :, None, :] / (2 * math.pi)
    idx = torch.arange(P)
    full = off.clone()
    full[:, :, idx, idx] = diag_nngp
    gap_nngp = full.mean((2, 3))
    gap_ntk = (K * diag_dot).sum(-1) / P ** 2  # NTK(p, p) = K(p) for one layer; 0 off-diagonal
    nngp = wo ** 2 * gap_nngp + bo ** 2
    ntk = nngp + wo ** 2 * gap_ntk
    _close(k.nngp, nngp)
    _close(k.ntk, ntk)
    kc = nl.serial(nl.Conv(4, 3, padding="SAME", W_std=w, b_std=b), nl.Relu(),
                   nl.GlobalAvgPool(), nl.Dense(1, wo, bo)).kernel(x1, x2)
    assert not torch.allclose(k.nngp, kc.nngp, rtol=1e-3)


@pytest.mark.parametrize("padding", ["VALID", "SAME", "CIRCULAR"])
def test_conv_local_single_layer_is_exact_jacobian_gram(padding):
    x1, x2 = randn64_pair((2, 4, 5))
    arch = nl.ConvLocal(1, (3, 2), (1, 2), padding, W_std=1.2, b_std=0.5)
    _check_exact_pixel_kernels(arch, x1, x2, (2, 4, 5))


class TestConvLocalBattery(KernelTestCase):
    """Erf (odd) after ConvLocal keeps different pixels uncorrelated, and the inputs share a
    per-example offset, so this kernel is ~2x away from the Conv one's (Monte Carlo error at the
    largest width ~6%): the Monte Carlo check tells the two apart."""
    widths = (32, 128, 512)
    seeds = 3
    n_samples = 2

    def build(self):
        return nl.serial(nl.ConvLocal(8, 3, padding="SAME", W_std=1.4, b_std=0.1), nl.Erf(),
                         nl.AvgPool(2), nl.Conv(8, 2), nl.Relu(), nl.GlobalAvgPool(),
                         nl.Dense(1))

    def inputs(self):
        x1, x2 = randn64_pair((2, 4, 4))
        return 0.5 * x1 + randn64(3, 2, 1, 1, seed=2), 0.5 * x2 + randn64(2, 2, 1, 1, seed=3)

    def test_monte_carlo_converges(self):
        _mc(self)


# ---------------------------------------------------------------------------------------------
# ImageResize

_BODY = (nl.Conv(4, 2, padding="SAME", W_std=1.3, b_std=0.1), nl.Relu(), nl.Conv(4, 2))


def _resize_pair(resize):
    x1, x2 = randn64_pair((2, 4, 5))
    k0 = _full_map(nl.serial(*_BODY), x1, x2)
    k1 = _full_map(nl.serial(*_BODY, resize), x1, x2)
    return k0, k1


def _check_map(k0, k1, fn):
    for key, bn in (("nngp", 2), ("ntk", 2), ("cov1", 1), ("cov2", 1)):
        _close(getattr(k1, key), fn(getattr(k0, key), bn))


def test_nearest_integer_upsampling_repeats_the_covariance():
    k0, k1 = _resize_pair(nl.ImageResize((6, 12), "nearest"))

    def rep(t, bn):  # (.., H, W, H, W): repeat every pixel axis
        for a, r in zip(range(bn, bn + 4), (2, 3, 2, 3)):
            t = t.repeat_interleave(r, dim=a)
        return t
    _check_map(k0, k1, rep)


@pytest.mark.parametrize("shape", [(7, 3), (3, 8)])
def test_nearest_matches_torch_nearest_exact_indices(shape):
    """Half-pixel nearest (jax.image.resize): torch's 'nearest-exact' gives the indices."""
    k0, k1 = _resize_pair(nl.ImageResize(shape, "nearest"))
    idx = []
    for n, m in zip((3, 4), shape):
        probe = torch.arange(n, dtype=D).reshape(1, 1, n)
        idx.append(F.interpolate(probe, size=m, mode="nearest-exact")[0, 0].long())

    def gather(t, bn):
        for a, i in zip(range(bn, bn + 4), idx + idx):
            t = t.index_select(a, i)
        return t
    _check_map(k0, k1, gather)


def _interp_matrix(n, m, antialias):
    """(m, n) linear resize matrix built independently: torch's interpolate of basis images."""
    eye = torch.eye(n, dtype=D).reshape(n, 1, 1, n)
    out = F.interpolate(eye, size=(1, m), mode="bilinear", align_corners=False,
                        antialias=antialias)
    return out.reshape(n, m).T


@pytest.mark.parametrize("shape,antialias", [((7, 9), True), ((3, 2), True), ((3, 2), False),
                                             ((8, 3), True), ((2, -1), False)])
def test_linear_resize_is_interpolation_matrix_on_both_sides(shape, antialias):
    k0, k1 = _resize_pair(nl.ImageResize(shape, "linear", antialias=antialias))
    Ms = [_interp_matrix(n, n if m == -1 else m, antialias) for n, m in zip((3, 4), shape)]

    def apply(t, bn):  # K' = M K M^T on each pixel axis
        for a, M in zip(range(bn, bn + 4), Ms + Ms):
            t = torch.movedim(torch.tensordot(M, t, dims=([1], [a])), 0, a)
        return t
    _check_map(k0, k1, apply)


def test_resize_layouts_and_output_shapes():
    x1, x2 = randn64_pair((2, 4, 5))
    lin = nl.serial(*_BODY, nl.ImageResize((6, 6)), nl.Flatten(), nl.Dense(1))
    near = nl.serial(*_BODY, nl.ImageResize((6, 6), "nearest"), nl.Flatten(), nl.Dense(1))
    assert lin.needs_full_spatial(False) and not near.needs_full_spatial(False)
    near_full = nl.serial(*_BODY, nl.ImageResize((6, 6), "nearest"), nl.AvgPool(1),
                          nl.Flatten(), nl.Dense(1))  # identity pool forces pixel pairs
    kd, kf = near.kernel(x1, x2), near_full.kernel(x1, x2)
    _close(kd.nngp, kf.nngp)
    _close(kd.ntk, kf.ntk)
    assert nl.ImageResize(scale_factor=1.5).out_shape((3, 4, 5)) == (3, 6, 7)
    assert nl.ImageResize((-1, 2)).out_shape((3, 4, 5)) == (3, 4, 2)
    assert nl.ImageResize(3).out_shape((3, 4, 5)) == (3, 3, 3)
    with pytest.raises(ValueError, match="pixel-pair"):
        nl.ImageResize((6, 6)).kernel_map(input_kernel(x1, x2, True, False))


def test_resize_single_layer_is_exact_jacobian_gram():
    x1, x2 = randn64_pair((2, 4, 5))
    for r in (nl.ImageResize((7, 3)), nl.ImageResize((6, 2), "nearest")):
        _check_exact_pixel_kernels(nl.serial(nl.Conv(1, 2, b_std=0.3), r), x1, x2, (2, 4, 5))


class TestImageResizeBattery(KernelTestCase):
    widths = (32, 128, 512)
    seeds = 3
    n_samples = 2

    def build(self):
        return nl.serial(nl.Conv(8, 2, padding="SAME", W_std=1.3, b_std=0.1),
                         nl.ImageResize((6, 3)), nl.Relu(), nl.Conv(8, 2),
                         nl.ImageResize((7, 4), "nearest"), nl.Relu(), nl.GlobalAvgPool(),
                         nl.Dense(1))

    def inputs(self):
        return randn64_pair((2, 4, 4))

    def test_monte_carlo_converges(self):
        _mc(self)


# ---------------------------------------------------------------------------------------------
# fused fast paths, validation

def test_fused_and_torch_paths_agree():
    """ConvTranspose SAME stride 1 and ConvLocal SAME hit the fused stencil when numba is
    present; the torch path must give the same kernels."""
    x1, x2 = randn64_pair((2, 5, 5))
    archs = [nl.serial(nl.ConvTranspose(4, 2, 1, "SAME", b_std=0.1), nl.Relu(),
                       nl.ConvTranspose(4, 3, 1, "SAME"), nl.Relu(), top, nl.Dense(1))
             for top in (nl.Flatten(), nl.GlobalAvgPool())]
    archs += [nl.serial(nl.ConvLocal(4, 3, padding="SAME", b_std=0.1), nl.Relu(),
                        nl.ConvLocal(4, 3, padding="SAME"), nl.Relu(), nl.GlobalAvgPool(),
                        nl.Dense(1))]
    fused = [a.kernel(x1, x2) for a in archs]
    for a, kf in zip(archs, fused):
        with ntkit.settings(fused=False):
            kt = a.kernel(x1, x2)
        _close(kt.nngp, kf.nngp)
        _close(kt.ntk, kf.ntk)


def test_validation_errors():
    with pytest.raises(ValueError, match="padding"):
        nl.ConvTranspose(4, 3, padding=1)  # ambiguous (torch vs lax convention): pairs only
    with pytest.raises(ValueError, match="padding"):
        nl.ConvTranspose(4, 3, padding="FULL")
    with pytest.raises(ValueError, match="does not fit"):
        nl.ConvTranspose(4, 5, padding=((0, 0),)).out_shape((2, 3))
    with pytest.raises(ValueError, match="exactly one"):
        nl.ImageResize()
    with pytest.raises(ValueError, match="exactly one"):
        nl.ImageResize((4, 4), scale_factor=2)
    with pytest.raises(ValueError, match="method"):
        nl.ImageResize((4, 4), "cubic")
    with pytest.raises(ValueError, match="shape"):
        nl.ImageResize((4, 0))
    with pytest.raises(ValueError, match="spatial"):
        nl.serial(nl.Dense(3), nl.ConvLocal(2, 1)).kernel(randn64(2, 3))
    assert nl.ConvTranspose(4, 3, strides=None).strides == 1


# ---------------------------------------------------------------------------------------------
# from_torch

@pytest.mark.parametrize("k,s,p,op", [(3, 2, 0, 0), (3, 2, 1, 1), (4, 2, 1, 0), (2, 3, 0, 2),
                                      (3, 1, 2, 0)])
def test_from_torch_conv_transpose_is_the_same_map(k, s, p, op):
    """Copying a torch ConvTranspose2d's weights into the converted module reproduces its
    output pixel for pixel (geometry exact for any stride, padding, output_padding)."""
    tm = nn.ConvTranspose2d(2, 3, k, stride=s, padding=p, output_padding=op).double()
    arch = nl.from_torch(nn.Sequential(tm))
    net = arch.module((2, 4, 5), seed=0)
    mod = [m for m in net.modules() if type(m).__name__ == "ConvTransposeModule"][0]
    with torch.no_grad():
        mod.weight.copy_(tm.weight)
        mod.bias.copy_(tm.bias)
    x = randn64(2, 2, 4, 5)
    with torch.no_grad():
        _close(net(x), tm(x))


def test_from_torch_conv_transpose_default_init_variance():
    """The kernel of the converted layer is that of torch's default init: Monte Carlo over
    reset_parameters() (in=2, out=6, so torch's fan_in = out * area differs 3x from in * area)."""
    torch.manual_seed(0)
    tm = nn.ConvTranspose2d(2, 6, 3, stride=2).double()
    arch = nl.from_torch(nn.Sequential(tm, nn.Flatten()))
    x = randn64(3, 2, 3, 3)
    k = arch.kernel(x, get="nngp")
    acc = torch.zeros(3, 3, dtype=D)
    n = 400
    with torch.no_grad():
        for _ in range(n):
            tm.reset_parameters()
            f = tm(x).flatten(1)
            acc += f @ f.T / f.shape[1]
    rel = float((acc / n - k).norm() / k.norm())
    assert rel < 0.05, rel


@pytest.mark.parametrize("up", [
    dict(scale_factor=2, mode="nearest"), dict(scale_factor=(2, 3), mode="nearest-exact"),
    dict(size=(7, 3), mode="nearest-exact"), dict(scale_factor=2, mode="bilinear"),
    dict(size=(3, 7), mode="bilinear"), dict(size=(9, 11), mode="bilinear"),
    dict(scale_factor=1.5, mode="bilinear", recompute_scale_factor=True)])
def test_from_torch_upsample_is_the_same_map(up):
    tm = nn.Upsample(**up)
    arch = nl.from_torch(nn.Sequential(nn.Conv2d(2, 3, 1), tm))
    net = arch.module((2, 4, 5), seed=0)
    x = randn64(2, 3, 4, 5)
    with torch.no_grad():
        _close(net[-1](x), tm(x))


def test_from_torch_upsampling_nearest2d_and_errors():
    arch = nl.from_torch(nn.Sequential(nn.Conv2d(2, 3, 1), nn.UpsamplingNearest2d(scale_factor=3)))
    assert arch.layers[-1] == nl.ImageResize(scale_factor=3.0, method="nearest",
                                             antialias=False)
    bad = [nn.Upsample(size=(7, 3), mode="nearest"), nn.Upsample(scale_factor=1.5),
           nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
           nn.Upsample(scale_factor=2, mode="bicubic"), nn.UpsamplingBilinear2d(scale_factor=2),
           nn.ConvTranspose2d(3, 3, 2, padding=2), nn.ConvTranspose2d(3, 3, 2, dilation=2)]
    for m in bad:
        with pytest.raises(ValueError, match="cannot convert"):
            nl.from_torch(nn.Sequential(nn.Conv2d(2, 3, 1), m))
