"""Lazy training, measured: how far a network is from its linearization, for any ``nn.Module``.

Chizat & Bach (2019, "On lazy training in differentiable programming") view a model as a map
``h: w -> h(w)`` from parameters to its outputs on the data, here the vector of the ``N = n * k``
stacked outputs ``h(w) = model(x).reshape(-1)``. Training is *lazy* (the network stays close to
its linearization, the NTK stays put) when the inverse relative scale

    ``kappa(w0) = ||h(w0) - y|| * ||D^2 h(w0)|| / ||D h(w0)||^2``

is small. Norms (all in float64, on a private copy of the model):

* output space: ``||v|| = sqrt(mean(v^2))`` over the ``N`` stacked outputs (the norm of the loss
  ``1/2 ||h - y||^2``; kappa does not depend on this normalization, it cancels);
* parameter space: the Euclidean norm of all trainable parameters, concatenated;
* ``||D h(w0)||`` ("gradient norm"): operator norm of the Jacobian ``J`` (N x P),
  ``sup_{|u|=1} ||J u|| = sqrt(lambda_max(J J^T) / N)``, from the full empirical NTK ``J J^T``;
* ``||D^2 h(w0)||`` ("Hessian norm"): operator norm of the symmetric bilinear map
  ``(u, v) -> D^2 h(w0)[u, v]``, ``sup_{|u|=|v|=1} ||D^2 h[u, v]|| = sup_{|u|=1} ||D^2 h[u, u]||``
  (Banach's theorem for symmetric forms on Hilbert spaces) ``= sup_{||z||=1} |lambda|_max(H_z)``
  with ``H_z = Hessian of <z, h(w)>``. It is estimated by alternating maximization: for fixed
  ``z`` Lanczos on Hessian-vector products of ``<z, h>`` finds the largest-magnitude eigenpair
  ``(lambda, u)``; then ``z <- D^2 h[u, u] / ||D^2 h[u, u]||`` (a forward-over-forward
  derivative). Every iterate is a certified lower bound; it increases monotonically.

Scalings these give (tests check them on trained and untrained networks): a 1-hidden-layer net
with LeCun (standard) initialization has ``||Dh|| ~ sqrt(m)``, ``||D^2 h|| ~ 1``,
``kappa ~ 1/m`` in the width ``m``; in NTK parameterization ``||Dh|| ~ 1``,
``||D^2 h|| ~ m^(-1/2)`` (times a slowly growing max over neurons), ``kappa ~ m^(-1/2)``, and the
relative weight change after training ``~ m^(-1/2)``. Scaling a centered model by ``alpha``
(``alpha * (f - f_0)``, loss divided by ``alpha^2``) gives ``kappa ~ 1/alpha``.

Example::

    >>> from ntkit import diagnostics as dg
    >>> s = dg.lazy_scales(net, x, y)                 # s.kappa, s.jacobian_norm, s.hessian_norm
    >>> rec = dg.train(net, x, y, steps=200)          # rec.rel_weight_change[-1], rec.kernel_drift
    >>> sweep = dg.width_sweep(arch, x, y, widths=(64, 256, 1024), seeds=(0, 1))
    >>> sweep.slope('kappa')                          # Slope(slope=-0.5.., low=.., high=..)
    >>> sweep.to_pandas(); sweep.plot('scaling.png')
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "LazyScales", "lazy_scales", "jacobian_norm", "hessian_norm", "kappa",
    "relative_weight_change", "kernel_drift", "TrainingRecord", "train",
    "Slope", "fit_slope", "LazySweep", "width_sweep", "alpha_sweep",
]

_F64 = torch.float64


# =========================================================================================
# input checks and small helpers
# =========================================================================================

def _check_model(model: Any, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"`{name}` has no trainable parameters (requires_grad=True)")
    return model


def _as_x(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            import numpy as np
            x = torch.as_tensor(np.asarray(x))
        except Exception:
            raise TypeError(f"`{name}` must be a tensor (n, ...), got {type(x).__name__}") from None
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty batch (n, ...), got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"`{name}` must be real, got {x.dtype}")
    x = x.detach().to(_F64)
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN/Inf values")
    return x


def _as_y(y: Any, out_shape: torch.Size, name: str = "y") -> torch.Tensor:
    y = torch.as_tensor(y).detach().to(_F64)
    if y.shape != out_shape:
        if y.numel() == math.prod(out_shape):
            y = y.reshape(out_shape)
        else:
            raise ValueError(f"`{name}` has shape {tuple(y.shape)} but the model outputs "
                             f"{tuple(out_shape)} on x; pass targets of the output's shape "
                             f"(for one output: y[:, None])")
    if not torch.isfinite(y).all():
        raise ValueError(f"`{name}` contains NaN/Inf values")
    return y


def _f64_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    return m.to(_F64)


def _trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _check_int(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {v!r}")
    return v


# =========================================================================================
# norms at initialization
# =========================================================================================

def _full_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J J^T`` as an ``(N, N)`` matrix in the order of ``model(x).reshape(-1)``."""
    from .empirical import empirical_ntk
    k = empirical_ntk(model, x, output="full", dtype=_F64)        # (n, n, k, k)
    n, kk = k.shape[0], k.shape[2]
    return k.permute(0, 2, 1, 3).reshape(n * kk, n * kk)


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
    alphas, betas = [], []
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
                g = torch.autograd.grad(out, params, grad_outputs=z / N, create_graph=True,
                                        allow_unused=True)
                g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
                live = [gi.requires_grad for gi in g]

                def hvp(v: torch.Tensor) -> torch.Tensor:
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


