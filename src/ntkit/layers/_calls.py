"""Call-time arguments (neural-tangents' ``kernel_fn(x1, x2, get, **kwargs)`` /
``apply_fn(params, x, **kwargs)``, e.g. the graph ``pattern`` of :class:`~ntkit.layers.Aggregate`)
and the masked-kernel dispatch: the plumbing every layer, the tiler and the feature maps share,
below all of them (it knows layers only through ``walk()``, ``call_args`` and their kernel maps).

A layer lists the names it reads in ``call_args``; ``arch.kernel(x1, x2, pattern=(p1, p2))`` and
``net(x, pattern=p)`` accept exactly the names some layer of the architecture reads. The values
are per-example arrays (leading axis = batch), sliced with ``x1`` / ``x2`` tile by tile, and a
layer reads the current ``(value for x1 block, value for x2 block or None)`` with
:func:`call_arg` inside ``kernel_map`` / its module's ``forward``. Other layers never see them.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ._masking import Masked

if TYPE_CHECKING:
    from ._base import Layer

__all__ = ["call_arg", "using_call_args", "accepted_call_args", "prepare_call_args",
           "check_call_arg_pair", "slice_call_args", "is_masked", "apply_kernel_map",
           "CallArgsModule"]


# ---- call-time arguments ----------------------------------------------------------------
# name -> (value for the x1 block, value for the x2 block or None when x2 is x1)
_CALL_ARGS: "contextvars.ContextVar[Optional[dict]]" = contextvars.ContextVar(
    "ntkit_call_args", default=None)


def call_arg(name: str) -> Optional[Tuple[Any, Any]]:
    """The call-time argument ``name`` of the kernel evaluation or forward pass in progress:
    ``(a1, a2)`` with ``a1`` the rows for the current ``x1`` block and ``a2`` those for the
    ``x2`` block (``None`` when the tile is symmetric, ``x2`` is ``x1``, or in a forward pass),
    or ``None`` when the argument was not given."""
    args = _CALL_ARGS.get()
    return None if args is None else args.get(name)


@contextlib.contextmanager
def using_call_args(args: Optional[dict]):
    """Make ``args`` (``name -> (a1, a2)``) visible to :func:`call_arg` while the block runs."""
    if not args:
        yield
        return
    token = _CALL_ARGS.set(args)
    try:
        yield
    finally:
        _CALL_ARGS.reset(token)


def accepted_call_args(layer: "Layer") -> Tuple[str, ...]:
    """Sorted names of the call-time arguments read by ``layer`` or any layer inside it."""
    return tuple(sorted({name for sub in layer.walk() for name in sub.call_args}))


def _per_example(v: Any, name: str, n: int, what: str):
    """``v`` as a tensor whose leading (batch) axis has ``n`` rows."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.ascontiguousarray(v))
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy array with the batch on its "
                        f"leading axis, got {type(v).__name__}")
    if v.ndim == 0 or v.shape[0] != n:
        raise ValueError(f"`{name}` has shape {tuple(v.shape)} but {what} has {n} examples; its "
                         f"leading axis must be the batch ({n} rows, one per example)")
    return v


def _unexpected(name: str, accepted: Tuple[str, ...], where: str) -> TypeError:
    return TypeError(f"{where} got an unexpected keyword argument {name!r}; the architecture's "
                     f"layers read the call-time arguments "
                     f"{', '.join(repr(a) for a in accepted) if accepted else '(none)'}")


