"""Training dynamics from the kernel: what gradient descent does to a wide network, in closed form.

A network in its linear (NTK) regime, trained by gradient descent on the squared loss, follows the
linear ODE ``df/dt = -Theta (f - y) / y_train.size`` on the training set (and the matching one on
any test set), so its outputs at every time ``t`` are known in closed form; averaged over random
initializations the outputs are Gaussian with a known mean and covariance (Lee et al. 2019,
arXiv:1902.06720). This module computes those numbers.

Conventions (identical to neural-tangents' ``predict`` module, so numbers compare one to one):

* loss = ``1/2 * mean((f - y)^2)`` over **all** entries of ``y_train`` (``N = y_train.numel()``);
  gradient flow ``df/dt = -Theta (f - y) / N``, each eigenmode decays as ``exp(-lambda t / N)``;
* time ``t`` is in units of the learning rate: ``absolute_time = learning_rate * t`` (so with
  ``learning_rate`` equal to the SGD step size, ``t`` counts training steps);
* ``diag_reg`` is relative to the mean of the kernel diagonal (``diag_reg * trace(K) / n`` is added
  to ``K``) unless ``diag_reg_absolute_scale=True``;
* ``t=None`` means ``t = infinity``; every spelling of infinity (``None``, ``math.inf``, a 0-d
  or 1-d ``inf`` tensor, ``steps=None``, ``gp_inference`` / the ensemble without test inputs)
  goes through the same eigendecomposition as finite ``t`` and gives the same numbers;
* kernels are ``(n, n)`` matrices shared by all outputs (``Theta ⊗ I``); targets are ``(n, k)``.

Numerics and guarantees: every factorization is done in float64 (also for float32 kernels) by
one cached eigendecomposition (``ntkit._linalg``). Eigenvalues at or below the numerical-null
threshold ``n * eps(kernel dtype) * lambda_max`` are treated as exactly zero **at every t**:
those modes do not move, so at ``t = inf`` the training outputs are
``f_0 + P_range(K) (y - f_0)`` (the projection onto the range of the kernel; with duplicated
inputs and conflicting labels, the mean of the labels) and test outputs
``g_0 + k_td K^+ (y - f_0)``, and ``f(t)`` tends to them continuously as ``t`` grows. A kernel
that is not symmetric PSD beyond rounding, NaN/Inf inputs, mismatched shapes, a learning rate
at or above the stable limit of discrete gradient descent (:func:`max_learning_rate`), and an
ODE that cannot be integrated within ``max_steps`` raise ``ValueError`` naming the argument;
outputs are checked to be finite (never NaN returned silently).

Example::

    >>> from ntkit import layers as nl, predict
    >>> arch = nl.serial(nl.Dense(512), nl.Relu(), nl.Dense(1))
    >>> ntk_dd = arch.kernel(x_train, get='ntk'); ntk_td = arch.kernel(x_test, x_train, get='ntk')
    >>> predict_fn = predict.gradient_descent_mse(ntk_dd, y_train)
    >>> f_train_t, f_test_t = predict_fn(t=torch.tensor([1., 10., 100.]), fx_train_0=0.,
    ...                                  fx_test_0=0., k_test_train=ntk_td)   # (3, n, k), (3, m, k)
    >>> ens = predict.gradient_descent_mse_ensemble(arch, x_train, y_train)
    >>> mean, cov = ens(t=100., x_test=x_test, get='ntk', compute_cov=True)  # (m, k), (m, m)
"""
from __future__ import annotations

import collections
import inspect
import math
import weakref
from typing import (Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union,
                    overload)

import numpy as np
import torch

from ._linalg import factorize, matmul_lower, null_eps
from ._typing import (GPPredictFn, ODEPredictFn, PredictFn, StepsPredictFn, TimePredictFn,
                      as_kernel_fn)
from ._validation import all_finite as _all_finite
from ._validation import as_array as _as_array
from ._validation import check_int as _check_int
from ._validation import check_momentum as _check_momentum
from ._validation import check_positive as _positive
from ._validation import parse_get as _parse_get

__all__ = [
    "gradient_descent_mse",
    "gradient_descent_mse_discrete",
    "gradient_descent_mse_ensemble",
    "gp_inference",
    "gradient_descent",
    "max_learning_rate",
    "eigenmodes",
    "Gaussian",
    "Eigenmodes",
]

_F64 = torch.float64
_GETS = ("nngp", "ntk")


class Gaussian(NamedTuple):
    """Mean ``t_shape + (m, k)`` and covariance ``t_shape + (m, m)`` (shared by the k outputs)."""
    mean: torch.Tensor
    covariance: torch.Tensor


# =========================================================================================
# input handling
# =========================================================================================

def _targets(y: Any, n: int) -> torch.Tensor:
    y = _as_array(y, "y_train")
    if y.ndim != 2:
        raise ValueError(f"`y_train` must have shape (n_train, n_outputs), got {tuple(y.shape)}; "
                         f"for a single output use `y_train[:, None]`")
    if y.shape[0] != n:
        raise ValueError(f"`y_train` has {y.shape[0]} rows but the train-train kernel is "
                         f"{n} x {n}; they must describe the same training set")
    if y.numel() == 0:
        raise ValueError("`y_train` is empty")
    return y


def _times(t: Any, name: str = "t") -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """``(flat float64 times on the CPU, shape of t)``; ``None`` is ``t = inf`` (scalar).
    The few times steer host-side choices (finite / infinite, steps), so they live on the CPU
    whatever device the kernels are on; the predictors move them where they are used."""
    if t is None:
        return torch.tensor([math.inf], dtype=_F64, device="cpu"), ()
    tt = t.detach() if isinstance(t, torch.Tensor) else None
    if tt is None:
        try:
            tt = torch.as_tensor(np.asarray(t, dtype=np.float64), device="cpu")
        except (TypeError, ValueError):
            raise TypeError(f"`{name}` must be None, a number or a 1-D array of numbers, got "
                            f"{type(t).__name__}") from None
    if tt.is_complex():
        raise TypeError(f"`{name}` must be real")
    tt = tt.to(_F64)
    if torch.isnan(tt).any():
        raise ValueError(f"`{name}` contains NaN")
    if (tt < 0).any():
        raise ValueError(f"`{name}` must be >= 0 (time since initialization), got min "
                         f"{float(tt.min())}")
    return tt.reshape(-1).cpu(), tuple(tt.shape)


def _result_dtype(*ts: Optional[torch.Tensor]) -> torch.dtype:
    dt = None
    for t in ts:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt or _F64


def _broadcast(f: Any, shape: Tuple[int, ...], name: str, device) -> torch.Tensor:
    f = _as_array(f, name).to(device=device, dtype=_F64)
    try:
        return torch.broadcast_to(f, shape)
    except RuntimeError:
        raise ValueError(f"`{name}` of shape {tuple(f.shape)} cannot be broadcast to the output "
                         f"shape {shape}") from None


def _test_kernel(k: Any, n: int, name: str = "k_test_train") -> torch.Tensor:
    k = _as_array(k, name)
    if k.ndim != 2 or k.shape[1] != n:
        raise ValueError(f"`{name}` must have shape (n_test, {n}) (test rows, train columns), got "
                         f"{tuple(k.shape)}")
    return k


# =========================================================================================
# per-mode factors (NaN-free, float64)
# =========================================================================================

