"""Convolution layer ``Conv``: exact kernel map (CNTK) and the finite ``nn.Module``.

PyTorch layout ``(N, C, *spatial)`` (1-D ``(N, C, L)``, 2-D ``(N, C, H, W)``, ...). With filter
``F`` (``|F|`` taps), strides and padding, the kernel map in NTK parameterization is

    nngp'(P, Q) = W_std^2 / |F| * sum_{s in F} nngp(P + s, Q + s) + b_std^2
    ntk'(P, Q)  = nngp'(P, Q) + W_std^2 / |F| * sum_{s in F} ntk(P + s, Q + s)

(the same shift ``s`` moves both pixels; zero outside the image for zero padding, wrapped for
'CIRCULAR'; ``P``, ``Q`` step by the strides), as in neural-tangents. On the per-pixel diagonal
layout it is the same sum with ``P = Q``. It is evaluated as a fixed stencil of shifted-slice
additions (:mod:`ntkit.layers._stencil`), separable over spatial dimensions.

Cost per layer: ``sum_d (f_d - 1)`` adds per output entry for the NNGP and again for the NTK
(a 3x3 filter: 2 + 2 passes per array; the ``W_std^2 / |F|`` scale, the bias and the NTK's
``+ nngp'`` ride on the last pass); entries are ``n1 n2 P`` (diagonal layout, ``P`` pixels) or
``n1 n2 P^2`` (full layout, needed under pooling / GlobalAvgPool). With numba installed, 1-D/2-D
stride-1 size-preserving zero-padded convs (e.g. 'SAME') run as one fused pass per array
instead (all taps of a 3x3 filter in one vectorized loop: :mod:`ntkit.layers._fused`). The self-covariances of the
examples go through :func:`ntkit.layers._ops.memo_self`, so a tiled evaluation maps each block's
once, not once per tile.

Parameterizations (``fan_in = in_chan * |F|``):

* ``'ntk'`` (default): ``y = W_std / sqrt(fan_in) * conv(x, W) + b_std * b``, ``W, b ~ N(0, 1)``;
* ``'standard'``: ``y = conv(x, W) + b``, ``W ~ N(0, W_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``;
  its NTK depends on the widths: ``ntk' = fan_in * nngp_avg + W_std^2 ntk_avg + [1 if bias]``.

Example::

    >>> from ntkit import layers as nl
    >>> arch = nl.serial(nl.Conv(64, 3, padding='SAME'), nl.Relu(),
    ...                  nl.GlobalAvgPool(), nl.Dense(10))
    >>> k = arch.kernel(torch.randn(4, 3, 8, 8))          # (4, 4) NNGP and NTK
    >>> net = arch.module((3, 8, 8), width=256)           # the finite CNN
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

from .._validation import check_int, check_std
from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._masking import centre_mask, unwrap, wrap
from ._ops import memo_self, set_batch_diag
from . import _stencil as st
from .dense import check_parameterization
from . import _feature_ops as fo

__all__ = ["Conv"]

Sizes = Union[int, Tuple[int, ...]]


def _spatial_kernel(k, who: str) -> Kernel:
    if isinstance(k, tuple):
        raise ValueError(f"{who} received several branches; merge them with FanInSum() or "
                         f"FanInConcat() first")
    if k.n_spatial == 0:
        raise ValueError(f"{who} needs spatial inputs (N, C, *spatial), e.g. images (N, C, H, W); "
                         f"got per-example shape {k.shape1}. Put it before Flatten/"
                         f"GlobalAvgPool, or reshape the data to (N, C, L)")
    return k


class ConvModule(nn.Module):
    """Finite convolution with the initialization and scaling its kernel assumes."""
    jacobian_kind = "conv"   # features(method='jacobian'): per-example gradients of a conv

    def __init__(self, in_chan: int, out_chan: int, filt: Tuple[int, ...],
                 strides: Tuple[int, ...], pads, circular: bool, W_std: float,
                 b_std: Optional[float], parameterization: str, ctx: BuildContext):
        super().__init__()
        if len(filt) > 3:
            raise ValueError(f"finite Conv modules support 1-3 spatial dimensions, got "
                             f"{len(filt)} (the kernel supports any number)")
        g, dt = ctx.generator, ctx.dtype
        self.in_chan, self.out_chan, self.filt, self.strides = in_chan, out_chan, filt, strides
        self.pads, self.circular = pads, circular
        self.W_std, self.b_std, self.parameterization = W_std, b_std, parameterization
        fan_in = in_chan * st.prod(filt)
        dev = ctx.device
        w = torch.randn((out_chan, in_chan) + tuple(filt), generator=g, dtype=dt, device=dev)
        b = None if b_std is None else torch.randn(out_chan, generator=g, dtype=dt, device=dev)
        if parameterization == "standard":
            w = w * (W_std / math.sqrt(fan_in))
            b = None if b is None or b_std is None else b * b_std
            self.w_scale, self.b_scale = 1.0, 1.0
        else:
            self.w_scale, self.b_scale = W_std / math.sqrt(fan_in), (b_std or 0.0)
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)
        self._conv = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[
            len(filt) - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.w_scale if self.w_scale != 1.0 else self.weight
        b = None if self.bias is None else (
            self.bias * self.b_scale if self.b_scale != 1.0 else self.bias)
        x, m = unwrap(x)
        x = st.pad_input(x, self.pads, self.circular)
        y = self._conv(x, w, b, stride=self.strides)
        if m is None:
            return y
        return wrap(y, centre_mask(m, self.filt, self.strides, self.pads, self.circular,
                                   tuple(y.shape[2:])))

    def extra_repr(self) -> str:
        return (f"{self.in_chan} -> {self.out_chan}, filter={self.filt}, strides={self.strides}, "
                f"pads={self.pads}{', circular' if self.circular else ''}, W_std={self.W_std}, "
                f"b_std={self.b_std}, parameterization={self.parameterization!r}")


@frozen_layer
class Conv(Layer):
    """``Conv(out_chan, filter_shape, strides=1, padding='VALID', W_std=1.0, b_std=None,
    parameterization='ntk', padding_mode='zeros')`` over ``(N, C, *spatial)``.

    Args:
      out_chan: output channels of the finite network (the kernel is its infinite-width limit;
        in NTK parameterization it does not depend on ``out_chan``).
      filter_shape: int (same in every spatial dimension) or one int per dimension.
      strides: int or per-dimension ints.
      padding: ``'VALID'`` (default, as in neural-tangents and ``torch.nn.Conv2d``), ``'SAME'``
        (zero padding, output size ``ceil(size / stride)``, extra padding at the end),
        ``'CIRCULAR'`` (periodic, like SAME on a torus), or explicit zero padding as
        ``torch.nn.Conv2d`` takes it (an int, per-dimension ints, or ``(lo, hi)`` pairs).
      W_std, b_std: weight / bias standard deviations (``b_std=None``: no bias).
      parameterization: ``'ntk'`` or ``'standard'`` (see module docstring).
      padding_mode: ``'zeros'`` or ``'circular'`` (wrap the explicit/SAME padding around).
    """
    collapses_mask_channels = True
    out_chan: int
    filter_shape: Sizes
    strides: Sizes = 1
    padding: Union[str, int, tuple] = "VALID"
    W_std: float = 1.0
    b_std: Optional[float] = None
    parameterization: str = "ntk"
    padding_mode: str = "zeros"

    supports_masking = True  # an output is masked when its filter's centre input is (NT)

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.ConvOp(self, ctx), self.out_shape(in_shape)

    def mask_map(self, mask: Any, in_shape: Any) -> Any:
        filt, strides, pads, circ, out_sp = self.geometry(tuple(in_shape[1:]))
        return centre_mask(mask, filt, strides, pads, circ, out_sp)

    def __post_init__(self):
        check_int(self.out_chan, "out_chan")
        object.__setattr__(self, "filter_shape", st.check_sizes(self.filter_shape,
                                                                "filter_shape"))
        object.__setattr__(self, "strides", st.check_sizes(self.strides, "strides"))
        object.__setattr__(self, "padding", st.check_padding(self.padding))
        st.check_mode(self.padding_mode)
        check_std(self.W_std, "W_std")
        if self.b_std is not None:
            check_std(self.b_std, "b_std", allow_zero=True)
        check_parameterization(self.parameterization)
        if isinstance(self.filter_shape, tuple) and isinstance(self.strides, tuple) and \
                len(self.filter_shape) != len(self.strides):
            raise ValueError(f"`strides` {self.strides} and `filter_shape` {self.filter_shape} "
                             f"have different lengths")

    @property
    def has_linear(self) -> bool:
        return True

    def geometry(self, spatial: Tuple[int, ...]) -> Tuple[Any, ...]:
        """``(filter, strides, pads, circular, out_spatial)`` for an input of this spatial shape."""
        ns = len(spatial)
        filt = st.as_tuple(self.filter_shape, ns, "filter_shape")
        strides = st.as_tuple(self.strides, ns, "strides")
        pads, circ = st.resolve(self.padding, self.padding_mode, spatial, filt, strides)
        out = st.out_spatial(spatial, filt, strides, pads, "filter")
        return filt, strides, pads, circ, out

    def out_shape(self, in_shape: Any) -> Any:
        if len(in_shape) < 2:
            raise ValueError(f"Conv needs inputs of shape (C, *spatial), got {tuple(in_shape)}")
        return (self.out_chan,) + self.geometry(tuple(in_shape[1:]))[4]

    def kernel_map(self, k: Kernel) -> Kernel:
        k = _spatial_kernel(k, "Conv")
        filt, strides, pads, circ, out_sp = self.geometry(tuple(k.shape1[1:]))
        stencil = st.conv_diag if k.diagonal_spatial else st.conv_full
        area = st.prod(filt)
        w2, b2 = self.W_std ** 2, (self.b_std or 0.0) ** 2

        def conv(t, batch_ndim, alpha, base=None):  # base + alpha * sum over the filter taps
            return stencil(t, batch_ndim, filt, strides, pads, circ, alpha, base)

        # nngp' = w2/|F| S(nngp) + b2 and ntk' = nngp' + w2/|F| S(ntk): the scale and the
        # additions ride on the stencil's first pass (no separate affine passes).
        nngp = conv(k.nngp, 2, w2 / area, b2)
        ntk = None
        if k.want_ntk:
            if self.parameterization == "ntk":
                ntk = nngp.clone() if k.ntk is None else conv(k.ntk, 2, w2 / area, nngp)
            else:  # ntk' = fan_in * S(nngp)/|F| + w2/|F| S(ntk) [+ 1 with a bias]
                fan = float(k.shape1[0])
                base = conv(k.nngp, 2, fan)  # fan_in * S/|F| with fan_in = C |F|
                if self.b_std is not None:
                    base.add_(1.0)
                ntk = base if k.ntk is None else conv(k.ntk, 2, w2 / area, base)
        key = ("conv", self, tuple(k.shape1), k.diagonal_spatial)
        cov1 = memo_self(key, k.cov1, lambda c: conv(c, 1, w2 / area, b2))
        cov2 = memo_self(key, k.cov2, lambda c: conv(c, 1, w2 / area, b2))
        if k.cov2 is None:  # keep the batch diagonal exact
            set_batch_diag(nngp, cov1)
        shape1 = (self.out_chan,) + out_sp
        shape2 = (self.out_chan,) + tuple(out_sp)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape1=shape1, shape2=shape2,
                         is_gaussian=True)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        if len(in_shape) < 2:
            raise ValueError(f"Conv needs inputs of shape (C, *spatial), got {tuple(in_shape)}")
        out = self.out_chan if (ctx.width is None or not followed) else ctx.width
        filt, strides, pads, circ, out_sp = self.geometry(tuple(in_shape[1:]))
        mod = ConvModule(in_shape[0], out, filt, strides, pads, circ, self.W_std, self.b_std,
                         self.parameterization, ctx)
        return mod, (out,) + out_sp
