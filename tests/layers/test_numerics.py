"""Numerics of the exact kernel maps at extreme scales and depths (issue 13, items 5 and 6).

Expected values are derived, not pasted: bias-free networks of homogeneous activations are
scale-covariant (``K(a x) = a^2 K(x)`` for the ReLU family, any depth), an Erf network at a
huge input scale is the Sign network (``erf(b u) -> sign(u)``), GELU tends to ReLU, LayerNorm
removes the scale. Deep chaotic networks have no closed form, but identical inputs must give
identical rows and every kernel must be symmetric, PSD and within Cauchy-Schwarz.
"""
import math

import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.layers import _fused
from ntkit.layers._ops import SNAP_ULPS, correlation
from tests._helpers import randn64

F64, F32 = torch.float64, torch.float32


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _paths():
    return ["fused", "torch"] if _fused.enabled() else ["torch"]


@pytest.fixture(params=_paths())
def path(request):
    with ntkit.settings(fused=request.param == "fused"):
        yield request.param


def _check_valid(k, tol):
    """Symmetric, finite, Cauchy-Schwarz and PSD (min eigenvalue >= -tol * trace)."""
    k = k.double()
    assert torch.isfinite(k).all()
    assert torch.equal(k, k.T)
    d = k.diagonal()
    assert (k.abs() <= d.sqrt()[:, None] * d.sqrt()[None, :] * (1 + tol)).all()
    assert float(torch.linalg.eigvalsh(k).min()) >= -tol * float(d.sum())


# ---- item 5: over/underflow -------------------------------------------------------------------

RELU_FAMILY = nl.serial(nl.Dense(8, 1.3), nl.Relu(), nl.Dense(8, 1.1), nl.LeakyRelu(0.2),
                        nl.Dense(8), nl.Abs(), nl.Dense(1))
CNN = nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.4), nl.Relu(), nl.Conv(8, 3, padding="SAME"),
                nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))


@pytest.mark.parametrize("scale, dtype, rtol", [
    (1e10, F32, 2e-6), (1e-15, F32, 2e-6), (1e15, F32, 2e-6),
    (1e100, F64, 1e-13), (1e150, F64, 1e-13), (1e-100, F64, 1e-13), (1e-150, F64, 1e-13)])
def test_homogeneous_net_is_scale_covariant(path, scale, dtype, rtol):
    """Bias-free ReLU/leaky/abs net: K(a x) = a^2 K(x) wherever a^2 K is representable (was
    inf in float32 at 1e10 and 10-40% off in float64 at 1e100: v1 v2 over/underflowed)."""
    x = randn64(5, 4)
    ref = RELU_FAMILY.kernel(x)
    k = RELU_FAMILY.kernel(x * scale, dtype=dtype)
    for key in ("nngp", "ntk"):
        got = getattr(k, key).double() / scale ** 2
        assert _rel(got, getattr(ref, key)) < rtol, key
        _check_valid(getattr(k, key) / scale ** 2, 1e-5 if dtype == F32 else 1e-12)


@pytest.mark.parametrize("scale, dtype", [(1e10, F32), (1e-12, F32), (1e120, F64)])
def test_conv_net_is_scale_covariant(path, scale, dtype):
    """The same on the pixel-pair layout (fused 3x3 stencils and dual map, or torch)."""
    x = randn64(3, 2, 5, 5)
    ref = CNN.kernel(x)
    k = CNN.kernel(x * scale, dtype=dtype)
    for key in ("nngp", "ntk"):
        assert _rel(getattr(k, key).double() / scale ** 2, getattr(ref, key)) < (
            3e-6 if dtype == F32 else 1e-13)


@pytest.mark.parametrize("scale, dtype, rtol", [(1e10, F32, 2e-6), (1e18, F32, 2e-6),
                                                (1e150, F64, 1e-12)])