def _mode_factors(evals: torch.Tensor, live: torch.Tensor, times: torch.Tensor, size: float,
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per time and eigenvalue: ``expm1(-lam t/N)``, ``expm1(-lam t/N) / lam``, ``exp(-lam t/N)``.

    Shapes ``(T, n)``; ``t = inf`` allowed. Numerically-null modes (``live`` False, eigenvalues
    at or below the cutoff of :meth:`ntkit._linalg.Factorization.spectrum`) do not move at any
    ``t``: factors ``0``, ``0``, ``1``. For the quotient this is the pseudo-inverse convention:
    for an exact null vector ``v`` of a PSD kernel, ``k_td v = 0``, so the ``-t/N`` limit would
    only multiply rounding noise by ``t``. Live modes use the stable ``(1 - e^{-x}) / x``.
    """
    lam = evals.to(_F64)[None, :]
    lv = live[None, :]
    tt = times.to(device=lam.device, dtype=_F64)[:, None]
    finite = torch.isfinite(tt)
    lam1 = torch.where(lv, lam, torch.ones_like(lam))
    tt_f = torch.where(finite, tt, torch.zeros_like(tt))
    x = lam1 * tt_f / size                                       # finite t: lam t / N
    em1_f = torch.expm1(-x)
    small = x < 1e-8
    h = torch.where(small, 1.0 - 0.5 * x, -em1_f / torch.where(small, torch.ones_like(x), x))
    q_f = -(tt_f / size) * h                                      # expm1(-x) / lam
    em1 = torch.where(finite, em1_f, -torch.ones_like(x))
    quot = torch.where(finite, q_f, (-1.0 / lam1).expand_as(x))
    zero = torch.zeros_like(x)
    em1 = torch.where(lv, em1, zero)
    quot = torch.where(lv, quot, zero)
    return em1, quot, em1 + 1.0


def _train_outputs(V: torch.Tensor, em1: torch.Tensor, ex: torch.Tensor, p: torch.Tensor,
                   f0: torch.Tensor, y: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """``f_t = f_0 + V diag(expm1) p`` (``p = V^T (f_0 - y)``), written at ``t = inf`` as
    ``y + V diag(e^{-lam t}) p`` (only null modes survive): exactly ``y`` for a nonsingular
    kernel, ``f_0 + P_range (y - f_0)`` otherwise. Shape ``(T, n, k)``."""
    fin = f0 + torch.matmul(V, em1[:, :, None] * p)
    inf_rows = torch.isinf(times).to(fin.device)
    if bool(inf_rows.any()):
        lim = y + torch.matmul(V, ex[:, :, None] * p)
        fin = torch.where(inf_rows[:, None, None], lim, fin)
    return fin


@overload
def _finite(z: torch.Tensor, what: str) -> torch.Tensor: ...


@overload
def _finite(z: None, what: str) -> None: ...


@overload
def _finite(z: Optional[torch.Tensor], what: str) -> Optional[torch.Tensor]: ...


def _finite(z: Optional[torch.Tensor], what: str) -> Optional[torch.Tensor]:
    """Raise instead of returning NaN/Inf (overflow in a product of huge kernels/targets)."""
    if z is not None and z.numel() and not _all_finite(z):
        raise ValueError(f"the predicted {what} are not finite (overflow): the kernel, targets "
                         f"or initial outputs are too large to represent the result in the "
                         f"output dtype; rescale them (e.g. divide the kernel by its mean "
                         f"diagonal and multiply `t` or `learning_rate` accordingly)")
    return z


# =========================================================================================
# 1. gradient_descent_mse
# =========================================================================================

def _return(fx_train, fx_test, want_train, want_test):
    if want_train and want_test:
        return fx_train, fx_test
    return fx_test if want_test else fx_train


def _check_call(fx_train_0, fx_test_0, k_test_train):
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError("`fx_test_0` was given but `k_test_train` is None: pass the test-train "
                         "kernel k(x_test, x_train) to predict test outputs")
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError("both `fx_train_0` and `fx_test_0` are None: nothing to predict")


def gradient_descent_mse(k_train_train: Any, y_train: Any, learning_rate: float = 1.0,
                         diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False
                         ) -> TimePredictFn:
    """Outputs of a linearized network trained by gradient flow on MSE, at any time(s) ``t``.

    Solves ``df/dt = -Theta (f - y) / N`` (``N = y_train.numel()``, loss ``1/2 mean (f-y)^2``) in
    closed form in the eigenbasis of ``Theta = k_train_train`` (+ ridge), exactly as
    neural-tangents' ``predict.gradient_descent_mse``.

    Args:
      k_train_train: ``(n, n)`` NTK (or NNGP, for readout-only training) on the training set.
      y_train: ``(n, k)`` targets.
      learning_rate: time unit: ``absolute_time = learning_rate * t``.
      diag_reg: ridge added to the kernel, relative to its mean diagonal.
      diag_reg_absolute_scale: if True, ``diag_reg`` is absolute.

    Returns:
      ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``:

      * ``t``: scalar or array of times (``None`` or ``inf``: convergence; null modes of the
        kernel do not move, so the train limit is ``f_0 + P_range(K) (y - f_0)``);
      * ``fx_train_0``: ``(n, k)`` (or broadcastable) outputs at ``t = 0``; ``None``: skip train;
      * ``fx_test_0``: ``(m, k)`` test outputs at ``t = 0`` (needs ``k_test_train`` ``(m, n)``).

      It returns ``fx_train_t`` ``t.shape + (n, k)``, or ``fx_test_t`` ``t.shape + (m, k)``, or
      both as a tuple when both ``fx_train_0`` and ``fx_test_0`` are given.

    Example::

        >>> predict_fn = gradient_descent_mse(ntk_dd, y_train)
        >>> f_tr, f_te = predict_fn(torch.tensor([0., 10.]), f_train_0, f_test_0, ntk_td)
    """
    fac = factorize(k_train_train, diag_reg, diag_reg_absolute_scale, "k_train_train")
    n = fac.n
    y = _targets(y_train, n)
    lr = _positive(learning_rate, "learning_rate")
    size = float(y.numel())
    out_dtype = _result_dtype(fac.matrix.new_empty(0, dtype=fac.input_dtype), y)
    dev = fac.matrix.device
    y64 = y.to(device=dev, dtype=_F64)

    def predict_fn(t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: Any = None):
        _check_call(fx_train_0, fx_test_0, k_test_train)
        times, t_shape = _times(t)
        want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
        f0 = (torch.zeros_like(y64) if fx_train_0 is None
              else _broadcast(fx_train_0, tuple(y.shape), "fx_train_0", dev))
        k_td = g0 = None
        if want_test:
            k_td = _test_kernel(k_test_train, n).to(device=dev, dtype=_F64)
            g0 = _broadcast(fx_test_0, (k_td.shape[0], y.shape[1]), "fx_test_0", dev)
        evals, evecs, live = fac.spectrum()
        em1, quot, ex = _mode_factors(evals, live, times * lr, size)  # t = inf included
        p = evecs.T @ (f0 - y64)                                      # (n, k) residual modes
        fx_train = fx_test = None
        if want_train:
            fx_train = _train_outputs(evecs, em1, ex, p, f0, y64, times)   # (T, n, k)
        if want_test:
            assert k_td is not None and g0 is not None  # set above when want_test
            a = k_td @ evecs                                          # (m, n)
            fx_test = g0 + torch.matmul(a, quot[:, :, None] * p)
        shp = lambda z: None if z is None else z.reshape(t_shape + z.shape[1:])  # noqa: E731
        cast = lambda z: None if z is None else z.to(out_dtype)  # noqa: E731
        fx_train = _finite(cast(shp(fx_train)), "training outputs")
        fx_test = _finite(cast(shp(fx_test)), "test outputs")
        return _return(fx_train, fx_test, want_train, want_test)

    return predict_fn


# =========================================================================================
# discrete steps with a finite learning rate (and heavy-ball momentum)
# =========================================================================================

def max_learning_rate(k_train_train: Any, y_train_size: Optional[int] = None,
                      momentum: float = 0.0) -> float:
    """Largest stable learning rate of full-batch GD (+ momentum) on ``1/2 mean (f - y)^2``.

    A mode with NTK eigenvalue ``lam`` evolves as ``r <- (1 - lr lam / N) r`` (plus momentum
    terms): stable iff ``lr < 2 (1 + momentum) N / lam_max`` (``N = y_train_size``, default
    ``n``: one output). Computed in float64 from the (cached) eigendecomposition.

    Example::

        >>> lr = 0.5 * max_learning_rate(ntk_dd, y_train.numel())
    """
    fac = factorize(k_train_train, 0.0, False, "k_train_train")
    mom = _check_momentum(momentum)
    size = fac.n if y_train_size is None else int(y_train_size)
    if size < 1:
        raise ValueError(f"`y_train_size` must be a positive integer, got {y_train_size!r}")
    evals, _, _ = fac.spectrum()
    return _stable_limit(float(evals[-1]) if fac.n else 0.0, mom, size)


def _stable_limit(top: float, mom: float, size: float) -> float:
    """``2 (1 + momentum) N / lambda_max`` (``inf`` for a zero kernel)."""
    return math.inf if top <= 0 else 2.0 * (1.0 + mom) * size / top


def _step_matrices(evals: torch.Tensor, lr: float, mom: float, size: float) -> torch.Tensor:
    """Per mode the 3x3 one-step map of ``(r, w, g)``: residual, velocity / lam, test accumulator.

    ``w' = mom w - lr/N r``; ``r' = r + lam w'``; ``g' = g + w'`` — heavy-ball momentum as in
    ``torch.optim.SGD(momentum=mom)`` on the linearized network, written so that no division by
    an eigenvalue is needed (null modes stay exact).
    """
    lam = evals.to(_F64)
    n = lam.shape[0]
    c = lr / size
    M = torch.zeros(n, 3, 3, dtype=_F64, device=lam.device)
    M[:, 0, 0] = 1.0 - c * lam
    M[:, 0, 1] = lam * mom
    M[:, 1, 0] = -c
    M[:, 1, 1] = mom
    M[:, 2, 0] = -c
    M[:, 2, 1] = mom
    M[:, 2, 2] = 1.0
    return M


def _plain_gd_factors(evals: torch.Tensor, live: torch.Tensor, times: torch.Tensor, c: float
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Without momentum, per step count ``s`` and mode: ``(1 - c lam)^s - 1`` and the test
    accumulator ``-c sum_{j<s} (1 - c lam)^j = ((1 - c lam)^s - 1) / lam``, in closed form with
    ``log1p``/``expm1`` so that small ``c lam`` keeps full relative precision (``1 - c lam`` itself
    would round away the digits that decide the ``t -> inf`` limit). Shapes ``(T, n)``."""
    lam = torch.where(live, evals.to(_F64), torch.zeros_like(evals, dtype=_F64))[None, :]
    s = times.to(device=lam.device, dtype=_F64)[:, None]
    x = c * lam                                                   # in [0, 2) (stable rate)
    mono = x <= 1.0
    L = s * torch.log1p(-torch.where(mono, x, torch.zeros_like(x)))
    L = torch.where(s == 0, torch.zeros_like(L), L)               # 0 * log(0) at c lam = 1
    r_mono = torch.expm1(L)
    base = (x - 1.0).clamp_min(0.0)                               # |1 - x| for 1 < x < 2
    sign = torch.where(torch.remainder(s, 2) == 0, 1.0, -1.0)
    r_osc = sign * torch.pow(base, s) - 1.0
    r_fac = torch.where(mono, r_mono, r_osc)
    lam1 = torch.where(live[None, :], lam, torch.ones_like(lam))
    g_fac = torch.where(live[None, :], r_fac / lam1, torch.zeros_like(r_fac))
    return r_fac, g_fac


def gradient_descent_mse_discrete(k_train_train: Any, y_train: Any, learning_rate: float,
                                  momentum: float = 0.0, diag_reg: float = 0.0,
                                  diag_reg_absolute_scale: bool = False) -> StepsPredictFn:
    """Outputs of a linearized network after a number of discrete full-batch GD steps.

    Exact for ``torch.optim.SGD(lr=learning_rate, momentum=momentum)`` on the loss
    ``1/2 mean (f - y)^2`` of a linearized network with NTK ``k_train_train``: no ``O(lr)``
    discretization error, unlike the gradient-flow prediction. Each eigenmode is advanced by the
    power of a 3x3 matrix (repeated squaring), so any step count costs ``O(n log steps)`` after
    one eigendecomposition.

    Args:
      k_train_train: ``(n, n)`` kernel; y_train: ``(n, k)`` targets.
      learning_rate: SGD step size (see :func:`max_learning_rate` for the stability limit).
      momentum: heavy-ball momentum in ``[0, 1)`` (PyTorch's convention, no dampening).
      diag_reg, diag_reg_absolute_scale: ridge, as in :func:`gradient_descent_mse`.

    Returns:
      ``predict_fn(steps=None, fx_train_0=0., fx_test_0=None, k_test_train=None)`` with integer
      ``steps`` (scalar or array; ``None``/``inf``: convergence, only if the rate is stable), same
      outputs as :func:`gradient_descent_mse`.

    Example::

        >>> pf = gradient_descent_mse_discrete(ntk_dd, y, learning_rate=0.5, momentum=0.9)
        >>> f_tr, f_te = pf(torch.arange(0, 100, 10), f_tr0, f_te0, ntk_td)
    """
    fac = factorize(k_train_train, diag_reg, diag_reg_absolute_scale, "k_train_train")
    n = fac.n
    y = _targets(y_train, n)
    lr = _positive(learning_rate, "learning_rate")
    mom = _check_momentum(momentum)
    size = float(y.numel())
    out_dtype = _result_dtype(fac.matrix.new_empty(0, dtype=fac.input_dtype), y)
    dev = fac.matrix.device
    y64 = y.to(device=dev, dtype=_F64)
    infer = gradient_descent_mse(k_train_train, y, 1.0, diag_reg, diag_reg_absolute_scale)

    def check_stable() -> None:
        evals, _, _ = fac.spectrum()
        top = float(evals[-1]) if n else 0.0
        limit = _stable_limit(top, mom, size)
        if lr >= limit:
            raise ValueError(
                f"`learning_rate`={lr:g} is unstable: at or above the stable limit {limit:.6g} "
                f"of gradient descent on this kernel (2 (1 + momentum) N / lambda_max with "
                f"momentum={mom:g}, "
                f"N={int(size)}, lambda_max={top:.6g}; see max_learning_rate): the predicted "
                f"outputs would grow without bound. Use learning_rate < {limit:.6g}, e.g. "
                f"{0.5 * limit:.4g}")

    def predict_fn(steps: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: Any = None):
        _check_call(fx_train_0, fx_test_0, k_test_train)
        times, t_shape = _times(steps, "steps")
        inf = torch.isinf(times)
        if bool(inf.any()) and times.numel() > 1:
            raise ValueError("`steps` may be None/inf (convergence) as a scalar only; query "
                             "finite step counts and convergence in separate calls")
        if bool((times != torch.round(times)).any()):
            raise ValueError("`steps` must be whole numbers of gradient-descent steps")
        if not bool(inf.any()) and times.numel() and float(times.max()) > 2.0 ** 62:
            raise ValueError(f"`steps` must be below 2**62, got {float(times.max()):g}; use "
                             f"steps=None for convergence")
        check_stable()
        if bool(inf.any()):
            return infer(steps, fx_train_0, fx_test_0, k_test_train)
        want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
        f0 = (torch.zeros_like(y64) if fx_train_0 is None
              else _broadcast(fx_train_0, tuple(y.shape), "fx_train_0", dev))
        evals, evecs, live = fac.spectrum()
        if mom == 0:
            r_fac, g_fac = _plain_gd_factors(evals, live, times, lr / size)
        else:
            M = _step_matrices(evals, lr, mom, size)
            uniq, inv = torch.unique(times, return_inverse=True)
            rs, gs = [], []
            for s in uniq.tolist():
                P = torch.linalg.matrix_power(M, int(s))
                rs.append(P[:, 0, 0])
                gs.append(P[:, 2, 0])
            r_fac = torch.stack(rs)[inv] - 1.0                  # (T, n): r_s / r_0 - 1
            g_fac = torch.stack(gs)[inv]
        # null modes do not move (r_fac = 0 exactly as lam = 0); their test-output accumulator
        # multiplies k_td v = 0 (rounding noise) by the step count: dropped, as in the flow
        g_fac = torch.where(live[None, :], g_fac, torch.zeros_like(r_fac))
        p = evecs.T @ (f0 - y64)
        fx_train = fx_test = None
        if want_train:
            fx_train = f0 + torch.matmul(evecs, r_fac[:, :, None] * p)
            fx_train = fx_train.reshape(t_shape + fx_train.shape[1:]).to(out_dtype)
        if want_test:
            k_td = _test_kernel(k_test_train, n).to(device=dev, dtype=_F64)
            g0 = _broadcast(fx_test_0, (k_td.shape[0], y.shape[1]), "fx_test_0", dev)
            fx_test = g0 + torch.matmul(k_td @ evecs, g_fac[:, :, None] * p)
            fx_test = fx_test.reshape(t_shape + fx_test.shape[1:]).to(out_dtype)
        return _return(_finite(fx_train, "training outputs"), _finite(fx_test, "test outputs"),
                       want_train, want_test)

    return predict_fn


# =========================================================================================
# 2. GP inference and the infinite ensemble
# =========================================================================================

def _kernel_part(k: Any, g: str, name: str) -> torch.Tensor:
    """``k.nngp`` / ``k['ntk']`` / ``k`` itself (a bare matrix stands for any ``get``); a ``k``
    without that kernel (``None`` included) is a ValueError naming ``name``."""
    if isinstance(k, (torch.Tensor, np.ndarray)):
        return _as_array(k, name)
    if isinstance(k, dict):
        v = k.get(g)
    else:
        v = getattr(k, g, None)
    if v is None:
        raise ValueError(f"`{name}` has no {g!r} kernel; compute it with get=('nngp', 'ntk') "
                         f"(the NTK posterior covariance needs both)")
    return _as_array(v, f"{name}.{g}")


def _is_bare(k: Any) -> bool:
    """A single matrix (not a record/dict holding 'nngp' and 'ntk' separately)."""
    return isinstance(k, (torch.Tensor, np.ndarray))


def _pack(out: Dict[str, Any], keys: Tuple[str, ...], single: bool):
    if single:
        return out[keys[0]]
    return collections.namedtuple("Gaussians", keys)(*[out[k] for k in keys])


def gp_inference(k_train_train: Any, y_train: Any, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False) -> GPPredictFn:
    """Exact posteriors: NNGP (Bayesian net), NTK (ensemble after infinite training), NTK-GP.

    * ``'nngp'``: mean ``K_td K^-1 y``, cov ``K_tt - K_td K^-1 K_dt`` (K = NNGP);
    * ``'ntk'``: mean ``Th_td Th^-1 y``, cov ``K_tt + Th_td Th^-1 K Th^-1 Th_dt -
      (Th_td Th^-1 K_dt + transpose)`` (Lee et al. 2019, eq. 16 at t = inf);
    * ``'ntkgp'``: the GP posterior with the NTK as covariance (He et al. 2020).

    Args:
      k_train_train: kernel record with ``.nngp``/``.ntk`` (or a dict, or one ``(n, n)`` matrix,
        used as the kernel of whatever ``get`` asks for; the ``'ntk'`` posterior *covariance*
        needs both kernels and refuses a single matrix rather than guess the NNGP).
      y_train: ``(n, k)``; diag_reg / diag_reg_absolute_scale: ridge (relative to mean diagonal).

    Singular kernels use the pseudo-inverse with the numerical-null threshold of
    :mod:`ntkit._linalg` (the ``t = inf`` limit of :func:`gradient_descent_mse`).

    Returns:
      ``predict_fn(get=None, k_test_train=None, k_test_test=None)``: the mean ``(m, k)`` or, when
      ``k_test_test`` is given, a :class:`Gaussian` ``(mean, (m, m) covariance)``; a namedtuple
      over ``get`` for a tuple/``None`` ``get``. ``k_test_train=None`` gives training-set outputs
      (``y_train`` projected on the range of the kernel, i.e. ``y_train`` itself for a
      nonsingular kernel, the same numbers as passing the training inputs as test inputs; pass
      ``k_test_test=True`` for the covariance, zero except for 'ntk' with a singular NTK).

    Example::

        >>> post = gp_inference(arch.kernel(x_tr), y_tr, diag_reg=1e-4)
        >>> mean, cov = post('nngp', arch.kernel(x_te, x_tr), arch.kernel(x_te, get='nngp'))
    """
    first = None
    for g in _GETS:
        try:
            first = _kernel_part(k_train_train, g, "k_train_train")
        except ValueError:
            continue
        if first is not None:
            break
    if first is None:
        raise ValueError("`k_train_train` holds neither an 'nngp' nor an 'ntk' kernel")
    if first.ndim != 2 or first.shape[0] != first.shape[1]:
        raise ValueError(f"`k_train_train` must hold square (n, n) kernels, got shape "
                         f"{tuple(first.shape)}")
    n = first.shape[0]
    y = _targets(y_train, n)
    y64 = y.to(_F64)
    facs: Dict[str, Any] = {}

    def fac(g: str):
        if g not in facs:
            facs[g] = factorize(_kernel_part(k_train_train, g, "k_train_train"), diag_reg,
                                diag_reg_absolute_scale, f"k_train_train.{g}")
            if facs[g].n != n:
                raise ValueError(f"`k_train_train.{g}` is {facs[g].n} x {facs[g].n} but the other "
                                 f"kernel is {n} x {n}; both must be on the same training set")
        return facs[g]

    def need_both(name: str, k: Any) -> None:
        if _is_bare(k):
            raise ValueError(
                f"`{name}` is a single matrix, but the 'ntk' posterior covariance needs both "
                f"the NNGP (the covariance of the initial outputs) and the NTK (the training "
                f"dynamics), which differ; pass a kernel record or dict with both, e.g. "
                f"arch.kernel(x, get=('nngp', 'ntk')), or ask for get='nngp' / 'ntkgp' / the "
                f"mean only")

    def predict_fn(get: Union[str, Sequence[str], None] = None, k_test_train: Any = None,
                   k_test_test: Any = None):
        keys, single = _parse_get(get, ("nngp", "ntk", "ntkgp"))
        out: Dict[str, Any] = {}
        for g in keys:
            kk = "ntk" if g == "ntkgp" else g
            want_cov = k_test_test is not None
            if g == "ntk" and want_cov:
                need_both("k_train_train", k_train_train)
                if k_test_train is not None:
                    need_both("k_test_train", k_test_train)
            f = fac(kk)
            dt = _result_dtype(f.matrix.new_empty(0, dtype=f.input_dtype), y)
            dev = f.matrix.device
            yd = y64.to(dev)
            cov = None
            if k_test_train is None:
                # training inputs: the t = inf limit of the flow from f_0 = 0, y projected on
                # the kernel's range (exactly y for a nonsingular kernel)
                _, V, live = f.spectrum()
                Vn = V[:, ~live]
                mean = yd - Vn @ (Vn.T @ yd)
                if want_cov:
                    if g == "ntk":
                        K = _kernel_part(k_train_train, "nngp", "k_train_train").to(dev, _F64)
                        Pn = Vn @ Vn.T                                   # null-space projector
                        cov = Pn @ K @ Pn
                        cov = 0.5 * (cov + cov.T)
                    else:                                   # K - K K^+ K = 0 (null modes = 0)
                        cov = torch.zeros(n, n, dtype=_F64, device=dev)
            else:
                k_td = _test_kernel(_kernel_part(k_test_train, kk, "k_test_train"), n)
                k_td = k_td.to(device=dev, dtype=_F64)
                mean = k_td @ f.pinv_solve(yd)
                if want_cov:
                    m = k_td.shape[0]
                    g_init = "ntk" if g == "ntkgp" else "nngp"
                    k_tt = _kernel_part(k_test_test, g_init, "k_test_test")
                    if k_tt.shape != (m, m):
                        raise ValueError(f"`k_test_test` must be ({m}, {m}), got "
                                         f"{tuple(k_tt.shape)}")
                    k_tt = k_tt.to(dev, _F64)
                    if g in ("nngp", "ntkgp"):
                        cov = k_tt - k_td @ f.pinv_solve(k_td.T)
                    else:
                        k_td_init = _test_kernel(_kernel_part(k_test_train, g_init,
                                                              "k_test_train"), n,
                                                 f"k_test_train.{g_init}")
                        if k_td_init.shape[0] != m:
                            raise ValueError(f"`k_test_train.nngp` has {k_td_init.shape[0]} "
                                             f"rows but `k_test_train.ntk` has {m}")
                        k_td_init = k_td_init.to(dev, _F64)
                        nngp_dd = _kernel_part(k_train_train, "nngp", "k_train_train")
                        nngp_dd = nngp_dd.to(dev, _F64)
                        if nngp_dd.shape != (n, n):
                            raise ValueError(f"`k_train_train.nngp` must be ({n}, {n}), got "
                                             f"{tuple(nngp_dd.shape)}")
                        term_1 = f.pinv_solve(k_td.T)                   # (n, m)
                        cross = k_td @ f.pinv_solve(k_td_init.T)        # (m, m)
                        cov = term_1.T @ nngp_dd @ term_1 - (cross + cross.T) + k_tt
                    cov = 0.5 * (cov + cov.T)
            mean = _finite(mean.to(dt), f"{g} posterior means")
            out[g] = mean if cov is None else Gaussian(mean, _finite(cov.to(dt),
                                                                     f"{g} covariances"))
        return _pack(out, keys, single)

    return predict_fn


def _as_kernel_fn(kernel_fn: Any, kwargs: Dict[str, Any]) -> Callable:
    """:func:`ntkit._typing.as_kernel_fn` (the one kernel-source normalisation), forwarding
    ``kernel_fn_kwargs``. Its own parameters are called ``source`` and ``name``, so kwargs with
    those names are bound here first instead of colliding with them."""
    clash = {k: kwargs[k] for k in ("source", "name") if k in kwargs}
    if clash:
        src = kernel_fn
        if callable(getattr(src, "kernel", None)):
            meth = src.kernel

            class _Bound:
                def kernel(self, x1, x2=None, get=None, **kw):
                    return meth(x1, x2, get=get, **clash, **kw)
            kernel_fn = _Bound()
        elif callable(src):
            def kernel_fn(x1, x2, get, **kw):
                return src(x1, x2, get, **clash, **kw)
        kwargs = {k: v for k, v in kwargs.items() if k not in clash}
    return as_kernel_fn(kernel_fn, "kernel_fn", **kwargs)


def gradient_descent_mse_ensemble(kernel_fn: Any, x_train: Any, y_train: Any,
                                  learning_rate: float = 1.0, diag_reg: float = 0.0,
                                  diag_reg_absolute_scale: bool = False,
                                  **kernel_fn_kwargs: Any) -> PredictFn:
    """Mean and covariance of the infinite ensemble of infinitely wide networks trained on MSE.

    Over random initializations ``f_0 ~ GP(0, K)`` (K = NNGP) and gradient flow with the NTK
    ``Th`` (``get='ntk'``; training only the readout gives ``Th = K``: ``get='nngp'``), the
    outputs at time ``t`` are Gaussian (Lee et al. 2019, eqs. 15-16)::

        mean_t(x) = Th_x,d Th^-1 (I - e^{-Th t/N}) y
        cov_t(x, x') = K_xx' + Q_x K Q_x'^T - (Q_x K_d,x' + transpose),
        where Q_x = Th_x,d Th^-1 (I - e^{-Th t/N})

    with neural-tangents' conventions (``N = y_train.numel()``, ``t`` in units of
    ``learning_rate``, ridge ``diag_reg`` relative to the mean diagonal of the train kernel).

    Args:
      kernel_fn: an architecture (``arch.kernel(x1, x2, get=...)`` is used) or a callable
        ``kernel_fn(x1, x2, get)`` returning an object/dict with ``nngp``/``ntk``.
      x_train: training inputs; y_train: ``(n, k)`` targets.
      learning_rate, diag_reg, diag_reg_absolute_scale: as in :func:`gradient_descent_mse`.
      **kernel_fn_kwargs: passed to every kernel call.

    Returns:
      ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``, neural-tangents' order:
      ``t`` scalar or array (``None``: ``t = inf``); ``x_test=None`` predicts on the training
      inputs; ``get`` ``'ntk'``, ``'nngp'`` or a tuple (``None``: both, as a namedtuple). Returns
      the mean ``t.shape + (m, k)`` or ``Gaussian(mean, covariance t.shape + (m, m))``. A call in
      ntkit's old ``(x_test, t)`` order (inputs passed as ``t``, or times as ``x_test``) raises
      ``TypeError`` saying how to call it. The train kernels, their factorizations and the
      NNGP in the NTK's eigenbasis are cached.

    Cost: one eigendecomposition of the train kernel per ``get``, shared by every ``t`` and by
    mean and covariance; the ``T`` times go through single large products (``T m n^2`` flops for
    the NTK covariance). At ``t = inf`` with a test set, when every eigenvalue is provably above
    the numerical-null cutoff (so ``K^+ = K^-1``), Cholesky solves give the same numbers
    without any eigendecomposition; otherwise the eigendecomposition decides (null modes).

    Example::

        >>> ens = gradient_descent_mse_ensemble(arch, x_train, y_train, diag_reg=1e-4)
        >>> mean, cov = ens(t=torch.logspace(0, 3, 10), x_test=x_test, get='ntk', compute_cov=True)
    """
    kfn = _as_kernel_fn(kernel_fn, kernel_fn_kwargs)
    lr = _positive(learning_rate, "learning_rate")
    diag_reg = _positive(diag_reg, "diag_reg", allow_zero=True)
    k_dd: Dict[str, torch.Tensor] = {}
    state: Dict[str, Any] = {"y": None}

    def train_kernels(keys: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
        missing = tuple(g for g in keys if g not in k_dd)
        if missing:
            k_dd.update(kfn(x_train, None, missing))
        return {g: k_dd[g] for g in keys}

    def targets(n: int) -> torch.Tensor:
        if state["y"] is None:
            state["y"] = _targets(y_train, n)
        return state["y"]

    def fac(g: str):
        return factorize(train_kernels((g,))[g], diag_reg, diag_reg_absolute_scale,
                         f"kernel_fn(x_train).{g}")

    basis_cache: Dict[Any, Any] = {}

    def _predict(t: Any = None, x_test: Any = None, get: Union[str, Sequence[str], None] = None,
                 compute_cov: bool = False):
        _check_ensemble_order(t, x_test, x_train)
        keys, single = _parse_get(get, _GETS)
        need = set(keys) | ({"nngp"} if compute_cov else set())
        kdd = train_kernels(tuple(g for g in _GETS if g in need))
        n = next(iter(kdd.values())).shape[0]
        for g, v in kdd.items():
            if v.ndim != 2 or tuple(v.shape) != (n, n):
                raise ValueError(f"`kernel_fn(x_train).{g}` must be ({n}, {n}) (one train-train "
                                 f"kernel per get), got {tuple(v.shape)}")
        y = targets(n)
        dt = _result_dtype(next(iter(kdd.values())), y)
        times, t_shape = _times(t)                       # t = None: [inf], same eigen path
        k_td = nngp_tt = None
        m = None
        if x_test is not None:
            k_td = kfn(x_test, x_train, tuple(g for g in _GETS if g in need))
            for g, v in k_td.items():
                _test_kernel(v, n, f"kernel_fn(x_test, x_train).{g}")
                if m is not None and v.shape[0] != m:
                    raise ValueError("`kernel_fn(x_test, x_train)` returned kernels with "
                                     "different numbers of test rows")
                m = v.shape[0]
            if compute_cov:
                nngp_tt = _as_array(kfn(x_test, None, ("nngp",))["nngp"], "kernel_fn(x_test).nngp")
                if tuple(nngp_tt.shape) != (m, m):
                    raise ValueError(f"`kernel_fn(x_test).nngp` must be ({m}, {m}), got "
                                     f"{tuple(nngp_tt.shape)}")
        all_inf = bool(torch.isinf(times).all())
        size = float(y.numel())

        out: Dict[str, Any] = {}
        for g in keys:
            f = fac(g)
            dev = f.matrix.device
            y_d = y.to(device=dev, dtype=_F64)
            f64 = lambda z, dev=dev: z.to(device=dev, dtype=_F64)  # noqa: E731
            K_tt = None if nngp_tt is None else f64(nngp_tt)
            res = None
            if k_td is not None and all_inf:
                # t = inf with all modes provably live (K^+ = K^-1): the same numbers as the
                # eigen path below, by Cholesky solves (no eigendecomposition)
                res = _ensemble_inf_direct(f, g, y_d, {h: f64(v) for h, v in k_td.items()},
                                           kdd, K_tt, compute_cov, times.numel())
            if res is None:
                res = _ensemble_eigen(f, g, y, k_td, kdd, nngp_tt, compute_cov, times * lr,
                                      times, size, basis_cache)
            mean, cov = res
            mean = _finite(mean.reshape(t_shape + mean.shape[1:]).to(dt), f"{g} means")
            if not compute_cov:
                out[g] = mean
                continue
            cov = 0.5 * (cov + cov.transpose(-1, -2))
            cov = _finite(cov.reshape(t_shape + cov.shape[1:]).to(dt), f"{g} covariances")
            out[g] = Gaussian(mean, cov)
        return _pack(out, keys, single)

    sig = inspect.signature(_predict)

    def predict_fn(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:          # e.g. predict_fn(x_test, t=...): the old order
            raise TypeError(f"{e}: {_ORDER_HINT}") from None
        return _predict(*bound.args, **bound.kwargs)

    predict_fn.__signature__ = sig      # type: ignore[attr-defined]
    predict_fn.__doc__ = ("predict_fn(t=None, x_test=None, get=None, compute_cov=False): see "
                          "gradient_descent_mse_ensemble.")
    return predict_fn


_ORDER_HINT = ("the ensemble's predict_fn takes (t=None, x_test=None, get=None, "
               "compute_cov=False) in that order, as neural-tangents; ntkit's old order was "
               "(x_test, t). Call it with keywords, e.g. predict_fn(t=..., x_test=x_test, "
               "get='ntk', compute_cov=True)")


def _check_ensemble_order(t: Any, x_test: Any, x_train: Any) -> None:
    """Refuse calls written for the old ``predict_fn(x_test, t, ...)`` order (clear TypeError)."""
    how = _ORDER_HINT
    tr_shape = tuple(getattr(x_train, "shape", ()))
    if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim >= 2 and len(tr_shape) >= 2 and \
            tuple(t.shape[1:]) == tr_shape[1:]:
        raise TypeError(f"`t` received an array of inputs of shape {tuple(t.shape)} (x_train is "
                        f"{tr_shape}); {how}")
    if x_test is None or len(tr_shape) < 2:
        return
    if isinstance(x_test, (bool, int, float, np.number)) or (
            isinstance(x_test, (torch.Tensor, np.ndarray)) and x_test.ndim < 2):
        shape = "" if not hasattr(x_test, "shape") else f" of shape {tuple(x_test.shape)}"
        raise TypeError(f"`x_test` received times ({type(x_test).__name__}{shape}), not inputs "
                        f"like x_train {tr_shape}; {how}")


_CERT_CACHE: "weakref.WeakKeyDictionary" = None  # type: ignore[assignment]


def _certified_cholesky(f) -> Optional[torch.Tensor]:
    """The Cholesky factor ``L`` of the regularized kernel, only when **every** eigenvalue is
    provably above the numerical-null cutoff of :meth:`ntkit._linalg.Factorization.spectrum`
    (then ``K^+ = K^-1`` and the eigen path keeps all modes: Cholesky solves give its numbers,
    to rounding); ``None`` otherwise (the eigendecomposition decides, as before).

    Certificate: ``K - c I`` with ``c = 1.5 n eps(dtype) ||K||_inf`` (``||K||_inf >=
    lambda_max``, so ``c`` is above the cutoff ``n eps lambda_max``) has a Cholesky factor, i.e.
    is positive definite, so ``lambda_min(K) > c``; rounding in that float64 factorization is
    ``~n eps64 ||K||``, far below ``c``. Costs two Cholesky factorizations (``n^3 / 3`` flops
    each), a fraction of one ``eigh``. Cached per factorization."""
    global _CERT_CACHE
    import weakref
    if _CERT_CACHE is None:
        _CERT_CACHE = weakref.WeakKeyDictionary()
    try:
        hit = _CERT_CACHE.get(f)
    except TypeError:  # pragma: no cover - not weak-referenceable
        hit = None
    if hit is not None:
        return hit[0]
    L = None
    if f.n and not f.has_eigh:            # an eigendecomposition already made is simply reused
        L = f.cholesky()
    if L is not None:
        c = 1.5 * f.n * null_eps(f.input_dtype) * float(f.matrix.abs().sum(1).max())
        shifted = f.matrix - c * torch.eye(f.n, dtype=f.matrix.dtype, device=f.matrix.device)
        Ls, info = torch.linalg.cholesky_ex(shifted)
        if int(info) != 0 or not _all_finite(Ls):
            L = None
    try:
        _CERT_CACHE[f] = (L,)
    except TypeError:  # pragma: no cover
        pass
    return L


def _ensemble_inf_direct(f, g: str, y_d: torch.Tensor, k_td: Dict[str, torch.Tensor],
                         kdd: Dict[str, torch.Tensor], K_tt: Optional[torch.Tensor],
                         compute_cov: bool, T: int):
    """Mean and covariance at ``t = inf`` by Cholesky solves, or ``None`` (not certified).

    mean ``= k_td K^-1 y``; cov ('nngp') ``= K_tt - k_td K^-1 k_dt``; cov ('ntk')
    ``= K_tt + Q K Q^T - (Q K_dt + transpose)``, ``Q = Th_td Th^-1`` (the eigen path's
    ``t = inf`` formulas with every mode live). Shapes ``(T, m, k)``, ``(T, m, m)``."""
    L = _certified_cholesky(f)
    if L is None:
        return None
    ktd = k_td[g]
    mean = ktd @ torch.cholesky_solve(y_d, L)
    cov = None
    if compute_cov:
        assert K_tt is not None  # the caller computes it with the covariance
        if g == "nngp":
            Z = torch.linalg.solve_triangular(L, ktd.T, upper=False)     # (n, m)
            cov = K_tt - Z.T @ Z
        else:
            Qt = torch.cholesky_solve(ktd.T.contiguous(), L)                 # Th^-1 Th_dt
            K = _as_array(kdd["nngp"], "nngp").to(device=L.device, dtype=_F64)
            QKd = Qt.T @ k_td["nngp"].T                                      # (m, m)
            cov = (Qt.T @ (K @ Qt)) - QKd - QKd.T + K_tt
        cov = cov.expand((T,) + cov.shape)
    return mean.expand((T,) + mean.shape), cov


def _ensemble_eigen(f, g: str, y: torch.Tensor, k_td: Optional[Dict[str, torch.Tensor]],
                    kdd: Dict[str, torch.Tensor], nngp_tt: Optional[torch.Tensor],
                    compute_cov: bool, abs_times: torch.Tensor, times: torch.Tensor,
                    size: float, basis_cache: Dict[Any, Any]):
    """Mean ``(T, m, k)`` and covariance ``(T, m, m)`` (or ``None``) from one eigendecomposition
    of the regularized kernel shared by every ``t`` and by mean and covariance; the ``T`` times
    go through single large matrix products.

    Works in the dtype of :meth:`ntkit._linalg.Factorization.working_spectrum`: float64, or
    float32 for a float32 kernel that passed its conditioning check (then every product here
    is float32; only the per-mode factors and the NNGP's Cholesky solve are float64)."""
    evals, V, live = f.working_spectrum()
    wd, dev = V.dtype, V.device
    cv = lambda z: z.to(device=dev, dtype=wd)  # noqa: E731
    em1, quot, ex = (z.to(wd) for z in _mode_factors(evals, live, abs_times, size))   # (T, n)
    y_d = cv(y)
    p = -(V.T @ y_d)                                      # residual modes, f_0 = 0 mean
    if k_td is None:
        mean = _train_outputs(V, em1, ex, p, torch.zeros_like(y_d), y_d, times)
        if not compute_cov:
            return mean, None
        if g == "nngp":
            w = evals.to(wd)[None, :] * ex * ex                                 # lam e^{-2 lam t}
            cov = torch.matmul(V * w[:, None, :], V.T)
        else:
            B = _basis_nngp(basis_cache, g, V, kdd["nngp"])
            cov = torch.matmul(V, torch.matmul(ex[:, :, None] * B * ex[:, None, :], V.T))
        return mean, cov
    ktd = cv(k_td[g])
    if not compute_cov:
        # k_td (V (quot * p)): two thin products instead of forming k_td V (m x n x n)
        return torch.matmul(ktd, torch.matmul(V, quot[:, :, None] * p)), None
    A = ktd @ V                                                                  # (m, n)
    mean = torch.matmul(A, quot[:, :, None] * p)                                 # (T, m, k)
    T, m = quot.shape[0], A.shape[0]
    assert nngp_tt is not None  # computed with the covariance when there are test inputs
    K_tt = cv(nngp_tt)
    if g == "nngp":
        _, quot2, _ = _mode_factors(evals, live, 2 * abs_times, size)
        cov = K_tt - torch.matmul(A * (-quot2.to(wd))[:, None, :], A.T)
        return mean, cov
    P = A[None] * (-quot)[:, None, :]                                            # (T, m, n)
    fac = _basis_factor(basis_cache, V, kdd["nngp"], k_td["nngp"], nngp_tt)
    if fac is not None:
        # K = L L^T, R = V^T L, Z = L^-1 K_dt: cov_t = (K_tt - Z^T Z) + (P_t R - Z^T)(...)^T
        R, Zt, S = fac
        E = (P.reshape(T * m, -1) @ R).reshape(T, m, -1) - Zt                    # (T, m, n)
        cov = torch.matmul(E, E.transpose(1, 2)) + S
        return mean, cov
    B = _basis_nngp(basis_cache, g, V, kdd["nngp"])                              # V^T K V
    C = V.T @ cv(k_td["nngp"]).T                                                 # (n, m)
    PC = torch.matmul(P, C)                                                      # (T, m, m)
    cov = torch.matmul((P.reshape(T * m, -1) @ B).reshape(T, m, -1), P.transpose(1, 2))
    return mean, cov - PC - PC.transpose(1, 2) + K_tt


def _basis_factor(cache: Dict[Any, Any], V: torch.Tensor, nngp_dd: Any, nngp_td: torch.Tensor,
                  nngp_tt: torch.Tensor):
    """``(R, Z^T, K_tt - Z^T Z)`` in ``V``'s dtype with ``K = L L^T`` (train NNGP),
    ``R = V^T L`` and ``Z = L^-1 K_dt``, or ``None`` when the NNGP's Cholesky is
    ill-conditioned (pivot ratio below 1e-8, i.e. cond(L) > 1e4, where ``L^-1`` would amplify
    rounding): then the ``V^T K V`` form is used. Half the flops of ``V^T K V`` per
    eigenbasis, and the per-time covariance becomes one product ``E_t E_t^T`` instead of three.

    ``L``, ``Z`` and ``K_tt - Z^T Z`` (the steps that amplify rounding by ``cond(L)``, and a
    cancellation) are always computed in float64, ``R = V^T L`` (a product with an orthogonal
    matrix, ``trmm``) in ``V``'s dtype."""
    key = ("factor", id(nngp_dd))
    hit = cache.get(key)
    dev, wd = V.device, V.dtype
    if hit is None or hit[0] is not V or hit[1] is not nngp_dd:
        K = _as_array(nngp_dd, "nngp").to(device=dev, dtype=_F64)
        L, info = torch.linalg.cholesky_ex(0.5 * (K + K.T))
        val = None
        if int(info) == 0 and _all_finite(L) and K.shape[0]:
            d = torch.diagonal(L)
            if float(d.min()) > 0 and float(d.min() / d.max()) ** 2 > 1e-8:
                val = (L, matmul_lower(V.T, L.to(wd)))
        hit = (V, nngp_dd, val)
        cache[key] = hit
    if hit[2] is None:
        return None
    L, R = hit[2]
    Z = torch.linalg.solve_triangular(L, nngp_td.to(device=dev, dtype=_F64).T, upper=False)
    S = nngp_tt.to(device=dev, dtype=_F64) - Z.T @ Z
    return R, Z.T.to(wd), S.to(wd)


def _basis_nngp(cache: Dict[Any, Any], g: str, V: torch.Tensor, nngp_dd: torch.Tensor
                ) -> torch.Tensor:
    """``V^T K_nngp V`` in ``V``'s dtype (cached per eigenbasis): the prior covariance in the
    NTK's eigenbasis."""
    if cache.get(g, (None,))[0] is not V:
        K = _as_array(nngp_dd, "nngp").to(device=V.device, dtype=V.dtype)
        B = V.T @ K @ V
        cache[g] = (V, 0.5 * (B + B.T))
    return cache[g][1]


# =========================================================================================
# 3. other losses: ODE integration in function space
# =========================================================================================

def _mse_loss(fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((fx - y) ** 2).mean()


def _cross_entropy_loss(fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(torch.log_softmax(fx, dim=-1) * y).mean()


_LOSSES = {"mse": _mse_loss, "cross_entropy": _cross_entropy_loss}

# Dormand-Prince 5(4) tableau
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


class _StepLimitError(ValueError, RuntimeError):
    """The ODE cannot be integrated within ``max_steps`` (a ``ValueError`` and, as before, a
    ``RuntimeError``)."""


def _odeint(fun: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor,
            t_out: torch.Tensor, rtol: float, atol: float, max_steps: int,
            stiffness: str = "") -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) for an autonomous ODE ``y' = fun(y)``; returns ``y(t_out)``.

    ``t_out`` must be sorted non-decreasing and >= 0; the integrator hits each output time
    exactly (steps are clipped), error control is the usual mixed ``atol + rtol |y|`` RMS norm.

    Fails fast: at step counts 64, 128, 256, ... the number of steps still needed is projected
    from the current step size (``(t_last - t) / h``); when it exceeds what is left of
    ``max_steps`` the integration stops at once (an explicit method on a stiff problem keeps
    ``h`` at its stability limit ``~3.3 / |lambda|_max`` of the Jacobian, so the projection is
    reliable there) instead of running to ``max_steps``. ``stiffness`` is appended to messages.
    """
    y = y0.clone()
    t = 0.0
    k1 = fun(y)
    out = []
    scale0 = atol + rtol * y.abs()
    d0 = float(torch.sqrt(((y / scale0) ** 2).mean()))
    d1 = float(torch.sqrt(((k1 / scale0) ** 2).mean()))
    h = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    steps = 0
    next_check = 64
    h_prop = h
    t_last = float(t_out[-1]) if t_out.numel() else 0.0
    for t_end in t_out.tolist():
        while t < t_end:
            if steps >= max_steps:
                raise _StepLimitError(
                    f"ODE integration needed more than max_steps={max_steps} steps to reach "
                    f"t={t_end:g}; raise `max_steps`, loosen `rtol`, or ask for a smaller `t`"
                    f"{stiffness}")
            if steps >= next_check:
                next_check *= 2
                need = (t_last - t) / max(h, h_prop, 1e-300)   # h_prop: before clipping
                if steps + need > max_steps:
                    raise _StepLimitError(
                        f"ODE integration would need about {steps + need:.3g} steps (step size "
                        f"now {h:.3g} in absolute time, {t_last - t:.3g} to go) to reach "
                        f"t={t_last:g}, more than max_steps={max_steps}; stopped early after "
                        f"{steps} steps. Ask for a smaller `t`, raise `max_steps`, or loosen "
                        f"`rtol`/`atol`{stiffness}")
            h_prop = h
            h = min(h, t_end - t)
            ks = [k1]
            for i in range(1, 7):
                yi = y + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
                ks.append(fun(yi))
            y_new = y + h * sum(b * k for b, k in zip(_DP_B, ks) if b != 0.0)
            err = h * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
            scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            en = float(torch.sqrt(((err / scale) ** 2).mean())) if err.numel() else 0.0
            steps += 1
            if en <= 1.0:
                t = t + h if (t_end - t) > h else t_end
                y = y_new
                k1 = ks[6]                          # FSAL
                fac = 5.0 if en == 0 else min(5.0, max(0.2, 0.9 * en ** -0.2))
            else:
                fac = max(0.2, 0.9 * en ** -0.2)
            h = h * fac
            if y.numel() and not math.isfinite(float(y.abs().max())):
                raise FloatingPointError("ODE solution became non-finite; the dynamics diverge "
                                         "(check the learning rate / loss)")
            if not math.isfinite(h) or h <= 0:
                raise _StepLimitError("ODE step size underflowed (the right-hand side is "
                                      "non-finite or the problem is too stiff)" + stiffness)
        out.append(y.clone())
    return torch.stack(out) if out else y0.new_empty((0,) + y0.shape)


def gradient_descent(loss: Union[str, Callable], k_train_train: Any, y_train: Any,
                     learning_rate: float = 1.0, momentum: Optional[float] = None,
                     rtol: float = 1e-9, atol: float = 1e-12, max_steps: int = 200_000
                     ) -> ODEPredictFn:
    """Function-space gradient descent on any loss, by adaptive ODE integration (Dormand-Prince).

    Integrates ``df/dt = -Theta grad_f loss(f, y)`` on train (and, through ``k_test_train``, on
    test) outputs; with ``momentum`` the continuous heavy-ball ODE of neural-tangents is used
    (``f' = q``, ``q' = -Theta grad_f loss + (momentum - 1)/sqrt(lr) q``, time in units of
    ``sqrt(learning_rate)``); without it ``absolute_time = learning_rate * t``.

    Args:
      loss: ``'mse'`` (``1/2 mean (f-y)^2``), ``'cross_entropy'`` (``-mean(log_softmax(f) * y)``,
        neural-tangents' example; ``y`` one-hot) or a callable ``loss(fx, y) -> scalar`` written
        in torch (differentiated with autograd).
      k_train_train: ``(n, n)`` NTK; y_train: ``(n, k)``.
      learning_rate, momentum: as above. rtol, atol, max_steps: integrator controls.

    Returns:
      ``predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None)`` with finite ``t``
      (scalar or array, any order) returning outputs like :func:`gradient_descent_mse`.

    Example::

        >>> pf = gradient_descent('cross_entropy', ntk_dd, y_onehot)
        >>> f_tr, f_te = pf(torch.tensor([1., 10.]), 0., 0., ntk_td)
    """
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"`loss` must be one of {tuple(_LOSSES)} or a callable loss(fx, y), "
                             f"got {loss!r}")
        loss_fn = _LOSSES[loss]
    elif callable(loss):
        loss_fn = loss
    else:
        raise TypeError(f"`loss` must be a string or a callable loss(fx, y), got "
                        f"{type(loss).__name__}")
    fac = factorize(k_train_train, 0.0, False, "k_train_train")
    fac.eigh()                                  # symmetric PSD check (clear error, not garbage)
    K = fac.matrix
    n = K.shape[0]
    y = _targets(y_train, n)
    y64 = y.to(device=K.device, dtype=_F64)
    lr = _positive(learning_rate, "learning_rate")
    rtol = _positive(rtol, "rtol")
    atol = _positive(atol, "atol")
    max_steps = _check_int(max_steps, "max_steps")
    lam_max = float(fac.eigh()[0][-1]) if n else 0.0
    if momentum is not None:
        mom = _check_momentum(momentum)
        time_unit, friction = math.sqrt(lr), (mom - 1.0) / math.sqrt(lr)
    else:
        time_unit, friction = lr, None
    out_dtype = _result_dtype(k_train_train if isinstance(k_train_train, torch.Tensor) else None,
                              y)

    def grad_loss(fx: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            fx = fx.detach().requires_grad_(True)
            val = loss_fn(fx, y64)
            if not isinstance(val, torch.Tensor) or val.numel() != 1:
                raise TypeError("`loss(fx, y)` must return a scalar torch tensor")
            (g,) = torch.autograd.grad(val, fx)
        return g.detach()

    def predict_fn(t: Any, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: Any = None):
        _check_call(fx_train_0, fx_test_0, k_test_train)
        times, t_shape = _times(t)
        if torch.isinf(times).any():
            raise ValueError("`t` must be finite for ODE-based predictions (cross-entropy never "
                             "converges); for MSE at t = inf use gradient_descent_mse")
        want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
        f0 = (torch.zeros_like(y64) if fx_train_0 is None
              else _broadcast(fx_train_0, tuple(y.shape), "fx_train_0", K.device))
        k = y.shape[1]
        m = 0
        k_td = None
        if want_test:
            k_td = _test_kernel(k_test_train, n).to(device=K.device, dtype=_F64)
            m = k_td.shape[0]
            g0 = _broadcast(fx_test_0, (m, k), "fx_test_0", K.device)
            state0 = torch.cat([f0, g0])
        else:
            state0 = f0.clone()
        Kall = torch.cat([K, k_td]) if k_td is not None else K     # (n + m, n); k_td: want_test
        if friction is not None:
            state0 = torch.cat([state0, torch.zeros_like(state0)])
        nf = n + m

        def rhs(s: torch.Tensor) -> torch.Tensor:
            f = s[:nf]
            df = -(Kall @ grad_loss(f[:n]))
            if friction is None:
                return df
            q = s[nf:]
            return torch.cat([q, df + friction * q])

        order = torch.argsort(times)
        tau = y.numel() / (lr * lam_max) if lam_max > 0 else math.inf
        hint = (f". The kernel's fastest mode relaxes in about N / (learning_rate * "
                f"lambda_max) = {tau:.3g} (in units of t; N = y_train.numel(), exact for "
                f"'mse') while t reaches {float(times.max()):.3g}: an explicit integrator must "
                f"resolve that timescale all the way (a stiff problem)"
                + ("; for 'mse' use gradient_descent_mse, which is exact at any t"
                   if loss == "mse" else "")) if math.isfinite(tau) else ""
        sol = _odeint(rhs, state0, times[order] * time_unit, rtol, atol, max_steps, hint)
        res = torch.empty_like(sol)
        res[order] = sol
        res = _finite(res[:, :nf].reshape(t_shape + (nf, k)).to(out_dtype), "outputs")
        fx_train = res[..., :n, :] if want_train else None
        fx_test = res[..., n:, :] if want_test else None
        return _return(fx_train, fx_test, want_train, want_test)

    return predict_fn


# =========================================================================================
# 4. eigenmodes
# =========================================================================================

class Eigenmodes(NamedTuple):
    """Eigen-decomposition of the training dynamics (modes sorted by decreasing eigenvalue).

    Attributes:
      eigenvalues: ``(n,)`` eigenvalues of the (regularized) kernel, descending, >= 0; those at
        or below the numerical-null threshold ``n * eps * lambda_max`` are exactly 0 (these
        modes never move, as in every prediction of this module).
      eigenvectors: ``(n, n)``, column ``i`` is mode ``i``.
      projections: ``(n, k)`` initial residual ``V^T (f_0 - y)`` per mode and output.
      size: ``N = y_train.numel()``; learning_rate: time unit.

    Mode ``i``'s residual decays as ``exp(-lambda_i * learning_rate * t / N)``: large-eigenvalue
    modes are learned first; ``timescales`` gives each mode's e-folding time (in units of ``t``).
    """
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    projections: torch.Tensor
    size: int
    learning_rate: float

    @property
    def timescales(self) -> torch.Tensor:
        """``N / (learning_rate * lambda_i)`` (``inf`` for null modes)."""
        lam = self.eigenvalues
        return torch.where(lam > 0, self.size / (self.learning_rate * lam.clamp_min(1e-300)),
                           torch.full_like(lam, math.inf))

    def decay(self, t: Any) -> torch.Tensor:
        """``exp(-lambda_i lr t / N)``, shape ``t.shape + (n,)``."""
        times, t_shape = _times(t)
        if times is None:
            times, t_shape = torch.tensor([math.inf], dtype=_F64, device="cpu"), ()
        lam = self.eigenvalues.to(_F64)
        tt = (times * self.learning_rate).to(lam.device)[:, None]
        x = torch.where(lam[None] > 0, lam[None] * tt / self.size, torch.zeros_like(tt * lam[None]))
        x = torch.nan_to_num(x, nan=0.0)
        return torch.exp(-x).reshape(t_shape + lam.shape)

    def residual(self, t: Any) -> torch.Tensor:
        """Residual ``f_t - y`` in mode coordinates, shape ``t.shape + (n, k)``."""
        return self.decay(t)[..., None] * self.projections.to(_F64)

    def loss(self, t: Any) -> torch.Tensor:
        """Each mode's share of the loss ``1/2 mean (f_t - y)^2``, shape ``t.shape + (n,)``."""
        return 0.5 * (self.residual(t) ** 2).sum(-1) / self.size


def eigenmodes(k_train_train: Any, y_train: Any, fx_train_0: Any = 0.0,
               learning_rate: float = 1.0, diag_reg: float = 0.0,
               diag_reg_absolute_scale: bool = False) -> Eigenmodes:
    """Eigenvalues, residual projections and per-mode decay of gradient flow on MSE.

    The data behind "large-eigenvalue modes learn first": with ``Theta = V diag(lambda) V^T`` the
    training residual is ``f_t - y = V diag(exp(-lambda lr t / N)) V^T (f_0 - y)``.

    Example::

        >>> modes = eigenmodes(ntk_dd, y_train)
        >>> modes.eigenvalues[:5], modes.loss(torch.tensor([1., 10.])).shape   # (2, n)
    """
    fac = factorize(k_train_train, diag_reg, diag_reg_absolute_scale, "k_train_train")
    y = _targets(y_train, fac.n).to(device=fac.matrix.device, dtype=_F64)
    lr = _positive(learning_rate, "learning_rate")
    f0 = _broadcast(fx_train_0, tuple(y.shape), "fx_train_0", fac.matrix.device)
    evals, V, _ = fac.spectrum()                # numerically-null eigenvalues are exactly 0
    evals, V = evals.flip(0), V.flip(1)
    return Eigenmodes(evals, V, V.T @ (f0 - y), int(y.numel()), lr)
