"""``ntkit.from_torch``: structure (same parameters, same function), the kernels (NTK-limit and
standard parameterization) against Monte Carlo estimates from the original PyTorch modules at
PyTorch's default initialization, and clear errors for what cannot be converted."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import ntkit
from ntkit import layers as nl
from ntkit.empirical import empirical_ntk
from tests._helpers import randn64


def conv2d_net(w):
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, w, 3, padding=1, padding_mode="circular"), nn.ReLU()),
        nn.AvgPool2d(2),
        nn.Conv2d(w, w, (2, 3), padding="same"), nn.GELU(),
        nn.Conv2d(w, w, 3, stride=2, bias=False), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(w, 3)).eval()


def conv1d_net(w):
    return nn.Sequential(nn.Conv1d(2, w, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv1d(w, w, 3, padding="valid", bias=False), nn.LeakyReLU(0.1),
                         nn.AvgPool1d(2, stride=1, padding=1), nn.Flatten(), nn.Identity(),
                         nn.Linear(w * 5, 2))


def mlp_net(w):
    return nn.Sequential(nn.Identity(), nn.Linear(5, w), nn.ELU(), nn.LayerNorm(w),
                         nn.Sequential(nn.Linear(w, w), nn.Sigmoid()), nn.Linear(w, 1))


NETS = {"conv2d": (conv2d_net, (3, 8, 8)), "conv1d": (conv1d_net, (2, 11)),
        "mlp": (mlp_net, (5,))}


def _load(ours, theirs):
    """Copy PyTorch parameters into the ntkit module, undoing its NTK-parameterization scales."""
    mods = [m for m in ours.modules() if getattr(m, "weight", None) is not None]
    src = [m for m in theirs.modules() if getattr(m, "weight", None) is not None]
    assert [tuple(m.weight.shape) for m in mods] == [tuple(m.weight.shape) for m in src]
    with torch.no_grad():
        for a, b in zip(mods, src):
            a.weight.copy_(b.weight / getattr(a, "w_scale", 1.0))
            assert (a.bias is None) == (b.bias is None)
            if a.bias is not None:
                a.bias.copy_(b.bias / getattr(a, "b_scale", 1.0))


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("param", ["standard", "ntk"])
def test_module_has_the_same_structure_and_function(name, param):
    """The converted architecture's finite network has PyTorch's parameter shapes (at the
    module's widths and at another width) and, given PyTorch's parameter values, computes the
    same function: padding, strides, pooling, flatten order and activations all agree."""
    make, in_shape = NETS[name]
    torch.manual_seed(0)
    net = make(6).double()
    arch = ntkit.from_torch(net, parameterization=param, b_std=0.3)
    ours = arch.module(in_shape, seed=0)
    _load(ours, net)
    x = randn64(4, *in_shape)
    torch.testing.assert_close(ours(x), net(x), rtol=1e-12, atol=1e-12)
    wide = arch.module(in_shape, width=9, seed=0)
    assert [p.shape for p in wide.parameters()] == [p.shape for p in make(9).parameters()]


class _Scale(nn.Module):
    """Reparameterize ``W = c * w`` (NTK parameterization); ``w`` keeps PyTorch's draw."""

    def __init__(self, c):
        super().__init__()
        self.c = c


def _ntk_parameterization_ntk(net, x):
    """The NTK-parameterization NTK of a PyTorch-initialized module: W = W_std / sqrt(fan_in) w,
    so d/dw = W_std / sqrt(fan_in) d/dW: sum over linear maps of W_std^2 / fan_in * (the weight's
    empirical NTK), plus b_std^2 * (bias NTK) for the first layer's bias (b_std^2 = 1/(3 fan_in)),
    plus LayerNorm's gamma/beta (unit scale); later biases have b_std = 0."""
    total, first = None, True
    for name, m in net.named_modules():
        parts = []
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            parts.append((f"{name}.weight", 1 / (3 * fan_in)))
            if m.bias is not None and first:
                parts.append((f"{name}.bias", 1 / (3 * fan_in)))
            first = False
        elif isinstance(m, nn.LayerNorm):
            parts += [(f"{name}.{p}", 1.0) for p in ("weight", "bias")
                      if getattr(m, p, None) is not None]
        for pname, scale in parts:
            t = empirical_ntk(net, x, params=[pname]) * scale
            total = t if total is None else total + t
    return total


def _features_nngp(net, x):
    """NNGP estimate with PyTorch's readout integrated out: Var(W) = Var(b) = 1 / (3 fan_in)."""
    with torch.no_grad():
        h = net[:-1](x)
    return (h @ h.T + 1.0) / (3 * h.shape[1])


MC_NETS = {
    "conv": (lambda w: nn.Sequential(nn.Conv2d(3, w, 3, padding=1, padding_mode="circular"),
                                     nn.ReLU(), nn.Conv2d(w, w, 2, stride=2), nn.GELU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 2)),
             (3, 6, 6)),
    "mlp_layernorm": (lambda w: nn.Sequential(nn.Linear(4, w), nn.LayerNorm(w), nn.Linear(w, w),
                                              nn.Tanh(), nn.Linear(w, 2)),
                      (4,)),
}


