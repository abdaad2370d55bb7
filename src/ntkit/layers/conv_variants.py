"""Convolution variants of neural-tangents' stax: ``ConvTranspose``, ``ConvLocal``, ``ImageResize``.

Inputs are ``(N, C, *spatial)`` (PyTorch layout; neural-tangents uses channels-last). Each layer
gives the exact infinite-width NNGP/NTK map and the finite ``nn.Module`` it is the limit of.

* ``ConvTranspose``: transposed convolution with neural-tangents' (``jax.lax.conv_transpose``)
  geometry: the input is dilated by the strides (``s - 1`` zeros between pixels), zero padded by
  ``(lo, hi)`` and correlated with the filter at stride 1. Per spatial dimension, with ``f`` taps,

      K'(P, Q) = W_std^2 / f * sum_{t < f} K((P + t - lo) / s, (Q + t - lo) / s) + b_std^2

  where terms whose pixel is not an integer inside the input are zero (so ``K'(P, Q) = b^2``
  unless ``P = Q mod s``). Output size ``N s + max(f - s, 0)`` ('VALID'), ``N s`` ('SAME',
  'CIRCULAR': the 'VALID' output wrapped around onto ``N s`` pixels).
* ``ConvLocal``: a locally connected layer (unshared weights and biases per output pixel):
  different output pixels are independent, so ``K'(P, Q) = 0`` for ``P != Q`` and the pixel
  diagonal is exactly ``Conv``'s. Its input needs only the per-pixel diagonal.
* ``ImageResize``: ``jax.image.resize`` of the spatial axes, ``'linear'`` (triangle filter,
  antialiased when downsampling if ``antialias``) or ``'nearest'`` (half-pixel centers). Linear:
  ``y = M x`` per spatial axis, so ``K' = M K M^T`` on both pixel axes (needs pixel pairs);
  nearest: ``K'(P, Q) = K(idx(P), idx(Q))`` (works on either layout).

Cost: ``ConvTranspose`` is a stride-1 conv stencil (:mod:`ntkit.layers._stencil`) on the
stride-dilated covariance, ``sum_d (f_d - 1)`` adds per output entry; ``ConvLocal`` is a conv
stencil on the per-pixel diagonal (``n1 n2 P`` entries, whatever the layout); linear
``ImageResize`` is one small matrix product per pixel axis. All go through the same stencil
functions as ``Conv``, so the fused numba stencil is used where it applies (stride-1,
size-keeping zero padding) and the torch path otherwise.

Example::

    >>> from ntkit import layers as nl
    >>> arch = nl.serial(nl.Conv(64, 3, strides=2, padding='SAME'), nl.Relu(),
    ...                  nl.ConvTranspose(64, 3, strides=2, padding='SAME'), nl.Relu(),
    ...                  nl.ImageResize((16, 16), 'linear'), nl.ConvLocal(64, 3), nl.Relu(),
    ...                  nl.GlobalAvgPool(), nl.Dense(1))
    >>> k = arch.kernel(torch.randn(4, 3, 8, 8))
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn

from .._validation import check_int, check_std
from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._ops import memo_self, set_batch_diag
from . import _stencil as st
from ._stencil import fold as fold
from .conv import Conv, Sizes, _spatial_kernel
from .dense import check_parameterization
from . import _feature_ops as fo

__all__ = ["ConvTranspose", "ConvLocal", "ImageResize"]

Pads = Tuple[Tuple[int, int], ...]


def _check_common(layer, strides_default=1):
    check_int(layer.out_chan, "out_chan")
    object.__setattr__(layer, "filter_shape", st.check_sizes(layer.filter_shape, "filter_shape"))
    strides = strides_default if layer.strides is None else layer.strides
    object.__setattr__(layer, "strides", st.check_sizes(strides, "strides"))
    check_std(layer.W_std, "W_std")
    if layer.b_std is not None:
        check_std(layer.b_std, "b_std", allow_zero=True)
    check_parameterization(layer.parameterization)
    if isinstance(layer.filter_shape, tuple) and isinstance(layer.strides, tuple) and \
            len(layer.filter_shape) != len(layer.strides):
        raise ValueError(f"`strides` {layer.strides} and `filter_shape` {layer.filter_shape} "
                         f"have different lengths")


def _need_spatial_shape(in_shape, who: str) -> None:
    if len(in_shape) < 2:
        raise ValueError(f"{who} needs inputs of shape (C, *spatial), got {tuple(in_shape)}")


def _linear_kernel_map(layer, k: Kernel, lin, key, out_sp) -> Kernel:
    """The affine-layer recursion shared by the conv variants, given the linear part ``lin(t,
    batch_ndim, alpha, base) = base + alpha * sum_taps(t)`` (``sum_taps`` the un-normalized
    tap sum, so ``alpha = W_std^2 / |F|`` gives the layer's covariance map):

    ``nngp' = w2/|F| S(nngp) + b2``; NTK parameterization ``ntk' = nngp' + w2/|F| S(ntk)``;
    standard ``ntk' = C S(nngp) + w2/|F| S(ntk) [+ 1 with a bias]`` (``fan_in / |F| = C``)."""
    area = st.prod(layer.geometry(tuple(k.shape1[1:]))[0])
    w2, b2 = layer.W_std ** 2, (layer.b_std or 0.0) ** 2
    nngp = lin(k.nngp, 2, w2 / area, b2)
    ntk = None
    if k.want_ntk:
        if layer.parameterization == "ntk":
            ntk = nngp.clone() if k.ntk is None else lin(k.ntk, 2, w2 / area, nngp)
        else:
            base = lin(k.nngp, 2, float(k.shape1[0]), 1.0 if layer.b_std is not None else None)
            ntk = base if k.ntk is None else lin(k.ntk, 2, w2 / area, base)
    cov1 = memo_self(key, k.cov1, lambda c: lin(c, 1, w2 / area, b2))
    cov2 = memo_self(key, k.cov2, lambda c: lin(c, 1, w2 / area, b2))
    if k.cov2 is None:
        set_batch_diag(nngp, cov1)
    shape = (layer.out_chan,) + tuple(out_sp)
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape1=shape, shape2=shape,
                     is_gaussian=True)


