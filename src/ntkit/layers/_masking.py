"""Masking with ``mask_constant`` (neural-tangents' ``kernel_fn(..., mask_constant=c)`` /
``apply_fn(..., mask_constant=c)``): variable-length sequences, images or graphs padded with a
constant and masked out of pooling, attention and normalization.

Semantics (neural-tangents 0.6.5, ``stax.requirements.supports_masking``), channels first:

* Input: entries of ``x`` equal to ``c`` (``NaN`` matches ``NaN``) are set to zero; a
  *position* ``(n, :, p)`` is masked when all its channels equal ``c`` (FC inputs ``(n, d)``:
  the whole example). Positions where only some channels equal ``c`` are refused unless the
  first layer is ``Dense`` / ``Conv`` / ``GlobalSelfAttention`` (which collapse the channels,
  as NT's mask functions do), because NT's per-channel masks are not supported downstream.
* Every layer sees its input zeroed at masked positions (NT zeroes the inputs of every
  layer); in the kernel this is "covariances involving a masked position are zero", applied
  after every layer (:func:`remask`) except those that provably keep such zeros
  (:func:`keeps_zeros`: Identity, ABRelu, bias-free Dense).
* Masks propagate per layer (:meth:`ntkit.layers.Layer.mask_map`): unchanged through
  position-wise layers (Dense, activations, LayerNorm, Aggregate, attention); ``Conv`` /
  ``AvgPool`` / ``SumPool``: an output position is masked when its window's centre input
  position is (NT's ``_pool_mask``); ``GlobalAvgPool`` / ``GlobalSumPool`` / ``Flatten``: the
  example is masked when all its positions are; ``FanInSum``: masked where all branches are;
  ``FanInConcat``: branches must have equal masks.
* Layers that read the mask: ``GlobalAvgPool`` averages over unmasked positions only (sum /
  number of unmasked positions); ``GlobalSelfAttention`` excludes masked keys from the
  attention (softmax logit ``-inf``; weight 0 for the other mechanisms) and zeroes the
  positional embeddings at masked positions; ``LayerNorm`` over spatial axes averages the
  variance over unmasked positions. ``Flatten`` and ``AvgPool`` keep their denominators
  (masked positions count as zeros), as in NT.

The finite network (``net(x, mask_constant=c)``) carries a :class:`Masked` value between its
modules; each module zeroes its input at the masked positions and computes its output mask.
Its output is a plain tensor with masked positions zeroed (NT's ``unmask_fn``).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

from ._ops import memo_self

__all__ = ["MASK_ARG", "Masked", "unwrap", "wrap", "check_mask_constant", "input_masks", "remask",
           "refusal", "check_supported", "keeps_zeros", "centre_mask", "all_positions", "mask_pre_hook",
           "mask_post_hook"]

Tensor = torch.Tensor

#: internal call-time argument carrying the position masks ``(m1, m2)`` through the tiles
MASK_ARG = "_ntkit_mask"


class Masked:
    """A value of the finite network with its boolean position mask ``(n, *S)`` (``(n,)``
    for FC values): ``True`` = masked. Not a tuple, so combinators pass it through intact."""

    __slots__ = ("value", "mask")

    def __init__(self, value: Tensor, mask: Tensor):
        self.value, self.mask = value, mask

    @property
    def shape(self):
        return self.value.shape

    def __repr__(self) -> str:
        return f"Masked(value={tuple(self.value.shape)}, mask={tuple(self.mask.shape)})"


def _expand(mask: Tensor, value: Tensor) -> Tensor:
    """``(n, *S)`` position mask broadcastable against ``(n, C, *S)`` values."""
    return mask.unsqueeze(1)


def unwrap(x: Any) -> Tuple[Any, Optional[Tensor]]:
    """``(value zeroed at masked positions, mask)`` for a :class:`Masked`, else ``(x, None)``."""
    if not isinstance(x, Masked):
        return x, None
    m = x.mask
    if not bool(m.any()):
        return x.value, m
    return x.value.masked_fill(_expand(m, x.value), 0), m


def wrap(y: Any, mask: Optional[Tensor]) -> Any:
    """``Masked(y, mask)``, or ``y`` itself when no mask is active."""
    return y if mask is None else Masked(y, mask)


def check_mask_constant(c: Any) -> float:
    """``c`` as a float (``NaN`` and ``+-inf`` allowed: NT's masks accept them)."""
    if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, float, np.integer,
                                                             np.floating)):
        if torch.is_tensor(c) and c.numel() == 1 and not c.dtype == torch.bool:
            return float(c)
        raise TypeError(f"`mask_constant` must be a real number (the padding value of the "
                        f"inputs, e.g. -1e9 or float('nan')) or None, got {c!r}")
    return float(c)


