"""Architectures: the shared battery (symmetry, tiles, float32, Monte Carlo ~ width^-1/2) plus
hand-derived closed forms."""
import math

import numpy as np
import torch

from ntkit import layers as nl
from ntkit.monte_carlo import monte_carlo_kernel
from ntkit.testing import KernelTestCase, mc_error_slope


def relu_mlp_reference(x1, x2, depth, W_std, b_std):
    """Arc-cosine recursion written out in numpy with arccos (independent of the library)."""
    x1, x2 = x1.numpy(), x2.numpy()
    d = x1.shape[1]
    k12 = W_std ** 2 * x1 @ x2.T / d + b_std ** 2
    k11 = W_std ** 2 * (x1 ** 2).sum(1) / d + b_std ** 2
    k22 = W_std ** 2 * (x2 ** 2).sum(1) / d + b_std ** 2
    ntk = k12.copy()
    for _ in range(depth):
        norm = np.sqrt(np.outer(k11, k22))
        th = np.arccos(np.clip(k12 / norm, -1, 1))
        e = norm * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
        edot = (np.pi - th) / (2 * np.pi)
        k12 = W_std ** 2 * e + b_std ** 2
        k11 = W_std ** 2 * k11 / 2 + b_std ** 2
        k22 = W_std ** 2 * k22 / 2 + b_std ** 2
        ntk = k12 + W_std ** 2 * edot * ntk
    return torch.from_numpy(k12), torch.from_numpy(ntk)


class TestReluMLP(KernelTestCase):
    def build(self):
        return nl.serial(nl.Dense(8, 1.4, 0.2), nl.Relu(), nl.Dense(8, 1.4, 0.2), nl.Relu(),
                         nl.Dense(1, 1.4, 0.2))

    def reference(self, x1, x2):
        return relu_mlp_reference(x1, x2, 2, 1.4, 0.2)


class TestErfGeluMLP(KernelTestCase):
    def build(self):
        return nl.serial(nl.Dense(8, 1.2, 0.1), nl.Erf(), nl.Dense(8, 1.5), nl.Gelu(),
                         nl.Dense(2))


class TestResidual(KernelTestCase):
    def build(self):
        block = nl.serial(nl.FanOut(2), nl.parallel(nl.Identity(),
                                                    nl.serial(nl.Relu(), nl.Dense(8, 1.3))),
                          nl.FanInSum())
        return nl.serial(nl.Dense(8, 1.0, 0.1), block, block, nl.Relu(), nl.Dense(1))


class TestLayerNorm(KernelTestCase):
    def build(self):
        return nl.serial(nl.Dense(8, 1.3, 0.3), nl.LayerNorm(), nl.Relu(), nl.Dense(8),
                         nl.LayerNorm(), nl.Sin(), nl.Dense(1))


class TestConcat(KernelTestCase):
    def build(self):
        return nl.serial(nl.Dense(8, 1.1, 0.1), nl.FanOut(2),
                         nl.parallel(nl.Relu(), nl.serial(nl.Erf(), nl.Dense(8))),
                         nl.FanInConcat(), nl.Dense(8, 1.2), nl.Relu(), nl.Dense(1))