def _scales(W_std, b_std, parameterization, fan_in, w, b):
    """Apply the parameterization to freshly drawn ``N(0, 1)`` weights; returns
    ``(w, b, w_scale, b_scale)``."""
    if parameterization == "standard":
        return (w * (W_std / math.sqrt(fan_in)), None if b is None else b * b_std, 1.0, 1.0)
    return w, b, W_std / math.sqrt(fan_in), (b_std or 0.0)


# ---------------------------------------------------------------------------------------------
# ConvTranspose

def _check_transpose_padding(padding):
    if isinstance(padding, str):
        if padding.upper() not in st.PADDINGS:
            raise ValueError(f"`padding` must be one of {st.PADDINGS} or explicit (lo, hi) pairs, "
                             f"one per spatial dimension, got {padding!r}")
        return padding.upper()
    bad = ValueError(
        f"`padding` of ConvTranspose must be 'VALID', 'SAME', 'CIRCULAR' or explicit (lo, hi) "
        f"pairs of non-negative ints, one per spatial dimension (the zero padding of the "
        f"stride-dilated input, as jax.lax.conv_transpose takes it; torch's "
        f"ConvTranspose2d(padding=p, output_padding=q) is ((k-1-p, k-1-p+q), ...)), got "
        f"{padding!r}")
    try:
        items = tuple(padding)
    except TypeError:
        raise bad from None
    out = []
    for it in items:
        if not (isinstance(it, (tuple, list)) and len(it) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in it)):
            raise bad
        out.append((int(it[0]), int(it[1])))
    if not out:
        raise bad
    return tuple(out)


