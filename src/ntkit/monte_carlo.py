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
from .layers import (CallArgsModule, check_mask_constant, check_supported, finite_stand_in,
                     mask_pre_hook, masked_input, prepare_call_args, unwrap)
from .layers.dense import AffineModule

if TYPE_CHECKING:
    from .layers import Layer

__all__ = ["monte_carlo_kernel"]


def _masked_zero(out: torch.Tensor, v: torch.Tensor, m1: Optional[torch.Tensor],
                 m2: Optional[torch.Tensor]) -> None:
    """In place: the estimate is zero for examples masked as a whole (every position padding),
    as the network's output is there (``net(x, mask_constant=c)`` zeroes masked outputs)."""
    if m1 is not None and bool(m1.any()):
        out[m1] = 0
        v[m1] = 0
    if m2 is not None and bool(m2.any()):
        out[:, m2] = 0


def _nngp_estimate(net: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor],
                   kw1: Optional[Dict[str, Any]] = None, kw2: Optional[Dict[str, Any]] = None,
                   mask_constant: Optional[float] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One network's NNGP estimate ``(k12, var1, var2)``: the ``(n1, n2)`` matrix and the
    per-example variances of ``x1`` and ``x2`` (``var2`` is ``None`` when ``x2`` is ``None``;
    ``var1`` is then the diagonal of ``k12``). ``kw1`` / ``kw2``: the call-time arguments of
    ``x1`` / ``x2`` (``net(x1, **kw1)``); ``mask_constant``: every call is
    ``net(x, mask_constant=c, ...)``.

    If the readout is a Dense layer acting on ``(n, C)`` features ``h``, its weights are
    integrated out exactly (``W_std^2 h1.h2 / C + b_std^2``): the error is then the
    finite-width error alone, ``O(1/sqrt(width))``, instead of the O(1) spread of a single
    output sample. Otherwise ``f(x1) f(x2)^T / k``."""
    kw1, kw2 = dict(kw1 or {}), dict(kw2 or {})
    if mask_constant is not None:
        kw1["mask_constant"] = kw2["mask_constant"] = mask_constant
    inner = net.net if isinstance(net, CallArgsModule) else net
    seq = inner if isinstance(inner, nn.Sequential) else None
    last = seq[-1] if seq is not None and len(seq) else None
    with torch.no_grad():
        if seq is not None and isinstance(last, AffineModule):
            body: nn.Module = seq[:-1]
            if isinstance(net, CallArgsModule):   # the body reads the same call-time arguments
                body = CallArgsModule(body, net.call_args)
            if mask_constant is not None:
                # the body's output keeps its mask (a Masked value): the readout is applied
                # here, and examples masked as a whole have a zero output in the network
                body.__dict__["_ntkit_mask_info"] = net.__dict__["_ntkit_mask_info"]
                body.register_forward_pre_hook(mask_pre_hook, with_kwargs=True)
            h1, m1 = unwrap(body(x1, **kw1))
            if h1.ndim == 2:
                h2, m2 = (h1, None) if x2 is None else unwrap(body(x2, **kw2))
                scale = last.W_std ** 2 / h1.shape[1]
                bias = 0.0 if last.b_std is None else last.b_std ** 2
                out = (h1 @ h2.T) * scale + bias
                v1 = (h1 * h1).sum(1) * scale + bias
                v2 = None if x2 is None else (h2 * h2).sum(1) * scale + bias
                _masked_zero(out, v1, m1, m1 if x2 is None else m2)
                if v2 is not None and m2 is not None:
                    v2[m2] = 0
                return out, v1, v2
        f1 = net(x1, **kw1).reshape(x1.shape[0], -1)
        f2 = f1 if x2 is None else net(x2, **kw2).reshape(x2.shape[0], -1)
    k = f1.shape[1]
    v2 = None if x2 is None else (f2 * f2).sum(1) / k
    return f1 @ f2.T / k, (f1 * f1).sum(1) / k, v2


class _WithMask(nn.Module):
    """``net`` declaring ``mask_constant`` among its call-time arguments: ``empirical_ntk``
    passes a network with declared ``call_args`` only the names it declares, and passes a
    non-array argument (the scalar ``mask_constant``) unchanged to every call, never split
    into ``x1`` / ``x2`` parts."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.call_args = tuple(getattr(net, "call_args", ())) + ("mask_constant",)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = self.net(x, **kwargs)
        return out


def monte_carlo_kernel(arch: Layer, x1: Any, x2: Any = None, *, width: Optional[int] = None,
                       n_samples: int = 16, get: Union[str, Sequence[str]] = ("nngp", "ntk"),
                       seed: int = 0, dtype: torch.dtype = torch.float64,
                       memory_budget: MemoryBudget = None,
                       mask_constant: Optional[float] = None,
                       **call_args: Any) -> Union[torch.Tensor, Kernel]:
    """Estimate ``arch``'s NNGP/NTK from ``n_samples`` finite networks of hidden width ``width``.

    Args:
      arch: an ntkit architecture (``arch.module`` builds the networks).
      x1, x2: inputs ``(n, *in_shape)``; ``x2=None`` means ``x1``.
      width: hidden width (``None`` keeps the widths written in the architecture).
      n_samples: number of independently initialized networks (seeds ``seed + i``).
      get: like ``arch.kernel``.
      memory_budget: bytes for each network's empirical NTK (see ``ntkit.empirical_ntk``).
      mask_constant: neural-tangents' masking, as in ``arch.kernel(..., mask_constant=c)``:
        every network runs as ``net(x, mask_constant=c)`` (positions whose channels all equal
        ``c`` are padding), so the estimate converges to ``arch.kernel(x1, x2,
        mask_constant=c)``. One number shared by ``x1`` and ``x2`` (not a per-example call
        argument); architectures with a layer that cannot honour masks raise ``ValueError``
        naming it.
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
    if mask_constant is None:
        x1 = as_tensor(x1, "x1", dtype)
        x2 = None if x2 is None else as_tensor(x2, "x2", dtype)
    else:   # the padding as arch.kernel finds it: compared in the inputs' own dtype
        mask_constant = check_mask_constant(mask_constant)
        check_supported(arch)     # refuse before any network is built
        x1 = masked_input(x1, "x1", dtype, mask_constant)
        x2 = None if x2 is None else masked_input(x2, "x2", dtype, mask_constant)
        # NaN / inf padding: the same entries marked by a finite constant (empirical_ntk
        # refuses non-finite inputs; the networks mask exactly the same positions)
        (x1, x2), mask_constant = finite_stand_in([x1, x2], mask_constant)
        assert x1 is not None
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"`x2` per-example shape {tuple(x2.shape[1:])} does not match `x1` "
                         f"{tuple(x1.shape[1:])}")
    in_shape = tuple(x1.shape[1:])
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
            t, v1, v2 = _nngp_estimate(net, x1, x2, kw1, kw2, mask_constant)
            nngp = t if nngp is None else nngp + t
            var1 = v1 if var1 is None else var1 + v1
            if v2 is not None:
                var2 = v2 if var2 is None else var2 + v2
        if "ntk" in keys:
            if mask_constant is None:
                t = empirical_ntk(net, x1, x2, output="trace", memory_budget=memory_budget,
                                  **pairs)
            else:   # a scalar shared by both inputs: bound to the network, never split
                t = empirical_ntk(_WithMask(net), x1, x2, output="trace",
                                  memory_budget=memory_budget, mask_constant=mask_constant,
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