def test_dense_alone_is_the_scaled_gram():
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g,
                                                                              dtype=torch.float64)
    k = nl.Dense(7, W_std=1.7, b_std=0.3).kernel(x1, x2)
    ref = 1.7 ** 2 * x1 @ x2.T / 5 + 0.09
    torch.testing.assert_close(k.nngp, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(k.ntk, ref, rtol=1e-14, atol=1e-14)
    ks = nl.Dense(7, W_std=1.7, b_std=0.3, parameterization="standard").kernel(x1, x2)
    torch.testing.assert_close(ks.nngp, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ks.ntk, x1 @ x2.T + 1, rtol=1e-14, atol=1e-14)


def test_standard_parameterization_matches_finite_networks():
    """Standard parameterization: the NTK depends on the widths written in the spec. One-hidden-
    layer closed form: Theta = n * E[relu relu] + 1 + W2^2 * E[relu' relu'] * (x.x' + 1)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    errs = []
    widths = [64, 256, 1024, 4096]
    for n in widths:
        arch = nl.serial(nl.Dense(n, 1.3, 0.2, "standard"), nl.Relu(),
                         nl.Dense(1, 1.1, 0.1, "standard"))
        k = arch.kernel(x)
        k1 = 1.69 * x @ x.T / 3 + 0.04
        v = torch.diagonal(k1)
        norm = torch.sqrt(torch.outer(v, v))
        th = torch.arccos((k1 / norm).clamp(-1, 1))
        e = norm * (torch.sin(th) + (math.pi - th) * torch.cos(th)) / (2 * math.pi)
        edot = (math.pi - th) / (2 * math.pi)
        ref = n * e + 1 + 1.21 * edot * (x @ x.T + 1)
        torch.testing.assert_close(k.ntk, ref, rtol=1e-6, atol=1e-6)  # arccos ref near diagonal
        mc = monte_carlo_kernel(arch, x, get="ntk", n_samples=4, seed=n)
        errs.append(float(torch.linalg.norm(mc - k.ntk) / torch.linalg.norm(k.ntk)))
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    assert -1.2 < slope < -0.3 and errs[-1] < 0.02, (slope, errs)


def test_module_has_the_declared_parameterization_and_init():
    arch = nl.serial(nl.Dense(4096, W_std=2.0, b_std=0.5), nl.Relu(), nl.Dense(3))
    net = arch.module(in_shape=10, seed=0)
    w = net[0].weight
    assert w.shape == (4096, 10) and w.dtype == torch.float64
    w = w.detach()
    assert abs(float(w.std()) - 1.0) < 0.02 and abs(float(w.mean())) < 0.02
    x = torch.randn(2, 10, dtype=torch.float64)
    ref = 2.0 / math.sqrt(10) * x @ w.T + 0.5 * net[0].bias
    torch.testing.assert_close(net[0](x), ref)
    net2 = arch.module(in_shape=10, seed=0, width=16)
    assert net2[0].weight.shape == (16, 10) and net2[2].weight.shape == (3, 16)
    torch.testing.assert_close(arch.module(10, seed=1)(x), arch.module(10, seed=1)(x))
    std = nl.Dense(4096, W_std=2.0, b_std=0.5, parameterization="standard").module(10, seed=0)
    std.requires_grad_(False)
    assert abs(float(std.weight.std()) - 2.0 / math.sqrt(10)) < 0.01
    assert abs(float(std.bias.std()) - 0.5) < 0.03


def test_depth_1_to_5_relu_matches_reference():
    g = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g,
                                                                              dtype=torch.float64)
    for depth in range(1, 6):
        layers = []
        for _ in range(depth):
            layers += [nl.Dense(16, 1.5, 0.1), nl.Relu()]
        arch = nl.serial(*layers, nl.Dense(1, 1.5, 0.1))
        k = arch.kernel(x1, x2)
        ref = relu_mlp_reference(x1, x2, depth, 1.5, 0.1)
        torch.testing.assert_close(k.nngp, ref[0], rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(k.ntk, ref[1], rtol=1e-11, atol=1e-12)


def test_wrong_kernel_map_is_detected_by_monte_carlo():
    """The oracle can fail: a network whose kernel map is deliberately wrong (Relu kernel with an
    Abs finite network) stops converging."""
    from ntkit.layers.activations import ABRelu

    class WrongRelu(ABRelu):
        def fn(self, x):
            return x.abs()

    arch = nl.serial(nl.Dense(8, 1.2, 0.3), WrongRelu(0.0, 1.0), nl.Dense(1))
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    slope, errs = mc_error_slope(arch, x, (16, 64, 256, 1024), get="nngp", n_samples=2, seeds=2)
    assert slope > -0.25 and errs[-1] > 0.2, (slope, errs)