def transpose_pads(n: int, f: int, s: int, padding) -> Tuple[int, int]:
    """``(lo, hi)`` padding of the dilated input for 'VALID' / 'SAME' (``jax.lax``'s rule)."""
    if padding == "SAME":
        total = f + s - 2
        lo = f - 1 if s > f - 1 else -(-total // 2)
        return lo, total - lo
    return f - 1, f + s - 2 + max(f - s, 0) - (f - 1)  # VALID (and CIRCULAR before wrapping)


def dilate(t: torch.Tensor, axes_strides) -> torch.Tensor:
    """Insert ``s - 1`` zeros between consecutive entries along each ``(axis, s)``."""
    axes_strides = [(a, s) for a, s in axes_strides if s > 1]
    if not axes_strides:
        return t
    shape = list(t.shape)
    idx = [slice(None)] * t.ndim
    for a, s in axes_strides:
        shape[a] = (shape[a] - 1) * s + 1
        idx[a] = slice(None, None, s)
    out = t.new_zeros(shape)
    out[tuple(idx)] = t
    return out


class ConvTransposeModule(nn.Module):
    """Finite transposed convolution with neural-tangents' geometry and the initialization its
    kernel assumes (weight ``(in_chan, out_chan, *filter)``, as ``torch.nn.ConvTranspose2d``)."""

    def __init__(self, in_chan, out_chan, filt, strides, pads, circular, out_sp, W_std, b_std,
                 parameterization, ctx: BuildContext):
        super().__init__()
        if len(filt) > 3:
            raise ValueError(f"finite ConvTranspose modules support 1-3 spatial dimensions, got "
                             f"{len(filt)} (the kernel supports any number)")
        g, dt = ctx.generator, ctx.dtype
        self.in_chan, self.out_chan, self.filt, self.strides = in_chan, out_chan, filt, strides
        self.pads, self.circular, self.out_sp = pads, circular, tuple(out_sp)
        self.W_std, self.b_std, self.parameterization = W_std, b_std, parameterization
        w = torch.randn((in_chan, out_chan) + tuple(filt), generator=g, dtype=dt,
                        device=ctx.device)
        b = None if b_std is None else torch.randn(out_chan, generator=g, dtype=dt,
                                                    device=ctx.device)
        w, b, self.w_scale, self.b_scale = _scales(W_std, b_std, parameterization,
                                                   in_chan * st.prod(filt), w, b)
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)
        self._conv = (nn.functional.conv_transpose1d, nn.functional.conv_transpose2d,
                      nn.functional.conv_transpose3d)[len(filt) - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.w_scale if self.w_scale != 1.0 else self.weight
        y = self._conv(x, w, stride=self.strides)  # pads (f - 1, f - 1) of the dilated input
        crop = []
        for f, (lo, hi) in zip(reversed(self.filt), reversed(self.pads)):
            crop += [lo - (f - 1), hi - (f - 1)]  # negative: crop, positive: zeros
        if any(crop):
            y = nn.functional.pad(y, crop)
        if self.circular:
            for d, (n, (lo, hi)) in enumerate(zip(self.out_sp, self.pads)):
                y = fold(y, 2 + d, n, (y.shape[2 + d] - n) // 2)
        if self.bias is not None:
            b = self.bias * self.b_scale if self.b_scale != 1.0 else self.bias
            y = y + b.reshape((1, -1) + (1,) * len(self.filt))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_chan} -> {self.out_chan}, filter={self.filt}, strides={self.strides}, "
                f"pads={self.pads}{', circular' if self.circular else ''}, W_std={self.W_std}, "
                f"b_std={self.b_std}, parameterization={self.parameterization!r}")


