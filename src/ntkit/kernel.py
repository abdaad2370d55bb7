"""The immutable kernel record that flows through an architecture's kernel maps.

A :class:`Kernel` holds the NNGP covariance and the NTK between two batches ``x1`` (n1 examples)
and ``x2`` (n2 examples) at one point of the network, plus what the next layer needs to continue
the recursion: the self-covariances (variances) of each batch and the per-example shape.

Layouts (``S`` = spatial dims, channels are always integrated out):

* fully connected: ``nngp``/``ntk`` ``(n1, n2)``, ``cov1`` ``(n1,)``, ``cov2`` ``(n2,)``;
* spatial, diagonal (only same-pixel covariances, enough when Flatten/Dense follows):
  ``nngp`` ``(n1, n2, *S)``, ``cov1`` ``(n1, *S)``;
* spatial, full (pixel-pair covariances, needed under pooling):
  ``nngp`` ``(n1, n2, *S, *S)``, ``cov1`` ``(n1, *S, *S)``.

``cov2 is None`` means ``x2`` is ``x1``: the kernel is symmetric and its batch diagonal equals
``cov1`` exactly (layers keep it so; this is how exact diagonals survive float32).
``ntk is None`` while ``want_ntk`` is true means the NTK is identically zero (inputs).

Example::

    >>> k = arch.kernel(x, get=('nngp', 'ntk'))
    >>> k.nngp.shape, k.ntk.shape
    (torch.Size([10, 10]), torch.Size([10, 10]))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

__all__ = ["Kernel"]


def _token(t: Optional[torch.Tensor]) -> Optional[Tuple[torch.Tensor, int]]:
    return None if t is None else (t, t._version)


def _same(a: Optional[Tuple[torch.Tensor, int]], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a[0] is b and a[1] == b._version


@dataclass(frozen=True, eq=False)
class GramFactors:
    """A low-rank description of a full pixel-pair kernel that layers may use as a shortcut:
    ``nngp[i, j, p, q] = a s^2 <f1[i, :, p], f2[j, :, q]> + b`` and the same for ``ntk`` with
    its own ``(a, b)`` (``None``: the NTK is zero), ``f1`` ``(n1, C, P)`` / ``f2`` ``(n2, C, P)``
    (``None``: ``x2`` is ``x1``), ``s = fscale`` (the features stay near unit scale, as the
    input kernel's own products). Set by the input kernel and carried through ``Dense``; valid
    only while ``nngp`` and ``ntk`` are the very tensors it was made for, unmodified (they are
    held with torch's in-place version counter), and dropped by :meth:`Kernel.replace` unless
    passed again, so no other layer can carry a stale one."""

    f1: torch.Tensor
    f2: Optional[torch.Tensor]
    fscale: float
    nngp_ab: Tuple[float, float]
    ntk_ab: Optional[Tuple[float, float]]
    tokens: Tuple[Any, Any]

    @staticmethod
    def make(f1: torch.Tensor, f2: Optional[torch.Tensor], fscale: float,
             nngp_ab: Tuple[float, float], ntk_ab: Optional[Tuple[float, float]],
             nngp: torch.Tensor, ntk: Optional[torch.Tensor]) -> "GramFactors":
        return GramFactors(f1, f2, fscale, nngp_ab, ntk_ab, (_token(nngp), _token(ntk)))

    def valid_for(self, k: "Kernel") -> bool:
        """Whether this still describes ``k.nngp`` / ``k.ntk`` exactly."""
        return _same(self.tokens[0], k.nngp) and _same(self.tokens[1], k.ntk) and \
            (self.ntk_ab is None) == (k.ntk is None)


@dataclass(frozen=True, eq=False)
class Kernel:
    """Kernel state between batches ``x1`` and ``x2`` (see module docstring for layouts).

    Attributes:
      nngp: NNGP covariance ``E[f(x1) f(x2)]`` per output unit, or ``None`` if not computed.
      ntk: neural tangent kernel, or ``None`` (zero, or not requested).
      cov1: self-covariance of each ``x1`` example (its variance in the FC case).
      cov2: same for ``x2``; ``None`` when ``x2`` is ``x1``.
      shape1, shape2: per-example output shape ``(channels, *spatial)`` of the layer.
      want_ntk: whether the NTK is being computed.
      is_gaussian: whether the pre-activations are Gaussian (true after Dense/Conv).
      diagonal_spatial: spatial layout, see module docstring (irrelevant for FC).
      mask1, mask2: boolean position masks ``(n1, *S)`` / ``(n2, *S)`` (``(n,)`` for FC)
        when the kernel is evaluated with ``mask_constant``: ``True`` marks a masked
        (padding) position, whose covariances are zero. ``mask1 is None``: no masking;
        ``mask2 is None`` with ``mask1`` set: ``x2`` is ``x1`` (symmetric tile).
    """

    nngp: Optional[torch.Tensor]
    ntk: Optional[torch.Tensor]
    cov1: Optional[torch.Tensor]
    cov2: Optional[torch.Tensor]
    shape1: Tuple[int, ...]
    shape2: Tuple[int, ...]
    want_ntk: bool = True
    is_gaussian: bool = False
    diagonal_spatial: bool = True
    mask1: Optional[torch.Tensor] = None
    mask2: Optional[torch.Tensor] = None
    #: optional low-rank shortcut (:class:`GramFactors`); internal, dropped by :meth:`replace`
    gram: Optional[GramFactors] = None

    def replace(self, **changes: Any) -> "Kernel":
        """A copy with some fields changed (the record itself is never mutated). The
        :class:`GramFactors` shortcut is dropped unless ``gram=`` is passed again."""
        changes.setdefault("gram", None)
        return dataclasses.replace(self, **changes)

    def valid_gram(self) -> Optional[GramFactors]:
        """The :class:`GramFactors` shortcut if it still describes this kernel, else ``None``."""
        g = self.gram
        return g if g is not None and self.mask1 is None and g.valid_for(self) else None

    @property
    def symmetric(self) -> bool:
        """True when ``x2`` is ``x1`` (the kernel is symmetric with exact batch diagonal)."""
        return self.cov2 is None

    @property
    def n_spatial(self) -> int:
        """Number of spatial dimensions of the per-example shape (0 for fully connected)."""
        return len(self.shape1) - 1

    def __repr__(self) -> str:
        def s(t: Optional[torch.Tensor]) -> Optional[Tuple[int, ...]]:
            return None if t is None else tuple(t.shape)
        return (f"Kernel(nngp={s(self.nngp)}, ntk={s(self.ntk)}, shape1={self.shape1}, "
                f"shape2={self.shape2}, symmetric={self.symmetric})")
