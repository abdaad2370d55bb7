"""Monte Carlo estimates of an architecture's kernels from finite networks built by the same spec.

NNGP: average of ``f(x1) f(x2)^T / k`` over ``n_samples`` random networks (and ``k`` output
units). NTK: average of ``J(x1) J(x2)^T / k`` with ``J`` the Jacobian of the outputs w.r.t. all
parameters (``ntkit.empirical_ntk``, structured derivatives, mean over outputs). The error
shrinks like ``1 / sqrt(width)`` (finite width) plus
``1 / sqrt(n_samples)`` (sampling), which is what the library's tests check analytic kernels
against.

Example::

    >>> est = monte_carlo_kernel(arch, x, width=2048, n_samples=8)
    >>> (est.ntk - arch.kernel(x, get='ntk')).abs().max()
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._typing import MemoryBudget
from ._validation import as_tensor, check_int, parse_get
from .empirical import empirical_ntk
from .kernel import Kernel

if TYPE_CHECKING:
    from .layers import Layer

__all__ = ["monte_carlo_kernel"]


def _nngp_estimate(net: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor],
                   kw1: Optional[Dict[str, Any]] = None, kw2: Optional[Dict[str, Any]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One network's NNGP estimate ``(k12, var1, var2)``: the ``(n1, n2)`` matrix and the
    per-example variances of ``x1`` and ``x2`` (``var2`` is ``None`` when ``x2`` is ``None``;
    ``var1`` is then the diagonal of ``k12``). ``kw1`` / ``kw2``: the call-time arguments of
    ``x1`` / ``x2`` (``net(x1, **kw1)``).

    If the readout is a Dense layer acting on ``(n, C)`` features ``h``, its weights are
    integrated out exactly (``W_std^2 h1.h2 / C + b_std^2``): the error is then the
    finite-width error alone, ``O(1/sqrt(width))``, instead of the O(1) spread of a single
    output sample. Otherwise ``f(x1) f(x2)^T / k``."""
    from .layers import CallArgsModule
    from .layers.dense import AffineModule
    kw1, kw2 = kw1 or {}, kw2 or {}
    inner = net.net if isinstance(net, CallArgsModule) else net
    seq = inner if isinstance(inner, nn.Sequential) else None
    last = seq[-1] if seq is not None and len(seq) else None
    with torch.no_grad():
        if seq is not None and isinstance(last, AffineModule):
            body: nn.Module = seq[:-1]
            if isinstance(net, CallArgsModule):   # the body reads the same call-time arguments
                body = CallArgsModule(body, net.call_args)
            h1 = body(x1, **kw1)
            if h1.ndim == 2:
                h2 = h1 if x2 is None else body(x2, **kw2)
                scale = last.W_std ** 2 / h1.shape[1]
                bias = 0.0 if last.b_std is None else last.b_std ** 2
                out = (h1 @ h2.T) * scale + bias
                v1 = (h1 * h1).sum(1) * scale + bias
                v2 = None if x2 is None else (h2 * h2).sum(1) * scale + bias
                return out, v1, v2
        f1 = net(x1, **kw1).reshape(x1.shape[0], -1)
        f2 = f1 if x2 is None else net(x2, **kw2).reshape(x2.shape[0], -1)
    k = f1.shape[1]
    v2 = None if x2 is None else (f2 * f2).sum(1) / k
    return f1 @ f2.T / k, (f1 * f1).sum(1) / k, v2


