"""Pooling and flattening: ``AvgPool``, ``SumPool``, ``GlobalAvgPool``, ``GlobalSumPool``,
``Flatten``, for ``(N, C, *spatial)`` inputs (neural-tangents conventions).

Kernel maps (``K`` a pixel-pair covariance, ``w`` the window, ``P`` the number of pixels):

* ``AvgPool``: ``K'(P, Q) = 1/|w|^2 sum_{s, t in w} K(P + s, Q + t)`` (zero padding counts in
  the average, like ``torch.nn.AvgPool2d(count_include_pad=True)``); ``SumPool`` without the
  ``1/|w|^2``. The two pixels move independently, so pooling needs the full pixel-pair layout
  (``n1 n2 P^2`` entries); cost ``2 sum_d (w_d - 1)`` adds per entry.
* ``GlobalAvgPool``: ``K' = mean_{p, q} K(p, q)``; ``GlobalSumPool``: the sum. Needs the full
  layout below it; cost one add per entry.
* ``Flatten``: ``(N, C, *S) -> (N, C * P)``; ``K' = mean_p K(p, p)``, so a ``Dense`` readout with
  ``fan_in = C * P`` sees the mean over pixels. Only the per-pixel diagonal is needed below it
  (``n1 n2 P`` entries: Flatten + Dense CNNs are cheap).

The full layout is chosen automatically: a network whose top needs no pixel pairs (Flatten)
keeps only the diagonal all the way down.

Example::

    >>> arch = nl.serial(nl.Conv(64, 3, padding='SAME'), nl.Relu(), nl.AvgPool(2, 2),
    ...                  nl.Conv(64, 3, padding='SAME'), nl.Relu(), nl.GlobalAvgPool(),
    ...                  nl.Dense(10))
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union, cast

import torch
from torch import nn

from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._masking import all_positions, centre_mask, unwrap, wrap
from ._ops import memo_self, set_batch_diag
from . import _stencil as st
from .conv import Sizes, _spatial_kernel
from . import _feature_ops as fo

__all__ = ["AvgPool", "SumPool", "GlobalAvgPool", "GlobalSumPool", "Flatten"]


def _need_full(k: Kernel, who: str) -> None:
    if k.diagonal_spatial:
        raise ValueError(f"{who} needs pixel-pair covariances but received the per-pixel "
                         f"(diagonal) layout; evaluate the architecture with arch.kernel(), "
                         f"which chooses the layout from the layers")


def _fix_diag(k: Kernel, nngp: torch.Tensor, cov1: torch.Tensor) -> None:
    if k.cov2 is None:
        set_batch_diag(nngp, cov1)


class PoolModule(nn.Module):
    """Finite average / sum pooling with explicit (possibly asymmetric or circular) padding."""

    def __init__(self, window, strides, pads, circular: bool, sum_: bool):
        super().__init__()
        if len(window) > 3:
            raise ValueError(f"finite pooling supports 1-3 spatial dimensions, got {len(window)}")
        self.window, self.strides, self.pads, self.circular = window, strides, pads, circular
        self.sum_ = sum_
        self._pool = (nn.functional.avg_pool1d, nn.functional.avg_pool2d,
                      nn.functional.avg_pool3d)[len(window) - 1]

    def forward(self, x):
        x, m = unwrap(x)
        x = st.pad_input(x, self.pads, self.circular)
        y = self._pool(x, self.window, self.strides)
        y = y * st.prod(self.window) if self.sum_ else y
        if m is None:
            return y
        return wrap(y, centre_mask(m, self.window, self.strides, self.pads, self.circular,
                                   tuple(y.shape[2:])))

    def extra_repr(self):
        return (f"{'sum' if self.sum_ else 'avg'}, window={self.window}, strides={self.strides}, "
                f"pads={self.pads}{', circular' if self.circular else ''}")


@frozen_layer
class _Pool(Layer):
    window_shape: Sizes
    strides: Optional[Sizes] = None
    padding: Union[str, int, tuple] = "VALID"

    _sum = False
    supports_masking = True  # masked positions count as zeros; centre-of-window output mask

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        mod, _ = self.build(in_shape, cast(Any, None), False)   # pooling needs no context
        return fo.LinearSpatialOp(mod), self.out_shape(in_shape)

    def mask_map(self, mask: Any, in_shape: Any) -> Any:
        win, strides, pads, circ, out_sp = self.geometry(tuple(in_shape[1:]))
        return centre_mask(mask, win, strides, pads, circ, out_sp)

    def __post_init__(self):
        object.__setattr__(self, "window_shape", st.check_sizes(self.window_shape,
                                                                "window_shape"))
        if self.strides is not None:
            object.__setattr__(self, "strides", st.check_sizes(self.strides, "strides"))
        object.__setattr__(self, "padding", st.check_padding(self.padding))

    def needs_full_spatial(self, above: bool) -> bool:
        return True

    def geometry(self, spatial: Tuple[int, ...]) -> Tuple[Any, ...]:
        ns = len(spatial)
        win = st.as_tuple(self.window_shape, ns, "window_shape")
        strides = st.as_tuple(1 if self.strides is None else self.strides, ns, "strides")
        pads, circ = st.resolve(self.padding, "zeros", spatial, win, strides)
        return win, strides, pads, circ, st.out_spatial(spatial, win, strides, pads, "window")

    def out_shape(self, in_shape: Any) -> Any:
        return (in_shape[0],) + self.geometry(tuple(in_shape[1:]))[4]

    def kernel_map(self, k: Kernel) -> Kernel:
        name = type(self).__name__
        k = _spatial_kernel(k, name)
        _need_full(k, name)
        win, strides, pads, circ, out_sp = self.geometry(tuple(k.shape1[1:]))
        scale = 1.0 if self._sum else 1.0 / st.prod(win) ** 2

        def pool(t, batch_ndim):
            if t is None:
                return None
            t = st.pool_full(t, batch_ndim, win, strides, pads, circ)
            return t.mul_(scale) if scale != 1.0 else t

        key = ("pool", self, tuple(k.shape1))
        nngp = pool(k.nngp, 2)
        cov1 = memo_self(key, k.cov1, lambda c: pool(c, 1))
        cov2 = memo_self(key, k.cov2, lambda c: pool(c, 1))
        _fix_diag(k, nngp, cov1)
        return k.replace(nngp=nngp, ntk=pool(k.ntk, 2), cov1=cov1, cov2=cov2,
                         shape1=(k.shape1[0],) + out_sp, shape2=(k.shape2[0],) + out_sp)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        win, strides, pads, circ, out_sp = self.geometry(tuple(in_shape[1:]))
        return PoolModule(win, strides, pads, circ, self._sum), (in_shape[0],) + out_sp


@frozen_layer
class AvgPool(_Pool):
    """``AvgPool(window_shape, strides=None, padding='VALID')``: average pooling.

    ``strides=None`` means stride 1 (neural-tangents' convention; ``torch.nn.AvgPool2d``
    defaults to ``stride = kernel_size``, so write ``AvgPool(2, 2)`` for that). Zero padding
    counts in the average. ``padding``: 'VALID', 'SAME', 'CIRCULAR' or explicit pixel counts.
    """



@frozen_layer
class SumPool(_Pool):
    """``SumPool(window_shape, strides=None, padding='VALID')``: sum pooling (``|w|`` times
    ``AvgPool``)."""
    _sum = True



class GlobalPoolModule(nn.Module):
    def __init__(self, sum_: bool):
        super().__init__()
        self.sum_ = sum_

    def forward(self, x):
        x, m = unwrap(x)
        dims = tuple(range(2, x.ndim))
        if m is None:
            return x.sum(dims) if self.sum_ else x.mean(dims)
        s = x.sum(dims)
        if not self.sum_:  # mean over the unmasked positions (masked ones are zero)
            cnt = (~m).reshape(m.shape[0], -1).sum(1).clamp_min(1).to(x.dtype)
            s = s / cnt[:, None]
        return wrap(s, all_positions(m))


@frozen_layer
class _GlobalPool(Layer):
    _sum = False
    supports_masking = True  # GlobalAvgPool: mean over the unmasked positions only

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.GlobalPoolOp(self._sum), self.out_shape(in_shape)

    def mask_map(self, mask: Any, in_shape: Any) -> Any:
        return all_positions(mask)

    def needs_full_spatial(self, above: bool) -> bool:
        return True

    def out_shape(self, in_shape: Any) -> Any:
        return (in_shape[0],)

    def kernel_map(self, k: Kernel) -> Kernel:
        name = type(self).__name__
        k = _spatial_kernel(k, name)
        _need_full(k, name)

        def red(t, batch_ndim, ca=None, cb=None):
            if t is None:
                return None
            dims = tuple(range(batch_ndim, t.ndim))
            if ca is not None:  # masked: sum (masked entries are zero) / unmasked pairs
                den = (ca[:, None] * cb[None, :]) if batch_ndim == 2 else ca * ca
                return t.sum(dims) / den
            return t.sum(dims) if self._sum else t.mean(dims)

        c1 = c2 = None
        if k.mask1 is not None and not self._sum:  # numbers of unmasked positions
            def count(m):
                return (~m).reshape(m.shape[0], -1).sum(1).clamp_min(1).to(k.nngp.dtype)
            c1 = count(k.mask1)
            c2 = c1 if k.mask2 is None else count(k.mask2)
        key = ("gpool", self, tuple(k.shape1))
        nngp = red(k.nngp, 2, c1, c2)
        cov1 = memo_self(key, k.cov1, lambda c: red(c, 1, c1, c1))
        cov2 = memo_self(key, k.cov2, lambda c: red(c, 1, c2, c2))
        _fix_diag(k, nngp, cov1)
        return k.replace(nngp=nngp, ntk=red(k.ntk, 2, c1, c2), cov1=cov1, cov2=cov2,
                         shape1=(k.shape1[0],), shape2=(k.shape2[0],), diagonal_spatial=True)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        if len(in_shape) < 2:
            raise ValueError(f"{type(self).__name__} needs inputs (C, *spatial), got {in_shape}")
        return GlobalPoolModule(self._sum), (in_shape[0],)


@frozen_layer
class GlobalAvgPool(_GlobalPool):
    """``GlobalAvgPool()``: mean over all spatial dimensions, ``(N, C, *S) -> (N, C)``."""



@frozen_layer
class GlobalSumPool(_GlobalPool):
    """``GlobalSumPool()``: sum over all spatial dimensions, ``(N, C, *S) -> (N, C)``."""
    _sum = True



class FlattenModule(nn.Module):
    def forward(self, x):
        x, m = unwrap(x)
        return wrap(x.flatten(1), None if m is None else all_positions(m))


@frozen_layer
class Flatten(Layer):
    """``Flatten()``: ``(N, C, *S) -> (N, C * prod(S))`` (channel-major, like
    ``torch.flatten(x, 1)``). Kernel: mean over pixels of the per-pixel covariance (with
    ``mask_constant``: masked pixels count as zeros, as in neural-tangents)."""
    supports_masking = True

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.FlattenOp(), self.out_shape(in_shape)

    def mask_map(self, mask: Any, in_shape: Any) -> Any:
        return all_positions(mask)

    def needs_full_spatial(self, above: bool) -> bool:
        return False

    def out_shape(self, in_shape: Any) -> Any:
        return (st.prod(in_shape),)

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError("Flatten received several branches; merge them first")
        if k.n_spatial == 0:
            return k
        ns = k.n_spatial

        def tr(t, batch_ndim):
            if t is None:
                return None
            if not k.diagonal_spatial:
                pix = st.prod(t.shape[batch_ndim:batch_ndim + ns])
                t = t.reshape(t.shape[:batch_ndim] + (pix, pix)).diagonal(dim1=-2, dim2=-1)
            return t.mean(tuple(range(batch_ndim, t.ndim)))

        key = ("flatten", self, tuple(k.shape1), k.diagonal_spatial)
        nngp = tr(k.nngp, 2)
        cov1 = memo_self(key, k.cov1, lambda c: tr(c, 1))
        cov2 = memo_self(key, k.cov2, lambda c: tr(c, 1))
        _fix_diag(k, nngp, cov1)
        return k.replace(nngp=nngp, ntk=tr(k.ntk, 2), cov1=cov1, cov2=cov2,
                         shape1=(st.prod(k.shape1),), shape2=(st.prod(k.shape2),),
                         is_gaussian=False, diagonal_spatial=True)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        return FlattenModule(), (st.prod(in_shape),)
