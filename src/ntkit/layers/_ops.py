"""Layout-generic helpers for kernel maps (FC, diagonal-spatial and full-spatial layouts)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..kernel import Kernel

Tensor = torch.Tensor


def input_kernel(x1: Tensor, x2: Optional[Tensor], want_ntk: bool, full_spatial: bool) -> Kernel:
    """Kernel of the raw inputs: ``nngp = <x1, x2> / C`` (mean over the channel axis 1).

    FC ``(n, d)``: ``(n1, n2)``; spatial ``(n, C, *S)``: ``(n1, n2, *S)`` (diagonal) or
    ``(n1, n2, *S, *S)`` (full). The NTK of the inputs is zero (``ntk=None``).
    """
    c = x1.shape[1]
    shape = tuple(x1.shape[1:])
    if x1.ndim == 2:
        nngp = (x1 @ (x1 if x2 is None else x2).T) / c
        cov1 = x1.pow(2).sum(1) / c
        cov2 = None if x2 is None else x2.pow(2).sum(1) / c
        diag = True
    else:
        a = x1.flatten(2)                      # (n1, C, P)
        b = a if x2 is None else x2.flatten(2)
        sp = shape[1:]
        if full_spatial:
            nngp = torch.einsum("icp,jcq->ijpq", a, b) / c
            nngp = nngp.reshape(nngp.shape[:2] + sp + sp)
            cov1 = torch.einsum("icp,icq->ipq", a, a).reshape((a.shape[0],) + sp + sp) / c
            cov2 = None if x2 is None else (
                torch.einsum("icp,icq->ipq", b, b).reshape((b.shape[0],) + sp + sp) / c)
        else:
            nngp = torch.einsum("icp,jcp->ijp", a, b).reshape(a.shape[:1] + b.shape[:1] + sp) / c
            cov1 = a.pow(2).sum(1).reshape((a.shape[0],) + sp) / c
            cov2 = None if x2 is None else b.pow(2).sum(1).reshape((b.shape[0],) + sp) / c
        diag = not full_spatial
    k = Kernel(nngp=nngp, ntk=None, cov1=cov1, cov2=cov2, shape1=shape,
               shape2=shape if x2 is None else tuple(x2.shape[1:]), want_ntk=want_ntk,
               is_gaussian=False, diagonal_spatial=diag)
    if x2 is None:
        set_batch_diag(k.nngp, cov1)
    return k


def variances(cov: Tensor, k: Kernel) -> Tensor:
    """Per-example variances ``(n,)`` or ``(n, *S)`` from a self-covariance in ``k``'s layout."""
    ns = k.n_spatial
    if ns == 0 or k.diagonal_spatial:
        return cov
    n = cov.shape[0]
    sp = cov.shape[1:1 + ns]
    p = 1
    for s in sp:
        p *= s
    return cov.reshape(n, p, p).diagonal(dim1=1, dim2=2).reshape((n,) + tuple(sp))


def outer_vars(k: Kernel) -> Tuple[Tensor, Tensor]:
    """Variances of x1 and x2 shaped to broadcast against ``k.nngp``."""
    v1 = variances(k.cov1, k)
    v2 = v1 if k.cov2 is None else variances(k.cov2, k)
    ns = k.n_spatial
    if ns == 0 or k.diagonal_spatial:
        return v1.unsqueeze(1), v2.unsqueeze(0)
    one = (1,) * ns
    v1 = v1.reshape(v1.shape[:1] + (1,) + v1.shape[1:] + one)
    v2 = v2.reshape((1,) + v2.shape[:1] + one + v2.shape[1:])
    return v1, v2


def self_outer_vars(cov: Tensor, k: Kernel) -> Tuple[Tensor, Tensor]:
    """For full-spatial self-covariances ``(n, *S, *S)``: variances broadcast as (p, q) pairs."""
    v = variances(cov, k)
    ns = k.n_spatial
    one = (1,) * ns
    return v.reshape(v.shape + one), v.reshape(v.shape[:1] + one + v.shape[1:])


def set_batch_diag(t: Tensor, values: Tensor) -> None:
    """In place: ``t[i, i, ...] = values[i, ...]`` for a square-in-batch tensor ``t``."""
    t.diagonal(dim1=0, dim2=1).copy_(values.movedim(0, -1))


def batch_diag(t: Tensor) -> Tensor:
    """``t[i, i, ...]`` as an ``(n, ...)`` tensor."""
    return t.diagonal(dim1=0, dim2=1).movedim(-1, 0)


CrossFn = Callable[[Tensor, Tensor, Tensor, bool], Tuple[Tensor, Optional[Tensor]]]
SelfFn = Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]]


def apply_elementwise(k: Kernel, cross: CrossFn, self_fn: SelfFn) -> Kernel:
    """Push ``k`` through an activation given its dual maps.

    ``cross(c12, v1, v2, need_dot) -> (E[phi(u) phi(v)], E[phi'(u) phi'(v)] or None)`` for
    ``(u, v) ~ N(0, [[v1, c12], [c12, v2]])`` (broadcasting), and
    ``self_fn(v) -> (E[phi(u)^2], E[phi'(u)^2])`` for ``u ~ N(0, v)``, used for exact diagonals.
    """
    if not k.is_gaussian:
        raise ValueError("an activation needs Gaussian pre-activations: put a Dense/Conv layer "
                         "(or LayerNorm after one) before it")
    need_dot = k.ntk is not None
    v1, v2 = outer_vars(k)
    nngp, dot = cross(k.nngp, v1, v2, need_dot)
    if nngp.data_ptr() == k.nngp.data_ptr():  # never write into the incoming record
        nngp = nngp.clone()

    def self_map(cov):
        if k.n_spatial == 0 or k.diagonal_spatial:
            return self_fn(cov)
        a, b = self_outer_vars(cov, k)
        return cross(cov, a, b, True)

    cov1, dot1 = self_map(k.cov1)
    cov2 = None if k.cov2 is None else self_map(k.cov2)[0]
    if k.cov2 is None:  # exact batch diagonal
        set_batch_diag(nngp, cov1)
        if dot is not None and dot.shape == nngp.shape:
            set_batch_diag(dot, dot1)
    ntk = None if not need_dot else k.ntk * dot
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)


def safe_sqrt(x: Tensor) -> Tensor:
    return x.clamp_min(0).sqrt()