@frozen_layer
class ConvTranspose(Layer):
    """``ConvTranspose(out_chan, filter_shape, strides=1, padding='VALID', W_std=1.0,
    b_std=None, parameterization='ntk')``: transposed convolution over ``(N, C, *spatial)``,
    neural-tangents' ``stax.ConvTranspose`` (``jax.lax.conv_transpose`` geometry).

    Args:
      out_chan: output channels of the finite network.
      filter_shape, strides: an int (every spatial dimension) or one int per dimension;
        ``strides=None`` means 1.
      padding: ``'VALID'`` (output ``N s + max(f - s, 0)``), ``'SAME'`` (output ``N s``),
        ``'CIRCULAR'`` (the 'VALID' output wrapped around onto ``N s`` pixels, as
        neural-tangents), or explicit ``((lo, hi), ...)``: the zero padding of the
        stride-dilated input (output ``(N - 1) s + 1 + lo + hi - f + 1``).
        ``torch.nn.ConvTranspose2d(padding=p, output_padding=q)`` is ``((f-1-p, f-1-p+q), ...)``.
      W_std, b_std, parameterization: as :class:`~ntkit.layers.Conv` (``fan_in = in_chan *
        |F|``, the filter taps, as neural-tangents; ``b_std=None``: no bias).

    The kernel equals ``Conv``'s when ``strides = 1`` and the padding is mirrored (the filter
    is flipped, which changes nothing in distribution). Example::

        >>> nl.serial(nl.ConvTranspose(8, 3, strides=2, padding='SAME'), nl.Flatten()
        ...           ).kernel(torch.randn(2, 3, 4, 4)).nngp.shape
        torch.Size([2, 2])
    """
    out_chan: int
    filter_shape: Sizes
    strides: Optional[Sizes] = 1
    padding: Union[str, tuple] = "VALID"
    W_std: float = 1.0
    b_std: Optional[float] = None
    parameterization: str = "ntk"

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.ConvTransposeOp(self, ctx), self.out_shape(in_shape)

    def __post_init__(self):
        _check_common(self)
        object.__setattr__(self, "padding", _check_transpose_padding(self.padding))

    @property
    def has_linear(self) -> bool:
        return True

    def geometry(self, spatial: Tuple[int, ...]) -> Tuple[Any, ...]:
        """``(filter, strides, pads, circular, out_spatial)``; ``pads`` pad the dilated input."""
        ns = len(spatial)
        filt = st.as_tuple(self.filter_shape, ns, "filter_shape")
        strides = st.as_tuple(self.strides, ns, "strides")
        circ = self.padding == "CIRCULAR"
        if isinstance(self.padding, str):
            pads = tuple(transpose_pads(n, f, s, self.padding)
                         for n, f, s in zip(spatial, filt, strides))
        else:
            pads = self.padding
            if len(pads) != ns:
                raise ValueError(f"`padding` has {len(pads)} (lo, hi) pairs but the input has "
                                 f"{ns} spatial dimension(s)")
        out = []
        for d, (n, f, s, (lo, hi)) in enumerate(zip(spatial, filt, strides, pads)):
            m = (n - 1) * s + 1 + lo + hi - f + 1
            if m < 1:
                raise ValueError(f"ConvTranspose: a filter of size {f} does not fit spatial "
                                 f"dimension {d} ({n} pixels dilated to {(n - 1) * s + 1}, "
                                 f"padding {lo}+{hi}); pad more or use a smaller filter")
            out.append(n * s if circ else m)
        return filt, strides, tuple(pads), circ, tuple(out)

    def out_shape(self, in_shape: Any) -> Any:
        _need_spatial_shape(in_shape, "ConvTranspose")
        return (self.out_chan,) + self.geometry(tuple(in_shape[1:]))[4]

    def kernel_map(self, k: Kernel) -> Kernel:
        k = _spatial_kernel(k, "ConvTranspose")
        filt, strides, pads, circ, out_sp = self.geometry(tuple(k.shape1[1:]))
        ns, diag = len(filt), k.diagonal_spatial
        ones = (1,) * ns
        stencil = st.conv_diag if diag else st.conv_full

        def lin(t, batch_ndim, alpha, base=None):
            axes = [(batch_ndim + d, s) for d, s in enumerate(strides)]
            if not diag:
                axes += [(batch_ndim + ns + d, s) for d, s in enumerate(strides)]
            t = dilate(t, axes)
            if not circ:
                return stencil(t, batch_ndim, filt, ones, pads, False, alpha, base)
            t = stencil(t, batch_ndim, filt, ones, pads, False, alpha)
            for d, m in enumerate(out_sp):
                for a in ((batch_ndim + d,) if diag else (batch_ndim + d, batch_ndim + ns + d)):
                    t = fold(t, a, m, (t.shape[a] - m) // 2)
            if base is not None and not (isinstance(base, float) and base == 0.0):
                t = t.add_(base)
            return t

        key = ("conv_transpose", self, tuple(k.shape1), diag)
        return _linear_kernel_map(self, k, lin, key, out_sp)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        _need_spatial_shape(in_shape, "ConvTranspose")
        out = self.out_chan if (ctx.width is None or not followed) else ctx.width
        filt, strides, pads, circ, out_sp = self.geometry(tuple(in_shape[1:]))
        mod = ConvTransposeModule(in_shape[0], out, filt, strides, pads, circ, out_sp,
                                  self.W_std, self.b_std, self.parameterization, ctx)
        return mod, (out,) + out_sp


# ---------------------------------------------------------------------------------------------
# ConvLocal

def pixel_diagonal(t: torch.Tensor, batch_ndim: int, ns: int) -> torch.Tensor:
    """``t[..., P, P]`` of a full-layout ``(*batch, *S, *S)`` array, as ``(*batch, *S)``."""
    batch, sp = t.shape[:batch_ndim], t.shape[batch_ndim:batch_ndim + ns]
    p = st.prod(sp)
    return t.reshape(tuple(batch) + (p, p)).diagonal(dim1=-2, dim2=-1).reshape(
        tuple(batch) + tuple(sp))


def embed_diagonal(d: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """The full-layout array with pixel diagonal ``d`` (``(*batch, *S)``) and zeros elsewhere."""
    batch, sp = d.shape[:batch_ndim], d.shape[batch_ndim:]
    p = st.prod(sp)
    out = d.new_zeros(tuple(batch) + (p, p))
    out.diagonal(dim1=-2, dim2=-1).copy_(d.reshape(tuple(batch) + (p,)))
    return out.reshape(tuple(batch) + tuple(sp) + tuple(sp))


class ConvLocalModule(nn.Module):
    """Finite locally connected layer: a separate filter (and bias) at every output pixel,
    weight ``(out_chan, in_chan, *out_spatial, *filter)``, bias ``(out_chan, *out_spatial)``."""

    def __init__(self, in_chan, out_chan, filt, strides, pads, circular, out_sp, W_std, b_std,
                 parameterization, ctx: BuildContext):
        super().__init__()
        g, dt = ctx.generator, ctx.dtype
        self.in_chan, self.out_chan, self.filt, self.strides = in_chan, out_chan, filt, strides
        self.pads, self.circular, self.out_sp = pads, circular, tuple(out_sp)
        self.W_std, self.b_std, self.parameterization = W_std, b_std, parameterization
        w = torch.randn((out_chan, in_chan) + self.out_sp + tuple(filt), generator=g, dtype=dt,
                        device=ctx.device)
        b = None if b_std is None else torch.randn((out_chan,) + self.out_sp, generator=g,
                                                   dtype=dt, device=ctx.device)
        w, b, self.w_scale, self.b_scale = _scales(W_std, b_std, parameterization,
                                                   in_chan * st.prod(filt), w, b)
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ns = len(self.filt)
        x = st.pad_input(x, self.pads, self.circular)
        for d in range(ns):  # (N, C, *out, *filter) patches
            x = x.unfold(2 + d, self.filt[d], self.strides[d])
        n, c = x.shape[:2]
        p, f = st.prod(self.out_sp), st.prod(self.filt)
        w = self.weight * self.w_scale if self.w_scale != 1.0 else self.weight
        y = torch.einsum("ncpf,ocpf->nop", x.reshape(n, c, p, f),
                         w.reshape(self.out_chan, c, p, f))
        y = y.reshape((n, self.out_chan) + self.out_sp)
        if self.bias is not None:
            y = y + (self.bias * self.b_scale if self.b_scale != 1.0 else self.bias)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_chan} -> {self.out_chan}, filter={self.filt}, strides={self.strides}, "
                f"pads={self.pads}{', circular' if self.circular else ''}, out={self.out_sp}, "
                f"W_std={self.W_std}, b_std={self.b_std}, "
                f"parameterization={self.parameterization!r}")