def test_erf_saturates_to_the_sign_kernel(scale, dtype, rtol):
    """erf(b u) -> sign(u) for pre-activation variance -> inf, so a bias-free Erf net at input
    scale 1e10 has the NNGP of the Sign net, (2/pi) arcsin(rho) (float32 was 47-50% off: the
    old form (1 + 2v1)(1 + 2v2) overflowed)."""
    x = randn64(5, 4)
    erf = nl.serial(nl.Dense(8, 1.5), nl.Erf(), nl.Dense(1))
    sign = nl.serial(nl.Dense(8, 1.5), nl.Sign(), nl.Dense(1))
    got = erf.kernel(x * scale, dtype=dtype)
    assert _rel(got.nngp, sign.kernel(x, get="nngp")) < rtol
    if dtype == F32:  # the NTK grows like the scale (v erf'^2 ~ sqrt(v)): float64 as reference
        assert _rel(got.ntk, erf.kernel(x * scale, get="ntk")) < rtol


def test_gelu_tends_to_relu_and_layernorm_removes_the_scale():
    """GELU(a z) / a -> ReLU(z) (error O(a^-3)); LayerNorm after a bias-free Dense makes the
    kernel scale-free. Both overflowed in float32 at 1e10 (NaN / an all-zero off-diagonal)."""
    x = randn64(5, 4)
    a = 1e10
    gelu = nl.serial(nl.Dense(8, 1.2), nl.Gelu(), nl.Dense(1))
    relu = nl.serial(nl.Dense(8, 1.2), nl.Relu(), nl.Dense(1))
    k = gelu.kernel(x * a, dtype=F32)
    ref = relu.kernel(x)
    assert _rel(k.nngp.double() / a ** 2, ref.nngp) < 2e-6
    assert _rel(k.ntk.double() / a ** 2, ref.ntk) < 2e-6
    ln = nl.serial(nl.Dense(8), nl.LayerNorm(), nl.Relu(), nl.Dense(8), nl.Erf(), nl.Dense(1))
    assert _rel(ln.kernel(x * a, dtype=F32, get="ntk"), ln.kernel(x, get="ntk")) < 2e-6


@pytest.mark.parametrize("arch, scale, dtype, match", [
    (RELU_FAMILY, 1e20, F32, "overflows float32"),
    (RELU_FAMILY, 1e160, F64, "overflows float64"),
    (RELU_FAMILY, 1e-21, F32, "underflows float32"),
    (RELU_FAMILY, 1e-160, F64, "underflows float64"),
    (nl.serial(nl.Dense(8, 1e100), nl.Relu(), nl.Dense(8, 1e100), nl.Relu(), nl.Dense(1, 1e100)),
     1.0, F64, "overflows float64"),
    (nl.serial(nl.Dense(8, 3.0), nl.Exp(), nl.Dense(1)), 30.0, F64, "overflows float64"),
])
def test_unrepresentable_kernels_raise(path, arch, scale, dtype, match):
    """Where the true kernel is beyond the dtype's range: a clear error, never inf, NaN or a
    number that has lost its precision in the subnormal range."""
    with pytest.raises(ValueError, match=match):
        arch.kernel(randn64(4, 3) * scale, dtype=dtype)


def test_activation_constants_must_fit_the_dtype():
    """ABRelu(0, 1e-36) has h = b^2 / 2 = 5e-73: fine in float64, zero in float32, where the
    kernel came out all zeros. Refused in float32, computed in float64."""
    arch = nl.serial(nl.Dense(4), nl.ABRelu(0.0, 1e-36), nl.Dense(1))
    x = randn64(3, 2)
    with pytest.raises(ValueError, match="not representable in float32"):
        arch.kernel(x, dtype=F32)
    ref = nl.serial(nl.Dense(4), nl.Relu(), nl.Dense(1)).kernel(x)
    assert _rel(arch.kernel(x).nngp / 1e-72, ref.nngp) < 1e-13


def test_biased_net_at_tiny_scale_is_fine():
    """A bias keeps the variances normal: tiny inputs are no error (the kernel is the
    bias-driven one, to float32 precision)."""
    arch = nl.serial(nl.Dense(8, 1.3, 0.1), nl.Relu(), nl.Dense(1, 1.0, 0.1))
    x = randn64(4, 3)
    k = arch.kernel(x * 1e-30, dtype=F32)
    assert _rel(k.nngp, arch.kernel(x * 1e-30).nngp) < 1e-6


def test_gaussian_with_positive_b_refuses_infinite_moments():
    arch = nl.serial(nl.Dense(8, 2.0), nl.Gaussian(b=0.5), nl.Dense(1))
    with pytest.raises(ValueError, match="infinite"):
        arch.kernel(randn64(3, 2) * 3)
    small = arch.kernel(randn64(3, 2) * 0.05)  # 4 b v < 1: finite and valid
    _check_valid(small.nngp, 1e-12)