def kappa(model: nn.Module, x: Any, y: Any = None, **kwargs) -> float:
    """``kappa(w0) = ||h(w0) - y|| * ||D^2 h(w0)|| / ||D h(w0)||^2`` (see :func:`lazy_scales`).
    Example: ``kappa(scaled(centered(net), 10.0), x, y)``."""
    return lazy_scales(model, x, y, **kwargs).kappa


# =========================================================================================
# motion during training
# =========================================================================================

def _param_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().to(_F64).clone() for n, p in _trainable(model)}


def relative_weight_change(params_t: Union[nn.Module, Dict[str, torch.Tensor]],
                           params_0: Union[nn.Module, Dict[str, torch.Tensor]],
                           by: str = "total") -> Union[float, Dict[str, float]]:
    """``|theta_t - theta_0| / |theta_0|`` (Euclidean over all trainable parameters).

    Args:
      params_t, params_0: modules or ``{name: tensor}`` dicts with the same names.
      by: ``'total'`` (a float), ``'parameter'`` (one value per parameter tensor) or ``'layer'``
        (parameters grouped by the module that owns them, e.g. ``'0.weight'`` and ``'0.bias'``).

    Example: ``relative_weight_change(net, net0, by='layer')``.
    """
    a = _param_dict(params_t) if isinstance(params_t, nn.Module) else params_t
    b = _param_dict(params_0) if isinstance(params_0, nn.Module) else params_0
    if set(a) != set(b):
        raise ValueError(f"`params_t` and `params_0` have different parameter names: "
                         f"{sorted(set(a) ^ set(b))[:6]}")
    if by not in ("total", "parameter", "layer"):
        raise ValueError(f"`by` must be 'total', 'parameter' or 'layer', got {by!r}")
    groups: Dict[str, List[str]] = {}
    for n in b:
        key = "total" if by == "total" else (n if by == "parameter" else n.rpartition(".")[0]
                                             or n)
        groups.setdefault(key, []).append(n)
    out = {}
    for key, ns in groups.items():
        num = sum(float(((a[n].to(_F64) - b[n].to(_F64)) ** 2).sum()) for n in ns)
        den = sum(float((b[n].to(_F64) ** 2).sum()) for n in ns)
        out[key] = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return out["total"] if by == "total" else out


def kernel_drift(model_t: nn.Module, model_0: nn.Module, x: Any) -> float:
    """``||Theta_t - Theta_0||_F / ||Theta_0||_F`` for the full empirical NTKs ``(N, N)`` on
    ``x``. Example: ``kernel_drift(trained, initial, x)``."""
    x = _as_x(x)
    k_t = _full_ntk(_f64_copy(_check_model(model_t, "model_t")), x)
    k_0 = _full_ntk(_f64_copy(_check_model(model_0, "model_0")), x)
    return float((k_t - k_0).norm() / k_0.norm())


@dataclass
class TrainingRecord:
    """What :func:`train` measured (``R`` records, taken every ``record_every`` steps).

    Attributes:
      steps: ``(R,)`` step counts (0 = initialization); loss: ``(R,)`` ``loss_scale * 1/2
        mean (f - y)^2`` on the training data; rel_weight_change: ``(R,)``
        ``|theta_t - theta_0| / |theta_0|``; lin_gap: ``(R,)`` RMS of ``f_net - f_lin`` on
        ``x_eval`` (the network vs its linearization trained identically) or ``None``;
        rel_change_by_layer: final ``{layer: relative change}``; kernel_drift: final
        ``||Theta_T - Theta_0|| / ||Theta_0||`` on ``x_eval`` (or ``None``); learning_rate: the
        step size used; snapshots: ``{step: tensor}`` copies of the ``snapshot`` parameter.
    """
    steps: torch.Tensor
    loss: torch.Tensor
    rel_weight_change: torch.Tensor
    lin_gap: Optional[torch.Tensor]
    rel_change_by_layer: Dict[str, float]
    kernel_drift: Optional[float]
    learning_rate: float
    outputs: Optional[torch.Tensor] = None
    snapshots: Dict[int, torch.Tensor] = field(default_factory=dict)


