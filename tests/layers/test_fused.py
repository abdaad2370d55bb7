"""Fused numba kernels (ntkit.layers._fused) against the torch path they replace.

The torch path (NTKIT_FUSED=0) is itself checked against the independent loop reference in
test_conv.py; here the fused path must agree with it to float64 rounding on every layout and
padding the fused kernels accept, fall back on the rest, and keep the properties the tiled
evaluator relies on (exact symmetry, results independent of the thread count).
"""
import math

import numpy as np
import pytest
import torch

from ntkit import layers as nl
from ntkit.layers import _fused
from tests._helpers import randn64

pytestmark = pytest.mark.skipif(not _fused.enabled(), reason="numba not installed")


def _both(monkeypatch, arch, x1, x2=None, dtype=torch.float64, **kw):
    monkeypatch.setenv("NTKIT_FUSED", "0")
    ref = arch.kernel(x1, x2, dtype=dtype, **kw)
    monkeypatch.setenv("NTKIT_FUSED", "1")
    got = arch.kernel(x1, x2, dtype=dtype, **kw)
    return ref, got


def _rel(a, b):
    return float(((a - b).abs().max() / b.abs().max()))


# ---- the atan polynomial -------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype,tol", [("ATAN_F32", np.float32, 1.2e-7),
                                            ("ATAN_F64", np.float64, 4e-16)])
def test_atan_polynomial(name, dtype, tol):
    """atan(t) = t + t^3 g(t^2) on [0, 1]: the coefficients were fitted to g at 4000 Chebyshev
    nodes (numpy.polynomial.chebyshev.chebfit, degree 8 / 20, converted to powers of t^2);
    checked here against numpy.arctan, evaluated with Horner in the storage dtype."""
    from ntkit.layers import _fused_kernels as fk
    coef = [dtype(c) for c in getattr(fk, name)]
    t = np.linspace(0, 1, 100001, dtype=np.float64)[1:]
    tt = t.astype(dtype)
    x2 = tt * tt
    u = np.zeros_like(tt)
    for c in coef:
        u = u * x2 + c
    approx = (tt + tt * x2 * u).astype(np.float64)
    ref = np.arctan(tt.astype(np.float64))
    assert np.max(np.abs(approx - ref) / ref) < tol


def test_theta_matches_atan2():
    """The angle used by the arc-cosine duals, including signs, axes and the (0, 0) case."""
    from numba import njit

    from ntkit.layers import _fused_kernels as fk

    @njit
    def run(s, c, K, A):
        out = np.empty_like(s)
        for i in range(s.shape[0]):
            out[i] = fk.theta(s[i], c[i], K, A)
        return out

    g = np.random.default_rng(0)
    s = np.concatenate([np.abs(g.normal(size=2000)), [0.0, 0.0, 1.0, 1e-300, 2.0, 0.0]])
    c = np.concatenate([g.normal(size=2000), [1.0, -1.0, 0.0, 1.0, 2.0, 0.0]])
    for dt, tol in ((np.float64, 4e-16 * math.pi), (np.float32, 3e-7 * math.pi)):
        K = tuple(dt(v) for v in (0, 1, math.pi, math.pi / 2, 0, 0))
        A = tuple(dt(v) for v in (fk.ATAN_F32 if dt is np.float32 else fk.ATAN_F64))
        got = run(s.astype(dt), c.astype(dt), K, A).astype(np.float64)
        ref = np.arctan2(s.astype(dt).astype(np.float64), c.astype(dt).astype(np.float64))
        ref[-1] = math.pi / 2  # both zero: the convention of the torch path
        assert np.max(np.abs(got - ref)) <= tol


# ---- agreement with the torch path -----------------------------------------------------------

ARCHS = {
    "same3x3_gap": lambda: nl.serial(nl.Conv(8, 3, padding="SAME", W_std=1.4, b_std=0.1),
                                     nl.Relu(), nl.Conv(8, 3, padding="SAME"), nl.Relu(),
                                     nl.GlobalAvgPool(), nl.Dense(1)),
    "same3x3_flatten": lambda: nl.serial(nl.Conv(8, 3, padding="SAME", b_std=0.2), nl.Relu(),
                                         nl.Conv(8, 3, padding="SAME"), nl.LeakyRelu(0.1),
                                         nl.Flatten(), nl.Dense(1)),
    "explicit_pads_0_2": lambda: nl.serial(nl.Conv(8, 3, padding=((0, 2), (2, 0)), b_std=0.1),
                                           nl.Abs(), nl.AvgPool(2), nl.Dense(1)),
    "5x5_and_1x3": lambda: nl.serial(nl.Conv(8, 5, padding="SAME"), nl.Relu(),
                                     nl.Conv(8, (1, 3), padding="SAME"), nl.Relu(),
                                     nl.GlobalAvgPool(), nl.Dense(1)),
    "fallbacks": lambda: nl.serial(nl.Conv(8, 3, strides=2, padding="SAME"), nl.Relu(),
                                   nl.Conv(8, 3, padding="CIRCULAR"), nl.Relu(),
                                   nl.Conv(8, 2, padding="VALID"), nl.Relu(), nl.Flatten(),
                                   nl.Dense(1)),
    "standard": lambda: nl.serial(nl.Conv(8, 3, padding="SAME", parameterization="standard",
                                          b_std=0.1), nl.Relu(),
                                  nl.Conv(8, 3, padding="SAME", parameterization="standard"),
                                  nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1)),
    "residual_layernorm": lambda: nl.serial(
        nl.Conv(8, 3, padding="SAME"),
        nl.FanOut(2), nl.parallel(nl.serial(nl.Relu(), nl.Conv(8, 3, padding="SAME")),
                                  nl.Identity()), nl.FanInSum(), nl.LayerNorm(), nl.Relu(),
        nl.GlobalAvgPool(), nl.Dense(1)),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_fused_matches_torch_path(monkeypatch, name):
    x1, x2 = randn64(3, 2, 6, 5), randn64(2, 2, 6, 5, seed=1)
    arch = ARCHS[name]()
    for args in ((x1, None), (x1, x2)):
        ref, got = _both(monkeypatch, arch, *args)
        assert _rel(got.nngp, ref.nngp) < 1e-14
        assert _rel(got.ntk, ref.ntk) < 1e-14


