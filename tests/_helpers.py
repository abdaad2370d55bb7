"""Small input builders shared by the test files (import them: ``from tests._helpers import
randn64``). The ``randn64`` fixture of ``tests/conftest.py`` is the same function.

* ``randn64(*shape, seed=0)``: a float64 standard normal tensor ``shape`` from its own generator
  seeded with ``seed`` (reproducible, independent of the global RNG and of other tests).
* ``randn64_pair(shape, n1=3, n2=2, seed=0)``: two batches ``(n1, *shape)`` and ``(n2, *shape)``
  with seeds ``seed`` and ``seed + 1`` (the usual ``x1``, ``x2`` of a cross-kernel test).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["randn64", "randn64_pair"]


def randn64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randn64_pair(shape: Sequence[int], n1: int = 3, n2: int = 2,
                 seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    return randn64(n1, *shape, seed=seed), randn64(n2, *shape, seed=seed + 1)