# a run is reported as diverged when its loss exceeds this many times the larger of the
# initial loss and the targets' own loss scale (1/2 mean y^2) at any step, or _FINAL times it at
# the end: gradient descent below the stable rate does not increase the loss (and the
# transient spike of a "catapult" stays orders of magnitude below _EXPLODE)
_EXPLODE = 1e4
_FINAL = 10.0


class _Diverged(ValueError):
    """Training diverged (a ``ValueError``; the message names the learning rate and limit)."""


def _stable_limit_text(model: nn.Module, theta0: Dict[str, torch.Tensor], x: torch.Tensor,
                       loss_scale: float, lr: float) -> str:
    """``' (stable limit ... at initialization)'`` or ``''`` if it cannot be computed."""
    try:
        m0 = _f64_copy(model)
        with torch.no_grad():
            for name, p in _trainable(m0):
                p.copy_(theta0[name])
        limit = _auto_lr(m0, x, loss_scale, 1.0)
    except Exception:  # the message must not hide the divergence itself
        return ""
    if not math.isfinite(limit):
        return ""
    return (f" (the full-batch stable limit at initialization is 2 N / (loss_scale * "
            f"lambda_max(NTK)) = {limit:.4g}, so learning_rate is {lr / limit:.3g} times it)")


def _auto_lr(model: nn.Module, x: torch.Tensor, loss_scale: float, fraction: float) -> float:
    theta = _full_ntk(_f64_copy(model), x)
    lam = float(torch.linalg.eigvalsh(theta)[-1])
    N = theta.shape[0]
    # loss_scale * 1/2 mean (f-y)^2: residual modes evolve as (1 - lr * loss_scale * lam / N)
    return fraction * 2.0 * N / (loss_scale * lam)