def test_fused_one_dimensional(monkeypatch):
    x = randn64(4, 3, 11)
    arch = nl.serial(nl.Conv(8, 3, padding="SAME", b_std=0.1), nl.Relu(),
                     nl.Conv(8, 3, padding="SAME"), nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))
    ref, got = _both(monkeypatch, arch, x)
    assert _rel(got.ntk, ref.ntk) < 1e-14


def test_fused_float32_accuracy(monkeypatch):
    """float32 storage: within a few ulp of the float64 kernel, like the torch path."""
    x = randn64(4, 3, 8, 8)
    arch = ARCHS["same3x3_gap"]()
    monkeypatch.setenv("NTKIT_FUSED", "1")
    k64 = arch.kernel(x, dtype=torch.float64)
    k32 = arch.kernel(x, dtype=torch.float32)
    assert _rel(k32.ntk.double(), k64.ntk) < 2e-6
    assert _rel(k32.nngp.double(), k64.nngp) < 2e-6


def test_fused_exact_symmetry_and_thread_independence(monkeypatch):
    """x2=None kernels are exactly symmetric through tiles; results do not depend on threads."""
    monkeypatch.setenv("NTKIT_FUSED", "1")
    x = randn64(6, 2, 7, 7)
    arch = ARCHS["same3x3_gap"]()
    k = arch.kernel(x, tile=2)
    assert torch.equal(k.ntk, k.ntk.T) and torch.equal(k.nngp, k.nngp.T)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        k1 = arch.kernel(x, tile=2)
        torch.set_num_threads(2)
        k2 = arch.kernel(x, tile=2)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(k1.ntk, k2.ntk) and torch.equal(k1.nngp, k2.nngp)


def test_padded_outputs_are_read_in_place():
    """The activation's outputs carry a zero-margined buffer the next 3x3 conv reads without a
    copy; the result equals the conv of a plain copy of the same numbers."""
    c = torch.rand(2, 3, 4, 5, 4, 5, dtype=torch.float64) - 0.3
    v1 = torch.rand(2, 4, 5, dtype=torch.float64) + 1
    v2 = torch.rand(3, 4, 5, dtype=torch.float64) + 1
    out, _ = _fused.relu(c, v1, v2, 1 / (2 * math.pi), 0.5, None, False, True)
    ref, _ = nl.Relu().cross(c, v1[:, None, :, :, None, None], v2[None, :, None, None, :, :],
                             False)
    assert _rel(out, ref) < 1e-15
    buf = getattr(out, _fused._PAD_ATTR)[0]
    assert _fused._padded_source(out, 4, 5, out.numpy().reshape(-1))[0] is buf
    a = _fused.conv(out, 2, (3, 3), ((1, 1), (1, 1)), 0.3, 0.1, True)
    b = _fused.conv(out.clone(), 2, (3, 3), ((1, 1), (1, 1)), 0.3, 0.1, True)
    assert torch.equal(a, b)


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("NTKIT_FUSED", "0")
    assert not _fused.enabled()
    assert not _fused.usable(torch.zeros(2, dtype=torch.float64))
    monkeypatch.setenv("NTKIT_FUSED", "1")
    assert _fused.usable(torch.zeros(2, dtype=torch.float64))
    assert not _fused.usable(torch.zeros(2, dtype=torch.float16))


def test_fused_fully_connected(monkeypatch):
    """The FC layout (n1, n2) runs the same fused dual map, row by row."""
    x1, x2 = randn64(9, 5), randn64(7, 5, seed=1)
    arch = nl.serial(nl.Dense(64, 1.4, 0.1), nl.Relu(), nl.Dense(64, 1.3, 0.2),
                     nl.LeakyRelu(0.2), nl.Dense(64), nl.Abs(), nl.Dense(2))
    for args in ((x1, None), (x1, x2)):
        ref, got = _both(monkeypatch, arch, *args)
        assert _rel(got.nngp, ref.nngp) < 1e-14 and _rel(got.ntk, ref.ntk) < 1e-14
    k = arch.kernel(x1, tile=4)
    assert torch.equal(k.ntk, k.ntk.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_keys_fused_equal_the_torch_formula(monkeypatch, dtype):
    """The one-pass numba row keys are the torch formula's keys bit for bit (negative numbers,
    zeros of both signs, subnormals, wrap-around), and equal rows get equal keys."""
    from ntkit.layers import _ops
    x = torch.randn(257, 67, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[3] = -0.0
    x[4, :5] = torch.tensor([1e-310, -1e-310, 1e300, -1e300, 0.0])
    x[10] = x[200]
    x = x.to(dtype)
    got = _ops.row_keys(x)
    monkeypatch.setenv("NTKIT_FUSED", "0")
    ref = _ops.row_keys(x)
    assert torch.equal(got, ref)
    assert got[10] == got[200] and len(set(got.tolist())) == 256