def _raw(x: Any, name: str) -> Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        arr = np.asarray(x)
        if arr.dtype != object and (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            return torch.from_numpy(np.ascontiguousarray(arr))
    raise TypeError(f"`{name}` must be a torch.Tensor or numpy array, got {type(x).__name__}")


def collapses_channels(layer) -> bool:
    """Whether the first layer the inputs meet collapses the channel axis of masks (its class
    sets ``collapses_mask_channels``: Dense, Conv, GlobalSelfAttention)."""
    return bool(layer.first_layer().collapses_mask_channels)


def input_masks(collapse: bool, x: Any, c: float, name: str) -> Tuple[Tensor, Tensor]:
    """``(x with entries equal to c zeroed, position mask (n, *S))`` (see module docstring).

    The comparison is made in ``x``'s own dtype (as NT does), before any conversion."""
    t = _raw(x, name)
    if t.ndim < 2:
        # (as_tensor reports the shape)
        return t, torch.zeros(t.shape[:1], dtype=torch.bool, device=t.device)
    if math.isnan(c):
        hit = torch.isnan(t) if t.is_floating_point() else torch.zeros_like(t, dtype=torch.bool)
    else:
        hit = t == c
    pos = hit.all(1)
    partial = hit.any(1) & ~pos
    if bool(partial.any()) and not collapse:
        idx = tuple(int(i) for i in partial.nonzero()[0])
        where = f"example {idx[0]}" + (f", position {idx[1:]}" if len(idx) > 1 else "")
        raise ValueError(
            f"`{name}` ({where}) has channels equal to mask_constant={c!r} next to channels "
            f"that are not: a masked position must hold the constant on every channel "
            f"(axis 1). Per-channel masks are only supported when the architecture starts "
            f"with Dense, Conv or GlobalSelfAttention (as in neural-tangents, whose other "
            f"layers refuse them); pad whole positions, or pick a constant the data never "
            f"takes")
    if bool(hit.any()):
        t = t.masked_fill(hit, 0)
    return t, pos


def refusal(layer) -> ValueError:
    name = type(layer).__name__
    return ValueError(
        f"{name} does not support `mask_constant` (masked inputs): neural-tangents' masking "
        f"semantics are implemented for activations, Dense, Conv, LayerNorm, AvgPool, SumPool, "
        f"GlobalAvgPool, GlobalSumPool, Flatten, GlobalSelfAttention, Aggregate, Identity, "
        f"FanOut, FanInSum, FanInConcat, serial and parallel; evaluate without "
        f"mask_constant (e.g. crop the padding) or remove {name}")


def first_unsupported(arch):
    """The first layer of ``arch`` that cannot honour masks, or ``None``."""
    for sub in arch.walk():
        if not getattr(sub, "supports_masking", False):
            return sub
    return None


def check_supported(arch) -> None:
    """Raise :func:`refusal` for the first layer of ``arch`` that cannot honour masks."""
    bad = first_unsupported(arch)
    if bad is not None:
        raise refusal(bad)


def module_info(arch) -> Tuple[Optional[str], bool]:
    """What the finite network's hooks need: (refusal message or None, collapses channels)."""
    bad = first_unsupported(arch)
    return (None if bad is None else str(refusal(bad)), collapses_channels(arch))


# ---- kernel side -------------------------------------------------------------------------

def _pair_factors(ma: Tensor, mb: Tensor, batch_ndim: int, ns: int, full: bool):
    """Two tensors that broadcast to the layout of a covariance between blocks with position
    masks ``ma``, ``mb`` (``batch_ndim=2``: cross ``(n1, n2, ...)``; ``1``: self ``(n, ...)``,
    ``mb is ma``), one per side: the entry involves a masked position where either is set."""
    if batch_ndim == 2:
        if ns == 0 or not full:
            return ma[:, None], mb[None, :]
        one = (1,) * ns
        return (ma.reshape(ma.shape[:1] + (1,) + ma.shape[1:] + one),
                mb.reshape((1,) + mb.shape[:1] + one + mb.shape[1:]))
    if ns == 0 or not full:
        return ma, ma
    one = (1,) * ns
    return ma.reshape(ma.shape + one), ma.reshape(ma.shape[:1] + one + ma.shape[1:])


def _pair_mask(ma: Tensor, mb: Tensor, batch_ndim: int, ns: int, full: bool) -> Tensor:
    """Mask of the entries of a covariance between blocks with position masks ``ma``, ``mb``:
    ``batch_ndim=2``: cross ``(n1, n2, ...)``; ``1``: self ``(n, ...)`` (``mb is ma``)."""
    a, b = _pair_factors(ma, mb, batch_ndim, ns, full)
    return a if a is b else a | b


def _fill(t: Optional[Tensor], m: Tensor) -> Optional[Tensor]:
    if t is None or t.ndim == 0:
        return t
    return t.masked_fill(m, 0)


def _cached_pair_mask(ma: Tensor, mb: Tensor, batch_ndim: int, ns: int, full: bool) -> Tensor:
    """:func:`_pair_mask`, cached on ``ma`` for the partner ``mb`` (same arguments).

    Why: position-wise layers (Dense, activations, attention) pass their input masks on as the
    same tensors, so every layer of a tile rebuilt the same ``(n1, n2, *S, *S)`` mask (as much
    time as the fill itself). The cache lives on the mask tensor (masks are never mutated), so
    it goes when the tile's masks go; ``mb is ma`` is stored without a second reference to
    ``ma`` (no reference cycle)."""
    cache = getattr(ma, "_ntkit_pair_masks", None)
    tag = (batch_ndim, ns, full, None if mb is ma else id(mb))
    if cache is not None:
        hit = cache.get(tag)
        if hit is not None and (hit[0] is None or hit[0] is mb):
            return hit[1]
    else:
        cache = {}
        try:
            ma._ntkit_pair_masks = cache  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor types
            return _pair_mask(ma, mb, batch_ndim, ns, full)
    out = _pair_mask(ma, mb, batch_ndim, ns, full)
    if out is ma:  # (self masks without pixel pairs are ``ma`` itself: nothing to cache)
        return out
    if len(cache) >= 8:  # a mask meets few partners within a tile; keep the cache small
        cache.clear()
    cache[tag] = (None if mb is ma else mb, out)
    return out


def add_unmasked(t: Tensor, value: float, k, which: str) -> Tensor:
    """In place: ``t += value`` at the entries of ``t`` that involve no masked position (zero
    elsewhere stays zero), ``t`` laid out as ``k``'s cross covariance (``which='cross'``) or
    its x1 / x2 self-covariance (``'self1'`` / ``'self2'``). One broadcast ``addcmul`` (a pass
    like ``t += value``) instead of adding everywhere and :func:`remask` after: a biased layer
    then keeps masked covariances zero (Dense). ``k.mask1`` must be set."""
    ns = k.n_spatial
    full = bool(ns) and not k.diagonal_spatial
    m1 = k.mask1
    m2 = m1 if k.mask2 is None else k.mask2
    if which == "cross":
        a, b = _pair_factors(m1, m2, 2, ns, full)
    else:
        m = m1 if which == "self1" else m2
        a, b = _pair_factors(m, m, 1, ns, full)
    return t.addcmul_((~a).to(t.dtype), (~b).to(t.dtype), value=value)


def keeps_zeros(layer) -> bool:
    """Whether ``layer``'s kernel map sends a kernel that is zero at every covariance involving
    a masked position to one that is zero there again, masks unchanged; then
    :meth:`ntkit.layers.Layer.masked_kernel_map` skips :func:`remask` (which would rewrite
    zeros with zeros: same values, up to the sign of zero).

    Why this holds for the layers listed (every record passed between masked layers is
    already zero there: the zeroed inputs, each layer's remasked output, and FanInSum /
    FanInConcat of such records): ``Identity`` returns its input; ``Dense`` is
    ``W^2 * cov`` (+ ``width * nngp``) position by position and adds its bias terms (``b^2``,
    the standard parameterization's 1 in the NTK) only where no position is masked
    (:func:`add_unmasked`);
    ``ABRelu`` (Relu, LeakyRelu, Abs) maps a zero variance to correlation 0
    (:func:`ntkit.layers._ops.inv_sqrt`) and its output scales with ``sqrt(v1) sqrt(v2)``,
    its NTK term with the input NTK. ``tests/layers/test_masking_skip.py`` checks each one.
    Layers that move positions or read masked ones (attention, pooling, conv, LayerNorm,
    Aggregate) are not listed and always remask.

    Each listed class answers through :meth:`ntkit.layers.Layer.keeps_masked_zeros` for its
    exact type only (a subclass may override the kernel map); the rest inherit ``False``."""
    return bool(layer.keeps_masked_zeros())


def remask(k, key=None):
    """The kernel record with covariances involving a masked position set to zero (the next
    layer's input is zeroed there). Self-covariances go through the tile memo under ``key``
    (the same block keeps the same tensors, so later layers still reuse their maps)."""
    if k.mask1 is None:
        return k
    m1 = k.mask1
    m2 = m1 if k.mask2 is None else k.mask2
    ns = k.n_spatial
    full = bool(ns) and not k.diagonal_spatial
    any1, any2 = bool(m1.any()), bool(m2.any())
    if not (any1 or any2):
        return k
    mc = _cached_pair_mask(m1, m2, 2, ns, full)

    def self_fill(m):
        return lambda c: _fill(c, _cached_pair_mask(m, m, 1, ns, full))

    mkey = None if key is None else ("remask", key)
    cov1 = memo_self(mkey, k.cov1, self_fill(m1)) if any1 else k.cov1
    cov2 = k.cov2
    if cov2 is not None and any2:
        cov2 = memo_self(mkey, cov2, self_fill(m2))
    return k.replace(nngp=_fill(k.nngp, mc), ntk=_fill(k.ntk, mc), cov1=cov1, cov2=cov2)


def all_positions(mask: Tensor) -> Tensor:
    """``(n,)``: the example is masked when all its positions are."""
    return mask.reshape(mask.shape[0], -1).all(1) if mask.ndim > 1 else mask


def centre_mask(mask: Tensor, window: Sequence[int], strides: Sequence[int], pads,
                circular: bool, out_spatial: Sequence[int]) -> Tensor:
    """Output position mask of a window operation (Conv / pooling): an output position is
    masked when the centre ``(w - 1) // 2`` of its window is a masked input position (NT's
    ``_pool_mask``); centres in the zero padding are not masked; circular padding wraps."""
    out = mask
    for d, (w, s, (lo, _), o) in enumerate(zip(window, strides, pads, out_spatial)):
        size = mask.shape[1 + d]
        idx = torch.arange(o, device=mask.device) * s - lo + (w - 1) // 2
        if circular:
            idx = idx % size
            out = out.index_select(1 + d, idx)
        else:
            valid = (idx >= 0) & (idx < size)
            picked = out.index_select(1 + d, idx.clamp(0, size - 1))
            shape = [1] * out.ndim
            shape[1 + d] = o
            out = picked & valid.reshape(shape)
    return out


# ---- finite network: top-level hooks -------------------------------------------------------

def mask_pre_hook(module, args, kwargs):
    """``net(x, mask_constant=c)``: zero the padding of ``x`` and pass a :class:`Masked` on."""
    if "mask_constant" not in kwargs:
        return None
    kwargs = dict(kwargs)
    c = kwargs.pop("mask_constant")
    if c is None:
        return args, kwargs
    c = check_mask_constant(c)
    info = getattr(module, "_ntkit_mask_info", None)
    if info is None:  # pragma: no cover - hooks are only installed by Layer.module
        raise TypeError("forward() got an unexpected keyword argument 'mask_constant'")
    if info[0] is not None:
        raise ValueError(info[0])
    if not args:
        raise TypeError("forward() with mask_constant needs the input x as first argument")
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"with mask_constant, the input must be a tensor (n, C, *spatial) or "
                         f"(n, d), got {type(x).__name__} "
                         f"{tuple(x.shape) if torch.is_tensor(x) else ''}")
    xz, pos = input_masks(info[1], x, c, "x")
    return (Masked(xz, pos.to(xz.device)),) + tuple(args[1:]), kwargs


def _unmask(y):
    if isinstance(y, Masked):
        v, _ = unwrap(y)
        return v
    if isinstance(y, tuple):
        return tuple(_unmask(t) for t in y)
    return y


def mask_post_hook(module, args, kwargs, output):
    """The network's output as plain tensors, masked positions zeroed (NT's ``unmask_fn``)."""
    if isinstance(output, (Masked, tuple)):
        return _unmask(output)
    return None
