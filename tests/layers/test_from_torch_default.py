"""``ntkit.from_torch(net)`` by default describes the network it is given (issue 18): its NTK is
the expected empirical NTK of that very network (its widths, PyTorch's parameterization and
default init), so the distance to ``empirical_ntk`` of PyTorch-initialized draws of the same
network falls like width^-1/2. ``parameterization='ntk'`` (the infinite-width NTK limit) is a
different kernel, ~width times smaller."""
import numpy as np
import torch
from torch import nn

import ntkit
from tests._helpers import randn64


def fc_relu(w, d=8):
    return nn.Sequential(nn.Linear(d, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 1))


def small_cnn(w):
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 1))


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _distances(make, x, w, seeds, **kw):
    """Per-draw relative Frobenius distances ||Theta_emp - Theta|| / ||Theta|| for ``seeds``
    PyTorch-default-initialized draws of ``make(w)``, and the distance of their average."""
    ref = ntkit.from_torch(make(w), **kw).kernel(x, get="ntk")
    dists, mean = [], 0.0
    for s in range(seeds):
        torch.manual_seed(1000 * s + w)
        emp = ntkit.empirical_ntk(make(w).double(), x)
        dists.append(_rel(emp, ref))
        mean = mean + emp / seeds
    return dists, _rel(mean, ref)


def test_default_fc_kernel_is_the_networks_own_ntk():
    """FC ReLU net, widths 256/1024/4096, 8 PyTorch-initialized draws each: the mean per-draw
    distance falls like width^-1/2 (measured slope -0.36..-0.49 over seed sets; the approach to
    -1/2 is slow since the per-draw relative std is ~3 width^-1/2 and saturates at small width),
    and the 8-draw average agrees with the kernel within its fluctuation at the largest width
    (measured 0.01-0.03). The old default (NTK-parameterization limit) is ~1000x off here."""
    x = randn64(6, 8)
    widths, seeds = (256, 1024, 4096), 8
    mean_d, avg_d = [], []
    for w in widths:
        d, a = _distances(fc_relu, x, w, seeds)
        mean_d.append(float(np.mean(d)))
        avg_d.append(a)
    slope = np.polyfit(np.log(widths), np.log(mean_d), 1)[0]
    assert -0.75 < slope < -0.3, (slope, mean_d)
    assert mean_d[-1] < 0.08 and avg_d[-1] < 0.06, (mean_d, avg_d)
    # the infinite-width limit is a different kernel: explicit, and far from this network's NTK
    d_limit, _ = _distances(fc_relu, x, 256, 1, parameterization="ntk")
    assert d_limit[0] > 10, d_limit


def test_default_conv_kernel_is_the_networks_own_ntk():
    """Small CNN (two 3x3 convs, global pooling, readout) at width 128: the average of 6
    PyTorch-initialized draws' empirical NTKs is within 0.15 of the default kernel (first conv
    on 3 channels: the uniform init's non-Gaussianity adds ~4%, see ``from_torch``), and each
    draw within 0.3; the NTK-parameterization limit is orders of magnitude away."""
    x = randn64(4, 3, 6, 6, seed=1)
    dists, avg = _distances(small_cnn, x, 128, 6)
    assert max(dists) < 0.3 and avg < 0.15, (dists, avg)
    d_limit, _ = _distances(small_cnn, x, 128, 1, parameterization="ntk")
    assert d_limit[0] > 10, d_limit


def test_default_nngp_has_pytorch_biases_at_every_layer():
    """The default NNGP of Linear -> Linear (no nonlinearity) is closed form: Var(W) = 1/(3 fan_in)
    and Var(b) = 1/(3 fan_in) at each layer's own fan_in (the second bias is dropped in the
    'ntk' limit); checked against a Monte Carlo over PyTorch-initialized networks too."""
    d, w = 5, 7
    x = randn64(4, d, seed=2)
    net = nn.Sequential(nn.Linear(d, w), nn.Linear(w, 3))
    k1 = (x @ x.T + 1.0) / (3 * d)        # first layer: Var(W) = Var(b) = 1/(3 d)
    expect = k1 / 3 + 1.0 / (3 * w)       # second: W_std^2 = 1/3, b_std^2 = 1/(3 w)
    got = ntkit.from_torch(net).kernel(x, get="nngp")
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    limit = ntkit.from_torch(net, parameterization="ntk").kernel(x, get="nngp")
    torch.testing.assert_close(limit, k1 / 3, rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    with torch.no_grad():  # E[f(x) f(x')^T] over 4000 draws of the PyTorch module, per output
        outs = torch.stack([nn.Sequential(nn.Linear(d, w), nn.Linear(w, 3)).double()(x)
                            for _ in range(4000)])              # (draws, n, 3)
    mc = torch.einsum("sio,sjo->ij", outs, outs) / (outs.shape[0] * 3)
    assert _rel(mc, expect) < 0.04 and _rel(mc, limit) > 0.1, (_rel(mc, expect), _rel(mc, limit))
