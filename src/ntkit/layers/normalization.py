"""LayerNorm over the channel axis: kernel map and finite module.

Infinite width: the per-example (per-pixel) channel variance is the deterministic ``cov``, so
``nngp' = nngp / sqrt((v1 + eps)(v2 + eps))``, the same for ``ntk``, and variances become
``v / (v + eps)`` (~1), as in neural-tangents. The finite
module also subtracts the channel mean (as ``torch.nn.LayerNorm`` does, without affine
parameters); the kernel assumes zero-mean inputs, which holds after a Dense/Conv layer — the
usual place for LayerNorm. Cost: one multiply per kernel entry.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_positive
from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._ops import outer_vars, self_outer_vars

__all__ = ["LayerNorm"]


class LayerNormModule(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps)


@frozen_layer
class LayerNorm(Layer):
    """Normalize each example (each pixel) over channels: ``(x - mean) / sqrt(var + eps)``."""
    eps: float = 1e-12

    def __post_init__(self):
        check_positive(self.eps, "eps", allow_zero=True)

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError("LayerNorm received several branches; merge them first")
        v1, v2 = outer_vars(k)
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

        cov1 = norm_self(k.cov1)
        cov2 = None if k.cov2 is None else norm_self(k.cov2)
        if k.cov2 is None:
            nngp.diagonal(dim1=0, dim2=1).copy_(cov1.movedim(0, -1))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)

    def build(self, in_shape, ctx: BuildContext, followed: bool):
        return LayerNormModule(self.eps), in_shape