@frozen_layer
class ConvLocal(Layer):
    """``ConvLocal(out_chan, filter_shape, strides=1, padding='VALID', W_std=1.0, b_std=None,
    parameterization='ntk', padding_mode='zeros')``: locally connected layer (a convolution
    whose filter and bias differ at every output pixel), neural-tangents' ``stax.ConvLocal``.

    Arguments as :class:`~ntkit.layers.Conv` (same geometry and output shape; ``strides=None``
    means 1). Kernel: the per-pixel diagonal of ``Conv``'s; pixel pairs ``P != Q`` are
    uncorrelated (independent weights), so under pooling or ``GlobalAvgPool`` it differs from
    ``Conv``. Only the per-pixel diagonal of the input is used. Example::

        >>> nl.serial(nl.ConvLocal(8, 3, padding='SAME'), nl.Relu(), nl.GlobalAvgPool(),
        ...           nl.Dense(1)).kernel(torch.randn(2, 3, 5, 5)).ntk.shape
        torch.Size([2, 2])
    """
    out_chan: int
    filter_shape: Sizes
    strides: Optional[Sizes] = 1
    padding: Union[str, int, tuple] = "VALID"
    W_std: float = 1.0
    b_std: Optional[float] = None
    parameterization: str = "ntk"
    padding_mode: str = "zeros"

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.ConvLocalOp(self, ctx), self.out_shape(in_shape)

    def __post_init__(self):
        _check_common(self)
        object.__setattr__(self, "padding", st.check_padding(self.padding))
        st.check_mode(self.padding_mode)

    @property
    def has_linear(self) -> bool:
        return True

    # ``(filter, strides, pads, circular, out_spatial)``: the same geometry as Conv's
    # (cast: mypy would bind Conv.geometry's `self: Conv` to a ConvLocal; it reads only the
    # fields both classes declare)
    geometry = cast(Callable[[Any, Tuple[int, ...]], Tuple[Any, ...]], Conv.geometry)

    def out_shape(self, in_shape: Any) -> Any:
        _need_spatial_shape(in_shape, "ConvLocal")
        return (self.out_chan,) + self.geometry(tuple(in_shape[1:]))[4]

    def kernel_map(self, k: Kernel) -> Kernel:
        k = _spatial_kernel(k, "ConvLocal")
        filt, strides, pads, circ, out_sp = self.geometry(tuple(k.shape1[1:]))
        ns, diag = len(filt), k.diagonal_spatial

        def lin(t, batch_ndim, alpha, base=None):
            if diag:
                return st.conv_diag(t, batch_ndim, filt, strides, pads, circ, alpha, base)
            if torch.is_tensor(base):  # an earlier output of lin: take its pixel diagonal
                base = pixel_diagonal(base, batch_ndim, ns)
            out = st.conv_diag(pixel_diagonal(t, batch_ndim, ns), batch_ndim, filt, strides,
                               pads, circ, alpha, base)
            return embed_diagonal(out, batch_ndim)

        key = ("conv_local", self, tuple(k.shape1), diag)
        return _linear_kernel_map(self, k, lin, key, out_sp)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        _need_spatial_shape(in_shape, "ConvLocal")
        out = self.out_chan if (ctx.width is None or not followed) else ctx.width
        filt, strides, pads, circ, out_sp = self.geometry(tuple(in_shape[1:]))
        mod = ConvLocalModule(in_shape[0], out, filt, strides, pads, circ, out_sp, self.W_std,
                              self.b_std, self.parameterization, ctx)
        return mod, (out,) + out_sp


