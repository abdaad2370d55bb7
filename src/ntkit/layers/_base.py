"""The architecture node: every layer (and every combination of layers) is a :class:`Layer`.

A layer knows three things, all derived from one definition:

* ``kernel_map(k) -> k'``: how the exact infinite-width NNGP/NTK change through it;
* ``build(in_shape, ctx, followed) -> (module, out_shape)``: the finite ``nn.Module`` it stands
  for, with the parameterization and initialization the kernel map assumes;
* ``out_shape(in_shape)``.

Any layer is an architecture: ``layer.kernel(x1, x2)`` evaluates the kernel tile by tile
(upper triangle only when ``x2`` is ``None``) and ``layer.module(in_shape)`` builds the network.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._validation import as_tensor, check_int, parse_get, parse_memory_budget
from ..kernel import Kernel

__all__ = ["Layer", "BuildContext", "KernelLike", "available_memory", "DEFAULT_DTYPE"]

DEFAULT_DTYPE = torch.float64
KernelLike = Union[Kernel, Tuple[Kernel, ...]]
Shape = Tuple[int, ...]


def available_memory() -> int:
    """Bytes of RAM available now (``MemAvailable``), or 4 GiB if it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class BuildContext:
    """What building a finite network needs besides the architecture."""
    width: Optional[int] = None
    generator: Optional[torch.Generator] = None
    dtype: torch.dtype = DEFAULT_DTYPE


class Layer:
    """Base class of architecture nodes (immutable; subclasses are frozen dataclasses)."""

    # ---- to be provided by subclasses -------------------------------------------------
    def kernel_map(self, k: KernelLike) -> KernelLike:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no kernel map")

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no finite module")  # pragma: no cover

    def out_shape(self, in_shape: Any) -> Any:
        return in_shape

    @property
    def has_linear(self) -> bool:
        """Whether the layer contains a trainable linear map (Dense/Conv)."""
        return False

    def needs_full_spatial(self, above: bool) -> bool:
        """Whether the representation *entering* this layer must keep pixel-pair covariances,
        given whether the layers above need it (``above``). Default: pass through."""
        return above

    # ---- architecture API ------------------------------------------------------------
    def kernel(self, x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = ("nngp", "ntk"),
               *, dtype: Optional[torch.dtype] = None,
               memory_budget: Union[int, float, str, None] = None,
               progress: bool = False, tile: Optional[int] = None):
        """Exact infinite-width kernels of this architecture between ``x1`` and ``x2``.

        Args:
          x1: ``(n1, d)`` (or ``(n1, C, *spatial)``) tensor or array.
          x2: ``(n2, ...)`` with the same per-example shape, or ``None`` for ``x2 = x1``: then only
            the upper triangle of tiles is computed and the diagonal is exact.
          get: ``'nngp'``, ``'ntk'`` (returns that ``(n1, n2)`` tensor) or a tuple of them (returns
            a :class:`~ntkit.Kernel` record with ``.nngp`` / ``.ntk``). Only what is asked for is
            computed (the NTK recursion needs the NNGP, not the reverse).
          dtype: dtype of the recursion; default ``float64`` (float32 loses angles near the
            diagonal). ``torch.float32`` is about 2x faster.
          memory_budget: bytes the computation may use (default: half the available RAM): a
            positive number of bytes or a string with a unit, ``'512MB'``, ``'2GiB'``.
          progress: show a progress bar over tiles.
          tile: override the tile edge (examples per block); chosen automatically otherwise.

        Returns ``(n1, n2)`` kernels (empty when ``x1`` or ``x2`` has no rows). Raises
        ``ValueError`` when the architecture's output keeps spatial axes (add ``Flatten()``),
        when the inputs have no features, and when the kernel is not representable in
        ``dtype`` (overflow, or variances below the smallest normal number): never ``inf``,
        ``NaN`` or a silently imprecise number.

        Example::

            >>> arch = serial(Dense(512), Relu(), Dense(1))
            >>> arch.kernel(torch.randn(5, 3), get='ntk').shape
            torch.Size([5, 5])
        """
        keys, single = parse_get(get)
        memory_budget = parse_memory_budget(memory_budget)
        if tile is not None:
            tile = check_int(tile, "tile")
        dtype = DEFAULT_DTYPE if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
        x1 = as_tensor(x1, "x1", dtype)
        x2 = None if x2 is None else as_tensor(x2, "x2", dtype)
        if 0 in x1.shape[1:]:
            raise ValueError(f"`x1` has per-example shape {tuple(x1.shape[1:])} with no features "
                             f"(a zero-length axis); the kernel needs inputs (n, d) or "
                             f"(n, C, *spatial) with d, C and every spatial size >= 1")
        if x2 is not None and x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"`x2` per-example shape {tuple(x2.shape[1:])} does not match `x1` "
                             f"{tuple(x1.shape[1:])}; both must be (n, *feature_shape)")
        from ._tiling import evaluate
        return evaluate(self, x1, x2, keys, single, memory_budget=memory_budget,
                        progress=progress, tile=tile)

    def features(self, x: Any, dim: int = 1024, get: Union[str, Sequence[str]] = "ntk",
                 **kwargs):
        """Random features ``phi`` with ``phi(x1) @ phi(x2).T ~= self.kernel(x1, x2, get)``
        (error ~ ``dim^-1/2``); see :func:`ntkit.features.features` for the arguments.

        Example::

            >>> phi = serial(Dense(512), Relu(), Dense(1)).features(torch.randn(5, 3), 4096)
            >>> phi.shape
            torch.Size([5, 8194])
        """
        from ._features import features
        return features(self, x, dim, get, **kwargs)

    def module(self, in_shape: Union[int, Sequence[int]], width: Optional[int] = None,
               seed: Optional[int] = None, dtype: torch.dtype = DEFAULT_DTYPE) -> nn.Module:
        """The finite network this architecture describes.

        Args:
          in_shape: per-example input shape, ``d`` or ``(C, *spatial)``.
          width: if given, replaces the width (``out_dim`` / ``out_chan``) of every Dense/Conv
            layer that is followed by another one (all but the readout).
          seed: seed for the initialization (parameters drawn i.i.d. from the distribution the
            kernel assumes: ``N(0, 1)`` in NTK parameterization, ``N(0, W_std^2 / fan_in)`` in
            standard parameterization).
          dtype: parameter dtype.

        Example::

            >>> net = serial(Dense(512), Relu(), Dense(1)).module(3, width=2048, seed=0)
            >>> net(torch.randn(4, 3, dtype=torch.float64)).shape
            torch.Size([4, 1])
        """
        if isinstance(in_shape, int):
            in_shape = (in_shape,)
        in_shape = tuple(int(s) for s in in_shape)
        if not in_shape or any(s < 1 for s in in_shape):
            raise ValueError(f"`in_shape` must be positive sizes (d,) or (C, *spatial), "
                             f"got {in_shape}")
        if width is not None and (not isinstance(width, int) or width < 1):
            raise ValueError(f"`width` must be a positive integer, got {width!r}")
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        mod, _ = self.build(in_shape, BuildContext(width, gen, dtype), followed=False)
        return mod

    # ---- conveniences ----------------------------------------------------------------
    def __rshift__(self, other: "Layer") -> "Layer":
        from .combinators import serial
        return serial(self, other)


def frozen_layer(cls):
    """Decorator: make a Layer subclass an immutable dataclass with value equality."""
    return dataclass(frozen=True, repr=True, eq=True)(cls)
