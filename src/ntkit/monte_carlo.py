"""Monte Carlo estimates of an architecture's kernels from finite networks built by the same spec.

NNGP: average of ``f(x1) f(x2)^T / k`` over ``n_samples`` random networks (and ``k`` output
units). NTK: average of ``J(x1) J(x2)^T / k`` with ``J`` the Jacobian of the outputs w.r.t. all
parameters (``ntkit.empirical_ntk``, structured derivatives, mean over outputs). The error shrinks like ``1 / sqrt(width)`` (finite width) plus
``1 / sqrt(n_samples)`` (sampling), which is what the library's tests check analytic kernels
against.

Example::

    >>> est = monte_carlo_kernel(arch, x, width=2048, n_samples=8)
    >>> (est.ntk - arch.kernel(x, get='ntk')).abs().max()
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ._validation import as_tensor, check_int, parse_get
from .empirical import empirical_ntk
from .kernel import Kernel

__all__ = ["monte_carlo_kernel"]


def _nngp_estimate(net: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor]) -> torch.Tensor:
    """One network's NNGP estimate. If the readout is a Dense layer acting on ``(n, C)``
    features ``h``, its weights are integrated out exactly (``W_std^2 h1.h2 / C + b_std^2``):
    the error is then the finite-width error alone, ``O(1/sqrt(width))``, instead of the O(1)
    spread of a single output sample. Otherwise ``f(x1) f(x2)^T / k``."""
    from .layers.dense import AffineModule
    last = net[-1] if isinstance(net, nn.Sequential) and len(net) else None
    with torch.no_grad():
        if isinstance(last, AffineModule):
            body = net[:-1]
            h1 = body(x1)
            if h1.ndim == 2:
                h2 = h1 if x2 is None else body(x2)
                out = (h1 @ h2.T) * (last.W_std ** 2 / h1.shape[1])
                if last.b_std is not None:
                    out = out + last.b_std ** 2
                return out
        f1 = net(x1).reshape(x1.shape[0], -1)
        f2 = f1 if x2 is None else net(x2).reshape(x2.shape[0], -1)
    return f1 @ f2.T / f1.shape[1]


def monte_carlo_kernel(arch, x1: Any, x2: Any = None, *, width: Optional[int] = None,
                       n_samples: int = 16, get: Union[str, Sequence[str]] = ("nngp", "ntk"),
                       seed: int = 0, dtype: torch.dtype = torch.float64,
                       memory_budget=None):
    """Estimate ``arch``'s NNGP/NTK from ``n_samples`` finite networks of hidden width ``width``.

    Args:
      arch: an ntkit architecture (``arch.module`` builds the networks).
      x1, x2: inputs ``(n, *in_shape)``; ``x2=None`` means ``x1``.
      width: hidden width (``None`` keeps the widths written in the architecture).
      n_samples: number of independently initialized networks (seeds ``seed + i``).
      get: like ``arch.kernel``.
      memory_budget: bytes for each network's empirical NTK (see ``ntkit.empirical_ntk``).

    Returns: a tensor (``get`` a string) or a :class:`~ntkit.Kernel` with ``.nngp``/``.ntk``.
    """
    keys, single = parse_get(get)
    check_int(n_samples, "n_samples")
    x1 = as_tensor(x1, "x1", dtype)
    x2 = None if x2 is None else as_tensor(x2, "x2", dtype)
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"`x2` per-example shape {tuple(x2.shape[1:])} does not match `x1` "
                         f"{tuple(x1.shape[1:])}")
    in_shape = tuple(x1.shape[1:])
    nngp = ntk = None
    for s in range(n_samples):
        net = arch.module(in_shape, width=width, seed=seed + s, dtype=dtype)
        if "nngp" in keys:
            t = _nngp_estimate(net, x1, x2)
            nngp = t if nngp is None else nngp + t
        if "ntk" in keys:
            t = empirical_ntk(net, x1, x2, output="trace", memory_budget=memory_budget)
            ntk = t if ntk is None else ntk + t
    nngp = None if nngp is None else nngp / n_samples
    ntk = None if ntk is None else ntk / n_samples
    if single:
        return nngp if keys[0] == "nngp" else ntk
    return Kernel(nngp=nngp, ntk=ntk, cov1=None, cov2=None, shape1=(), shape2=(),
                  want_ntk="ntk" in keys)