# ---------------------------------------------------------------------------------------------
# ImageResize

_LINEAR = ("linear", "bilinear", "trilinear", "triangle")


def resize_matrix(n_in: int, n_out: int, antialias: bool, device=None) -> torch.Tensor:
    """``(n_out, n_in)`` float64 matrix of ``jax.image.resize(method='linear')`` along one axis
    (``compute_weight_mat``: triangle filter at half-pixel sample points ``(o + 0.5) n_in /
    n_out - 0.5``, widened by ``n_in / n_out`` when downsampling with ``antialias``, columns
    renormalized to sum 1 inside the image). Made on ``device`` (default: the CPU)."""
    scale = n_out / n_in
    inv_scale = 1.0 / scale
    kernel_scale = max(inv_scale, 1.0) if antialias else 1.0
    dt = torch.float64
    device = torch.device("cpu") if device is None else device
    sample_f = (torch.arange(n_out, dtype=dt, device=device) + 0.5) * inv_scale - 0.5
    x = (sample_f[None, :] - torch.arange(n_in, dtype=dt, device=device)[:, None]).abs() \
        / kernel_scale
    w = (1 - x.abs()).clamp_min(0.0)
    total = w.sum(0, keepdim=True)
    w = torch.where(total.abs() > 1000.0 * float(torch.finfo(torch.float32).eps),
                    w / torch.where(total != 0, total, torch.ones_like(total)),
                    torch.zeros_like(w))
    inside = (sample_f >= -0.5) & (sample_f <= n_in - 0.5)
    return torch.where(inside[None, :], w, torch.zeros_like(w)).T.contiguous()


