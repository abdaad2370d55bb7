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


# A tensor whose every entry a fused kernel found finite as it wrote them carries the torch
# version counter it had then (in-place torch ops, also through views, bump it): the final
# overflow check (``_tiling.check_representable``) skips the pass over a tensor so marked.
_FINITE_ATTR = "_ntkit_finite_at"


def mark_finite(t: torch.Tensor) -> torch.Tensor:
    """Record that all of ``t``'s entries are finite now (the caller has checked them)."""
    setattr(t, _FINITE_ATTR, t._version)
    return t


def known_finite(t: torch.Tensor) -> bool:
    """Whether :func:`mark_finite` vouched for ``t`` and it has not been written since."""
    return getattr(t, _FINITE_ATTR, None) == t._version