def monte_carlo_kernel(arch: Layer, x1: Any, x2: Any = None, *, width: Optional[int] = None,
                       n_samples: int = 16, get: Union[str, Sequence[str]] = ("nngp", "ntk"),
                       seed: int = 0, dtype: torch.dtype = torch.float64,
                       memory_budget: MemoryBudget = None,
                       **call_args: Any) -> Union[torch.Tensor, Kernel]:
    """Estimate ``arch``'s NNGP/NTK from ``n_samples`` finite networks of hidden width ``width``.

    Args:
      arch: an ntkit architecture (``arch.module`` builds the networks).
      x1, x2: inputs ``(n, *in_shape)``; ``x2=None`` means ``x1``.
      width: hidden width (``None`` keeps the widths written in the architecture).
      n_samples: number of independently initialized networks (seeds ``seed + i``).
      get: like ``arch.kernel``.
      memory_budget: bytes for each network's empirical NTK (see ``ntkit.empirical_ntk``).
      **call_args: the call-time arguments of ``arch.kernel`` (names some layer of ``arch``
        reads, e.g. ``pattern=(p1, p2)`` for :class:`~ntkit.layers.Aggregate`; ``pattern=p``
        when ``x2`` is ``None``): every network runs as ``net(x1, pattern=p1)`` and
        ``net(x2, pattern=p2)``. A name no layer reads is a ``TypeError``.

    Returns: a tensor (``get`` a string) or a :class:`~ntkit.Kernel` with ``.nngp``/``.ntk``,
    ``.cov1``/``.cov2`` the estimated NNGP variances of ``x1``/``x2`` (``cov2 is None``, i.e.
    ``.symmetric``, only when ``x2`` is ``None``).
    """
    keys, single = parse_get(get)
    check_int(n_samples, "n_samples")
    x1 = as_tensor(x1, "x1", dtype)
    x2 = None if x2 is None else as_tensor(x2, "x2", dtype)
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"`x2` per-example shape {tuple(x2.shape[1:])} does not match `x1` "
                         f"{tuple(x1.shape[1:])}")
    in_shape = tuple(x1.shape[1:])
    from .layers import prepare_call_args
    args = prepare_call_args(arch, call_args, x1.shape[0],
                             None if x2 is None else x2.shape[0]) if call_args else {}
    # per side: net(x1, **kw1), net(x2, **kw2); empirical_ntk takes them as arch.kernel does
    kw1 = {name: a1 for name, (a1, _) in args.items()}
    kw2 = {name: a2 for name, (_, a2) in args.items()} if x2 is not None else {}
    pairs: Dict[str, Any] = {name: (a1 if x2 is None else (a1, a2))
                             for name, (a1, a2) in args.items()}
    nngp: Optional[torch.Tensor] = None
    ntk: Optional[torch.Tensor] = None
    var1: Optional[torch.Tensor] = None
    var2: Optional[torch.Tensor] = None
    for s in range(n_samples):
        net = arch.module(in_shape, width=width, seed=seed + s, dtype=dtype)
        if "nngp" in keys or not single:
            t, v1, v2 = _nngp_estimate(net, x1, x2, kw1, kw2)
            nngp = t if nngp is None else nngp + t
            var1 = v1 if var1 is None else var1 + v1
            if v2 is not None:
                var2 = v2 if var2 is None else var2 + v2
        if "ntk" in keys:
            t = empirical_ntk(net, x1, x2, output="trace", memory_budget=memory_budget,
                              **pairs)
            ntk = t if ntk is None else ntk + t

    def mean(total: Optional[torch.Tensor], what: str) -> torch.Tensor:
        if total is None:   # unreachable: n_samples >= 1 and `what` was computed for `get`
            raise RuntimeError(f"internal error: no {what} estimate was computed")
        return total / n_samples

    if single:
        return mean(nngp if keys[0] == "nngp" else ntk, keys[0])
    # cov1/cov2: the estimated NNGP variances of the examples; cov2 is None only for x2=None
    # (Kernel.symmetric), never for a cross-kernel
    return Kernel(nngp=mean(nngp, "nngp") if "nngp" in keys else None,
                  ntk=mean(ntk, "ntk") if "ntk" in keys else None,
                  cov1=mean(var1, "variance"),
                  cov2=None if var2 is None else var2 / n_samples,
                  shape1=(), shape2=(), want_ntk="ntk" in keys)
