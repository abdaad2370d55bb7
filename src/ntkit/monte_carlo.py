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

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._validation import as_tensor, check_int, parse_get
from .empirical import empirical_ntk
from .kernel import Kernel

__all__ = ["monte_carlo_kernel"]


def _nngp_estimate(net: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One network's NNGP estimate ``(k12, var1, var2)``: the ``(n1, n2)`` matrix and the
    per-example variances of ``x1`` and ``x2`` (``var2`` is ``None`` when ``x2`` is ``None``;
    ``var1`` is then the diagonal of ``k12``).

    If the readout is a Dense layer acting on ``(n, C)`` features ``h``, its weights are
    integrated out exactly (``W_std^2 h1.h2 / C + b_std^2``): the error is then the
    finite-width error alone, ``O(1/sqrt(width))``, instead of the O(1) spread of a single
    output sample. Otherwise ``f(x1) f(x2)^T / k``."""
    from .layers.dense import AffineModule
    last = net[-1] if isinstance(net, nn.Sequential) and len(net) else None
    with torch.no_grad():
        if isinstance(last, AffineModule):
            body = net[:-1]
            h1 = body(x1)
            if h1.ndim == 2:
                h2 = h1 if x2 is None else body(x2)
                scale = last.W_std ** 2 / h1.shape[1]
                bias = 0.0 if last.b_std is None else last.b_std ** 2
                out = (h1 @ h2.T) * scale + bias
                v1 = (h1 * h1).sum(1) * scale + bias
                v2 = None if x2 is None else (h2 * h2).sum(1) * scale + bias
                return out, v1, v2
        f1 = net(x1).reshape(x1.shape[0], -1)
        f2 = f1 if x2 is None else net(x2).reshape(x2.shape[0], -1)
    k = f1.shape[1]
    v2 = None if x2 is None else (f2 * f2).sum(1) / k
    return f1 @ f2.T / k, (f1 * f1).sum(1) / k, v2


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
    nngp = ntk = var1 = var2 = None
    for s in range(n_samples):
        net = arch.module(in_shape, width=width, seed=seed + s, dtype=dtype)
        if "nngp" in keys or not single:
            t, v1, v2 = _nngp_estimate(net, x1, x2)
            nngp = t if nngp is None else nngp + t
            var1 = v1 if var1 is None else var1 + v1
            if v2 is not None:
                var2 = v2 if var2 is None else var2 + v2
        if "ntk" in keys:
            t = empirical_ntk(net, x1, x2, output="trace", memory_budget=memory_budget)
            ntk = t if ntk is None else ntk + t
    ntk = None if ntk is None else ntk / n_samples
    if single:
        return nngp / n_samples if keys[0] == "nngp" else ntk
    # cov1/cov2: the estimated NNGP variances of the examples; cov2 is None only for x2=None
    # (Kernel.symmetric), never for a cross-kernel
    return Kernel(nngp=nngp / n_samples if "nngp" in keys else None, ntk=ntk,
                  cov1=var1 / n_samples,
                  cov2=None if var2 is None else var2 / n_samples,
                  shape1=(), shape2=(), want_ntk="ntk" in keys)
