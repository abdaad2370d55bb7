"""Tile-by-tile evaluation of an architecture's kernel under a memory budget.

The architecture is applied to blocks ``(x1[I], x2[J])``; every kernel entry depends only on its
two examples, so tiles are independent. When ``x2`` is ``None`` only tiles with ``I <= J`` are
computed and mirrored, and diagonal tiles keep an exact diagonal.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..kernel import Kernel
from ._base import available_memory
from ._ops import input_kernel

# Live n1 x n2 (x spatial) arrays during a layer's kernel map, a conservative count used to size
# tiles: nngp, ntk, the new nngp/ntk, and ~6 temporaries of an activation's dual map.
LIVE_ARRAYS = 12
# Tile edge cap for fully-connected kernels: ~0.5-2 MB temporaries stay cache-friendly.
FC_TILE_CAP = 768


def _gb(b: float) -> str:
    return f"{b / 2**30:.3g} GiB"


def kernel_tile(arch, xa: torch.Tensor, xb: Optional[torch.Tensor], want_ntk: bool,
                full_spatial: bool) -> Kernel:
    """Kernel of one tile; ``xb=None`` means the symmetric tile ``(xa, xa)``."""
    k = input_kernel(xa, xb, want_ntk, full_spatial)
    k = arch.kernel_map(k)
    if isinstance(k, tuple):
        raise ValueError("the architecture ends in several branches; merge them with FanInSum() or "
                         "FanInConcat() before the end")
    if want_ntk and k.ntk is None:
        k = k.replace(ntk=torch.zeros_like(k.nngp))
    return k


def plan_tile(n1: int, n2: int, per_entry_bytes: float, out_entry_bytes: float, budget: int,
              fc: bool, tile: Optional[int]) -> int:
    """Examples per tile edge so that the output plus one tile's working set fit ``budget``."""
    out_bytes = n1 * n2 * out_entry_bytes
    if out_bytes > budget:
        raise MemoryError(
            f"the requested kernel alone needs {_gb(out_bytes)} ({n1} x {n2} entries x "
            f"{out_entry_bytes:.0f} B) but memory_budget is {_gb(budget)}; compute it in pieces "
            f"with ntkit.compute_kernel(..., store='k.zarr') or raise memory_budget")
    if tile is not None:
        if tile < 1:
            raise ValueError(f"`tile` must be a positive integer, got {tile}")
        return int(tile)
    room = budget - out_bytes
    b = int(math.floor(math.sqrt(max(room, 0) / per_entry_bytes)))
    if b < 1:
        raise MemoryError(
            f"one kernel entry needs {_gb(per_entry_bytes)} of working memory but only "
            f"{_gb(room)} of memory_budget={_gb(budget)} is left after the output; a budget of at "
            f"least {_gb(out_bytes + per_entry_bytes)} would fit")
    if fc:
        b = min(b, FC_TILE_CAP)
    return max(1, min(b, max(n1, n2)))


def _mirror(t: torch.Tensor, ns: int, diagonal_spatial: bool) -> torch.Tensor:
    """The tile for ``(x2, x1)`` from the tile for ``(x1, x2)``."""
    t = t.transpose(0, 1)
    if ns and not diagonal_spatial and t.ndim == 2 + 2 * ns:
        perm = [0, 1] + list(range(2 + ns, 2 + 2 * ns)) + list(range(2, 2 + ns))
        t = t.permute(perm)
    return t


def evaluate(arch, x1: torch.Tensor, x2: Optional[torch.Tensor], keys: Tuple[str, ...],
             single: bool, memory_budget: Optional[int] = None, progress: bool = False,
             tile: Optional[int] = None):
    """Evaluate ``arch``'s kernel between ``x1`` and ``x2`` (see ``Layer.kernel``)."""
    want_ntk = "ntk" in keys
    full = bool(x1.ndim > 2 and arch.needs_full_spatial(False))
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    itemsize = x1.element_size()
    budget = int(memory_budget) if memory_budget is not None else available_memory() // 2
    if budget <= 0:
        raise ValueError(f"`memory_budget` must be a positive number of bytes, got {memory_budget}")

    # Probe the output layout with a 1 x 1 tile (cheap), then size the tiles.
    probe = kernel_tile(arch, x1[:1], None, want_ntk, full)
    out_tail = tuple(probe.nngp.shape[2:])
    out_entry = itemsize * max(1, math.prod(out_tail)) * len(keys)
    ns = x1.ndim - 2
    pix = math.prod(x1.shape[2:]) if ns else 1
    per_entry = LIVE_ARRAYS * itemsize * (pix * pix if full else pix)
    b = plan_tile(n1, n2, per_entry, out_entry, budget, fc=(ns == 0), tile=tile)

    if b >= n1 and b >= n2:
        k = kernel_tile(arch, x1, x2, want_ntk, full)
        return _finish(k, keys, single)

    like = dict(dtype=x1.dtype, device=x1.device)
    out = {key: torch.empty((n1, n2) + out_tail, **like) for key in keys}
    cov1 = torch.empty((n1,) + tuple(probe.cov1.shape[1:]), **like)
    cov2 = None if x2 is None else torch.empty((n2,) + tuple(probe.cov1.shape[1:]), **like)
    rows = [slice(i, min(i + b, n1)) for i in range(0, n1, b)]
    cols = rows if x2 is None else [slice(j, min(j + b, n2)) for j in range(0, n2, b)]
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(cols))
             if x2 is not None or j >= i]
    from tqdm.auto import tqdm
    diag_sp = probe.diagonal_spatial
    out_ns = len(probe.shape1) - 1
    for i, j in tqdm(pairs, desc="kernel tiles", disable=not progress, leave=False):
        I, J = rows[i], cols[j]
        if x2 is None and i == j:
            kt = kernel_tile(arch, x1[I], None, want_ntk, full)
            cov1[I] = kt.cov1
        else:
            kt = kernel_tile(arch, x1[I], (x1 if x2 is None else x2)[J], want_ntk, full)
            if x2 is not None:
                if j == 0:
                    cov1[I] = kt.cov1
                if i == 0:
                    cov2[J] = kt.cov2
        for key in keys:
            t = getattr(kt, key)
            out[key][I, J] = t
            if x2 is None and i != j:
                out[key][J, I] = _mirror(t, out_ns, diag_sp)
    k = probe.replace(nngp=out.get("nngp"), ntk=out.get("ntk"), cov1=cov1, cov2=cov2,
                      shape2=probe.shape1 if x2 is None else probe.shape2)
    return _finish(k, keys, single, already=True)


def _finish(k: Kernel, keys, single: bool, already: bool = False):
    if single:
        return getattr(k, keys[0])
    if "nngp" not in keys:
        k = k.replace(nngp=None)
    if "ntk" not in keys:
        k = k.replace(ntk=None)
    return k
