"""Property-based tests of the exact kernels over random architectures and inputs (hypothesis).

Every kernel must be exactly symmetric, positive semi-definite (min eigenvalue >= -tol * trace,
tol ~ 10 sqrt(roundoff)),
within Cauchy-Schwarz, give bitwise-identical rows for identical inputs, and agree between
float32 and float64, tiled and untiled evaluation, the fused (numba) and the pure-torch dual
maps; bias-free networks of homogeneous activations are scale-covariant,
``K(a x) = a^(2 prod_l d_l) K(x)`` (``d_l`` the degree of homogeneity of activation ``l``:
1 for the ReLU family, ``k`` for ``Monomial(k)`` / ``RectifiedMonomial(k)``, 0 for ``Sign``;
after a Dense the covariance scales like ``s``, after a degree-``d`` activation like ``s^d``,
and the NTK like the NNGP at every layer: ``ntk * E[phi' phi']`` scales like ``s * s^(d-1)``).

Bounded for CI: the default profile runs 30 examples per property, derandomized and without an
example database (about 20 s in all on 2 cores); ``HYPOTHESIS_PROFILE=slow`` runs 300 random
examples per property.
"""
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ntkit  # noqa: E402
from ntkit import layers as nl  # noqa: E402
from ntkit.layers import _fused  # noqa: E402