def _gaussian_init_(net):
    """Re-draw PyTorch's uniform weights and biases as Gaussians of the same variance: the
    first layer sums over the fixed input dimension, so a uniform draw is not Gaussian there and
    its kernel differs from the limit by O(1/fan_in) (see ``from_torch``'s docstring)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                std = (1.0 / (3 * m.weight[0].numel())) ** 0.5
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.normal_(0.0, std)
    return net


@pytest.mark.parametrize("name", ["conv", "mlp_layernorm"])
def test_torch_module_kernels_converge_to_converted_arch(name):
    """Monte Carlo over PyTorch modules (the original module types, weights of PyTorch's
    variances drawn Gaussian) against the converted kernels: NNGP and NTK-parameterization NTK
    (infinite-width limits, arch converted once) and the standard-parameterization NTK (arch
    converted at each width). Relative errors must fall like width^-1/2."""
    make, in_shape = MC_NETS[name]
    # PyTorch's init (W_std^2 = 1/3) shrinks the signal layer by layer, while hidden biases
    # (variance 1/(3 fan_in), zero in the limit) add O(1/width) offsets: inputs of scale 5
    # keep those below the O(width^-1/2) fluctuations being measured at these widths
    x = 5 * randn64(4, *in_shape, seed=1)
    arch = ntkit.from_torch(make(7), parameterization="ntk")
    exact = arch.kernel(x)
    widths, seeds = (32, 128, 512), 2
    errs = {"nngp": [], "ntk": [], "standard": []}
    for w in widths:
        est = {k: 0.0 for k in errs}
        std_exact = ntkit.from_torch(make(w), parameterization="standard").kernel(x, get="ntk")
        for s in range(3 * seeds):  # forward passes are cheap: more networks for the NNGP
            torch.manual_seed(1000 * s + w)
            net = _gaussian_init_(make(w).double())
            est["nngp"] = est["nngp"] + _features_nngp(net, x) / (3 * seeds)
            if s < seeds:
                est["ntk"] = est["ntk"] + _ntk_parameterization_ntk(net, x) / seeds
                est["standard"] = est["standard"] + empirical_ntk(net, x) / seeds
        for key, ref in (("nngp", exact.nngp), ("ntk", exact.ntk), ("standard", std_exact)):
            errs[key].append(float(torch.linalg.norm(est[key] - ref) / torch.linalg.norm(ref)))
    for key, e in errs.items():
        slope = np.polyfit(np.log(widths), np.log(e), 1)[0]
        assert -1.5 < slope < -0.15 and e[-1] < 0.1 and e[-1] < 0.6 * e[0], (key, slope, e)


def test_defaults_follow_pytorch_initialization():
    """Default: PyTorch's parameterization, W_std^2 = 1/3 and every bias at 1/(3 fan_in) of its
    own module; 'ntk' (the infinite-width limit) keeps only the first layer's bias."""
    net = nn.Sequential(nn.Conv2d(3, 8, (3, 2)), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12, 4),
                        nn.ReLU(), nn.Linear(4, 1, bias=False))
    arch = ntkit.from_torch(net)
    conv, dense, readout = arch.layers[0], arch.layers[3], arch.layers[5]
    assert math.isclose(conv.W_std, 1 / math.sqrt(3)) and conv.parameterization == "standard"
    assert math.isclose(conv.b_std, 1 / math.sqrt(3 * 3 * 6))  # 1/(3 fan_in), fan_in = 3*3*2
    assert math.isclose(dense.b_std, 1 / math.sqrt(3 * 96)) and dense.parameterization == "standard"
    assert readout.b_std is None and readout.out_dim == 1
    limit = ntkit.from_torch(net, parameterization="ntk")
    conv, dense, readout = limit.layers[0], limit.layers[3], limit.layers[5]
    assert math.isclose(conv.W_std, 1 / math.sqrt(3)) and conv.parameterization == "ntk"
    assert math.isclose(conv.b_std, 1 / math.sqrt(3 * 3 * 6))  # first layer: 1/(3 fan_in)
    assert dense.b_std == 0.0 and readout.b_std is None and dense.parameterization == "ntk"
    custom = ntkit.from_torch(net, W_std=1.4, b_std=0.1, parameterization="standard")
    assert custom.layers[0].W_std == 1.4 and custom.layers[3].b_std == 0.1
    assert custom.layers[5].b_std is None and custom.layers[5].parameterization == "standard"
    assert ntkit.from_torch is nl.from_torch