def train(model: nn.Module, x: Any, y: Any, *, steps: int = 100,
          learning_rate: Union[float, str] = "auto", lr_fraction: float = 0.5,
          batch_size: Optional[int] = None, loss_scale: float = 1.0,
          record_every: Optional[int] = None, linearization: bool = True,
          measure_kernel_drift: bool = True, x_eval: Any = None, record_outputs: bool = False,
          snapshot: Optional[str] = None, seed: int = 0) -> TrainingRecord:
    """Train ``model`` **in place** with SGD on ``loss_scale * 1/2 mean (f - y)^2`` and measure
    how lazily it moves.

    Args:
      model: the network (its parameters are updated). x: ``(n, ...)``; y: targets of the
        output's shape.
      steps: optimizer steps. learning_rate: a float, or ``'auto'``: ``lr_fraction`` times the
        full-batch stability limit ``2 N / (loss_scale * lambda_max(Theta_0))``.
      batch_size: ``None`` for full-batch gradient descent, else minibatch SGD (batches drawn
        with ``seed``).
      loss_scale: multiplies the loss (``1 / alpha^2`` for Chizat & Bach's scaled models).
      record_every: record every so many steps (default ``max(1, steps // 50)``); the last step
        is always recorded.
      linearization: also train ``ntkit.linearize(model)`` on the same batches and record the
        RMS gap between the two on ``x_eval`` (default ``x``).
      measure_kernel_drift: compute the final relative change of the empirical NTK on ``x_eval``.
      record_outputs: keep ``model(x_eval)`` at every record in ``.outputs`` ``(R, *out)``.
      snapshot: name of a parameter (e.g. ``'2.weight'``) to copy at every record.

    Example::

        >>> rec = train(net, x, y, steps=300, learning_rate=1.0)
        >>> rec.loss[-1], rec.rel_weight_change[-1], rec.kernel_drift
    """
    model = _check_model(model)
    x = _as_x(x)
    _check_int(steps, "steps", 0)
    p_dtype = next(p for _, p in _trainable(model)).dtype
    xm = x.to(p_dtype)
    with torch.no_grad():
        out0 = model(xm)
    y = _as_y(y, out0.shape).to(p_dtype)
    xe = xm if x_eval is None else _as_x(x_eval, "x_eval").to(p_dtype)
    if not (isinstance(loss_scale, (int, float)) and loss_scale > 0 and math.isfinite(loss_scale)):
        raise ValueError(f"`loss_scale` must be a positive number, got {loss_scale!r}")
    if isinstance(learning_rate, str):
        if learning_rate != "auto":
            raise ValueError(f"`learning_rate` must be a positive number or 'auto', got "
                             f"{learning_rate!r}")
        lr = _auto_lr(model, x, float(loss_scale), float(lr_fraction))
    else:
        lr = float(learning_rate)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"`learning_rate` must be a positive number or 'auto', got "
                             f"{learning_rate!r}")
    n = x.shape[0]
    if batch_size is not None:
        _check_int(batch_size, "batch_size")
        if batch_size > n:
            raise ValueError(f"`batch_size`={batch_size} exceeds the {n} training examples")
    every = max(1, steps // 50) if record_every is None else _check_int(record_every,
                                                                       "record_every")
    if snapshot is not None and snapshot not in dict(model.named_parameters()):
        raise ValueError(f"`snapshot` {snapshot!r} is not a parameter name; names: "
                         f"{[nm for nm, _ in model.named_parameters()][:10]}")
    theta0 = _param_dict(model)
    model0 = copy.deepcopy(model) if measure_kernel_drift else None
    lin = None
    if linearization:
        from .empirical import linearize
        lin = linearize(model)
    opt = torch.optim.SGD([p for _, p in _trainable(model)], lr=lr)
    opt_lin = torch.optim.SGD([p for p in lin.parameters() if p.requires_grad], lr=lr) \
        if lin is not None else None
    gen = torch.Generator().manual_seed(int(seed))
    rec_steps, losses, rel, gaps, outs = [], [], [], [], []
    snaps: Dict[int, torch.Tensor] = {}

    def record(s: int) -> None:
        with torch.no_grad():
            f = model(xm)
            losses.append(float(loss_scale * 0.5 * ((f - y) ** 2).mean()))
            rec_steps.append(s)
            rel.append(relative_weight_change(_param_dict(model), theta0))
            fe = f if xe is xm else model(xe)
            if record_outputs:
                outs.append(fe.detach().to(_F64).clone())
        if lin is not None:
            with torch.no_grad():
                gaps.append(float(torch.sqrt(((fe - lin(xe)) ** 2).to(_F64).mean())))
        if snapshot is not None:
            snaps[s] = model.get_parameter(snapshot).detach().to(_F64).clone()

    record(0)
    # divergence guard: a loss that is not finite, or grows far beyond both the initial loss
    # and the scale of the targets, is a diverged run (never returned as a measurement)
    ref = max(losses[0], float(loss_scale * 0.5 * (y.to(_F64) ** 2).mean()), 1e-300)
    burst = _EXPLODE * (1.0 if batch_size is None else n / batch_size)

    def diverged(s: int, value: float, what: str) -> ValueError:
        return _Diverged(
            f"training diverged at step {s}: the {what} loss is {value:.4g} (initial "
            f"{losses[0]:.4g}); `learning_rate`={lr:.4g} is too large"
            f"{_stable_limit_text(model, theta0, x, float(loss_scale), lr)}. Lower "
            f"`learning_rate` (or use learning_rate='auto', a fraction `lr_fraction` of the "
            f"stable limit)")

    for s in range(1, steps + 1):
        if batch_size is None:
            xb, yb = xm, y
        else:
            idx = torch.randperm(n, generator=gen)[:batch_size]
            xb, yb = xm[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_scale * 0.5 * ((model(xb) - yb) ** 2).mean()
        lv = float(loss.detach())
        if not (math.isfinite(lv) and lv <= burst * ref):
            raise diverged(s, lv, "network's")
        loss.backward()
        opt.step()
        if lin is not None:
            opt_lin.zero_grad(set_to_none=True)
            loss_lin = loss_scale * 0.5 * ((lin(xb) - yb) ** 2).mean()
            lv = float(loss_lin.detach())
            if not (math.isfinite(lv) and lv <= burst * ref):
                raise diverged(s, lv, "linearized network's")
            loss_lin.backward()
            opt_lin.step()
        if s % every == 0 or s == steps:
            record(s)
            if not (math.isfinite(losses[-1]) and losses[-1] <= _EXPLODE * ref):
                raise diverged(s, losses[-1], "network's")
    if steps and losses[-1] > _FINAL * ref:
        raise diverged(steps, losses[-1], "final")
    drift = kernel_drift(model, model0, xe) if measure_kernel_drift else None
    return TrainingRecord(
        steps=torch.tensor(rec_steps), loss=torch.tensor(losses, dtype=_F64),
        rel_weight_change=torch.tensor(rel, dtype=_F64),
        lin_gap=torch.tensor(gaps, dtype=_F64) if lin is not None else None,
        rel_change_by_layer=relative_weight_change(_param_dict(model), theta0, by="layer"),
        kernel_drift=drift, learning_rate=lr,
        outputs=torch.stack(outs) if record_outputs else None, snapshots=snaps)


# =========================================================================================
# log-log slopes
# =========================================================================================

class Slope(NamedTuple):
    """Least-squares slope of ``log(value)`` vs ``log(x)`` with a 95% confidence interval
    (Student t with ``n_points - 2`` degrees of freedom; ``nan`` bounds if ``n_points < 3``)."""
    slope: float
    stderr: float
    low: float
    high: float
    intercept: float
    n_points: int

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{self.slope:+.3f} (no CI from {self.n_points} points)"
        return f"{self.slope:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _t_quantile(p: float, dof: int) -> float:
    try:
        from scipy.stats import t
        return float(t.ppf(p, dof))
    except ImportError:  # Cornish-Fisher expansion of the t quantile around the normal one
        z = math.sqrt(2) * _erfinv(2 * p - 1)
        g1 = (z ** 3 + z) / 4
        g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
        g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
        return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3


def _erfinv(y: float) -> float:
    return float(torch.erfinv(torch.tensor(y, dtype=_F64)))


def fit_slope(x: Sequence[float], values: Sequence[float]) -> Slope:
    """Fit ``log(values) = slope * log(x) + intercept`` by least squares (all points pooled,
    e.g. every seed at every width). Non-positive values are rejected.

    Example: ``fit_slope([64, 256, 1024], [0.1, 0.05, 0.025]).slope  # -0.5``
    """
    xs = torch.as_tensor(list(x), dtype=_F64)
    vs = torch.as_tensor(list(values), dtype=_F64)
    if xs.shape != vs.shape or xs.numel() < 2:
        raise ValueError("`x` and `values` need the same length, at least 2 points")
    if (xs <= 0).any() or (vs <= 0).any() or not torch.isfinite(vs).all():
        raise ValueError("log-log slopes need positive, finite `x` and `values`")
    lx, lv = xs.log(), vs.log()
    xc = lx - lx.mean()
    sxx = float((xc ** 2).sum())
    if sxx == 0:
        raise ValueError("`x` has a single distinct value: no slope")
    b = float((xc * (lv - lv.mean())).sum()) / sxx
    a = float(lv.mean()) - b * float(lx.mean())
    n = xs.numel()
    if n > 2:
        resid = lv - (a + b * lx)
        se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / sxx)
        q = _t_quantile(0.975, n - 2)
        lo, hi = b - q * se, b + q * se
    else:
        se, lo, hi = math.nan, math.nan, math.nan
    return Slope(b, se, lo, hi, a, int(n))


