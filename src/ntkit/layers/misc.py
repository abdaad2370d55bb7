"""``Dropout``, ``Index`` (with the ``Slice`` helper) and ``DotGeneral``: neural-tangents' stax
layers of the same names, for ntkit's channels-first batches ``(N, C, *spatial)``.

Kernel maps (``K`` the NNGP or NTK, ``v`` the per-example variances):

* ``Dropout(rate, mode)``: ``rate`` is the KEEP probability (NT / ``jax.example_libraries``
  convention; ``torch.nn.Dropout(p)`` is ``Dropout(rate=1 - p)``). ``'test'`` mode is the
  identity. ``'train'`` mode: every unit of every example is kept with probability ``rate`` and
  scaled by ``1 / rate``, masks independent across units, examples and forward passes, so a
  unit's second moment becomes ``v / rate`` while products of two different examples keep their
  mean. ``arch.kernel(x)`` describes ONE forward pass over the batch ``x``: its batch diagonal
  (and, in the pixel-pair layout, only its pixel diagonal) is multiplied by ``1 / rate``, and so
  are the self-covariances. ``arch.kernel(x1, x2)`` describes two independent passes: no entry
  is scaled, even where ``x2`` equals ``x1`` (NT scales ``kernel_fn(x, x)`` like
  ``kernel_fn(x)``; here ``kernel(x, x)`` is the cross-covariance of two passes). With this
  definition ``kernel(cat([x1, x2]))[:n1, n1:] == kernel(x1, x2)`` and tiles agree with the full
  matrix. Repeated rows of one batch are distinct examples (independent masks).
* ``Index(idx)``: ``x[idx]`` on the channels-first batch; the batch and channel entries must be
  ``:`` (the channel axis is infinitely wide in the kernel); spatial axes take integers (which
  remove the axis) and slices (any step, also negative). The kernel is indexed the same way on
  each of its spatial axes.
* ``DotGeneral(lhs=..., rhs=...)``: ``jax.lax.dot_general`` of the inputs with a fixed constant
  on the spatial axes; the output is the dot_general result with the input's batch and channel
  axes moved to the front, ``(N, C, *rest)``. A linear map ``A`` of the spatial axes maps
  ``K -> A K A^T`` (NNGP and NTK alike; Gaussianity is kept). Contractions need pixel-pair
  covariances; maps without contraction (scaling, broadcasting, batch dims) act on the per-pixel
  layout with the constant squared.

Example::

    >>> arch = nl.serial(nl.Conv(64, 3), nl.Relu(), nl.Index(nl.Slice[:, :, 1:5, ::-1]),
    ...                  nl.DotGeneral(rhs=torch.tensor([1., -1.]),
    ...                                dimension_numbers=(((3,), (0,)), ((), ()))),
    ...                  nl.Dropout(0.9), nl.Flatten(), nl.Dense(1))
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple, cast

import numpy as np
import torch
from torch import nn

from .._validation import check_real
from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._ops import batch_diag, memo_self, set_batch_diag
from . import _feature_ops as fo

__all__ = ["Dropout", "Index", "Slice", "DotGeneral"]

Tensor = torch.Tensor


def _single(k, name):
    if isinstance(k, tuple):
        raise ValueError(f"{name} received several branches; merge them first (FanInSum, "
                         f"FanInConcat)")
    return k


# ---------------------------------------------------------------------------------------------
# Dropout


def _scale_pixel_diag(t: Tensor, f: float, ns: int, full: bool) -> Tensor:
    """In place: multiply the per-pixel variances of ``t`` (``(n, *S)`` diagonal layout or FC,
    or ``(n, *S, *S)`` pixel-pair layout, where only the ``(p, p)`` entries are variances)."""
    if not full or ns == 0:
        return t.mul_(f)
    n = t.shape[0]
    p = math.prod(t.shape[1:1 + ns])
    t.view(n, p, p).diagonal(dim1=1, dim2=2).mul_(f)
    return t


class DropoutModule(nn.Module):
    """Finite dropout: keep each unit with probability ``rate`` and scale kept ones by
    ``1 / rate`` while in training mode (``mode='train'``); identity in ``mode='test'`` and
    after ``module.eval()``. Masks come from a private generator seeded at construction."""

    def __init__(self, rate: float, mode: str, seed: int):
        super().__init__()
        self.rate, self.mode, self.seed = rate, mode, seed
        self._gen = None

    def forward(self, x):
        if self.mode == "test" or not self.training or self.rate == 1.0:
            return x
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
        keep = torch.rand(x.shape, generator=self._gen, dtype=x.dtype, device=x.device) < self.rate
        return x * keep / self.rate

    def extra_repr(self):
        return f"rate={self.rate} (keep probability), mode={self.mode!r}"


@frozen_layer
class Dropout(Layer):
    """``Dropout(rate, mode='train')``: NT's ``stax.Dropout``; ``rate`` is the KEEP probability
    in ``(0, 1]`` (``torch.nn.Dropout(p)`` is ``Dropout(1 - p)``).

    ``'train'``: the kernel of one forward pass with random masks (batch diagonal and variances
    times ``1 / rate``; ``kernel(x1, x2)`` with ``x2`` given is two independent passes and is
    not scaled; see the module docstring). ``'test'``: identity. The finite module drops units
    while ``module.training`` is true. After train-mode dropout the outputs are not Gaussian
    (like NT): put a Dense/Conv layer before the next activation.

    Example: ``serial(Dense(512), Relu(), Dropout(0.8), Dense(1))``.
    """
    rate: float
    mode: str = "train"

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        if not self.per_pass_noise:      # mode='test' or rate=1: the identity
            return fo.SeqOp([]), self.out_shape(in_shape)
        raise NotImplementedError(
            f"features: no random-feature rule for Dropout(rate={self.rate}, mode='train'): its "
            f"kernel is that of one forward pass with random masks (the batch diagonal scaled "
            f"by 1/rate), which no fixed feature map reproduces; use Dropout(rate, mode='test') "
            f"(the identity) for features, or arch.kernel / method='jacobian'")

    def __post_init__(self):
        r = check_real(self.rate, "rate")
        if not 0.0 < r <= 1.0:
            raise ValueError(f"Dropout: `rate` is the keep probability and must be in (0, 1], "
                             f"got {self.rate!r} (torch.nn.Dropout(p) is Dropout(rate=1 - p))")
        object.__setattr__(self, "rate", r)
        if self.mode not in ("train", "test"):
            raise ValueError(f"Dropout: `mode` must be 'train' or 'test', got {self.mode!r}")

    @property
    def per_pass_noise(self) -> bool:
        """True when the kernel depends on which examples share a forward pass (train mode):
        repeated rows of a batch must then not be merged."""
        return self.mode == "train" and self.rate != 1.0

    def chain_stage(self, in_shape: Any, dtype: torch.dtype) -> Optional[Tuple[int, Tuple[float, ...]]]:
        return (-1, ()) if not self.per_pass_noise and type(self) is Dropout else None

    def kernel_map(self, k: Kernel) -> Kernel:
        k = _single(k, "Dropout")
        if not self.per_pass_noise:
            return k
        f = 1.0 / self.rate
        ns = k.n_spatial
        full = ns > 0 and not k.diagonal_spatial
        key = ("dropout", self, ns, k.diagonal_spatial)

        def scale(c):
            return _scale_pixel_diag(c.clone(), f, ns, full)

        cov1 = memo_self(key, k.cov1, scale)
        cov2 = memo_self(key, k.cov2, scale)
        nngp, ntk = k.nngp, k.ntk
        if k.cov2 is None:  # one pass: the batch diagonal is each example with itself
            if nngp is not None:
                nngp = nngp.clone()
                set_batch_diag(nngp, cov1)
            if ntk is not None:
                ntk = ntk.clone()
                d = batch_diag(ntk).clone(memory_format=torch.contiguous_format)
                set_batch_diag(ntk, _scale_pixel_diag(d, f, ns, full))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        gen = getattr(ctx, "generator", None)
        seed = int(torch.randint(0, 2 ** 62, (), generator=gen,
                                 device="cpu" if gen is None else gen.device).item())
        return DropoutModule(self.rate, self.mode, seed), in_shape


# ---------------------------------------------------------------------------------------------
# Index


class _Slice:
    """``Slice[1:3, ::-1]`` returns the index ``(slice(1, 3), slice(None, None, -1))``: pass it
    to :class:`Index` (neural-tangents' ``stax.Slice``)."""

    def __getitem__(self, idx):
        return idx

    def __repr__(self):
        return "Slice"


Slice = _Slice()
"""Index builder, neural-tangents' ``stax.Slice``: ``Slice[:, :, 1:3, ::-1]`` is the tuple
``(slice(None), slice(None), slice(1, 3), slice(None, None, -1))`` for :class:`Index`."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _freeze_idx(idx) -> tuple:
    items = idx if isinstance(idx, tuple) else (idx,)
    out = []
    for it in items:
        if it is Ellipsis:
            out.append(Ellipsis)
        elif _is_int(it):
            out.append(int(it))
        elif isinstance(it, slice):
            for part, nm in ((it.start, "start"), (it.stop, "stop"), (it.step, "step")):
                if part is not None and not _is_int(part):
                    raise TypeError(f"Index: slice {nm} must be an integer or None, got {part!r}")
            if it.step == 0:
                raise ValueError("Index: slice step must not be zero")
            out.append(slice(*(None if p is None else int(p)
                               for p in (it.start, it.stop, it.step))))
        else:
            raise TypeError(f"Index: `idx` entries must be integers, slices or `...` (use "
                            f"nl.Slice[...]), got {it!r}; advanced (array/boolean) indexing "
                            f"and None (new axes) are not supported")
    if sum(it is Ellipsis for it in out) > 1:
        raise ValueError("Index: `idx` may contain at most one `...`")
    return tuple(out)


# A resolved spatial axis: ('int', i) removes the axis, ('keep', None) keeps it whole,
# ('narrow', (start, length)), ('take', tuple of indices).
Spec = Tuple[str, Any]


def _resolve_index(idx: tuple, in_shape: Tuple[int, ...]) -> Tuple[List[Spec], Tuple[int, ...]]:
    """Per spatial axis specs and the output per-example shape for input ``(C, *S)``."""
    ndim = 1 + len(in_shape)                      # the batch axis too
    n_ell = ndim - (len(idx) - (1 if Ellipsis in idx else 0))
    if n_ell < 0:
        raise ValueError(f"Index: `idx` {idx!r} has more entries than the batch has axes "
                         f"({ndim}: N, C, *spatial)")
    full: List[Any] = []
    for it in idx:
        full.extend([slice(None)] * n_ell if it is Ellipsis else [it])
    full += [slice(None)] * (ndim - len(full))
    for ax, nm in ((0, "batch"), (1, "channel")):
        it = full[ax]
        size = None if ax == 0 else in_shape[0]
        ok = isinstance(it, slice) and (
            it == slice(None) or (size is not None and
                                  range(*it.indices(size)) == range(size)))
        if not ok:
            raise ValueError(f"Index: the {nm} axis {ax} must be indexed with `:`, got {it!r}; "
                             f"ntkit's batches are (N, C, *spatial) (channels first): index the "
                             f"spatial axes, e.g. nl.Slice[:, :, 1:5]"
                             + ("" if ax == 0 else "; the channel axis is infinitely wide in "
                                                   "the kernel and cannot be indexed"))
    specs: List[Spec] = []
    out = [in_shape[0]]
    for it, size in zip(full[2:], in_shape[1:]):
        if _is_int(it):
            if not -size <= it < size:
                raise IndexError(f"Index: index {it} is out of range for a spatial axis of "
                                 f"size {size}")
            specs.append(("int", it % size))
            continue
        r = range(*it.indices(size))
        if len(r) == 0:
            raise ValueError(f"Index: slice {it!r} selects nothing from a spatial axis of size "
                             f"{size}")
        if r == range(size):
            specs.append(("keep", None))
        elif r.step == 1:
            specs.append(("narrow", (r.start, len(r))))
        else:
            specs.append(("take", tuple(r)))
        out.append(len(r))
    return specs, tuple(out)


def _apply_index(t: Tensor, start: int, specs: List[Spec]) -> Tensor:
    """Index the spatial axes ``start .. start + len(specs) - 1`` of ``t``."""
    for a in range(len(specs) - 1, -1, -1):   # last axis first: earlier dims do not move
        kind, val = specs[a]
        d = start + a
        if kind == "int":
            t = t.select(d, val)
        elif kind == "narrow":
            t = t.narrow(d, val[0], val[1])
        elif kind == "take":
            step = val[1] - val[0] if len(val) > 1 else 1
            if len(val) and step > 0 and all(b - a == step for a, b in zip(val, val[1:])):
                # an arithmetic progression (``::2``, ``1:7:3``): a strided view, not a copy
                t = t[(slice(None),) * d + (slice(val[0], val[-1] + 1, step),)]
            else:
                t = t.index_select(d, torch.tensor(val, dtype=torch.long, device=t.device))
    return t


class IndexModule(nn.Module):
    def __init__(self, specs: List[Spec], text: str):
        super().__init__()
        self.specs, self.text = specs, text

    def forward(self, x):
        return _apply_index(x, 2, self.specs)

    def extra_repr(self):
        return self.text


@frozen_layer
class Index(Layer):
    """``Index(idx)``: ``x[idx]`` on the batch ``(N, C, *spatial)`` (NT's ``stax.Index``; NT
    indexes NHWC, so NT's ``Slice[:, 1:5, ::2, :]`` is ``Slice[:, :, 1:5, ::2]`` here).

    ``idx``: an integer, slice, ``...`` or a tuple of them, most easily written
    ``nl.Slice[...]``. The batch and channel entries must be ``:``; integers on spatial axes
    remove them (indexing all of them gives a fully-connected output). Kernel: the same index on
    each spatial axis of the kernel (both pixel axes in the pixel-pair layout).

    Example: ``serial(Conv(64, 3), Relu(), Index(Slice[:, :, :4, ::-1]), Flatten(), Dense(1))``.
    """
    idx: Any

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        mod, _ = self.build(in_shape, cast(Any, None), False)   # parameter-free linear module
        return fo.ModuleLinearOp(mod, type(self).__name__), self.out_shape(in_shape)

    def __post_init__(self):
        object.__setattr__(self, "idx", _freeze_idx(self.idx))

    def __repr__(self):
        def one(it):
            if it is Ellipsis:
                return "..."
            if isinstance(it, slice):
                s = ("" if it.start is None else str(it.start)) + ":" + \
                    ("" if it.stop is None else str(it.stop))
                return s + ("" if it.step is None else f":{it.step}")
            return str(it)
        return f"Index(Slice[{', '.join(one(i) for i in self.idx)}])"

    def out_shape(self, in_shape: Any) -> Any:
        return _resolve_index(self.idx, tuple(in_shape))[1]

    def kernel_map(self, k: Kernel) -> Kernel:
        k = _single(k, "Index")
        specs, out = _resolve_index(self.idx, tuple(k.shape1))
        ns = k.n_spatial
        full = ns > 0 and not k.diagonal_spatial

        def apply(t, lead):  # a fresh contiguous tensor (never a view of ``t``)
            if t is None:
                return None
            r = _apply_index(t, lead + ns, specs) if full else t
            r = _apply_index(r, lead, specs)
            if r.is_contiguous() and r.untyped_storage().data_ptr() == \
                    t.untyped_storage().data_ptr():
                return r.clone()
            return r.contiguous()

        key = ("index", self, tuple(k.shape1), k.diagonal_spatial)
        fc = len(out) == 1
        return k.replace(nngp=apply(k.nngp, 2), ntk=apply(k.ntk, 2),
                         cov1=memo_self(key, k.cov1, lambda c: apply(c, 1)),
                         cov2=memo_self(key, k.cov2, lambda c: apply(c, 1)),
                         shape1=out, shape2=(k.shape2[0],) + out[1:],
                         diagonal_spatial=True if fc else k.diagonal_spatial)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        specs, out = _resolve_index(self.idx, tuple(in_shape))
        return IndexModule(specs, repr(self)), out


# ---------------------------------------------------------------------------------------------
# DotGeneral


class _Const:
    """A constant array with value equality and hashing (layers are frozen dataclasses)."""

    def __init__(self, value):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().double().numpy()
        try:
            arr = np.array(value, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"DotGeneral: the constant must be a real number or array, got "
                            f"{value!r}") from e
        if not np.all(np.isfinite(arr)):
            raise ValueError("DotGeneral: the constant has non-finite entries (inf/NaN)")
        arr.setflags(write=False)
        self.array = arr
        self._on = {}  # (dtype, device) -> tensor: one host-to-device copy, not per tile

    def tensor(self, dtype, device=None) -> Tensor:
        """The constant in ``dtype`` on ``device`` (cached; callers must not modify it)."""
        dev = torch.device("cpu") if device is None else torch.device(device)
        t = self._on.get((dtype, dev))
        if t is None:
            t = self._on.setdefault((dtype, dev), torch.tensor(self.array, dtype=dtype,
                                                               device=dev))
        return t

    def __eq__(self, other):
        return isinstance(other, _Const) and self.array.shape == other.array.shape and \
            bool(np.array_equal(self.array, other.array))

    def __hash__(self):
        return hash((self.array.shape, self.array.tobytes()))

    def __repr__(self):
        return np.array2string(self.array, separator=", ", threshold=20)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _dims(t, name) -> Tuple[int, ...]:
    if _is_int(t):
        return (int(t),)
    try:
        out = tuple(t)
    except TypeError:
        raise TypeError(f"DotGeneral: `dimension_numbers` entries must be tuples of ints, "
                        f"got {name}={t!r}") from None
    for d in out:
        if not _is_int(d):
            raise TypeError(f"DotGeneral: `dimension_numbers` {name} must hold ints, got {d!r}")
    return tuple(int(d) for d in out)


@frozen_layer
class DotGeneral(Layer):
    """``DotGeneral(lhs=None, rhs=None, dimension_numbers=(((), ()), ((), ())),
    precision=None, batch_axis=0, channel_axis=1)``: ``jax.lax.dot_general(inputs, rhs, dn)`` or
    ``jax.lax.dot_general(lhs, inputs, dn)`` with a constant (non-trainable) array, as NT's
    ``stax.DotGeneral``, on ntkit's ``(N, C, *spatial)`` batches.

    ``dimension_numbers = ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))`` use
    the axes of the channels-first input (negative allowed); the batch axis 0 and channel axis 1
    may not appear (the kernel is per pair of examples and the channels are infinitely wide).
    The output is dot_general's result with the input's N and C axes moved to the front:
    ``(N, C, *rest)`` with ``rest`` in dot_general's order (batch dims, then lhs free, then rhs
    free dims). ``precision`` is accepted for NT compatibility and has no effect (torch
    computes in the kernel's dtype). ``batch_axis``/``channel_axis`` must be ntkit's 0 and 1.
    Both ``lhs`` and ``rhs`` ``None``: identity.

    Example (difference of the two rows of ``(N, C, 2, W)`` feature maps; NT's
    ``DotGeneral(rhs=[1, -1], dimension_numbers=(((1,), (0,)), ((), ())))`` on NHWC)::

        >>> nl.DotGeneral(rhs=torch.tensor([1., -1.]), dimension_numbers=(((2,), (0,)), ((), ())))
    """
    lhs: Any = None
    rhs: Any = None
    dimension_numbers: Any = (((), ()), ((), ()))
    precision: Any = None
    batch_axis: int = 0
    channel_axis: int = 1

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        mod = DotGeneralModule(self, self._plan(tuple(in_shape)), torch.float64)
        return fo.ModuleLinearOp(mod, type(self).__name__), self.out_shape(in_shape)

    def __post_init__(self):
        if self.lhs is not None and self.rhs is not None:
            raise ValueError("DotGeneral: give at most one of `lhs` and `rhs` (the other factor "
                             "is the layer's input)")
        for nm in ("lhs", "rhs"):
            v = getattr(self, nm)
            if v is not None and not isinstance(v, _Const):
                object.__setattr__(self, nm, _Const(v))
        try:
            (lc, rc), (lb, rb) = self.dimension_numbers
        except (TypeError, ValueError):
            raise TypeError(f"DotGeneral: `dimension_numbers` must be ((lhs_contracting, "
                            f"rhs_contracting), (lhs_batch, rhs_batch)), got "
                            f"{self.dimension_numbers!r}") from None
        dn = ((_dims(lc, "lhs_contracting"), _dims(rc, "rhs_contracting")),
              (_dims(lb, "lhs_batch"), _dims(rb, "rhs_batch")))
        if len(dn[0][0]) != len(dn[0][1]) or len(dn[1][0]) != len(dn[1][1]):
            raise ValueError(f"DotGeneral: lhs and rhs must list as many contracting (and as "
                             f"many batch) dimensions, got {dn!r}")
        object.__setattr__(self, "dimension_numbers", dn)
        if self.precision is not None and not (isinstance(self.precision, str) or
                                               type(self.precision).__name__ == "Precision"):
            raise TypeError(f"DotGeneral: `precision` must be None or a precision name (no "
                            f"effect in ntkit), got {self.precision!r}")
        if isinstance(self.precision, str) and self.precision.lower() not in (
                "default", "high", "highest", "fastest", "bfloat16", "float32", "tensorfloat32"):
            raise ValueError(f"DotGeneral: unknown `precision` {self.precision!r}")
        if not _is_int(self.batch_axis) or self.batch_axis != 0:
            raise ValueError(f"DotGeneral: `batch_axis` must be 0 (ntkit batches are "
                             f"(N, C, *spatial)), got {self.batch_axis!r}")
        if not _is_int(self.channel_axis):
            raise TypeError(f"DotGeneral: `channel_axis` must be an int, got "
                            f"{self.channel_axis!r}")

    # -- the contraction, written once for modules and kernels ------------------------------
    @property
    def _const(self) -> Optional[_Const]:
        return self.rhs if self.lhs is None else self.lhs

    def _plan(self, in_shape: Tuple[int, ...]):
        """``(input letters, const letters, output letters, contracts, out spatial shape)`` for
        the spatial axes of an input of per-example shape ``in_shape = (C, *S)``."""
        ndim = 1 + len(in_shape)
        if self.channel_axis % ndim != 1 or not -ndim <= self.channel_axis < ndim:
            raise ValueError(f"DotGeneral: `channel_axis`={self.channel_axis} is not the channel "
                             f"axis 1 of ntkit's (N, C, *spatial) batches (NT's NHWC default -1 "
                             f"translates to 1 here; move spatial axis numbers accordingly)")
        const = self._const
        sp = in_shape[1:]
        ns = len(sp)
        if const is None:
            lets = _LETTERS[:ns]
            return lets, "", lets, False, tuple(sp)
        c = const.array
        is_lhs = self.rhs is None   # the constant is lhs; the input is rhs
        (lc, rc), (lb, rb) = self.dimension_numbers
        in_c, c_c = (rc, lc) if is_lhs else (lc, rc)
        in_b, c_b = (rb, lb) if is_lhs else (lb, rb)

        def norm(dims, n, who):
            out = []
            for d in dims:
                if not -n <= d < n:
                    raise ValueError(f"DotGeneral: dimension {d} is out of range for the "
                                     f"{who} with {n} axes")
                out.append(d % n)
            if len(set(out)) != len(out):
                raise ValueError(f"DotGeneral: repeated {who} dimension in "
                                 f"{self.dimension_numbers!r}")
            return out

        in_c, in_b = norm(in_c, ndim, "input"), norm(in_b, ndim, "input")
        c_c, c_b = norm(c_c, c.ndim, "constant"), norm(c_b, c.ndim, "constant")
        if set(in_c) & set(in_b) or set(c_c) & set(c_b):
            raise ValueError(f"DotGeneral: a dimension is both contracted and batched in "
                             f"{self.dimension_numbers!r}")
        for d in in_c + in_b:
            if d in (0, 1):
                raise ValueError(
                    f"DotGeneral: `dimension_numbers` {self.dimension_numbers!r} use the "
                    f"{'batch' if d == 0 else 'channel'} axis {d} of the input; only spatial "
                    f"axes (2..{ndim - 1} of (N, C, *spatial)) can be contracted or batched")
        in_l = {2 + i: _LETTERS[i] for i in range(ns)}
        c_l = {}
        for di, dc in zip(in_c + in_b, c_c + c_b):
            if sp[di - 2] != c.shape[dc]:
                raise ValueError(f"DotGeneral: input axis {di} has size {sp[di - 2]} but the "
                                 f"constant's paired axis {dc} has size {c.shape[dc]}")
            c_l[dc] = in_l[di]
        nxt = ns
        for dc in range(c.ndim):
            if dc not in c_l:
                c_l[dc] = _LETTERS[nxt]
                nxt += 1
        if nxt > len(_LETTERS):
            raise ValueError("DotGeneral: too many axes")
        batch = [in_l[d] for d in in_b]
        in_free = [in_l[d] for d in range(2, ndim) if d not in in_c and d not in in_b]
        c_free = [c_l[d] for d in range(c.ndim) if d not in c_c and d not in c_b]
        out_l = batch + (c_free + in_free if is_lhs else in_free + c_free)
        size = {in_l[d]: sp[d - 2] for d in in_l}
        size.update({c_l[d]: c.shape[d] for d in range(c.ndim)})
        x_lets = "".join(in_l[d] for d in range(2, ndim))
        return (x_lets, "".join(c_l[d] for d in range(c.ndim)), "".join(out_l), bool(in_c),
                tuple(size[l] for l in out_l))

    def _apply(self, t: Tensor, plan, const: Optional[Tensor]) -> Tensor:
        """The map on the LAST spatial group of ``t`` (``(*lead, *S) -> (*lead, *S')``)."""
        x_l, c_l, o_l, _, _ = plan
        if const is None:
            return t
        return torch.einsum(f"...{x_l},{c_l}->...{o_l}", t, const)

    def contracts(self, in_shape: Any) -> bool:
        return self._plan(tuple(in_shape))[3]

    def needs_full_spatial(self, above: bool) -> bool:
        if self._const is None:
            return above
        (lc, rc), _ = self.dimension_numbers
        return above or bool(rc if self.rhs is None else lc)

    def out_shape(self, in_shape: Any) -> Any:
        return (in_shape[0],) + self._plan(tuple(in_shape))[4]

    def kernel_map(self, k: Kernel) -> Kernel:
        k = _single(k, "DotGeneral")
        plan = self._plan(tuple(k.shape1))
        if self._const is None:
            return k
        ns = k.n_spatial
        full = ns > 0 and not k.diagonal_spatial
        out_sp = plan[4]
        ref = k.nngp if k.nngp is not None else k.cov1
        assert ref is not None  # the recursion always carries the x1 self-covariance
        const = self._const.tensor(ref.dtype, ref.device)
        if not full and plan[3]:
            raise ValueError("DotGeneral: a contraction over spatial axes needs pixel-pair "
                             "covariances but received the per-pixel layout; evaluate the "
                             "architecture with arch.kernel(), which chooses the layout")

        def apply(t, lead):
            if t is None:
                return None
            if not full:      # no contraction: each output pixel is one input pixel times a
                return self._apply(t, plan, const * const).contiguous()   # constant: square it
            t = self._apply(t, plan, const)                     # second pixel group
            t = t.movedim(tuple(range(lead, lead + ns)), tuple(range(t.ndim - ns, t.ndim)))
            t = self._apply(t, plan, const)                     # first pixel group (now last)
            no = len(out_sp)
            return t.movedim(tuple(range(lead, lead + no)),
                             tuple(range(t.ndim - no, t.ndim))).contiguous()

        key = ("dotgeneral", self, tuple(k.shape1), k.diagonal_spatial)
        nngp = apply(k.nngp, 2)
        cov1 = memo_self(key, k.cov1, lambda c: apply(c, 1))
        cov2 = memo_self(key, k.cov2, lambda c: apply(c, 1))
        if k.cov2 is None and nngp is not None:
            set_batch_diag(nngp, cov1)
        out = (k.shape1[0],) + out_sp
        return k.replace(nngp=nngp, ntk=apply(k.ntk, 2), cov1=cov1, cov2=cov2,
                         shape1=out, shape2=(k.shape2[0],) + out_sp,
                         diagonal_spatial=True if not out_sp else k.diagonal_spatial)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        plan = self._plan(tuple(in_shape))
        return DotGeneralModule(self, plan, ctx.dtype), (in_shape[0],) + plan[4]


class DotGeneralModule(nn.Module):
    """Finite counterpart of :class:`DotGeneral` (the constant is a buffer, not a parameter)."""

    def __init__(self, layer: DotGeneral, plan, dtype):
        super().__init__()
        self.layer, self.plan = layer, plan
        c = layer._const
        self.register_buffer("const", None if c is None else c.tensor(dtype).clone())

    def forward(self, x):
        if self.const is None:
            return x
        return self.layer._apply(x, self.plan, self.const.to(x.dtype))

    def extra_repr(self):
        x_l, c_l, o_l = self.plan[:3]
        return f"einsum('NC{x_l},{c_l}->NC{o_l}')"