def test_padding_variants_match_torch():
    """int, tuple, 'same' (even filter: extra padding at the end, as torch), 'valid', circular."""
    for conv in (nn.Conv2d(2, 5, 2, padding="same"), nn.Conv2d(2, 5, 3, padding=(1, 2)),
                 nn.Conv2d(2, 5, (3, 2), padding="same", padding_mode="circular"),
                 nn.Conv2d(2, 5, 3, stride=(2, 1), padding=2, padding_mode="circular"),
                 nn.Conv2d(2, 5, 3, padding="valid"), nn.Conv1d(2, 5, 4, padding="same")):
        conv = conv.double()
        nd = 1 if isinstance(conv, nn.Conv1d) else 2
        net = nn.Sequential(conv)
        arch = ntkit.from_torch(net, parameterization="standard", b_std=0.2)
        in_shape = (2, 6) if nd == 1 else (2, 5, 6)
        ours = arch.module(in_shape)
        _load(ours, net)
        x = randn64(2, *in_shape)
        torch.testing.assert_close(ours(x), net(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, path, words", [
    (nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4))), "1.1",
     "BatchNorm1d"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)), "1", "MaxPool2d"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout2d(0.5)), "1", "eval()"),  # nn.Dropout converts
    (nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1)), "1", "MultiheadAttention"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "0", "groups=2"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2)), "0", "dilation"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), "0", "reflect"),
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(2)), "1", "output_size"),
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.Linear(4, 2)), "1", "Flatten"),
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)), "2", "Flatten"),
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.LayerNorm(4)), "1", "LayerNorm"),
    (nn.Sequential(nn.Linear(4, 4), nn.PReLU()), "1", "PReLU"),
    (nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 1)), "0", "ceil_mode"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU()), "2", "elementwise_affine"),
])
def test_unsupported_modules_name_class_and_position(bad, path, words):
    with pytest.raises(ValueError) as err:
        ntkit.from_torch(bad)
    msg = str(err.value)
    assert f"'{path}'" in msg and words in msg, msg


def test_bad_arguments():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="nn.Sequential"):
        ntkit.from_torch(nn.Sequential(Custom()))
    with pytest.raises(TypeError, match="nn.Module"):
        ntkit.from_torch("net")
    with pytest.raises(ValueError, match="parameterization"):
        ntkit.from_torch(nn.Linear(3, 1), parameterization="mup")
    with pytest.raises(ValueError, match="W_std"):
        ntkit.from_torch(nn.Linear(3, 1), W_std=-1.0)
    with pytest.raises(ValueError, match="no Linear/Conv"):
        ntkit.from_torch(nn.Sequential(nn.ReLU()))
    # eval-mode dropout is the identity; a single Linear converts at the root
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1)).eval()
    assert len(ntkit.from_torch(net).layers) == 2
    k = ntkit.from_torch(nn.Linear(3, 2)).kernel(randn64(4, 3), get="nngp")
    torch.testing.assert_close(k, randn64(4, 3) @ randn64(4, 3).T / 9 + 1 / 9)


def test_data_must_fit_the_converted_module():
    """The infinite-width architecture accepts any width, but the torch module fixes its input:
    Linear(8, .) on 3-feature data (issue 13) and Conv2d(3, .) on 1-channel or flat data are
    refused, naming the expected size and the module."""
    arch = ntkit.from_torch(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    assert arch.kernel(randn64(4, 8), get="ntk").shape == (4, 4)
    with pytest.raises(ValueError, match=r"expects 8 input features.*Linear at '0'.*has 3"):
        arch.kernel(randn64(4, 3))
    with pytest.raises(ValueError, match="expects 8"):
        arch.module(3)
    with pytest.raises(ValueError, match=r"\(n, d\) features"):
        arch.kernel(randn64(4, 8, 2, 2))
    conv = ntkit.from_torch(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 9, 1)))
    assert conv.kernel(randn64(2, 3, 5, 5), get="nngp").shape == (2, 2)
    with pytest.raises(ValueError, match="expects 3 input features/channels"):
        conv.kernel(randn64(2, 1, 5, 5))
    with pytest.raises(ValueError, match="2 spatial axes"):
        conv.kernel(randn64(2, 3))
    flat_first = ntkit.from_torch(nn.Sequential(nn.Flatten(), nn.Linear(12, 1)))
    assert flat_first.kernel(randn64(2, 3, 2, 2), get="nngp").shape == (2, 2)
    with pytest.raises(ValueError, match="expects 12"):
        flat_first.kernel(randn64(2, 3, 2, 3))