# =========================================================================================
# sweeps
# =========================================================================================

METRICS = ("jacobian_norm", "hessian_norm", "kappa", "residual", "rel_weight_change",
           "kernel_drift", "lin_gap", "final_loss")

# expected log-log slopes (theory; None = no simple power law)
THEORY = {
    ("width", "standard"): {"jacobian_norm": 0.5, "hessian_norm": 0.0, "kappa": -1.0},
    # NTK drift and the gap to the linearized network: O(1/width) (Dyer & Gur-Ari 2020,
    # Huang & Yau 2020); weights move O(1) in total against |theta_0| ~ sqrt(width)
    ("width", "ntk"): {"jacobian_norm": 0.0, "hessian_norm": -0.5, "kappa": -0.5,
                       "rel_weight_change": -0.5, "kernel_drift": -1.0, "lin_gap": -1.0},
    ("alpha", "centered"): {"jacobian_norm": 1.0, "hessian_norm": 1.0, "kappa": -1.0,
                            "rel_weight_change": -1.0, "kernel_drift": -1.0, "lin_gap": -1.0},
}


@dataclass
class LazySweep:
    """Tidy result of :func:`width_sweep` / :func:`alpha_sweep`.

    Attributes:
      kind: ``'width'`` or ``'alpha'``; parameterization: how the networks were built
        (``'ntk'``, ``'standard'``, a user label, or ``'unknown'``); centered: alpha sweeps only.
      rows: one dict per (value, seed) with the keys ``kind`` (the swept value), ``seed`` and the
        :data:`METRICS` (``None`` where not measured), plus ``learning_rate``, ``steps``.
      curves: one dict per run: ``value``, ``seed``, ``steps``, ``loss``, ``rel_weight_change``,
        ``lin_gap`` (lists) for training-curve figures.
      settings: how it ran (data size, steps, batch size, ...).
    """
    kind: str
    parameterization: str
    rows: List[Dict[str, Any]]
    curves: List[Dict[str, Any]]
    settings: Dict[str, Any]
    centered: Optional[bool] = None

    @property
    def values(self) -> List[float]:
        return sorted({r[self.kind] for r in self.rows})

    def column(self, metric: str) -> List[Optional[float]]:
        if metric not in self.rows[0]:
            raise ValueError(f"unknown metric {metric!r}; available: {list(self.rows[0])}")
        return [r[metric] for r in self.rows]

    def slope(self, metric: str) -> Slope:
        """Log-log slope of ``metric`` vs the swept value, all seeds pooled (95% CI)."""
        if metric not in METRICS:
            raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")
        pts = [(r[self.kind], r[metric]) for r in self.rows
               if r.get(metric) is not None and r[metric] > 0 and math.isfinite(r[metric])]
        if len({p[0] for p in pts}) < 2:
            raise ValueError(f"metric {metric!r} was not measured at >= 2 values of "
                             f"{self.kind} (enable training for rel_weight_change & co.)")
        return fit_slope([p[0] for p in pts], [p[1] for p in pts])

    @property
    def slopes(self) -> Dict[str, Slope]:
        """Every measured metric's :class:`Slope`."""
        out = {}
        for m in METRICS:
            try:
                out[m] = self.slope(m)
            except ValueError:
                pass
        return out

    @property
    def theory(self) -> Dict[str, float]:
        """Expected slopes for this sweep (empty when theory gives none)."""
        key = (self.kind, "centered" if self.kind == "alpha" and self.centered
               else self.parameterization)
        return dict(THEORY.get(key, {}))

    def mean(self, metric: str) -> Dict[float, float]:
        """Geometric mean over seeds of ``metric`` at each swept value."""
        acc: Dict[float, List[float]] = {}
        for r in self.rows:
            v = r.get(metric)
            if v is not None and v > 0:
                acc.setdefault(r[self.kind], []).append(math.log(v))
        return {k: math.exp(sum(v) / len(v)) for k, v in sorted(acc.items())}

    def to_records(self) -> List[Dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_pandas() needs pandas (pip install pandas); use "
                              ".to_records() or .to_csv() without it") from e
        df = pd.DataFrame(self.rows)
        df.attrs.update(kind=self.kind, parameterization=self.parameterization)
        return df

    def to_csv(self, path: str) -> str:
        """Write the rows as CSV (no pandas needed); returns ``path``."""
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)
        return path

    def to_text(self) -> str:
        """Table of geometric means per swept value, then fitted slopes vs theory."""
        ms = [m for m in METRICS if any(r.get(m) is not None for r in self.rows)]
        head = f"{self.kind:>8} " + " ".join(f"{m:>17}" for m in ms)
        desc = (f"{self.kind} sweep, parameterization: {self.parameterization}"
                + (f", centered: {self.centered}" if self.kind == "alpha" else "")
                + f", seeds: {len(set(r['seed'] for r in self.rows))}")
        lines = [desc, head]
        means = {m: self.mean(m) for m in ms}
        for v in self.values:
            cells = " ".join(f"{means[m].get(v, float('nan')):>17.4e}" for m in ms)
            lines.append(f"{v:>8g} {cells}")
        th = self.theory
        lines.append(f"log-log slopes vs {self.kind} (95% CI)" + ("; theory" if th else ""))
        for m, s in self.slopes.items():
            t = f"   theory {th[m]:+.2f}" if m in th else ""
            lines.append(f"  {m:<18} {s}{t}")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None, metrics: Optional[Sequence[str]] = None):
        """Log-log scaling figure with fitted slopes (see :func:`ntkit.plots.plot_scaling`)."""
        from .plots import plot_scaling
        return plot_scaling(self, metrics=metrics, path=path)


