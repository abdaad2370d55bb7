"""Combinators: ``serial``, ``parallel``, ``FanOut``, ``FanInSum``, ``FanInConcat``, ``FanInProd``,
``Identity``, ``repeat``.

Same vocabulary as neural-tangents' stax. Branches carry tuples of kernels (and of tensors in the
finite network). A residual block::

    block = serial(FanOut(2), parallel(Identity(), serial(Dense(512), Relu(), Dense(512))),
                   FanInSum())

``FanInSum`` adds the branch kernels: exact when the branches are independent given the input,
as when at most one branch is parameter-free (residual blocks). ``FanInProd`` multiplies the
branches elementwise: NNGPs multiply and the NTK follows the product rule, under the same
independence condition.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, cast

import torch
from torch import nn

from .._validation import check_int
from ..kernel import Kernel
from ._base import (BuildContext, KernelLike, Layer, Serial, check_layer, apply_kernel_map,
                    frozen_layer, serial)
from ._masking import unwrap, wrap
from ._ops import memo_self
from . import _feature_ops as fo

__all__ = ["serial", "parallel", "FanOut", "FanInSum", "FanInConcat", "FanInProd", "Identity",
           "repeat", "Serial", "Parallel"]


class _ParallelModule(nn.Module):
    def __init__(self, mods):
        super().__init__()
        self.branches = nn.ModuleList(mods)

    def forward(self, xs):
        if not isinstance(xs, (tuple, list)) or len(xs) != len(self.branches):
            raise ValueError(f"parallel expects a tuple of {len(self.branches)} inputs")
        return tuple(m(x) for m, x in zip(self.branches, xs))


@frozen_layer
class Parallel(Layer):
    """Branch ``i`` applied to input ``i`` of a tuple (built with :func:`parallel`)."""
    fully_connected = True
    layers: Tuple[Layer, ...]
    supports_masking = True

    def inner_shapes(self, in_shape: Any) -> List[Any]:
        out: List[Any] = []
        for layer, s in zip(self.layers, in_shape):
            out += layer.inner_shapes(s)
        return out + [self.out_shape(in_shape)]

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        built = [layer.feature_op(s, ctx, followed_by_act)
                 for layer, s in zip(self.layers, in_shape)]
        return fo.ParallelOp([b[0] for b in built]), tuple(b[1] for b in built)

    def _split(self, k):
        if not isinstance(k, tuple) or len(k) != len(self.layers):
            raise ValueError(f"parallel with {len(self.layers)} branches needs {len(self.layers)} "
                             f"inputs; put FanOut({len(self.layers)}) before it")
        return k

    def kernel_map(self, k: KernelLike) -> KernelLike:
        return tuple(apply_kernel_map(layer, ki) for layer, ki in zip(self.layers, self._split(k)))

    def masked_kernel_map(self, k: KernelLike) -> KernelLike:
        return self.kernel_map(k)

    def out_shape(self, in_shape: Any) -> Any:
        return tuple(layer.out_shape(s) for layer, s in zip(self.layers, in_shape))

    @property
    def has_linear(self) -> bool:
        return any(layer.has_linear for layer in self.layers)

    def needs_full_spatial(self, above: bool) -> bool:
        return any(layer.needs_full_spatial(above) for layer in self.layers)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        self._split(tuple(in_shape) if isinstance(in_shape, tuple) and in_shape
                    and isinstance(in_shape[0], tuple) else in_shape)
        built = [layer.build(s, ctx, followed) for layer, s in zip(self.layers, in_shape)]
        return _ParallelModule([m for m, _ in built]), tuple(s for _, s in built)


def parallel(*layers: Layer) -> Parallel:
    """Apply layer ``i`` to branch ``i``: ``serial(FanOut(2), parallel(A, B), FanInSum())``."""
    if not layers:
        raise ValueError("parallel() needs at least one layer")
    return Parallel(tuple(check_layer(l, "parallel()") for l in layers))


class _FanOutModule(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return (x,) * self.n


@frozen_layer
class FanOut(Layer):
    """Copy the input into ``n`` branches."""
    fully_connected = True
    n: int
    supports_masking = True

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.FanOutOp(self.n), self.out_shape(in_shape)

    def __post_init__(self):
        check_int(self.n, "n")

    def kernel_map(self, k: KernelLike) -> KernelLike:
        if isinstance(k, tuple):
            raise ValueError("FanOut received several branches already")
        return (k,) * self.n

    def masked_kernel_map(self, k: KernelLike) -> KernelLike:
        return self.kernel_map(k)  # the branches share the masks

    def out_shape(self, in_shape: Any) -> Any:
        return (tuple(in_shape),) * self.n

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        return _FanOutModule(self.n), (tuple(in_shape),) * self.n


def _need_branches(k: KernelLike, name: str) -> Tuple[Kernel, ...]:
    if not isinstance(k, tuple):
        raise ValueError(f"{name} needs several branches (a tuple) as input; use FanOut/parallel "
                         f"before it")
    return k


def _equal_branches(ks: KernelLike, name: str) -> Tuple[Kernel, ...]:
    """Branches of equal shape and kernel layout (elementwise merges: sum, product)."""
    ks = _need_branches(ks, name)
    shapes = {k.shape1 for k in ks}
    if len(shapes) > 1:
        raise ValueError(f"{name} needs branches of equal shape, got {sorted(shapes)}")
    # (cast: the recursion always carries the NNGP)
    if len({(k.diagonal_spatial, cast(torch.Tensor, k.nngp).shape) for k in ks}) > 1:
        raise ValueError(f"{name} branches have different kernel layouts")
    return ks


def _sum_opt(ts):
    ts = [t for t in ts if t is not None]
    if not ts:
        return None
    out = ts[0].clone()
    for t in ts[1:]:
        out = out + t
    return out


def _branch_masks(ks: KernelLike, name: str) -> Tuple[Kernel, ...]:
    ks = _need_branches(ks, name)
    if any(k.mask1 is None for k in ks):  # pragma: no cover - FanOut copies the masks
        raise ValueError(f"{name}: some branches carry masks and others do not")
    return ks


def _and_masks(ms):
    out = ms[0]
    for m in ms[1:]:
        if m.shape != out.shape:
            return None
        out = out & m
    return out


def _equal_masks(ms, name):
    for m in ms[1:]:
        if m.shape != ms[0].shape or not torch.equal(m, ms[0]):
            raise ValueError(
                f"{name} with mask_constant: the branches have different masks (e.g. a Conv "
                f"or pooling on one branch moved the masked positions); concatenating "
                f"differently masked channels is not supported (neither in neural-tangents, "
                f"whose layers refuse per-channel masks). Use FanInSum, or keep the branches' "
                f"positions aligned (SAME padding, stride 1)")
    return ms[0]


def _unwrap_all(xs):
    vals, masks = zip(*(unwrap(x) for x in xs))
    if any(m is None for m in masks):
        return list(vals), None
    return list(vals), list(masks)


class _FanInSumModule(nn.Module):
    def forward(self, xs):
        xs, ms = _unwrap_all(xs)
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return wrap(out, None if ms is None else _and_masks(ms))


@frozen_layer
class FanInSum(Layer):
    """Sum the branches (their kernels add; branches must have equal shapes). With
    ``mask_constant`` a position is masked where all branches mask it (neural-tangents)."""
    fully_connected = True
    supports_masking = True

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.FanInOp(None), self.out_shape(in_shape)

    def masked_kernel_map(self, ks: KernelLike) -> KernelLike:
        ks = _branch_masks(ks, "FanInSum")
        out = self.kernel_map(ks)  # each branch is zero at its own masked positions
        m1 = _and_masks([k.mask1 for k in ks])
        m2 = None if ks[0].mask2 is None else _and_masks([k.mask2 for k in ks])
        return out.replace(mask1=m1, mask2=m2)

    def kernel_map(self, ks: KernelLike) -> Kernel:
        ks = _equal_branches(ks, "FanInSum")
        k0 = ks[0]
        key = ("faninsum", len(ks))   # (self-covariances through the tile memo)
        return k0.replace(
            nngp=_sum_opt([k.nngp for k in ks]),
            ntk=_sum_opt([k.ntk for k in ks]),
            cov1=memo_self(key, tuple(k.cov1 for k in ks), lambda cs: _sum_opt(list(cs))),
            cov2=None if k0.cov2 is None else memo_self(
                key, tuple(k.cov2 for k in ks), lambda cs: _sum_opt(list(cs))),
            is_gaussian=all(k.is_gaussian for k in ks))

    def out_shape(self, in_shape: Any) -> Any:
        if len({tuple(s) for s in in_shape}) > 1:
            raise ValueError(f"FanInSum needs branches of equal shape, got {in_shape}")
        return tuple(in_shape[0])

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        return _FanInSumModule(), self.out_shape(in_shape)


class _FanInConcatModule(nn.Module):
    def forward(self, xs):
        xs, ms = _unwrap_all(xs)
        return wrap(torch.cat(xs, dim=1), None if ms is None else _equal_masks(ms, "FanInConcat"))


def _wsum(ts, ws):
    if all(t is None for t in ts):
        return None
    out = None
    for t, w in zip(ts, ws):
        if t is None:
            continue
        out = t * w if out is None else out.add(t, alpha=w)
    return out


@frozen_layer
class FanInConcat(Layer):
    """Concatenate the branches along the channel axis (kernels average, weighted by width).
    With ``mask_constant`` the branches must have equal masks."""
    fully_connected = True
    supports_masking = True

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        c = [s[0] for s in in_shape]
        return fo.FanInOp([ci / sum(c) for ci in c]), self.out_shape(in_shape)

    def masked_kernel_map(self, ks: KernelLike) -> KernelLike:
        ks = _branch_masks(ks, "FanInConcat")
        m1 = _equal_masks([k.mask1 for k in ks], "FanInConcat")
        m2 = None if ks[0].mask2 is None else _equal_masks([k.mask2 for k in ks], "FanInConcat")
        return self.kernel_map(ks).replace(mask1=m1, mask2=m2)

    def kernel_map(self, ks: KernelLike) -> Kernel:
        ks = _need_branches(ks, "FanInConcat")
        if len({k.shape1[1:] for k in ks}) > 1:
            raise ValueError("FanInConcat needs branches with equal spatial shapes")
        c = [k.shape1[0] for k in ks]
        w = [ci / sum(c) for ci in c]
        k0 = ks[0]
        shape1 = (sum(c),) + tuple(k0.shape1[1:])
        shape2 = (sum(k.shape2[0] for k in ks),) + tuple(k0.shape2[1:])
        key = ("faninconcat", tuple(c))   # (self-covariances through the tile memo)
        return k0.replace(
            nngp=_wsum([k.nngp for k in ks], w), ntk=_wsum([k.ntk for k in ks], w),
            cov1=memo_self(key, tuple(k.cov1 for k in ks), lambda cs: _wsum(list(cs), w)),
            cov2=None if k0.cov2 is None else memo_self(
                key, tuple(k.cov2 for k in ks), lambda cs: _wsum(list(cs), w)),
            shape1=shape1, shape2=shape2, is_gaussian=all(k.is_gaussian for k in ks))

    def out_shape(self, in_shape: Any) -> Any:
        return (sum(s[0] for s in in_shape),) + tuple(in_shape[0][1:])

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        return _FanInConcatModule(), self.out_shape(in_shape)


class _FanInProdModule(nn.Module):
    def forward(self, xs):
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out


def _prod_opt(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out = out * t
    return out


@frozen_layer
class FanInProd(Layer):
    """Multiply the branches elementwise (neural-tangents' ``FanInProd``).

    For independent branches ``f_i`` (given the input; e.g. each ends in its own Dense/Conv,
    at most one is parameter-free): ``nngp = prod_i nngp_i`` (also per pixel pair), and by the
    product rule ``ntk = sum_i ntk_i prod_{j != i} nngp_j``. The product is not Gaussian, so
    an activation cannot follow directly (put a Dense/Conv in between). Shapes must be equal.

    Example: ``serial(FanOut(2), parallel(Dense(512), Dense(512)), FanInProd(), Dense(1))``
    (a quadratic network).
    """
    fully_connected = True

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.FanInProdOp(ctx), self.out_shape(in_shape)

    def kernel_map(self, ks: KernelLike) -> Kernel:
        ks = _equal_branches(ks, "FanInProd")
        k0 = ks[0]
        nngp = _prod_opt([k.nngp for k in ks])
        ntk = None
        for i, ki in enumerate(ks):
            if ki.ntk is None:  # zero NTK (a parameter-free branch of the inputs)
                continue
            term = _prod_opt([ki.ntk, *(k.nngp for j, k in enumerate(ks) if j != i)])
            ntk = term if ntk is None else ntk + term
        key = ("faninprod", len(ks))   # (self-covariances through the tile memo)
        cov1 = memo_self(key, tuple(k.cov1 for k in ks), lambda cs: _prod_opt(list(cs)))
        cov2 = None if k0.cov2 is None else memo_self(
            key, tuple(k.cov2 for k in ks), lambda cs: _prod_opt(list(cs)))
        if k0.cov2 is None:  # keep the batch diagonal exactly the self-covariance
            nngp.diagonal(dim1=0, dim2=1).copy_(cov1.movedim(0, -1))
        return k0.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)

    def out_shape(self, in_shape: Any) -> Any:
        if len({tuple(s) for s in in_shape}) > 1:
            raise ValueError(f"FanInProd needs branches of equal shape, got {in_shape}")
        return tuple(in_shape[0])

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        return _FanInProdModule(), self.out_shape(in_shape)


def repeat(layer: Layer, n: int) -> Layer:
    """``layer`` applied ``n`` times in sequence: ``serial(layer, ..., layer)`` (neural-
    tangents' ``repeat``). Each copy has its own parameters in the finite network (as in
    ``serial``); the kernel map is applied ``n`` times.

    Example: ``repeat(serial(Dense(512), Relu()), 3)`` is a depth-3 ReLU MLP body.
    """
    check_layer(layer, "repeat()")
    n = check_int(n, "n")
    return serial(*([layer] * n))


@frozen_layer
class Identity(Layer):
    """Pass the input through unchanged."""
    fully_connected = True
    supports_masking = True

    def keeps_masked_zeros(self) -> bool:
        return type(self) is Identity   # returns its input (exact type: subclasses may not)

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.SeqOp([]), self.out_shape(in_shape)

    def kernel_map(self, k: KernelLike) -> KernelLike:
        return k

    def chain_stage(self, in_shape: Any, dtype: torch.dtype) -> Optional[Tuple[int, Tuple[float, ...]]]:
        return (-1, ()) if type(self) is Identity else None

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        return nn.Identity(), in_shape
