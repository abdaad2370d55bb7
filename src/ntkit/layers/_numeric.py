"""Elementwise numeric helpers shared by the torch kernel maps (:mod:`._ops`, the activations'
dual maps) and the fused numba kernels (:mod:`._fused`): the bottom of ``ntkit.layers``, so that
both import them from here and neither imports the other for them.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["SNAP_ULPS", "inv_sqrt", "tu"]

Tensor = torch.Tensor

#: correlations within this many units of roundoff of +-1 are snapped to +-1
#: (see :func:`ntkit.layers._ops.correlation`)
SNAP_ULPS = 8


def inv_sqrt(v: Tensor) -> Tensor:
    """``1 / sqrt(v)``, and 0 where ``v = 0`` (a zero-variance unit is uncorrelated)."""
    return torch.where(v > 0, v.rsqrt(), torch.zeros((), dtype=v.dtype, device=v.device))


def tu(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(t, u) = (x / (1 + x), 1 / (1 + x))`` without overflow (``x`` up to inf)."""
    return (1 + x.reciprocal()).reciprocal_(), (1 + x).reciprocal_()