def nearest_index(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """``floor((o + 0.5) n_in / n_out)``: ``jax.image.resize(method='nearest')``'s source
    pixels (computed exactly in integers; JAX rounds in float32, identical while
    ``n_in * n_out < 8e6``)."""
    device = torch.device("cpu") if device is None else device
    return (torch.arange(n_out, device=device) * 2 + 1) * n_in // (2 * n_out)


def _apply_axis(t: torch.Tensor, axis: int, op) -> torch.Tensor:
    """Apply a per-axis resize (``op``: index tensor or ``(out, in)`` matrix) along ``axis``."""
    if op.dtype == torch.long:
        return t.index_select(axis, op.to(t.device))
    m = op.to(dtype=t.dtype, device=t.device)
    return torch.tensordot(t, m, dims=([axis], [1])).movedim(-1, axis)


class ImageResizeModule(nn.Module):
    """Finite image resize (no parameters): the same per-axis maps as the kernel."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops  # per spatial dim: None (unchanged), index or matrix

    def forward(self, x):
        for d, op in enumerate(self.ops):
            if op is not None:
                x = _apply_axis(x, 2 + d, op)
        return x


@frozen_layer
class ImageResize(Layer):
    """``ImageResize(shape=None, method='linear', antialias=True, scale_factor=None)``: resize
    the spatial axes of ``(N, C, *spatial)`` like ``jax.image.resize`` (neural-tangents'
    ``stax.ImageResize``).

    Args:
      shape: output spatial sizes, an int (every dimension) or one per spatial dimension;
        ``-1`` keeps a dimension. neural-tangents' NHWC ``(-1, H', W', -1)`` is ``(H', W')``
        here (the batch and channel axes cannot be resized).
      method: ``'linear'`` (also ``'bilinear'``, ``'trilinear'``, ``'triangle'``) or
        ``'nearest'`` (half-pixel centers: ``src = floor((o + 0.5) n_in / n_out)``, like
        ``torch`` ``'nearest-exact'``).
      antialias: linear only: widen the triangle filter by ``n_in / n_out`` when downsampling
        (no effect when upsampling). ``torch.nn.functional.interpolate(mode='bilinear',
        align_corners=False)`` equals ``antialias=False`` (and its ``antialias=True``, this).
      scale_factor: instead of ``shape``: output size ``floor(n * scale_factor)`` per dimension
        (a number or one per dimension; the resize then uses ``n_in / n_out``, like torch's
        ``recompute_scale_factor=True``).

    Kernel: linear ``K' = M K M^T`` on both pixel axes (needs the pixel-pair layout), nearest
    ``K'(P, Q) = K(idx(P), idx(Q))``. NTK parameterization-free (no parameters). Example::

        >>> nl.serial(nl.Conv(8, 3), nl.Relu(), nl.ImageResize((6, 6)), nl.GlobalAvgPool(),
        ...           nl.Dense(1)).kernel(torch.randn(2, 3, 5, 5)).nngp.shape
        torch.Size([2, 2])
    """
    shape: Optional[Union[int, tuple]] = None
    method: str = "linear"
    antialias: bool = True
    scale_factor: Optional[Union[float, tuple]] = None

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        mod, _ = self.build(in_shape, cast(Any, None), False)   # parameter-free linear module
        return fo.ModuleLinearOp(mod, type(self).__name__), self.out_shape(in_shape)

    def __post_init__(self):
        if (self.shape is None) == (self.scale_factor is None):
            raise ValueError("ImageResize needs exactly one of `shape` (output spatial sizes) "
                             "and `scale_factor`")
        if self.shape is not None:
            sh = (self.shape,) if isinstance(self.shape, int) else self.shape
            try:
                sh = tuple(sh)
            except TypeError:
                sh = None
            if not sh or not all(isinstance(s, int) and not isinstance(s, bool)
                                 and (s >= 1 or s == -1) for s in sh):
                raise ValueError(f"`shape` must be positive output sizes (an int or one per "
                                 f"spatial dimension, -1 keeps a dimension), got "
                                 f"{self.shape!r}")
            object.__setattr__(self, "shape", self.shape if isinstance(self.shape, int) else sh)
        else:
            sf = self.scale_factor
            sfs = (sf,) if isinstance(sf, (int, float)) else sf
            try:
                sfs = tuple(sfs)
            except TypeError:
                sfs = None
            if not sfs or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and math.isfinite(v) and v > 0 for v in sfs):
                raise ValueError(f"`scale_factor` must be a positive number or one per spatial "
                                 f"dimension, got {sf!r}")
            object.__setattr__(self, "scale_factor", float(sf) if isinstance(sf, (int, float))
                               else tuple(float(v) for v in sfs))
        if not isinstance(self.method, str) or self.method.lower() not in _LINEAR + ("nearest",):
            raise ValueError(f"`method` must be 'linear' (or 'bilinear'/'trilinear'/'triangle') "
                             f"or 'nearest', got {self.method!r}; other jax.image.resize "
                             f"methods have no kernel in neural-tangents either")
        object.__setattr__(self, "method",
                           "nearest" if self.method.lower() == "nearest" else "linear")
        if not isinstance(self.antialias, bool):
            raise TypeError(f"`antialias` must be True or False, got {self.antialias!r}")

    def out_spatial(self, spatial: Tuple[int, ...]) -> Tuple[int, ...]:
        ns = len(spatial)
        if self.shape is not None:
            sh = st.as_tuple(self.shape, ns, "shape")
            return tuple(n if s == -1 else s for n, s in zip(spatial, sh))
        sf = (self.scale_factor,) * ns if isinstance(self.scale_factor, float) else \
            self.scale_factor
        assert sf is not None  # __post_init__ requires `shape` or `scale_factor`
        if len(sf) != ns:
            raise ValueError(f"`scale_factor` has {len(sf)} entries but the input has {ns} "
                             f"spatial dimension(s)")
        out = tuple(int(math.floor(n * f)) for n, f in zip(spatial, sf))
        if any(o < 1 for o in out):
            raise ValueError(f"`scale_factor` {self.scale_factor} leaves no pixels of the input "
                             f"spatial shape {tuple(spatial)}")
        return out

    def _ops(self, spatial, device=None):
        out = self.out_spatial(spatial)
        ops = []
        for n, m in zip(spatial, out):
            if n == m:
                ops.append(None)
            elif self.method == "nearest":
                ops.append(nearest_index(n, m, device))
            else:
                ops.append(resize_matrix(n, m, self.antialias, device))
        return ops, out

    def _resizes(self) -> bool:
        """Whether some spatial size may change (``shape`` not all ``-1``)."""
        if self.shape is None:
            return True
        return any(s != -1 for s in ((self.shape,) if isinstance(self.shape, int)
                                     else self.shape))

    def needs_full_spatial(self, above: bool) -> bool:
        # linear interpolation mixes pixels: the diagonal of M K M^T needs all pixel pairs
        return above or (self.method == "linear" and self._resizes())

    def out_shape(self, in_shape: Any) -> Any:
        _need_spatial_shape(in_shape, "ImageResize")
        return (in_shape[0],) + self.out_spatial(tuple(in_shape[1:]))

    def kernel_map(self, k: Kernel) -> Kernel:
        k = _spatial_kernel(k, "ImageResize")
        assert k.cov1 is not None  # the recursion always carries the x1 self-covariance
        ops, out = self._ops(tuple(k.shape1[1:]), k.cov1.device)  # made where the kernel is
        ns, diag = len(ops), k.diagonal_spatial
        if diag and any(op is not None and op.dtype != torch.long for op in ops):
            raise ValueError("ImageResize(method='linear') needs pixel-pair covariances but "
                             "received the per-pixel (diagonal) layout; evaluate the "
                             "architecture with arch.kernel(), which chooses the layout")

        def rs(t, batch_ndim):
            if t is None:
                return None
            for d, op in enumerate(ops):
                if op is not None:
                    for a in ((batch_ndim + d,) if diag else (batch_ndim + d,
                                                                batch_ndim + ns + d)):
                        t = _apply_axis(t, a, op)
            return t.contiguous()

        key = ("image_resize", self, tuple(k.shape1), diag)
        nngp = rs(k.nngp, 2)
        cov1 = memo_self(key, k.cov1, lambda c: rs(c, 1))
        cov2 = memo_self(key, k.cov2, lambda c: rs(c, 1))
        if k.cov2 is None:
            set_batch_diag(nngp, cov1)
        return k.replace(nngp=nngp, ntk=rs(k.ntk, 2), cov1=cov1, cov2=cov2,
                         shape1=(k.shape1[0],) + out, shape2=(k.shape2[0],) + out)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        _need_spatial_shape(in_shape, "ImageResize")
        ops, out = self._ops(tuple(in_shape[1:]))
        return ImageResizeModule(ops), (in_shape[0],) + out