def _arch_parameterization(arch) -> str:
    found = set()

    def walk(obj, depth=0):
        if depth > 50:
            return
        p = getattr(obj, "parameterization", None)
        if isinstance(p, str):
            found.add(p)
        for name in ("layers", "branches", "children"):
            sub = getattr(obj, name, None)
            if isinstance(sub, (list, tuple)):
                for s in sub:
                    walk(s, depth + 1)
    walk(arch)
    if len(found) == 1:
        return found.pop()
    return "mixed" if found else "unknown"


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:  # pragma: no cover
        return None


def _measure(model: nn.Module, x, y, *, kind_value, seed, steps, learning_rate, lr_fraction,
             batch_size, loss_scale, linearization, hessian, record_every, x_eval) -> tuple:
    s = lazy_scales(model, x, y, **hessian)
    row = dict(seed=int(seed), jacobian_norm=s.jacobian_norm, hessian_norm=s.hessian_norm,
               kappa=s.kappa, residual=s.residual, n_params=s.n_params,
               rel_weight_change=None, kernel_drift=None, lin_gap=None, final_loss=None,
               learning_rate=None, steps=int(steps))
    curve = None
    if steps > 0:
        rec = train(model, x, y, steps=steps, learning_rate=learning_rate,
                    lr_fraction=lr_fraction, batch_size=batch_size, loss_scale=loss_scale,
                    record_every=record_every, linearization=linearization,
                    measure_kernel_drift=True, x_eval=x_eval, seed=seed)
        row.update(rel_weight_change=float(rec.rel_weight_change[-1]),
                   kernel_drift=rec.kernel_drift,
                   lin_gap=None if rec.lin_gap is None else float(rec.lin_gap.max()),
                   final_loss=float(rec.loss[-1]), learning_rate=rec.learning_rate)
        curve = dict(value=kind_value, seed=int(seed), steps=rec.steps.tolist(),
                     loss=rec.loss.tolist(), rel_weight_change=rec.rel_weight_change.tolist(),
                     lin_gap=None if rec.lin_gap is None else rec.lin_gap.tolist())
    return row, curve