# ---- item 6: deep chaotic networks ------------------------------------------------------------

def _deep(act, depth, w_std, b_std):
    layers = []
    for _ in range(depth):
        layers += [nl.Dense(8, w_std, b_std), act]
    return nl.serial(*layers, nl.Dense(1, w_std, b_std))


@pytest.mark.parametrize("act, depth, w_std, b_std, dtype", [
    (nl.Erf(), 30, 5.0, 0.1, F64),    # chaotic: off-diagonal was 2.08x the diagonal
    (nl.Erf(), 30, 5.0, 0.1, F32),
    (nl.Erf(), 100, 1.0, 0.1, F32),
    (nl.Erf(), 60, 2.5, 0.0, F64),
    (nl.Relu(), 60, math.sqrt(2), 0.1, F32),
    (nl.Gelu(), 40, 3.0, 0.05, F64),
])
def test_deep_nets_keep_identical_inputs_identical(path, act, depth, w_std, b_std, dtype):
    """Identical inputs give bitwise identical rows (and the diagonal value off the
    diagonal); every kernel is symmetric, finite, PSD and within Cauchy-Schwarz at any depth.
    The root cause was the rounding gap between the matrix product that gives K(x, x') and
    the sum of squares that gives K(x, x) (and between the two-point and one-point dual maps),
    which a chaotic correlation map (slope > 1 at correlation 1) amplified with depth."""
    base = randn64(4, 5)
    x = torch.cat([base, base[:2], base[:1] * 1.0])  # rows 4, 6 repeat 0; row 5 repeats 1
    arch = _deep(act, depth, w_std, b_std)
    k = arch.kernel(x, dtype=dtype)
    for key in ("nngp", "ntk"):
        t = getattr(k, key)
        for i, j in ((0, 4), (0, 6), (1, 5), (4, 6)):
            assert torch.equal(t[i], t[j]) and torch.equal(t[:, i], t[:, j])
            assert t[i, j] == t[i, i] == t[j, j]
        _check_valid(t, 1e-5 if dtype == F32 else 1e-12)
    cross = arch.kernel(base, x[4:], dtype=dtype)  # duplicates across x1 and x2
    for key in ("nngp", "ntk"):
        t, c = getattr(k, key), getattr(cross, key)
        assert _rel(c, t[:4, 4:]) < (1e-5 if dtype == F32 else 1e-12)


