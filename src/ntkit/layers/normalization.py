"""LayerNorm over the channel axis, or over channels and any spatial axes: kernel map and module.

Infinite width: the per-example (per-pixel) channel variance is the deterministic ``cov``, so
``nngp' = nngp / sqrt((v1 + eps)(v2 + eps))``, the same for ``ntk``, and variances become
``v / (v + eps)`` (~1), as in neural-tangents. With ``axis`` naming spatial axes too (NT's
``LayerNorm(axis=(1, 2, 3))`` on NHWC images is ``LayerNorm(axis=(1, 2, 3))`` on our
``(N, C, H, W)``: channels and all pixels jointly), ``v`` is the mean over the normalized
pixels of the per-pixel variances (the diagonal of the self-covariance), exactly as NT's
``LayerNorm`` kernel. The finite
module also subtracts the mean over ``axis`` (as ``torch.nn.LayerNorm`` does, without affine
parameters); the kernel assumes zero-mean inputs, which holds after a Dense/Conv layer — the
usual place for LayerNorm. Cost: one multiply per kernel entry.
"""
from __future__ import annotations

from typing import Any, Tuple, Union

import torch
from torch import nn

from .._validation import check_positive
from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._masking import unwrap, wrap
from ._ops import memo_self, outer_vars, self_outer_vars, variances
from . import _feature_ops as fo

__all__ = ["LayerNorm", "LayerNormAxes"]


class LayerNormModule(nn.Module):
    def __init__(self, eps: float, dims: Tuple[int, ...] = (1,)):
        super().__init__()
        self.eps, self.dims = eps, tuple(dims)

    def forward(self, x):
        x, m = unwrap(x)
        if m is None:
            mean = x.mean(self.dims, keepdim=True)
            var = x.var(self.dims, keepdim=True, unbiased=False)
            return (x - mean) / torch.sqrt(var + self.eps)
        # mean and variance over the unmasked entries only (masked positions are zero and
        # stay out of both; a fully masked group gives 0, not 0 / 0)
        valid = (~m).unsqueeze(1).to(x.dtype).expand_as(x)
        count = valid.sum(self.dims, keepdim=True).clamp_min(1)
        mean = x.sum(self.dims, keepdim=True) / count
        var = ((x - mean) * valid).pow(2).sum(self.dims, keepdim=True) / count
        den = torch.sqrt(var + self.eps)
        den = torch.where(den > 0, den, torch.ones_like(den))
        return wrap((x - mean) * valid / den, m)

    def extra_repr(self):
        return f"dims={self.dims}, eps={self.eps}"