def _common_checks(x, y, seeds, steps):
    x = _as_x(x)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty; give at least one seed, e.g. seeds=(0, 1, 2)")
    _check_int(steps, "steps", 0)
    return x, seeds


def _sweep_runs(kind: str, runs, x, y, *, progress, steps, learning_rate, lr_fraction,
                batch_size, linearization, hessian_outer, hessian_steps, record_every, x_eval):
    """Train and measure each ``(value, seed, make_net, loss_scale)`` run of a sweep."""
    rows, curves = [], []
    bar = _progress(len(runs), progress, f"{kind} sweep")
    hess = dict(outer_iters=hessian_outer, lanczos_steps=hessian_steps)
    for value, seed, make, loss_scale in runs:
        try:
            row, curve = _measure(make(), x, y, kind_value=value, seed=seed, steps=steps,
                                  learning_rate=learning_rate, lr_fraction=lr_fraction,
                                  batch_size=batch_size, loss_scale=loss_scale,
                                  linearization=linearization, hessian=hess,
                                  record_every=record_every, x_eval=x_eval)
        except _Diverged as e:
            if bar is not None:
                bar.close()
            # no slopes are fitted on a diverged run: the whole sweep fails, naming the run
            raise _Diverged(f"{kind} sweep, run {kind}={value:g}, seed={seed}: {e}; no slopes "
                            f"were fitted") from None
        rows.append({kind: value, **row})
        if curve is not None:
            curves.append(curve)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    settings = dict(n=int(x.shape[0]), steps=steps, learning_rate=learning_rate,
                    batch_size=batch_size, optimizer="GD" if batch_size is None else "SGD")
    return rows, curves, settings


def width_sweep(model: Any, x: Any, y: Any, widths: Sequence[int], *,
                seeds: Sequence[int] = (0, 1, 2), steps: int = 100,
                learning_rate: Union[float, str] = "auto", lr_fraction: float = 0.5,
                batch_size: Optional[int] = None, linearization: bool = True,
                parameterization: Optional[str] = None, in_shape: Any = None,
                record_every: Optional[int] = None, x_eval: Any = None,
                hessian_steps: int = 40, hessian_outer: int = 3,
                progress: bool = False) -> LazySweep:
    """Lazy-training diagnostics of networks of increasing width.

    For every width and seed: the network at initialization (gradient norm, Hessian norm,
    residual, kappa), then (if ``steps > 0``) training with full-batch GD (``batch_size=None``)
    or SGD, recording the relative weight change, the kernel drift and the gap to the
    linearized network.

    Args:
      model: an ntkit architecture (networks from ``arch.module(in_shape, width=w, seed=s)``; its
        Dense layers say the parameterization) or a factory ``width -> nn.Module``, called after
        ``torch.manual_seed(seed)``.
      x: ``(n, ...)`` inputs; y: targets of the network's output shape.
      widths: at least two hidden widths. seeds: initializations per width.
      steps, learning_rate, lr_fraction, batch_size, record_every, linearization, x_eval: as in
        :func:`train` (``'auto'`` picks each network's own stable rate times ``lr_fraction``;
        give a number for a fixed rate across widths).
      parameterization: label for factories (``'standard'``, ``'ntk'``, ...); selects the theory
        slopes shown next to the fits.
      in_shape: per-example input shape for architectures (default ``x.shape[1:]``).
      hessian_steps, hessian_outer: Lanczos steps / alternating iterations of the Hessian norm.

    Returns:
      :class:`LazySweep`. Example::

        >>> arch = nl.serial(nl.Dense(1, W_std=1.5), nl.Elementwise(torch.tanh), nl.Dense(1))
        >>> sw = width_sweep(arch, x, y, widths=(64, 256, 1024), seeds=(0, 1), steps=100)
        >>> print(sw.to_text()); sw.slope('kappa')     # about -1/2 in NTK parameterization
    """
    x, seeds = _common_checks(x, y, seeds, steps)
    ws = [int(w) for w in widths]
    if len(set(ws)) < 2 or min(ws) < 1:
        raise ValueError(f"`widths` needs at least two distinct positive widths, got "
                         f"{list(widths)}")
    from .layers import Layer
    if isinstance(model, Layer):
        shape = tuple(x.shape[1:]) if in_shape is None else in_shape
        label = parameterization or _arch_parameterization(model)

        def build(w, s):
            return model.module(in_shape=shape, width=w, seed=s, dtype=_F64)
    elif callable(model) and not isinstance(model, nn.Module):
        label = parameterization or "unknown"

        def build(w, s):
            torch.manual_seed(s)
            net = model(w)
            if not isinstance(net, nn.Module):
                raise TypeError(f"the width factory must return an nn.Module, got "
                                f"{type(net).__name__}")
            return net.to(_F64)
    else:
        raise TypeError("`model` must be an ntkit architecture (ntkit.layers) or a factory "
                        "`width -> nn.Module`; for a single module use alpha_sweep or "
                        "lazy_scales")
    runs = [(w, s, (lambda w=w, s=s: build(w, s)), 1.0) for w in ws for s in seeds]
    rows, curves, settings = _sweep_runs("width", runs, x, y, progress=progress, steps=steps,
                                         learning_rate=learning_rate, lr_fraction=lr_fraction,
                                         batch_size=batch_size, linearization=linearization,
                                         hessian_outer=hessian_outer,
                                         hessian_steps=hessian_steps,
                                         record_every=record_every, x_eval=x_eval)
    return LazySweep("width", label, rows, curves, settings)