def test_correlation_is_clipped_and_snapped():
    """``rho = (c / sqrt(v1)) / sqrt(v2)`` clipped into [-1, 1]; within SNAP_ULPS ulps of +-1
    it is exactly +-1 (a few ulps of rounding put identical examples off 1); farther away it
    is kept; a zero variance gives correlation 0."""
    v = torch.tensor([2.0, 3.0, 0.0], dtype=F64)
    eps = torch.finfo(F64).eps
    near = 1 - (SNAP_ULPS // 2) * eps
    far = 1 - 4 * SNAP_ULPS * eps
    c = torch.tensor([2.0 * (1 + 1e-12), -2.0 * near, 2.0 * far], dtype=F64)
    rho = correlation(c, v[0], v[0])
    assert rho[:2].tolist() == [1.0, -1.0]
    assert rho[2] < 1 and abs(float(rho[2]) - far) <= 2 * eps
    assert correlation(torch.tensor(0.0, dtype=F64), v[0], v[2]).item() == 0.0
    big = torch.tensor(1e300, dtype=F64)  # v1 v2 = 1e600 would overflow
    assert correlation(big * 0.5, big, big).item() == pytest.approx(0.5, rel=1e-15)


def test_fused_and_torch_paths_agree_at_extreme_scales():
    """The fused numba dual map uses the same normalized arithmetic as the torch path."""
    if not _fused.enabled():
        pytest.skip("numba not installed")
    for arch, x in ((RELU_FAMILY, randn64(6, 4)), (CNN, randn64(3, 2, 5, 5))):
        for scale, dtype, tol in ((1e150, F64, 1e-13), (1e-150, F64, 1e-13), (1e15, F32, 1e-5)):
            out = {}
            for flag in (False, True):
                with ntkit.settings(fused=flag):
                    out[flag] = arch.kernel(x * scale, dtype=dtype)
            for key in ("nngp", "ntk"):
                assert _rel(getattr(out[True], key), getattr(out[False], key)) < tol


@pytest.mark.parametrize("dtype", [F64, F32])
def test_identical_inputs_stay_identical_across_tiles(dtype, monkeypatch):
    """The same guarantee when the duplicates sit in different tiles (tile=2), and the
    search for them: one over all rows first; per tile only when that one found some."""
    from ntkit.layers import _ops
    calls = []
    real = _ops.duplicate_pairs

    def counting(x1, x2):
        calls.append(1)
        return real(x1, x2)

    monkeypatch.setattr(_ops, "duplicate_pairs", counting)
    arch = _deep(nl.Erf(), 30, 5.0, 0.1)
    base = randn64(4, 5)
    x = torch.cat([base, base[:2], base[:1] * 1.0])
    k = arch.kernel(x, dtype=dtype, tile=2)       # 4 x 4 blocks: 10 tiles
    assert len(calls) == 10
    for key in ("nngp", "ntk"):
        t = getattr(k, key)
        for i, j in ((0, 4), (0, 6), (1, 5), (4, 6)):
            assert torch.equal(t[i], t[j]) and torch.equal(t[:, i], t[:, j])
            assert t[i, j] == t[i, i] == t[j, j]
    cross = arch.kernel(base, x[4:], dtype=dtype, tile=2)   # duplicates across x1 and x2
    for key in ("nngp", "ntk"):
        c, t = getattr(cross, key), getattr(k, key)
        assert torch.equal(c[:, 0], c[:, 2])        # x2's rows 0 and 2 are equal (two tiles)
        assert _rel(c, t[:4, 4:]) < (1e-5 if dtype == F32 else 1e-12)
    calls.clear()
    k2 = arch.kernel(base, dtype=dtype, tile=2)   # no duplicates: no per-tile search
    assert calls == []
    torch.testing.assert_close(k2.nngp, k.nngp[:4, :4], rtol=0, atol=0)
    # duplicates only across x1 and x2 (each alone has none): found, searched per tile
    k3 = arch.kernel(base, base[2:].flip(0).clone(), dtype=dtype, tile=2)
    assert len(calls) == 2 * 1
    for key in ("nngp", "ntk"):
        c, t = getattr(k3, key), getattr(k2, key)
        assert _rel(c, t[:, [3, 2]]) < (1e-5 if dtype == F32 else 1e-12)


def test_has_duplicate_rows():
    from ntkit.layers._ops import has_duplicate_rows
    a = randn64(5, 3, 2)
    assert not has_duplicate_rows(a) and not has_duplicate_rows(a, a[:0])
    assert has_duplicate_rows(torch.cat([a, a[3:4]]))
    assert has_duplicate_rows(a[:3], a[2:4].clone())          # across the two only
    assert not has_duplicate_rows(a[:3], a[3:])
    b = a.clone()
    b[4] = a[1]
    b[4, 0, 1] = torch.nextafter(b[4, 0, 1], torch.tensor(9.0, dtype=b.dtype))  # one ulp off
    assert not has_duplicate_rows(b)


def test_input_gram_scaled_where_its_sum_would_overflow():
    """``|x| ~ 1.5e19`` in float32 with 4 channels: each square (2.3e38) is representable but
    their sum is not, while the input kernel (the mean over channels) is. The input Gram must
    still scale such inputs down (ntkit skips the scaling only when no sum can overflow):
    without it the kernel came back as a float32 overflow error."""
    x = torch.tensor([[1.0, -0.9, 0.8, 1.0], [0.7, 1.0, -1.0, 0.9], [1.0, 0.95, 0.9, -0.85]],
                     dtype=torch.float64) * 1.5e19
    arch = nl.serial(nl.Dense(3, W_std=0.5), nl.Relu(), nl.Dense(1, W_std=0.5))
    ref = arch.kernel(x, dtype=torch.float64)
    got = arch.kernel(x.float(), dtype=torch.float32)
    for key in ("nngp", "ntk"):
        r, g = getattr(ref, key), getattr(got, key).double()
        assert torch.isfinite(g).all()
        assert float((g - r).abs().max() / r.abs().max()) < 1e-5, key