def prepare_call_args(layer: "Layer", kwargs: dict, n1: int, n2: Optional[int]) -> dict:
    """Validate ``arch.kernel(..., **kwargs)``: ``name -> (a1, a2 or None)``. A value is one
    array (``x2`` must be ``None``) or a pair ``(a1, a2)``; ``a2`` must be ``None`` or equal to
    ``a1`` when ``x2`` is ``None``."""
    accepted = accepted_call_args(layer)
    out = {}
    for name, v in kwargs.items():
        if name not in accepted:
            raise _unexpected(name, accepted, "kernel()")
        if v is None:
            raise ValueError(f"`{name}=None`: pass the arrays ({name}=p when x2 is None, "
                             f"{name}=({name}1, {name}2) otherwise)")
        if isinstance(v, (tuple, list)):
            if len(v) != 2:
                raise ValueError(f"`{name}` must be one array or a pair ({name}1, {name}2) for "
                                 f"(x1, x2), got a {type(v).__name__} of length {len(v)}")
            a1, a2 = v
        elif n2 is None:
            a1, a2 = v, None
        else:
            raise ValueError(f"x2 is given, so `{name}` must be a pair ({name}1, {name}2): one "
                             f"array for x1 and one for x2")
        out[name] = check_call_arg_pair(name, a1, a2, n1, n2)
    return out


def check_call_arg_pair(name: str, a1: Any, a2: Any, n1: int, n2: Optional[int]
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The per-example arrays ``(a1, a2)`` of call argument ``name`` for ``x1`` (``n1`` rows)
    and ``x2`` (``n2``; ``None`` when ``x2`` is ``x1``, then ``a2`` must be ``None`` or equal
    ``a1`` and comes back ``None``). Shared by ``arch.kernel`` and ``ntkit.empirical``."""
    a1 = _per_example(a1, f"{name}[0]", n1, "x1")
    if n2 is None:
        if a2 is not None:
            a2 = _per_example(a2, f"{name}[1]", n1, "x1 (x2 is None)")
            if a2 is not a1 and not (a2.shape == a1.shape and torch.equal(a2, a1)):
                raise ValueError(f"x2 is None (x2 = x1) but `{name}[1]` differs from "
                                 f"`{name}[0]`; pass x2 explicitly or {name}=({name}1, None)")
        return a1, None
    if a2 is None:
        raise ValueError(f"x2 is given but `{name}[1]` is None; pass the {name} of x2")
    return a1, _per_example(a2, f"{name}[1]", n2, "x2")


def slice_call_args(args: Optional[dict], rows, cols=None) -> Optional[dict]:
    """The call-time arguments of the tile ``(x1[rows], x2[cols])``; ``cols=None``: the
    symmetric tile ``(x1[rows], x1[rows])``."""
    if not args:
        return None
    out = {}
    for name, (a1, a2) in args.items():
        out[name] = (a1[rows], None if cols is None else (a1 if a2 is None else a2)[cols])
    return out


def is_masked(k: Any) -> bool:
    """Whether a kernel record (or any branch of a tuple of them) carries masks."""
    if isinstance(k, tuple):
        return any(is_masked(ki) for ki in k)
    return getattr(k, "mask1", None) is not None


def apply_kernel_map(layer: "Layer", k: Any) -> Any:
    """``layer``'s kernel map, through :meth:`Layer.masked_kernel_map` when ``k`` carries
    masks (combinators call this for their children)."""
    return layer.masked_kernel_map(k) if is_masked(k) else layer.kernel_map(k)


class CallArgsModule(nn.Module):
    """The finite network of an architecture with call-time arguments: ``net(x, **kwargs)``
    makes them visible to the layers' modules (:func:`call_arg`) during the forward pass.

    ``net.net`` is the network itself (an ``nn.Sequential`` for ``serial``)."""

    def __init__(self, net: nn.Module, names: Tuple[str, ...]):
        super().__init__()
        self.net = net
        self.call_args = tuple(names)

    def forward(self, x, **kwargs):
        args = {}
        xv = x.value if isinstance(x, Masked) else x
        n = xv.shape[0] if isinstance(xv, torch.Tensor) and xv.ndim else None
        for name, v in kwargs.items():
            if name not in self.call_args:
                raise _unexpected(name, self.call_args, "forward()")
            if v is None:
                continue
            args[name] = (v if n is None else _per_example(v, name, n, "x"), None)
        with using_call_args(args):
            return self.net(x)

    def extra_repr(self) -> str:
        return f"call_args={self.call_args}"
