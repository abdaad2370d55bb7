"""``from_torch``: the analytic kernel of a PyTorch ``nn.Sequential``.

By default (``parameterization='standard'``) the kernel describes *the network handed in*: its
own widths, PyTorch's parameterization (``y = W x + b``) and PyTorch's default initialization.
Its NTK is the expectation, over that initialization, of the network's empirical NTK
(:func:`ntkit.empirical_ntk`), which fluctuates around it by O(width^-1/2) relative. With
``parameterization='ntk'`` it is instead the infinite-width limit in NTK parameterization: every
hidden width goes to infinity (input and readout widths kept), and the NTK is that of the network
trained with per-layer learning rates ``lr / fan_in``, about ``width`` times smaller than the
PyTorch network's own NTK. The result is an ordinary ntkit architecture: ``arch.kernel(x)`` gives
the NNGP/NTK, ``arch.module(in_shape, width=...)`` builds the finite network with the same layer
structure.

Initialization (what the kernel assumes about the weights). The NNGP depends only on the weight
and bias *variances*, so the defaults reproduce PyTorch's default initialization
(``kaiming_uniform_(a=sqrt(5))``, i.e. ``W ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, variance
``1 / (3 fan_in)``; bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, variance ``1 / (3 fan_in)``):

* ``W_std = 1/sqrt(3)`` for every Linear/Conv (weight variance ``W_std^2 / fan_in``);
* bias, ``'standard'`` (default): ``b_std = 1/sqrt(3 fan_in)`` for every Linear/Conv with a bias,
  at that module's own ``fan_in`` (``in_features``, or ``in_channels * kernel area``): exact
  PyTorch variances. ``'ntk'``: the same for the *first* linear map, whose ``fan_in`` is fixed,
  and ``b_std = 0`` for the later ones, whose ``fan_in`` grows with the hidden width, so
  PyTorch's bias variance ``1/(3 fan_in)`` vanishes in the limit. Pass ``b_std`` to choose one
  value for all layers with a bias (layers without a bias keep none). ``arch.module(width=...)``
  at another width keeps these ``b_std`` values (they are not rescaled to the new ``fan_in``).

The kernels are those of *Gaussian* weights with these variances. Hidden layers of a
uniformly initialized network converge to the same limit (their pre-activations are sums over a
growing width), but the first layer sums over the fixed input dimension, so with PyTorch's
uniform draw its pre-activations are not exactly Gaussian: the kernels of such networks differ
from these by O(excess kurtosis / fan_in) (about 1.2 / fan_in relative; ~4% for a 3x3 conv on 3
channels). Re-draw weights as ``normal_(0, std)`` with the same ``std`` to match exactly.

Parameterization (what the NTK assumes about training):

* ``'standard'`` (default): PyTorch's own parameterization; the NTK grows with the widths and
  ntkit evaluates it at the module's actual widths (``n * E[...]`` terms, see ``Dense``), so it
  is the expected empirical NTK of this very network; the NNGP is the infinite-width one (the
  expected NNGP up to O(1/width)).
* ``'ntk'``: ``W = W_std / sqrt(fan_in) * w``, ``w ~ N(0, 1)``; the NTK has a finite
  infinite-width limit, which this gives. Its value is that of the PyTorch network trained with
  per-layer learning rates ``lr / fan_in`` on the weights (and ``lr * b_std^2`` on biases).
  Use it for width-independent kernels (e.g. ``arch.features``, which supports only this
  parameterization). Earlier ntkit versions made it the default.

LayerNorm affine parameters (``elementwise_affine=True``, initialized to ``gamma=1, beta=0``)
leave the NNGP unchanged and add ``nngp + 1`` (``gamma`` and ``beta`` gradients, per unit) to the
NTK, in either parameterization. This is exact only when a ``Linear`` follows the LayerNorm
(before a nonlinearity ``phi`` the ``gamma`` term would be ``E[u v phi'(u) phi'(v)]``, not
``nngp * E[phi' phi']``), so other placements of an affine LayerNorm raise an error.

Conversion table: ``Linear`` -> ``Dense``; ``Conv1d/2d/3d`` (stride, int/tuple/'same'/'valid'
padding, ``padding_mode`` 'zeros'/'circular', ``groups=1``, ``dilation=1``) -> ``Conv``;
``ReLU``/``LeakyReLU``/``GELU`` -> closed forms; ``Tanh``, ``Sigmoid``, ``SiLU``, ``ELU``,
``CELU``, ``SELU``, ``Softplus``, ``Mish``, ``Softsign``, ``Hardtanh``, ``ReLU6``, tanh-``GELU``
-> ``Elementwise`` (quadrature to ``rtol`` (default 1e-10) chosen from the variances; kinked
functions (``Hardtanh``/``ReLU6``/``ELU(alpha != 1)``) converge slowly and warn once); ``AvgPool1d/2d/3d``
(``ceil_mode=False``, padding counted) -> ``AvgPool``; ``AdaptiveAvgPool*d(1)`` ->
``GlobalAvgPool`` (must be followed by ``Flatten``); ``Flatten()`` -> ``Flatten``;
``LayerNorm(d)`` on features ``(N, d)`` -> ``LayerNorm`` (over channels);
``ConvTranspose1d/2d/3d`` (``groups=1``, ``dilation=1``, ``padding <= kernel_size - 1``) ->
``ConvTranspose`` with explicit pads ``(k-1-p, k-1-p+output_padding)`` (PyTorch initializes its
weight ``(in, out, *k)`` with ``fan_in = out_channels * area``, so the default ``W_std`` is
``sqrt(in_channels / (3 out_channels))`` and the bias std ``1/sqrt(3 out_channels area)``);
``Upsample`` (``UpsamplingNearest2d``) with ``mode`` 'nearest' / 'nearest-exact' /
'linear' / 'bilinear' / 'trilinear' (``align_corners=False``) -> ``ImageResize`` where PyTorch's
sampling is exactly ``jax.image.resize``'s (linear: ``antialias=False``): integer
``scale_factor``, or ``size`` / ``recompute_scale_factor=True`` except for legacy 'nearest'
(``floor(o * in / out)`` differs from the half-pixel rule; use 'nearest-exact');
``Identity`` and dropout in eval mode (or with ``p=0``) are dropped. ``nn.Dropout(p)`` in train
mode (element-wise inverted dropout: keep with probability ``1 - p``, scale kept units by
``1 / (1 - p)``) -> ``Dropout(rate=1 - p, mode='train')`` (ntkit's and neural-tangents' ``rate``
is the KEEP probability); its kernel is that of one forward pass (``kernel(x)``: the batch
diagonal is scaled by ``1 / (1 - p)``; see :class:`~ntkit.layers.Dropout`). Train-mode
``Dropout1d/2d/3d`` (whole channels), ``AlphaDropout`` and ``FeatureAlphaDropout`` have no
ntkit layer and are refused. Anything else raises ``ValueError`` naming
the module class and its position (e.g. ``'features.3'``).

Example::

    >>> net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    >>> arch = ntkit.from_torch(net)       # the kernel of this net: 64 channels, PyTorch init
    >>> k = arch.kernel(torch.randn(8, 3, 16, 16), get='ntk')      # (8, 8)
    >>> k_inf = ntkit.from_torch(net, parameterization='ntk').kernel(
    ...     torch.randn(8, 3, 16, 16), get='ntk')                  # infinite-width NTK limit
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from .activations import Elementwise, Gelu, LeakyRelu, Relu
from .combinators import Serial, serial
from .conv import Conv
from .conv_variants import ConvTranspose, ImageResize
from .dense import Dense, check_parameterization
from .misc import Dropout
from .normalization import LayerNorm
from .pooling import AvgPool, Flatten, GlobalAvgPool

__all__ = ["from_torch"]

_DEFAULT_W_STD = 1.0 / math.sqrt(3.0)


# ---------------------------------------------------------------------------------------------
# Per-unit affine map (LayerNorm's gamma, beta): y = gamma * x + beta, gamma = 1, beta = 0 at init

class PerUnitAffineModule(nn.Module):
    """``y = gamma * x + beta`` over the channel axis 1 (``gamma = 1``, ``beta = 0`` at init)."""

    def __init__(self, chan: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(chan, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(chan, dtype=dtype)) if bias else None

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = x * self.weight.reshape(shape)
        return y if self.bias is None else y + self.bias.reshape(shape)


@frozen_layer
class PerUnitAffine(Layer):
    """Trainable per-channel scale (and shift), initialized to the identity.

    Kernel map: ``nngp`` unchanged; ``ntk' = ntk + nngp + [1 if bias]`` (the gradient of unit
    ``i`` w.r.t. its own ``gamma_i`` is ``x_i``, w.r.t. ``beta_i`` it is 1). The ``gamma`` term is
    unit-specific, so this is exact only when a Dense follows (from_torch enforces it). Cost: one
    add per entry.
    """
    fully_connected = True
    bias: bool = True

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError("PerUnitAffine received several branches; merge them first")
        if not k.want_ntk:
            return k
        assert k.nngp is not None      # the recursion always carries the NNGP
        ntk = k.nngp.clone() if k.ntk is None else k.ntk + k.nngp
        if self.bias:
            ntk.add_(1.0)
        return k.replace(ntk=ntk)

    def build(self, in_shape, ctx: BuildContext, followed: bool):
        return PerUnitAffineModule(in_shape[0], self.bias, ctx.dtype), tuple(in_shape)


# ---------------------------------------------------------------------------------------------
# The input the converted module expects

@frozen_layer
class TorchArchitecture(Serial):
    """A :func:`serial` converted from a torch module, which also checks that the data fits
    that module.

    ``expect_channels``: the feature count the first ``Linear``/``Conv``/``LayerNorm``
    (``in_features``, ``in_channels``, ``normalized_shape``) receives, checked on the
    representation entering layer ``expect_at`` (after any ``Flatten``/pooling before it);
    ``expect_spatial_dims``: its number of spatial axes (0 for ``Linear``). The infinite-width
    architecture itself accepts any width, so without this a ``Linear(8, ...)`` network would
    silently give the kernel of 3-feature data. Same kernels and module as the plain serial.
    """
    expect_channels: Optional[int] = None
    expect_spatial_dims: Optional[int] = None
    expect_at: int = 0
    expect_source: str = ""

    supports_masking = False  # converted torch modules: no mask_constant semantics

    def _check(self, shape) -> None:
        if self.expect_channels is None or not isinstance(shape, tuple) or not shape \
                or not all(isinstance(s, int) for s in shape):
            return
        where = f" ({self.expect_source})" if self.expect_source else ""
        nd = self.expect_spatial_dims
        if nd is not None and len(shape) - 1 != nd:
            want = "(n, d) features" if nd == 0 else f"(n, C, *spatial) inputs with {nd} " \
                                                      f"spatial axes"
            raise ValueError(
                f"the converted torch module expects {want}{where}, but the data reaching it "
                f"has per-example shape {shape}" + (
                    "; flatten it (x.flatten(1)) or add nn.Flatten() to the module" if nd == 0
                    else ""))
        if shape[0] != self.expect_channels:
            raise ValueError(
                f"the converted torch module expects {self.expect_channels} input "
                f"features/channels{where}, but the data reaching it has {shape[0]} "
                f"(per-example shape {shape}); pass data that fits the module")

    def kernel_map(self, k):
        for i, layer in enumerate(self.layers):
            if i == self.expect_at and not isinstance(k, tuple):
                self._check(tuple(k.shape1))
            k = layer.kernel_map(k)
        return k

    def out_shape(self, in_shape):
        for i, layer in enumerate(self.layers):
            if i == self.expect_at:
                self._check(tuple(in_shape))
            in_shape = layer.out_shape(in_shape)
        return in_shape

    def build(self, in_shape, ctx: BuildContext, followed: bool):
        shape = tuple(in_shape)
        for layer in self.layers[:self.expect_at]:
            shape = layer.out_shape(shape)
        self._check(tuple(shape))
        return super().build(in_shape, ctx, followed)


# ---------------------------------------------------------------------------------------------
# Activations

def _named(fn, name: str):
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def _activation(m: Any) -> Optional[Layer]:   # a torch module
    F = nn.functional
    if type(m) is nn.ReLU:
        return Relu()
    if type(m) is nn.LeakyReLU:
        return LeakyRelu(float(m.negative_slope))
    if type(m) is nn.GELU:
        if m.approximate == "none":
            return Gelu()
        return Elementwise(_named(lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"))
    if type(m) is nn.Tanh:
        return Elementwise(torch.tanh)
    if type(m) is nn.Sigmoid:
        return Elementwise(torch.sigmoid)
    if type(m) is nn.SiLU:
        return Elementwise(F.silu)
    if type(m) is nn.Mish:
        return Elementwise(F.mish)
    if type(m) is nn.Softsign:
        return Elementwise(F.softsign)
    if type(m) is nn.SELU:
        return Elementwise(F.selu)
    if type(m) is nn.ELU:
        a = float(m.alpha)
        return Elementwise(_named(lambda x: F.elu(x, a), f"elu_{a:g}"))
    if type(m) is nn.CELU:
        a = float(m.alpha)
        return Elementwise(_named(lambda x: F.celu(x, a), f"celu_{a:g}"))
    if type(m) is nn.Softplus:
        b, t = float(m.beta), float(m.threshold)
        return Elementwise(_named(lambda x: F.softplus(x, b, t), f"softplus_{b:g}"))
    if type(m) in (nn.Hardtanh, nn.ReLU6):
        lo, hi = float(m.min_val), float(m.max_val)
        return Elementwise(_named(lambda x: F.hardtanh(x, lo, hi), f"hardtanh_{lo:g}_{hi:g}"))
    return None


# ---------------------------------------------------------------------------------------------
# Walking the Sequential

_HINTS = {
    "BatchNorm": "batch statistics couple the examples of a batch, so the network has no "
                 "per-example kernel; use LayerNorm, or remove it",
    "MaxPool": "max pooling has no closed-form kernel; use AvgPool2d",
    "MultiheadAttention": "attention layers are not supported",
    "Dropout": "only element-wise nn.Dropout converts in train mode; call module.eval() first",
    "PReLU": "its slope is a trainable parameter; use LeakyReLU",
    "Adaptive": "only output_size=1 (global average pooling) is supported",
}


def _error(m: nn.Module, path: str, why: str = "") -> ValueError:
    name = type(m).__name__
    if not why:
        why = next((h for key, h in _HINTS.items() if key in name),
                   "it has no infinite-width kernel in ntkit")
    return ValueError(f"from_torch: cannot convert {name} at position '{path}': {why}")


def _train_dropout(m: nn.Module, path: str) -> Dropout:
    """Train-mode ``nn.Dropout(p)`` (``0 < p < 1``): torch zeroes each entry with probability
    ``p`` and scales the others by ``1 / (1 - p)``, which is ntkit's (and neural-tangents')
    ``Dropout(rate=1 - p)``, ``rate`` being the keep probability. Other dropout modules are
    refused: their noise is not element-wise i.i.d. inverted dropout."""
    name = type(m).__name__
    if type(m) is not nn.Dropout:
        what = ("drops whole channels (one mask per channel, shared by its positions)"
                if name.startswith("Dropout") and name[-2:] in ("1d", "2d", "3d") else
                "keeps the SELU self-normalization with an affine correction, not inverted "
                "dropout" if "Alpha" in name else "is not torch.nn.Dropout itself")
        raise _error(m, path, f"in train mode it {what}, which has no ntkit layer; call "
                              f"module.eval() (dropout is then the identity), or use "
                              f"nn.Dropout(p) (element-wise), which converts to "
                              f"ntkit.layers.Dropout(rate=1 - p)")
    p = float(m.p)
    if p >= 1.0:
        raise _error(m, path, f"nn.Dropout(p={m.p}) in train mode zeroes every unit (keep "
                              f"probability 0, so the kernel is zero); use p < 1 or call "
                              f"module.eval()")
    return Dropout(1.0 - p, mode="train")


def _leaves(module: nn.Module, path: str) -> Iterator[Tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{path}.{name}" if path else name)
    else:
        yield (path or "<root>"), module


def _sizes(v, n: int) -> Tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _conv(m, path, state, W_std, b_std, param) -> Conv:
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
    if m.groups != 1:
        raise _error(m, path, f"groups={m.groups} (grouped/depthwise convolutions) is not "
                              f"supported; use groups=1")
    if any(d != 1 for d in _sizes(m.dilation, nd)):
        raise _error(m, path, f"dilation={m.dilation} is not supported; use dilation=1")
    if m.padding_mode not in ("zeros", "circular"):
        raise _error(m, path, f"padding_mode={m.padding_mode!r} is not supported; use 'zeros' or "
                              f"'circular'")
    if state["flat"]:
        raise _error(m, path, "a convolution after Flatten/global pooling needs (N, C, *spatial) "
                              "inputs")
    if state["nd"] not in (None, nd):
        raise _error(m, path, f"{nd}-D convolution after {state['nd']}-D layers")
    state["nd"] = nd
    padding: Union[str, Tuple[int, ...]]
    if isinstance(m.padding, str):
        padding = m.padding.upper()
    else:
        pads = _sizes(m.padding, nd)
        padding = "VALID" if not any(pads) else pads
    mode = m.padding_mode
    if padding == "VALID":
        mode = "zeros"
    ks = _sizes(m.kernel_size, nd)
    fan_in = m.in_channels * math.prod(ks)
    return Conv(int(m.out_channels), ks, strides=_sizes(m.stride, nd), padding=padding,
                W_std=W_std, b_std=_bias_std(m, state, fan_in, b_std, param),
                parameterization=param, padding_mode=mode)


_CONV_T = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def _conv_transpose(m, path, state, W_std: Optional[float], b_std, param) -> ConvTranspose:
    """``nn.ConvTranspose{1,2,3}d`` -> ``ConvTranspose`` with explicit pads of the dilated input
    ``(k-1-p, k-1-p+output_padding)`` (the same output, pixel for pixel). ``W_std=None``:
    PyTorch's default init, ``Var(W) = 1/(3 out_channels area)`` (torch's fan_in of the
    ``(in, out, *k)`` weight), i.e. ``W_std = sqrt(in / (3 out))`` against ntkit's ``fan_in = in
    area``."""
    nd = _CONV_T[type(m)]
    if m.groups != 1:
        raise _error(m, path, f"groups={m.groups} is not supported; use groups=1")
    if any(d != 1 for d in _sizes(m.dilation, nd)):
        raise _error(m, path, f"dilation={m.dilation} is not supported; use dilation=1")
    if m.padding_mode != "zeros":
        raise _error(m, path, f"padding_mode={m.padding_mode!r} is not supported; use 'zeros'")
    if state["flat"]:
        raise _error(m, path, "a transposed convolution after Flatten/global pooling needs "
                              "(N, C, *spatial) inputs")
    if state["nd"] not in (None, nd):
        raise _error(m, path, f"{nd}-D convolution after {state['nd']}-D layers")
    state["nd"] = nd
    ks = _sizes(m.kernel_size, nd)
    ps = _sizes(m.padding, nd)
    ops = _sizes(m.output_padding, nd)
    if any(p > k - 1 for p, k in zip(ps, ks)):
        raise _error(m, path, f"padding={m.padding} larger than kernel_size - 1 is not supported "
                              f"(it crops more than the filter adds)")
    pads = tuple((k - 1 - p, k - 1 - p + q) for k, p, q in zip(ks, ps, ops))
    area = math.prod(ks)
    w_std = math.sqrt(m.in_channels / (3.0 * m.out_channels)) if W_std is None else W_std
    return ConvTranspose(int(m.out_channels), ks, strides=_sizes(m.stride, nd), padding=pads,
                         W_std=w_std,
                         b_std=_bias_std(m, state, int(m.out_channels) * area, b_std, param),
                         parameterization=param)


_UP_MODES = {"nearest": "nearest", "nearest-exact": "nearest", "linear": "linear",
             "bilinear": "linear", "trilinear": "linear"}
_UP_ND = {"linear": 1, "bilinear": 2, "trilinear": 3}


def _upsample(m, path, state) -> ImageResize:
    """``nn.Upsample`` -> ``ImageResize`` where torch samples exactly like ``jax.image.resize``:
    half-pixel centers with ratio ``in / out``; linear modes without antialiasing."""
    mode = m.mode
    if mode not in _UP_MODES:
        raise _error(m, path, f"mode={mode!r} has no exact ImageResize equivalent (bicubic uses "
                              f"a different cubic kernel); use 'nearest-exact' or 'bilinear'")
    if m.align_corners:
        raise _error(m, path, "align_corners=True samples differently from jax.image.resize; "
                              "use align_corners=False")
    if state["flat"]:
        raise _error(m, path, "upsampling after Flatten/global pooling needs (N, C, *spatial) "
                              "inputs")
    nd = _UP_ND.get(mode)
    if nd is not None:
        if state["nd"] not in (None, nd):
            raise _error(m, path, f"mode={mode!r} ({nd}-D) after {state['nd']}-D layers")
        state["nd"] = nd
    method = _UP_MODES[mode]
    if m.size is not None:
        if mode == "nearest":
            raise _error(m, path, "mode='nearest' with `size` takes pixel floor(o * in / out), "
                                  "not jax.image.resize's half-pixel floor((o + 0.5) in / out); "
                                  "use mode='nearest-exact'")
        size = m.size if isinstance(m.size, int) else tuple(int(v) for v in m.size)
        return ImageResize(shape=size, method=method, antialias=False)
    sf = m.scale_factor
    sfs = (sf,) if isinstance(sf, (int, float)) else tuple(sf)
    integer = all(float(v).is_integer() and v >= 1 for v in sfs)
    if not integer and not (m.recompute_scale_factor and mode != "nearest"):
        raise _error(m, path, f"scale_factor={sf} is not an integer: torch then samples at "
                              f"o / scale_factor, not at jax.image.resize's o * in / out; use an "
                              f"integer scale_factor, `size`, or recompute_scale_factor=True "
                              f"(with a mode other than legacy 'nearest')")
    return ImageResize(scale_factor=float(sf) if isinstance(sf, (int, float))
                       else tuple(float(v) for v in sfs), method=method, antialias=False)


def _bias_std(m, state, fan_in: int, b_std: Optional[float],
              param: str) -> Optional[float]:
    """PyTorch's default bias std ``1/sqrt(3 fan_in)`` at the module's own ``fan_in`` ('standard':
    the network as given), or its infinite-width limit ('ntk': kept for the first linear map,
    whose ``fan_in`` is fixed, 0 after); an explicit ``b_std`` applies to every bias."""
    first = not state["seen_linear"]
    state["seen_linear"] = True
    if m.bias is None:
        return None
    if b_std is not None:
        return float(b_std)
    return 1.0 / math.sqrt(3.0 * fan_in) if (first or param == "standard") else 0.0


def _avgpool(m, path, state) -> AvgPool:
    nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
    if m.ceil_mode:
        raise _error(m, path, "ceil_mode=True is not supported; use ceil_mode=False")
    if getattr(m, "divisor_override", None) is not None:
        raise _error(m, path, "divisor_override is not supported")
    if state["flat"]:
        raise _error(m, path, "pooling after Flatten/global pooling needs spatial inputs")
    win = _sizes(m.kernel_size, nd)
    stride = _sizes(m.stride if m.stride is not None else m.kernel_size, nd)
    pads = _sizes(m.padding, nd)
    if any(pads) and not m.count_include_pad:
        raise _error(m, path, "count_include_pad=False with padding is not supported (the "
                              "kernel averages zero padding like count_include_pad=True)")
    return AvgPool(win, stride, "VALID" if not any(pads) else pads)


_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d, nn.Upsample, nn.AvgPool1d, nn.AvgPool2d,
              nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
              nn.Flatten, nn.LayerNorm, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid,
              nn.SiLU, nn.Mish, nn.Softsign, nn.SELU, nn.ELU, nn.CELU, nn.Softplus, nn.Hardtanh)


def from_torch(module: nn.Module, *, parameterization: str = "standard",
               W_std: Optional[float] = None, b_std: Optional[float] = None) -> Layer:
    """The analytic kernel of ``module`` (an ``nn.Sequential``, possibly nested).

    Args:
      module: ``nn.Sequential`` of supported layers (see the module docstring), or one such
        layer. Its parameter *values* are ignored: the kernel is that of the random
        initialization (``W_std``, ``b_std``), i.e. of the architecture.
      parameterization: ``'standard'`` (default): PyTorch's parameterization at the module's
        own widths, so ``kernel(x, get='ntk')`` is the expectation of this network's empirical
        NTK at PyTorch's default init (the two differ by O(width^-1/2) relative for one draw).
        ``'ntk'``: the NTK-parameterization infinite-width limit (hidden widths -> infinity;
        its NTK is about ``width`` times smaller than the PyTorch network's).
      W_std: weight standard deviation (``Var(W) = W_std^2 / fan_in``) of every Linear/Conv;
        default ``1/sqrt(3)``, PyTorch's default initialization (for ``ConvTranspose*d``:
        ``sqrt(in_channels / (3 out_channels))``, see the module docstring).
      b_std: bias standard deviation of every Linear/Conv that has a bias; default PyTorch's
        ``1/sqrt(3 fan_in)`` at each module's own ``fan_in`` (``'standard'``), or for the first
        linear map only and 0 (its infinite-width limit) after (``'ntk'``).

    Returns:
      An ntkit :class:`~ntkit.layers.Layer`: a ``serial`` of the converted layers that also
      checks the data fits the module (the first ``Linear``'s ``in_features``, the first
      ``Conv``'s ``in_channels`` and spatial rank), raising ``ValueError`` otherwise.

    Raises:
      ValueError: a module that cannot be converted, naming its class and position, e.g.
        ``"cannot convert BatchNorm2d at position 'features.1': ..."``.

    Example::

        >>> net = nn.Sequential(nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 1))
        >>> from_torch(net).kernel(torch.randn(5, 10), get='ntk').shape
        torch.Size([5, 5])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module (an nn.Sequential), got "
                        f"{type(module).__name__}")
    check_parameterization(parameterization)
    W_std_given = W_std
    if W_std is None:
        W_std = _DEFAULT_W_STD
    if not (isinstance(W_std, (int, float)) and W_std > 0):
        raise ValueError(f"`W_std` must be a positive number or None, got {W_std!r}")
    if b_std is not None and not (isinstance(b_std, (int, float)) and b_std >= 0):
        raise ValueError(f"`b_std` must be a non-negative number or None, got {b_std!r}")
    W_std = float(W_std)
    user_W_std = None if W_std_given is None else W_std

    state: Dict[str, Any] = {"seen_linear": False, "flat": False, "nd": None, "gap": None,
                             "ln": None, "expect": None}
    layers: List[Layer] = []
    for path, leaf in _leaves(module, ""):
        m: Any = leaf           # torch modules' attributes are typed Tensor | Module
        t = type(m)
        if state["gap"] is not None and t not in (nn.Flatten, nn.Identity) \
                and not isinstance(m, nn.modules.dropout._DropoutNd) \
                and _activation(m) is None:
            gp = state["gap"]
            raise _error(m, path, f"the global pooling at '{gp}' leaves (N, C, 1, ...) maps; "
                                  f"put nn.Flatten() right after it")
        if state["ln"] is not None and t is not nn.Linear and t is not nn.Identity \
                and not isinstance(m, nn.modules.dropout._DropoutNd):
            raise _error(m, path, f"the LayerNorm at '{state['ln']}' has trainable "
                                  f"elementwise_affine parameters, whose NTK is exact only when "
                                  f"a Linear follows it; use elementwise_affine=False or put the "
                                  f"Linear right after it")
        if state["expect"] is None and t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                             nn.LayerNorm) + tuple(_CONV_T):
            if t is nn.LayerNorm:  # LayerNorm(d) is converted on (N, d) features only
                chans, nd = int(m.normalized_shape[-1]), 0
            elif t is nn.Linear:  # on (N, d) features (after Flatten if there is one)
                chans, nd = int(m.in_features), 0
            else:
                dims: Dict[Any, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, **_CONV_T}
                chans, nd = int(m.in_channels), dims[t]
            state["expect"] = (chans, nd, len(layers), f"{type(m).__name__} at '{path}'")
        if t is nn.Linear:
            state["ln"] = None
            if state["nd"] is not None and not state["flat"]:
                raise _error(m, path, "Linear on a conv feature map acts on its last axis; add "
                                      "nn.Flatten() (or global pooling) before it")
            state["flat"] = True
            layers.append(Dense(int(m.out_features), W_std,
                                _bias_std(m, state, int(m.in_features), b_std,
                                          parameterization),
                                parameterization))
        elif t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            layers.append(_conv(m, path, state, W_std, b_std, parameterization))
        elif t in _CONV_T:
            layers.append(_conv_transpose(m, path, state, user_W_std, b_std, parameterization))
        elif t in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
            layers.append(_upsample(m, path, state))
        elif t in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
            layers.append(_avgpool(m, path, state))
        elif t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
            out = m.output_size
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(o != 1 for o in outs):
                raise _error(m, path, f"output_size={out!r}: only 1 (global average pooling) "
                                      f"is supported")
            if state["flat"]:
                raise _error(m, path, "global pooling needs spatial inputs (N, C, *spatial)")
            layers.append(GlobalAvgPool())
            state["gap"] = path
        elif t is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise _error(m, path, f"only Flatten(start_dim=1, end_dim=-1) is supported, got "
                                      f"start_dim={m.start_dim}, end_dim={m.end_dim}")
            layers.append(Flatten())
            state["flat"], state["gap"] = True, None
        elif t is nn.LayerNorm:
            if len(m.normalized_shape) != 1 or (state["nd"] is not None and not state["flat"]):
                raise _error(m, path, "only LayerNorm(d) over the features of (N, d) inputs is "
                                      "supported (on conv feature maps torch normalizes the last "
                                      "axes, not the channels)")
            layers.append(LayerNorm(eps=float(m.eps)))
            if m.elementwise_affine:
                layers.append(PerUnitAffine(bias=m.bias is not None))
                state["ln"] = path
        elif t is nn.Identity:
            continue
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            if not m.training or m.p == 0:
                continue    # the identity
            layers.append(_train_dropout(m, path))
        else:
            act = _activation(m)
            if act is None:
                base = next((c for c in _SUPPORTED if isinstance(m, c)), None)
                if base is not None:
                    raise _error(m, path, f"it subclasses (or parametrizes) {base.__name__}, "
                                          f"whose forward may differ; use {base.__name__} itself")
                if list(m.children()) and not isinstance(m, nn.Sequential):
                    raise _error(m, path, "only nn.Sequential containers can be converted (the "
                                          "order in a custom forward() is unknown); rewrite it as "
                                          "an nn.Sequential")
                raise _error(m, path)
            layers.append(act)
    if not layers:
        raise ValueError("from_torch: the module has no layers to convert (only Identity/"
                         "Dropout)")
    if not state["seen_linear"]:
        raise ValueError("from_torch: the module has no Linear/Conv layer, so its NTK is zero; "
                         "convert a network with at least one")
    chans, nd, at, source = state["expect"]
    return TorchArchitecture(serial(*layers).layers, expect_channels=chans,
                             expect_spatial_dims=nd, expect_at=at, expect_source=source)