settings.register_profile("ntkit-default", max_examples=30, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile("slow" if os.environ.get("HYPOTHESIS_PROFILE") == "slow"
                               else "ntkit-default")

F64, F32 = torch.float64, torch.float32


# ---- strategies ------------------------------------------------------------------------------

def floats(lo, hi):
    """Floats in ``[lo, hi]`` rounded to 4 decimals: moderate magnitudes or exactly 0 (a
    parameter like 1e-36 makes a kernel that float32 cannot represent, which is refused)."""
    return st.floats(lo, hi).map(lambda v: round(v, 4))


@st.composite
def activations(draw, homogeneous=False):
    """``(layer, degree)``: a public activation with moderate parameters; ``degree`` is its
    degree of homogeneity (``None`` if it has none)."""
    relu_family = st.one_of(
        st.just((nl.Relu(), 1)), st.just((nl.Abs(), 1)),
        floats(-1, 1).map(lambda a: (nl.LeakyRelu(a), 1)),
        st.tuples(floats(-1.5, 1.5), floats(-1.5, 1.5)).map(lambda ab: (nl.ABRelu(*ab), 1)))
    other_homogeneous = st.one_of(
        st.just((nl.Sign(), 0)),
        st.integers(1, 2).map(lambda d: (nl.Monomial(d), d)),
        st.integers(0, 2).map(lambda d: (nl.RectifiedMonomial(d), d)))
    if homogeneous:
        return draw(st.one_of(relu_family, relu_family, other_homogeneous))
    smooth = st.one_of(
        st.tuples(floats(0.2, 2), floats(0.2, 2), floats(-1, 1)).map(
            lambda p: (nl.Erf(*p), None)),
        st.just((nl.Sigmoid_like(), None)), st.just((nl.Gelu(), None)),
        st.tuples(floats(0.2, 2), floats(0.2, 1.5), floats(-2, 2)).map(
            lambda p: (nl.Sin(*p), None)),
        st.tuples(floats(0.2, 2), floats(0.2, 1.5)).map(lambda p: (nl.Cos(*p), None)),
        st.tuples(floats(0.2, 2), floats(-1.0, -0.05)).map(lambda p: (nl.Gaussian(*p), None)),
        st.tuples(floats(0.2, 1.5), floats(-0.5, 0.5)).map(lambda p: (nl.Exp(*p), None)),
        floats(0.1, 2).map(lambda g: (nl.Rbf(g), None)))
    return draw(st.one_of(relu_family, other_homogeneous, smooth, smooth))


@st.composite
def fc_archs(draw, homogeneous=False, max_depth=6):
    """``(arch, degree)``: ``depth`` x [Dense, activation] + Dense readout; bias-free with
    homogeneous activations when ``homogeneous`` (``degree`` = product of their degrees)."""
    depth = draw(st.integers(1, max_depth))
    layers, degree = [], 1
    for _ in range(depth):
        w = draw(floats(0.5, 2.0))
        b = None if homogeneous else draw(st.one_of(st.none(), floats(0.0, 0.5)))
        layers.append(nl.Dense(8, w, b))
        if not homogeneous and draw(st.integers(0, 5)) == 0:
            layers.append(nl.LayerNorm())
        act, d = draw(activations(homogeneous))
        layers.append(act)
        degree = None if d is None or degree is None else degree * d
    layers.append(nl.Dense(draw(st.integers(1, 2)), draw(floats(0.5, 2.0)),
                           None if homogeneous else draw(st.one_of(st.none(), floats(0, 0.5)))))
    return nl.serial(*layers), degree


@st.composite
def conv_cases(draw, homogeneous=False):
    """``(arch, degree, image_shape)``: 1-2 small convs on ``(C, H, W)`` images (4x4-6x6, any
    padding/stride that fits what is left of the image), an activation each, then Flatten or
    global average pooling (optionally after an AvgPool)."""
    shape = draw(st.tuples(st.integers(1, 3), st.integers(4, 6), st.integers(4, 6)))
    size = min(shape[1:])
    layers, degree = [], 1
    for _ in range(draw(st.integers(1, 2))):
        padding = draw(st.sampled_from(["SAME", "VALID", "CIRCULAR"]))
        filt = draw(st.integers(1, min(3, size)))
        strides = draw(st.integers(1, 2)) if padding != "VALID" else 1
        size = size - filt + 1 if padding == "VALID" else -(-size // strides)
        b = None if homogeneous else draw(st.one_of(st.none(), floats(0, 0.3)))
        layers.append(nl.Conv(4, filt, strides=strides, padding=padding,
                              W_std=draw(floats(0.6, 1.8)), b_std=b))
        act, d = draw(activations(homogeneous) if homogeneous else st.one_of(
            activations(True), st.just((nl.Erf(), None)), st.just((nl.Gelu(), None))))
        layers.append(act)
        degree = None if d is None or degree is None else degree * d
    top = draw(st.sampled_from(["flatten", "gap", "pool_gap"]))
    if top == "pool_gap":
        layers.append(nl.AvgPool(2, padding="SAME"))
    layers.append(nl.Flatten() if top == "flatten" else nl.GlobalAvgPool())
    layers.append(nl.Dense(1, draw(floats(0.6, 1.8))))
    return nl.serial(*layers), degree, shape


@st.composite
def cases(draw, homogeneous=False, max_depth=6, conv=True):
    """``(arch, degree, per-example input shape)``: an FC or (if ``conv``) a conv case."""
    if conv and draw(st.booleans()):
        return draw(conv_cases(homogeneous))
    arch, degree = draw(fc_archs(homogeneous, max_depth))
    return arch, degree, (draw(st.integers(1, 5)),)


@st.composite
def inputs(draw, shape_tail):
    """``(x, dups)``: 2-6 random rows plus duplicated rows and rescaled copies (scale factors
    1e-2..1e2), optionally a zero row; ``dups`` lists (i, j) pairs of identical rows."""
    n = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + shape_tail, generator=g, dtype=F64)
    rows, dups = [x], []
    if draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        rows.append(x[i:i + 1].clone())
        dups.append((i, n))
    if draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        rows.append(x[i:i + 1] * draw(floats(1e-2, 1e2)))
    if draw(st.integers(0, 4)) == 0:
        rows.append(torch.zeros((1,) + shape_tail, dtype=F64))
    return torch.cat(rows), dups


# ---- checks ----------------------------------------------------------------------------------

TOL = {F64: (1e-12, 1e-7), F32: (1e-5, 3e-3)}  # (Cauchy-Schwarz, PSD) ~ (roundoff, its sqrt)


def assert_valid_kernel(k, dups=(), dtype=F64):
    """Finite, exactly symmetric, Cauchy-Schwarz (to a few roundoffs), PSD (min eigenvalue >=
    ``-tol * trace`` with ``tol`` ~ 10 sqrt(roundoff): the angle of a nearly collinear pair is
    only determined to ``sqrt(roundoff)``, and arcsine-type maps (Sign, ReLU's derivative)
    pass that on), and bitwise-identical rows/columns for identical inputs."""
    tol, psd_tol = TOL[dtype]
    k = k.double()
    assert torch.isfinite(k).all()
    assert torch.equal(k, k.T)
    d = k.diagonal()
    assert (d >= 0).all()
    bound = d.sqrt()[:, None] * d.sqrt()[None, :]  # never d_i d_j: it underflows
    assert (k.abs() <= bound * (1 + tol) + 1e-300).all(), float((k.abs() - bound).max())
    trace = float(d.sum())
    if trace > 0:
        assert float(torch.linalg.eigvalsh(k / trace).min()) >= -psd_tol
    for i, j in dups:
        assert torch.equal(k[i], k[j]) and k[i, j] == k[i, i]


def rel(a, b):
    scale = float(b.double().abs().max())
    return float((a.double() - b.double()).abs().max()) / scale if scale > 0 else \
        float(a.double().abs().max())


def _kernel(arch, x, **kw):
    """The kernel, or ``None`` (example discarded) when it is not representable, which must
    then be reported as such (never inf/NaN)."""
    try:
        return arch.kernel(x, **kw)
    except ValueError as e:
        assert "overflows" in str(e) or "underflows" in str(e), str(e)
        return None


# ---- properties ------------------------------------------------------------------------------

@settings(PROFILE)
@given(cases(conv=False), st.data())
def test_fc_kernels_are_valid(case, data):
    """Symmetric, PSD, Cauchy-Schwarz, duplicates exact, float64 and float32, depth 1-6."""
    arch, _, shape = case
    x, dups = data.draw(inputs(shape))
    for dtype in (F64, F32):
        k = _kernel(arch, x, dtype=dtype)
        assume(k is not None)
        assert_valid_kernel(k.nngp, dups, dtype)
        assert_valid_kernel(k.ntk, dups, dtype)


@settings(PROFILE)
@given(conv_cases(), st.data())
def test_conv_kernels_are_valid(case, data):
    arch, _, shape = case
    x, dups = data.draw(inputs(shape))
    for dtype in (F64, F32):
        k = _kernel(arch, x, dtype=dtype)
        assume(k is not None)
        assert_valid_kernel(k.nngp, dups, dtype)
        assert_valid_kernel(k.ntk, dups, dtype)


@settings(PROFILE)
@given(cases(homogeneous=True, max_depth=4), st.data())
def test_homogeneous_nets_are_scale_covariant(case, data):
    """Bias-free nets of homogeneous activations: K(a x) = a^(2 prod d) K(x), for a in
    [1e-3, 1e3] and also for scales far outside (1e+-30), in float64."""
    arch, degree, shape = case
    x, _ = data.draw(inputs(shape))
    a = data.draw(st.one_of(floats(1e-3, 1e3), st.sampled_from([1e-30, 1e30])))
    assume(abs(math.log10(a)) * 2 * degree < 250)
    ref = _kernel(arch, x)
    got = _kernel(arch, x * a)
    assume(ref is not None and got is not None)
    factor = a ** (2 * degree)
    for key in ("nngp", "ntk"):
        assert rel(getattr(got, key) / factor, getattr(ref, key)) < 1e-9


@settings(PROFILE)
@given(cases(max_depth=3), st.data())
def test_float32_agrees_with_float64(case, data):
    """Shallow nets (depth <= 3; deep chaotic maps amplify any rounding by design): float32
    within 1e-3 of the float64 kernel, relative to its largest entry."""
    arch, _, shape = case
    x, _ = data.draw(inputs(shape))
    k64 = _kernel(arch, x)
    k32 = _kernel(arch, x, dtype=F32)
    assume(k64 is not None and k32 is not None)
    for key in ("nngp", "ntk"):
        assert rel(getattr(k32, key), getattr(k64, key)) < 1e-3, key


@settings(PROFILE)
@given(cases(max_depth=4), st.data(), st.integers(1, 3))
def test_tiled_and_fused_agree_with_untiled_torch(case, data, tile):
    """Tiles of 1-3 examples (symmetric and cross kernels) and the fused numba dual maps give
    the untiled pure-torch kernel to float64 rounding."""
    arch, _, shape = case
    x, dups = data.draw(inputs(shape))
    with ntkit.settings(fused=False):     # the pure-torch dual maps
        ref = _kernel(arch, x)
        assume(ref is not None)
        tiled = arch.kernel(x, tile=tile)
        cross = arch.kernel(x[:2], x, tile=tile)
    for key in ("nngp", "ntk"):
        assert rel(getattr(tiled, key), getattr(ref, key)) < 1e-10
        assert rel(getattr(cross, key), getattr(ref, key)[:2]) < 1e-10
        assert_valid_kernel(getattr(tiled, key), dups)
    if _fused.enabled():
        with ntkit.settings(fused=True):  # the fused numba dual maps
            got = arch.kernel(x)
            got_tiled = arch.kernel(x, tile=tile)
        for key in ("nngp", "ntk"):
            assert rel(getattr(got, key), getattr(ref, key)) < 1e-10
            assert rel(getattr(got_tiled, key), getattr(ref, key)) < 1e-10
