"""Training, measured: the one training loop of ntkit (:func:`train`) and how far the weights
and the empirical NTK move.

Every network ntkit trains -- the sweeps, the demo, the figures -- goes through :func:`train`:
SGD (full batch or minibatches) on ``loss_scale * 1/2 mean (f - y)^2`` with a divergence guard,
recording the loss, the relative weight change and, optionally, the gap to the linearized
network, the outputs, a parameter's snapshots, or anything a ``callback`` measures.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union, overload

import torch
from torch import nn

from .._validation import check_positive
from ._common import (_F64, _as_x, _as_y, _check_int, _check_model, _f64_copy, _full_ntk,
                      _param_dict, _trainable)
from ..empirical import linearize

__all__ = ["relative_weight_change", "kernel_drift", "TrainingRecord", "train", "auto_lr"]


_Params = Union[nn.Module, Dict[str, torch.Tensor]]


@overload
def relative_weight_change(params_t: _Params, params_0: _Params,
                           by: Literal["total"] = "total") -> float: ...
@overload
def relative_weight_change(params_t: _Params, params_0: _Params,
                           by: Literal["parameter", "layer"]) -> Dict[str, float]: ...
@overload
def relative_weight_change(params_t: _Params, params_0: _Params,
                           by: str) -> Union[float, Dict[str, float]]: ...


def relative_weight_change(params_t: _Params, params_0: _Params,
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
        step size used; outputs: ``(R, *out)`` float64 ``model(x_eval)`` per record (with
        ``record_outputs=True``); snapshots: ``{step: tensor}`` copies of the ``snapshot``
        parameter; measured: ``(R,)`` list of what ``measure(step, model)`` returned per record.
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
    measured: List[Any] = field(default_factory=list)


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


def auto_lr(model: nn.Module, x: Any, loss_scale: float = 1.0, fraction: float = 1.0) -> float:
    """``fraction`` times the largest stable full-batch gradient-descent learning rate of
    ``model`` at its current weights, ``2 N / (loss_scale * lambda_max(Theta))``: ``Theta`` is
    the ``(N, N)`` empirical NTK on ``x`` (``N`` = examples x outputs), the loss
    :func:`train`'s ``loss_scale * 1/2 mean (f - y)^2``. ``train(learning_rate='auto')`` uses
    ``lr_fraction`` times it. Computed in float64 on a copy (``model`` is not changed).

    Raises ``TypeError``/``ValueError`` naming the argument. Example:
    ``lr = auto_lr(net, x, fraction=0.5)`` (half the stable limit).
    """
    model = _check_model(model)
    x = _as_x(x)
    return _auto_lr(model, x, check_positive(loss_scale, "loss_scale"),
                    check_positive(fraction, "fraction"))


def _auto_lr(model: nn.Module, x: torch.Tensor, loss_scale: float, fraction: float) -> float:
    """:func:`auto_lr` without the checks (its callers here checked the arguments)."""
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
          snapshot: Optional[str] = None, seed: int = 0,
          record_steps: Optional[Sequence[int]] = None,
          measure: Optional[Callable[[int, nn.Module], Any]] = None) -> TrainingRecord:
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
      record_steps: record at exactly these steps (integers in ``1..steps``; step 0 and the
        last step are always recorded) instead of every ``record_every`` steps.
      measure: ``measure(step, model)`` is called at every record (after the step's update) and
        its values are kept in ``.measured``: anything else to follow during training, e.g. the
        empirical NTK. It must not change the model.

    Every network ntkit trains goes through this function (the sweeps, the demo, the figures'
    experiments): one loop, one divergence guard.

    Example::

        >>> rec = train(net, x, y, steps=300, learning_rate=1.0)
        >>> rec.loss[-1], rec.rel_weight_change[-1], rec.kernel_drift
        >>> rec = train(net, x, y, steps=100, record_steps=(10, 30),
        ...             measure=lambda s, m: empirical_ntk(m, x))   # rec.measured: 4 kernels
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
    at = None
    if record_steps is not None:
        if record_every is not None:
            raise ValueError("give `record_every` or `record_steps`, not both")
        at = {_check_int(s, "record_steps") for s in record_steps}
        if at and max(at) > steps:
            raise ValueError(f"`record_steps` must lie in 1..steps={steps}, got {max(at)}")
    if measure is not None and not callable(measure):
        raise TypeError(f"`measure` must be a function (step, model) -> value, got "
                        f"{type(measure).__name__}")
    if snapshot is not None and snapshot not in dict(model.named_parameters()):
        raise ValueError(f"`snapshot` {snapshot!r} is not a parameter name; names: "
                         f"{[nm for nm, _ in model.named_parameters()][:10]}")
    theta0 = _param_dict(model)
    model0 = copy.deepcopy(model) if measure_kernel_drift else None
    lin = None
    if linearization:
        lin = linearize(model)
    opt = torch.optim.SGD([p for _, p in _trainable(model)], lr=lr)
    opt_lin = torch.optim.SGD([p for p in lin.parameters() if p.requires_grad], lr=lr) \
        if lin is not None else None
    gen = torch.Generator().manual_seed(int(seed))
    rec_steps, losses, rel, gaps, outs, measured = [], [], [], [], [], []
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
        if measure is not None:
            measured.append(measure(s, model))

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
        if lin is not None and opt_lin is not None:
            opt_lin.zero_grad(set_to_none=True)
            loss_lin = loss_scale * 0.5 * ((lin(xb) - yb) ** 2).mean()
            lv = float(loss_lin.detach())
            if not (math.isfinite(lv) and lv <= burst * ref):
                raise diverged(s, lv, "linearized network's")
            loss_lin.backward()
            opt_lin.step()
        if (s in at if at is not None else s % every == 0) or s == steps:
            record(s)
            if not (math.isfinite(losses[-1]) and losses[-1] <= _EXPLODE * ref):
                raise diverged(s, losses[-1], "network's")
    if steps and losses[-1] > _FINAL * ref:
        raise diverged(steps, losses[-1], "final")
    drift = kernel_drift(model, model0, xe) if model0 is not None else None
    return TrainingRecord(
        steps=torch.tensor(rec_steps), loss=torch.tensor(losses, dtype=_F64),
        rel_weight_change=torch.tensor(rel, dtype=_F64),
        lin_gap=torch.tensor(gaps, dtype=_F64) if lin is not None else None,
        rel_change_by_layer=relative_weight_change(_param_dict(model), theta0, by="layer"),
        kernel_drift=drift, learning_rate=lr,
        outputs=torch.stack(outs) if record_outputs else None, snapshots=snaps,
        measured=measured)