def alpha_sweep(model: Any, x: Any, y: Any, alphas: Sequence[float], *,
                seeds: Sequence[int] = (0,), center: bool = True, steps: int = 100,
                learning_rate: Union[float, str] = "auto", lr_fraction: float = 0.5,
                batch_size: Optional[int] = None, linearization: bool = True,
                in_shape: Any = None, record_every: Optional[int] = None, x_eval: Any = None,
                hessian_steps: int = 40, hessian_outer: int = 3,
                parameterization: Optional[str] = None, progress: bool = False) -> LazySweep:
    """Chizat & Bach's output scaling: train ``alpha * (f - f_0)`` (``center=True``) or
    ``alpha * f`` on the loss divided by ``alpha^2``, for several ``alpha``.

    With centering the function-space dynamics do not depend on ``alpha`` while
    ``kappa``, the relative weight change, the kernel drift and the linearization gap fall like
    ``1/alpha``; without centering the initial output ``alpha f_0`` blows up instead.

    Args:
      model: an ``nn.Module`` (one initialization, deep-copied per alpha; ``seeds`` must then
        have one entry), an ntkit architecture (``arch.module(in_shape, seed=s)``) or a factory
        ``() -> nn.Module`` called after ``torch.manual_seed(seed)``.
      alphas: at least two positive scales. center: subtract the initial function.
      parameterization: label of the base network (default: from the architecture, or
        ``'module'`` / ``'factory'``).
      Other arguments as in :func:`width_sweep`; ``'auto'`` learning rates are computed for the
      scaled model and loss, so they do not change with ``alpha`` when centered.

    Example::

        >>> sw = alpha_sweep(net, x, y, alphas=(1, 4, 16, 64), steps=100)
        >>> sw.slope('kappa')                  # about -1
    """
    x, seeds = _common_checks(x, y, seeds, steps)
    al = [float(a) for a in alphas]
    if len(set(al)) < 2 or min(al) <= 0 or not all(math.isfinite(a) for a in al):
        raise ValueError(f"`alphas` needs at least two distinct positive values, got "
                         f"{list(alphas)}")
    from .empirical import centered, scaled
    from .layers import Layer
    if isinstance(model, nn.Module):
        if len(seeds) != 1:
            raise ValueError("`model` is a single nn.Module (one initialization): give one seed, "
                             "or pass a factory `() -> nn.Module` / an architecture for several")
        label = "module"

        def build(s):
            return copy.deepcopy(model).to(_F64)
    elif isinstance(model, Layer):
        shape = tuple(x.shape[1:]) if in_shape is None else in_shape
        label = _arch_parameterization(model)

        def build(s):
            return model.module(in_shape=shape, seed=s, dtype=_F64)
    elif callable(model):
        label = "factory"

        def build(s):
            torch.manual_seed(s)
            return model().to(_F64)
    else:
        raise TypeError("`model` must be an nn.Module, an ntkit architecture or a factory "
                        "`() -> nn.Module`")
    def make(a, s):
        base = build(s)
        return scaled(centered(base) if center else base, a)

    runs = [(a, s, (lambda a=a, s=s: make(a, s)), 1.0 / a ** 2) for a in al for s in seeds]
    rows, curves, settings = _sweep_runs("alpha", runs, x, y, progress=progress, steps=steps,
                                         learning_rate=learning_rate, lr_fraction=lr_fraction,
                                         batch_size=batch_size, linearization=linearization,
                                         hessian_outer=hessian_outer,
                                         hessian_steps=hessian_steps,
                                         record_every=record_every, x_eval=x_eval)
    return LazySweep("alpha", parameterization or label, rows, curves, settings,
                     centered=bool(center))
