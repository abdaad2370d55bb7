"""Norms at the current parameters: gradient (Jacobian) norm, Hessian norm and kappa.

See :mod:`ntkit.diagnostics` for the definitions (RMS norm on the ``N`` stacked outputs,
Euclidean norm on the parameters).
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, NamedTuple, Optional

import torch
from torch import nn

from ._common import (_F64, _as_x, _as_y, _check_int, _check_model, _f64_copy, _flat,
                      _full_ntk, _trainable, _unflat)

__all__ = ["LazyScales", "lazy_scales", "jacobian_norm", "hessian_norm", "kappa"]


def jacobian_norm(model: nn.Module, x: Any) -> float:
    """Operator norm ``||D h(w0)|| = sqrt(lambda_max(J J^T) / N)`` of the Jacobian of the stacked
    outputs (RMS norm on outputs, Euclidean on parameters). Exact: the top eigenvalue of the
    ``(N, N)`` empirical NTK. Example: ``jacobian_norm(net, x)``."""
    model = _f64_copy(_check_model(model))
    x = _as_x(x)
    theta = _full_ntk(model, x)
    return math.sqrt(max(float(torch.linalg.eigvalsh(theta)[-1]), 0.0) / theta.shape[0])


def _lanczos_top(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, steps: int,
                 tol: float, gen: torch.Generator, v0: Optional[torch.Tensor] = None):
    """Largest-|eigenvalue| Ritz pair of a symmetric operator (full reorthogonalization)."""
    v = torch.randn(dim, generator=gen, dtype=_F64) if v0 is None else v0.clone()
    kmax = min(steps, dim)
    Q = torch.empty(kmax + 1, dim, dtype=_F64)         # Lanczos basis, preallocated (no copies)
    Q[0] = v / v.norm()
    alphas: List[float] = []
    betas: List[float] = []
    prev = None
    theta_best, coef, basis = 0.0, torch.ones(1, dtype=_F64), Q[:1]
    for j in range(kmax):
        w = matvec(Q[j])
        a = float(w @ Q[j])
        alphas.append(a)
        Qm = Q[:j + 1]
        w = w - Qm.T @ (Qm @ w)
        w = w - Qm.T @ (Qm @ w)          # twice is enough (Kahan)
        b = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=_F64))
        if betas:
            off = torch.tensor(betas, dtype=_F64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        ev, evec = torch.linalg.eigh(T)
        i = int(torch.argmax(ev.abs()))
        theta_best, coef, basis = float(ev[i]), evec[:, i], Qm
        if prev is not None and abs(abs(theta_best) - prev) <= tol * abs(theta_best):
            break
        prev = abs(theta_best)
        if b <= 1e-12 * max(abs(theta_best), 1e-300):
            break
        betas.append(b)
        Q[j + 1] = w / b
    vec_best = basis.T @ coef                          # Ritz vector, formed once
    return theta_best, vec_best / vec_best.norm()


def _second_directional(model: nn.Module, x: torch.Tensor, names: List[str],
                        values: List[torch.Tensor], u: List[torch.Tensor]) -> torch.Tensor:
    """``D^2 h(w)[u, u]`` (stacked outputs): forward-over-forward, central differences if an
    operation has no forward-mode derivative."""
    from torch.func import functional_call, jvp
    others = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if n not in set(names)}

    def f(*ps):
        d = dict(others)
        d.update(zip(names, ps))
        return functional_call(model, d, (x,)).reshape(-1)

    def df(*ps):
        return jvp(f, tuple(ps), tuple(u))[1]

    try:
        return jvp(df, tuple(values), tuple(u))[1].detach()
    except (RuntimeError, NotImplementedError):
        scale = float(_flat(values).abs().max()) + 1.0
        eps = 1e-4 * scale
        with torch.no_grad():
            plus = f(*[v + eps * d for v, d in zip(values, u)])
            minus = f(*[v - eps * d for v, d in zip(values, u)])
            mid = f(*values)
        return (plus - 2 * mid + minus) / eps ** 2


def hessian_norm(model: nn.Module, x: Any, *, outer_iters: int = 4, lanczos_steps: int = 40,
                 tol: float = 1e-6, seed: int = 0, restarts: int = 3) -> float:
    """Operator norm ``||D^2 h(w0)||`` of the Hessian of the stacked outputs (see the module
    docstring: ``sup_{|u|=1} ||D^2 h[u, u]||`` with the RMS norm on outputs).

    Alternating maximization over output directions ``z`` and parameter directions ``u``: Lanczos
    on Hessian-vector products of ``<z, h(w)>`` (reverse-over-reverse autograd, the gradient graph
    is built once per ``z``), then ``z`` from ``D^2 h[u, u]``. Each value is a lower bound of the
    norm and the returned maximum is attained (up to Lanczos tolerance ``tol``) by the final
    ``u``. The objective is not concave (local maxima exist), so ``restarts`` random starting
    directions are tried and the best kept. Cost: about ``restarts * outer_iters *
    lanczos_steps`` Hessian-vector products (each ~4 forward passes); ``lanczos_steps`` stored
    parameter vectors.

    Example: ``hessian_norm(net, x)``.
    """
    return _hessian_norm(_f64_copy(_check_model(model)), _as_x(x), outer_iters, lanczos_steps,
                         tol, seed, restarts)


def _hessian_norm(model: nn.Module, x: torch.Tensor, outer_iters: int, lanczos_steps: int,
                  tol: float, seed: int, restarts: int = 3) -> float:
    _check_int(outer_iters, "outer_iters")
    _check_int(lanczos_steps, "lanczos_steps", 2)
    _check_int(restarts, "restarts")
    named = _trainable(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    dim = sum(p.numel() for p in params)
    with torch.no_grad():
        N = model(x).numel()
    best = 0.0
    for r in range(restarts):           # the problem is not concave: keep the best local max
        gen = torch.Generator().manual_seed(int(seed) * 1009 + r)
        z = torch.randn(N, generator=gen, dtype=_F64)
        z = z / torch.sqrt((z ** 2).mean())                    # ||z|| = 1 (RMS norm)
        u_flat = None
        for _ in range(outer_iters):
            with torch.enable_grad():
                out = model(x).reshape(-1)
                g0 = torch.autograd.grad(out, params, grad_outputs=z / N, create_graph=True,
                                         allow_unused=True)
                g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g0, params)]
                live = [gi.requires_grad for gi in g]

                def hvp(v: torch.Tensor, g=g, live=live) -> torch.Tensor:
                    vs = _unflat(v, params)
                    pairs = [(gi, vi) for gi, vi, ok in zip(g, vs, live) if ok]
                    if not pairs:
                        return torch.zeros_like(v)
                    hv = torch.autograd.grad([a for a, _ in pairs], params,
                                             grad_outputs=[b for _, b in pairs],
                                             retain_graph=True, allow_unused=True)
                    return _flat([torch.zeros_like(p) if h is None else h
                                  for h, p in zip(hv, params)]).detach()

                lam, u_flat = _lanczos_top(hvp, dim, lanczos_steps, tol, gen, u_flat)
            best = max(best, abs(lam))
            w = _second_directional(model, x, names, [p.detach() for p in params],
                                    _unflat(u_flat, params))
            wn = float(torch.sqrt((w ** 2).mean()))
            best = max(best, wn)
            if wn == 0.0:
                break
            z_new = w / wn
            done = float(((z_new - z) ** 2).mean()) < tol ** 2 and abs(wn - abs(lam)) <= tol * wn
            z = z_new
            if done:
                break
    return best


class LazyScales(NamedTuple):
    """Chizat & Bach's quantities at the current parameters (norms as in the module docstring).

    ``residual = ||h(w0) - y||`` (RMS), ``jacobian_norm = ||D h||``, ``hessian_norm = ||D^2 h||``,
    ``kappa = residual * hessian_norm / jacobian_norm^2``; ``n_outputs = N``, ``n_params = P``.
    """
    residual: float
    jacobian_norm: float
    hessian_norm: float
    kappa: float
    n_outputs: int
    n_params: int


def lazy_scales(model: nn.Module, x: Any, y: Any = None, *, outer_iters: int = 4,
                lanczos_steps: int = 40, tol: float = 1e-6, seed: int = 0,
                restarts: int = 3) -> LazyScales:
    """Residual, gradient (Jacobian) norm, Hessian norm and ``kappa`` of ``model`` on ``(x, y)``.

    Args:
      model: any ``nn.Module`` mapping ``(n, ...)`` to ``(n, *out)``; not modified (a float64
        copy is used).
      x: ``(n, ...)`` inputs. y: targets of the output's shape (``None``: zeros).
      outer_iters, lanczos_steps, tol, seed, restarts: Hessian-norm estimation (see
        :func:`hessian_norm`).

    Example::

        >>> s = lazy_scales(net, x, y); s.kappa
    """
    model = _f64_copy(_check_model(model))
    x = _as_x(x)
    with torch.no_grad():
        out = model(x)
    yy = torch.zeros_like(out, dtype=_F64) if y is None else _as_y(y, out.shape)
    res = float(torch.sqrt(((out.to(_F64) - yy) ** 2).mean()))
    theta = _full_ntk(model, x)
    jn = math.sqrt(max(float(torch.linalg.eigvalsh(theta)[-1]), 0.0) / theta.shape[0])
    hn = _hessian_norm(model, x, outer_iters, lanczos_steps, tol, seed, restarts)
    kap = res * hn / jn ** 2 if jn > 0 else math.inf
    return LazyScales(res, jn, hn, kap, int(out.numel()),
                      sum(p.numel() for _, p in _trainable(model)))


def kappa(model: nn.Module, x: Any, y: Any = None, **kwargs: Any) -> float:
    """``kappa(w0) = ||h(w0) - y|| * ||D^2 h(w0)|| / ||D h(w0)||^2`` (see :func:`lazy_scales`).
    Example: ``kappa(scaled(centered(net), 10.0), x, y)``."""
    return lazy_scales(model, x, y, **kwargs).kappa
