"""Dense (fully-connected) layer: kernel map and finite module.

Applied over the channel axis (axis 1, PyTorch layout), so on ``(n, C, *S)`` inputs it acts on
every pixel. Parameterizations (``fan_in`` = input channels ``n``):

* ``'ntk'`` (default): ``y = W_std / sqrt(n) * W x + b_std * b``, ``W, b ~ N(0, 1)``.
* ``'standard'``: ``y = W x + b``, ``W ~ N(0, W_std^2 / n)``, ``b ~ N(0, b_std^2)``.

Kernel map: ``nngp' = W_std^2 nngp + b_std^2``; NTK ``ntk' = nngp' + W_std^2 ntk`` ('ntk') or
``ntk' = n * nngp + [1 if bias] + W_std^2 ntk`` ('standard', where the NTK depends on the widths).
Cost: one fused multiply-add per kernel entry.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import nn

from .._validation import check_int, check_std
from ..kernel import GramFactors, Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._masking import add_unmasked, unwrap, wrap
from ._ops import memo_self
from . import _feature_ops as fo

__all__ = ["Dense", "check_parameterization"]


def check_parameterization(p: str) -> str:
    if p not in ("ntk", "standard"):
        raise ValueError(f"`parameterization` must be 'ntk' or 'standard', got {p!r}")
    return p


class AffineModule(nn.Module):
    """Finite Dense layer over axis 1 with the initialization its kernel assumes."""
    jacobian_kind = "affine"   # features(method='jacobian'): per-example gradients of a Dense

    def __init__(self, in_dim: int, out_dim: int, W_std: float, b_std: Optional[float],
                 parameterization: str, ctx: BuildContext):
        super().__init__()
        g, dt = ctx.generator, ctx.dtype
        self.in_dim, self.out_dim = in_dim, out_dim
        self.parameterization = parameterization
        self.W_std, self.b_std = W_std, b_std
        dev = ctx.device
        w = torch.randn(out_dim, in_dim, generator=g, dtype=dt, device=dev)
        b = None if b_std is None else torch.randn(out_dim, generator=g, dtype=dt, device=dev)
        if parameterization == "standard":
            w = w * (W_std / math.sqrt(in_dim))
            b = None if b is None or b_std is None else b * b_std
            self.w_scale, self.b_scale = 1.0, 1.0
        else:
            self.w_scale, self.b_scale = W_std / math.sqrt(in_dim), (b_std or 0.0)
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, m = unwrap(x)
        b = None if self.bias is None else (
            self.bias * self.b_scale if self.b_scale != 1.0 else self.bias)
        if x.ndim == 2 and b is not None:
            # the weight scale rides in the GEMM (no scaled copy of W forward and backward)
            return wrap(torch.addmm(b, x, self.weight.T, alpha=self.w_scale), m)
        w = self.weight * self.w_scale if self.w_scale != 1.0 else self.weight
        if x.ndim == 2:
            return wrap(nn.functional.linear(x, w, b), m)
        y = nn.functional.linear(x.movedim(1, -1), w, b)
        return wrap(y.movedim(-1, 1), m)

    def extra_repr(self) -> str:
        return (f"{self.in_dim} -> {self.out_dim}, W_std={self.W_std}, b_std={self.b_std}, "
                f"parameterization={self.parameterization!r}")


@frozen_layer
class Dense(Layer):
    """Fully-connected layer ``Dense(out_dim, W_std=1.0, b_std=None, parameterization='ntk')``.

    ``b_std=None`` means no bias. Example::

        >>> serial(Dense(512, W_std=1.4, b_std=0.1), Relu(), Dense(1)).kernel(x, get='ntk')
    """
    fully_connected = True
    collapses_mask_channels = True
    out_dim: int
    W_std: float = 1.0
    b_std: Optional[float] = None
    parameterization: str = "ntk"

    supports_masking = True

    def keeps_masked_zeros(self) -> bool:
        # W^2 cov position by position, bias terms added only where no position is masked
        # (exact type: a subclass may override the kernel map)
        return type(self) is Dense

    def chain_stage(self, in_shape: Any, dtype: torch.dtype) -> Optional[Tuple[int, Tuple[float, ...]]]:
        if type(self) is not Dense:  # (a subclass may override the kernel map)
            return None
        b2 = 0.0 if self.b_std is None else self.b_std ** 2
        return 0, (self.W_std ** 2, b2, float(self.parameterization != "ntk"),
                   float(in_shape[0]), 0.0 if self.b_std is None else 1.0)

    def chain_self(self, cov: torch.Tensor, k: Kernel) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return memo_self(("dense", self), cov, self._affine), None

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        return fo.DenseOp(self, ctx, followed_by_act), self.out_shape(in_shape)

    def __post_init__(self):
        check_int(self.out_dim, "out_dim")
        check_std(self.W_std, "W_std")
        if self.b_std is not None:
            check_std(self.b_std, "b_std", allow_zero=True)
        check_parameterization(self.parameterization)

    @property
    def has_linear(self) -> bool:
        return True

    def out_shape(self, in_shape: Any) -> Any:
        return (self.out_dim,) + tuple(in_shape[1:])

    def _affine(self, t, k: Optional[Kernel] = None, which: str = "cross"):
        """``W^2 t + b^2``; with masks (``k.mask1`` set) the bias only where no position is
        masked (``which``: the layout of ``t`` in ``k``, see ``_masking.add_unmasked``)."""
        w2 = self.W_std ** 2
        if t is None:
            return None
        if self.b_std is None or self.b_std == 0:
            return t * w2
        if k is not None and k.mask1 is not None:
            return add_unmasked(t * w2, self.b_std ** 2, k, which)
        return (t * w2).add_(self.b_std ** 2)

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError("Dense received several branches; merge them with FanInSum() or "
                             "FanInConcat() first")
        w2 = self.W_std ** 2
        masked = k.mask1 is not None
        nngp = self._affine(k.nngp, k)
        ntk = None
        if k.want_ntk:
            if self.parameterization == "ntk":
                ntk = nngp.clone() if k.ntk is None else torch.add(nngp, k.ntk, alpha=w2)
            else:
                width = k.shape1[0]
                assert k.nngp is not None  # the recursion always carries the NNGP
                ntk = k.nngp * float(width)
                if k.ntk is not None:
                    ntk.add_(k.ntk, alpha=w2)
                if self.b_std is not None:
                    if masked:
                        add_unmasked(ntk, 1.0, k, "cross")
                    else:
                        ntk.add_(1.0)
        shape1 = (self.out_dim,) + tuple(k.shape1[1:])
        shape2 = (self.out_dim,) + tuple(k.shape2[1:])
        # self-covariances through the tile memo: cheap here, but a fresh tensor per tile
        # would keep every later layer's self-map from being reused across a block's tiles
        if not masked:
            key: Tuple[Any, ...] = ("dense", self)
            cov1 = memo_self(key, k.cov1, self._affine)
            cov2 = memo_self(key, k.cov2, self._affine)
        else:
            key = ("dense", self, "masked")
            cov1 = memo_self(key + ("self1",), k.cov1, lambda c: self._affine(c, k, "self1"))
            cov2 = memo_self(key + ("self2",), k.cov2, lambda c: self._affine(c, k, "self2"))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape1=shape1,
                         shape2=shape2, is_gaussian=True, gram=self._gram(k, nngp, ntk))

    def _gram(self, k: Kernel, nngp, ntk) -> Optional[GramFactors]:
        """The input's :class:`~ntkit.kernel.GramFactors` carried through this affine map
        (NTK parameterization, no masks), else ``None``."""
        g = k.valid_gram()
        if g is None or self.parameterization != "ntk" or nngp is None:
            return None
        w2, b2 = self.W_std ** 2, (self.b_std or 0.0) ** 2
        a, b = g.nngp_ab
        na, nb = w2 * a, w2 * b + b2
        ntk_ab = None
        if ntk is not None:
            ta, tb = g.ntk_ab if g.ntk_ab is not None else (0.0, 0.0)
            ntk_ab = (na + w2 * ta, nb + w2 * tb)
        return GramFactors.make(g.f1, g.f2, g.fscale, (na, nb), ntk_ab, nngp, ntk)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        out = self.out_dim if (ctx.width is None or not followed) else ctx.width
        mod = AffineModule(in_shape[0], out, self.W_std, self.b_std, self.parameterization, ctx)
        return mod, (out,) + tuple(in_shape[1:])