def _canonical_axes(axis, ndim: int) -> Tuple[int, ...]:
    """Sorted non-negative axes of an ``ndim``-dimensional batch ``(N, C, *spatial)``;
    the channel axis (1) must be among them and the batch axis (0) must not."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = set()
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"LayerNorm: `axis` {a} is out of range for inputs with {ndim} "
                             f"axes (N, C, *spatial); use axes in 1..{ndim - 1} (or negative)")
        out.add(a % ndim)
    if 0 in out:
        raise ValueError(f"LayerNorm: `axis`={axis!r} includes the batch axis 0; normalizing "
                         f"across examples has no per-example kernel; use channel/spatial axes")
    if 1 not in out:
        raise ValueError(f"LayerNorm: `axis`={axis!r} (canonical {sorted(out)}) must include the "
                         f"channel axis 1 (as in neural-tangents: without it the infinite-width "
                         f"limit has no deterministic normalizer); e.g. axis=(1, 2, 3)")
    return tuple(sorted(out))


def _channel_only_request(args, kwargs) -> bool:
    """Whether ``LayerNorm(*args, **kwargs)`` asks for the channel axis alone (or has an invalid
    ``axis``, which ``LayerNorm.__post_init__`` then reports)."""
    axis = kwargs.get("axis", args[1] if len(args) > 1 else 1)
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not items or any(isinstance(a, bool) or not isinstance(a, int) for a in items):
        return True
    return all(a == 1 for a in items)


class _LayerNormBase(Layer):
    """Kernel map and module shared by :class:`LayerNorm` and :class:`LayerNormAxes`.

    With ``mask_constant``, normalizing over spatial axes averages the variances over the
    unmasked positions only (neural-tangents' masked ``mean_and_var``)."""
    fully_connected = True

    supports_masking = True
    # the subclasses' dataclass fields (annotations only: no class attribute, no field here)
    eps: float
    axis: Union[int, Tuple[int, ...]]

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return (fo.LayerNormOp(self.eps, self._spatial_axes(len(in_shape))),
                self.out_shape(in_shape))

    def __post_init__(self):
        check_positive(self.eps, "eps", allow_zero=True)
        axis = self.axis
        if isinstance(axis, list):
            axis = tuple(axis)
            object.__setattr__(self, "axis", axis)
        items = (axis,) if not isinstance(axis, tuple) else axis
        if not items or any(isinstance(a, bool) or not isinstance(a, int) for a in items):
            raise TypeError(f"LayerNorm: `axis` must be an int or a non-empty tuple of ints, "
                            f"got {self.axis!r}")

    def _spatial_axes(self, n_features_axes: int) -> Tuple[int, ...]:
        """Normalized spatial axes as indices into the spatial dims (0-based)."""
        return tuple(a - 2 for a in _canonical_axes(self.axis, 1 + n_features_axes) if a >= 2)

    def out_shape(self, in_shape: Any) -> Any:
        _canonical_axes(self.axis, 1 + len(in_shape))
        return in_shape

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError("LayerNorm received several branches; merge them first")
        sp = self._spatial_axes(len(k.shape1))
        if sp:
            return self._joint_map(k, sp)
        v1, v2 = outer_vars(k)
        assert k.nngp is not None  # the recursion always carries the NNGP
        eps = self.eps
        # (v1 + eps)^-1/2 (v2 + eps)^-1/2, never the product (it overflows beyond ~1e19 in
        # float32 and would silently zero the kernel)
        scale = (v1 + eps).rsqrt() * (v2 + eps).rsqrt()
        nngp = k.nngp * scale
        ntk = None if k.ntk is None else k.ntk * scale

        def norm_self(cov):
            if k.n_spatial == 0 or k.diagonal_spatial:
                return cov / (cov + eps)
            a, b = self_outer_vars(cov, k)
            return cov * ((a + eps).rsqrt() * (b + eps).rsqrt())

        # through the tile memo, so that later layers' self-maps are reused across tiles
        key = ("layernorm", self, k.n_spatial, k.diagonal_spatial)
        cov1 = memo_self(key, k.cov1, norm_self)
        cov2 = memo_self(key, k.cov2, norm_self)
        if k.cov2 is None:
            nngp.diagonal(dim1=0, dim2=1).copy_(cov1.movedim(0, -1))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)

    def _joint_map(self, k: Kernel, sp: Tuple[int, ...]) -> Kernel:
        """Normalizer shared by the pixels of each normalized group: ``m + eps`` with ``m`` the
        mean over the normalized spatial axes of the per-pixel variances."""
        eps, ns = self.eps, k.n_spatial
        full = not k.diagonal_spatial

        def inv_norm(cov, mask):  # (n, *S): 1 / sqrt(m + eps), constant on normalized axes
            v = variances(cov, k)
            dims = tuple(1 + a for a in sp)
            if mask is None:
                m = v.mean(dim=dims, keepdim=True)
            else:  # masked positions have zero variance; average over the others
                cnt = (~mask).sum(dim=dims, keepdim=True).clamp_min(1).to(v.dtype)
                m = v.sum(dim=dims, keepdim=True) / cnt
            return (m + eps).rsqrt().expand(v.shape)

        one = (1,) * ns

        def norm_self(cov, r):
            if full:
                return cov * r.reshape(r.shape + one) * r.reshape(r.shape[:1] + one + r.shape[1:])
            return cov * r * r

        def self_map(mask):  # -> (1 / sqrt(m + eps), normalized self-covariance)
            def f(cov):
                r = inv_norm(cov, mask)
                return r, norm_self(cov, r)
            return f

        # through the tile memo (later layers key on the result) unless masks are in play:
        # each tile slices its own mask tensors, which the memo cannot key on
        key = None if k.mask1 is not None else ("layernorm", self, ns, k.diagonal_spatial)
        r1, cov1 = memo_self(key, k.cov1, self_map(k.mask1))
        r2, cov2 = (r1, None) if k.cov2 is None else memo_self(key, k.cov2, self_map(k.mask2))
        if full:
            a = r1.reshape(r1.shape[:1] + (1,) + r1.shape[1:] + one)
            b = r2.reshape((1,) + r2.shape[:1] + one + r2.shape[1:])
        else:
            a, b = r1.unsqueeze(1), r2.unsqueeze(0)
        nngp = k.nngp * a * b
        ntk = None if k.ntk is None else k.ntk * a * b
        if k.cov2 is None:
            nngp.diagonal(dim1=0, dim2=1).copy_(cov1.movedim(0, -1))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        dims = _canonical_axes(self.axis, 1 + len(in_shape))
        return LayerNormModule(self.eps, dims), in_shape




@frozen_layer
class LayerNorm(_LayerNormBase):
    """Normalize each example: ``(x - mean) / sqrt(var + eps)``, mean and variance over ``axis``.

        ``axis``: an axis or a tuple of axes of the batch ``(N, C, *spatial)`` (negative allowed);
        it must include the channel axis ``1`` and not the batch axis ``0``. Default ``1``: each
        pixel over its channels (NT's default ``axis=-1`` on NHWC). ``axis=(1, 2, 3)`` on images
        ``(N, C, H, W)`` normalizes each example over all its features (NT's ``axis=(1, 2, 3)``).
        ``eps`` as in ``torch.nn.LayerNorm`` (no affine parameters here). Pass ``axis`` by
        keyword (the first positional argument is ``eps``).

        Any ``axis`` other than the channel axis alone builds a :class:`LayerNormAxes` (same kernel
        map and module; not a ``LayerNorm`` instance, so the random-feature path, whose LayerNorm
        rule normalizes per pixel, refuses it instead of returning wrong features).

        Example::

            >>> arch = serial(Conv(64, 3), LayerNorm(axis=(1, 2, 3)), Relu(), Flatten(), Dense(1))
        """
    eps: float = 1e-12
    axis: Union[int, Tuple[int, ...]] = 1

    def __new__(cls, *args, **kwargs):
        if cls is LayerNorm and not _channel_only_request(args, kwargs):
            return LayerNormAxes(*args, **kwargs)
        return super().__new__(cls)


@frozen_layer
class LayerNormAxes(_LayerNormBase):
    """What ``LayerNorm(axis=...)`` builds when ``axis`` names more than the channel axis
    (see :class:`LayerNorm`)."""
    eps: float = 1e-12
    axis: Union[int, Tuple[int, ...]] = 1

    def __repr__(self):
        return f"LayerNorm(eps={self.eps!r}, axis={self.axis!r})"
