"""Small input builders shared by the test files (import them: ``from tests._helpers import
randn64``). The ``randn64`` fixture of ``tests/conftest.py`` is the same function.

* ``randn64(*shape, seed=0)``: a float64 standard normal tensor ``shape`` from its own generator
  seeded with ``seed`` (reproducible, independent of the global RNG and of other tests).
* ``randn64_pair(shape, n1=3, n2=2, seed=0)``: two batches ``(n1, *shape)`` and ``(n2, *shape)``
  with seeds ``seed`` and ``seed + 1`` (the usual ``x1``, ``x2`` of a cross-kernel test).
* ``padded_graphs(n, v, vp, pad, seed)``: ``n`` random graphs of ``v`` nodes (features
  ``(n, 3, v)``, adjacency with self-loops) and padded copies with ``vp`` nodes: the real nodes
  at random places, the others filled with ``pad`` and wired to them by random arcs.
* ``padded_sequences(n, chans, real, length, pad, seed)``: ``n`` random float64 sequences
  ``(n, chans, real)`` and padded copies ``(n, chans, length)``: each sequence at random sorted
  positions, every channel of the other positions equal to ``pad``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["randn64", "randn64_pair", "padded_graphs", "padded_sequences"]


def randn64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randn64_pair(shape: Sequence[int], n1: int = 3, n2: int = 2,
                 seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    return randn64(n1, *shape, seed=seed), randn64(n2, *shape, seed=seed + 1)


def padded_graphs(n: int = 4, v: int = 4, vp: int = 7, pad: float = -1e9, seed: int = 5
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = torch.float64
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, v, generator=g, dtype=dt)
    a = (torch.rand(n, v, v, generator=g) < 0.5).to(dt) + torch.eye(v, dtype=dt)
    xp = torch.full((n, 3, vp), pad, dtype=dt)
    ap = (torch.rand(n, vp, vp, generator=g) < 0.5).to(dt)
    for i in range(n):
        pos = torch.randperm(vp, generator=g)[:v]
        xp[i][:, pos] = x[i]
        ap[i][pos[:, None], pos[None, :]] = a[i]
    return x, a, xp, ap


def padded_sequences(n: int, chans: int, real: int, length: int, pad: float, seed: int = 0
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    dt = torch.float64
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chans, real, generator=g, dtype=dt)
    xp = torch.full((n, chans, length), pad, dtype=dt)
    for i in range(n):
        pos = torch.randperm(length, generator=g)[:real].sort().values
        xp[i][:, pos] = x[i]
    return x, xp
