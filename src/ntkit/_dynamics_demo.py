"""Real networks against the kernel prediction: the check behind ``ntkit demo``'s dynamics table.

Trains finite NTK-parameterized networks of increasing width with full-batch gradient descent on
``1/2 mean (f - y)^2`` and measures, at several step counts, the RMS distance between their
train/test outputs and what the infinite-width NTK predicts for that very network (same initial
outputs ``f_0``, same learning rate and number of steps:
:func:`ntkit.predict.gradient_descent_mse_discrete`, exact for linearized GD, so no
time-discretization error hides the width effect). Theory (Lee et al. 2019; Jacot et al. 2018):
the distance shrinks like ``width^(-1/2)``; the fitted log-log slope should be about ``-0.5``.

Example::

    >>> from ntkit import layers as nl
    >>> arch = nl.serial(nl.Dense(512, W_std=1.5, b_std=0.1), nl.Relu(), nl.Dense(1, W_std=1.5))
    >>> res = train_and_compare(arch, x_train, y_train, x_test, widths=(256, 1024, 4096))
    >>> res.slope, res.test_rms.shape          # about -0.5, (3 widths, n_steps)
    >>> print(res.to_text())
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import predict as _predict

__all__ = ["train_and_compare", "DynamicsComparison"]


@dataclass
class DynamicsComparison:
    """Distances between trained finite networks and the kernel prediction.

    Attributes:
      widths: ``(W,)`` hidden widths; steps: ``(S,)`` GD step counts; times: ``learning_rate *
        steps`` (neural-tangents' time units); learning_rate: the SGD step size used.
      train_rms, test_rms: ``(W, S)`` RMS over examples, outputs and seeds of
        ``f_network - f_predicted``.
      slopes_train, slopes_test: ``(S,)`` least-squares slopes of ``log rms`` vs ``log width``.
      slope: mean of all those slopes (expected about -0.5).
      slope_fit: the common slope of all those lines fitted together (an intercept per step
        count and train/test), with its 95% CI (a :class:`ntkit.diagnostics.Slope`).
      kernel_test_rmse: RMSE of kernel regression (t = inf, f_0 = 0) on ``y_test`` (if given).
      network_test_rmse: ``(W,)`` RMSE of the networks after the last step on ``y_test``.
      extra: ``test_outputs`` and ``test_predictions``, ``(W, n_seeds, m, k)``: each network's
        test outputs after the last step and the NTK prediction for that network.
    """
    widths: torch.Tensor
    steps: torch.Tensor
    times: torch.Tensor
    learning_rate: float
    train_rms: torch.Tensor
    test_rms: torch.Tensor
    slopes_train: torch.Tensor
    slopes_test: torch.Tensor
    slope: float
    kernel_test_rmse: Optional[float] = None
    network_test_rmse: Optional[torch.Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    slope_fit: Any = None

    def to_text(self) -> str:
        """A small table: one row per width, train/test distance at each step count."""
        head = "width  " + "  ".join(f"train@{int(s):<5d} test@{int(s):<5d}" for s in self.steps)
        lines = [f"full-batch GD, lr={self.learning_rate:.4g}, distance |f_net - f_NTK| (RMS)",
                 head]
        for i, w in enumerate(self.widths.tolist()):
            cells = "  ".join(f"{float(a):<11.3e} {float(b):<10.3e}"
                              for a, b in zip(self.train_rms[i], self.test_rms[i]))
            extra = ""
            if self.network_test_rmse is not None:
                extra = f"   net test RMSE {float(self.network_test_rmse[i]):.4f}"
            lines.append(f"{int(w):<6d} {cells}{extra}")
        ci = ""
        if self.slope_fit is not None and math.isfinite(self.slope_fit.low):
            ci = f", 95% CI [{self.slope_fit.low:.3f}, {self.slope_fit.high:.3f}]"
        lines.append(f"log-log slope vs width: {self.slope:.3f}{ci} (theory -0.5); per step train "
                     f"{[round(float(s), 3) for s in self.slopes_train]}, test "
                     f"{[round(float(s), 3) for s in self.slopes_test]}")
        if self.kernel_test_rmse is not None:
            lines.append(f"kernel regression (t=inf) test RMSE {self.kernel_test_rmse:.4f}")
        return "\n".join(lines)


def _common_slope(widths: torch.Tensor, series: List[torch.Tensor]):
    """One log-log slope for several series over the same widths, each with its own intercept
    (least squares), with a 95% Student-t CI on ``n_points - n_series - 1`` degrees of
    freedom; returns a :class:`ntkit.diagnostics.Slope` (intercept: that of the first series)."""
    from .diagnostics import Slope, _t_quantile
    x = torch.log(widths.to(torch.float64))
    xc = x - x.mean()
    sxx = float((xc * xc).sum()) * len(series)
    ys = [torch.log(v.to(torch.float64).clamp_min(1e-300)) for v in series]
    b = sum(float((xc * (y - y.mean())).sum()) for y in ys) / sxx
    rss = sum(float(((y - y.mean() - b * xc) ** 2).sum()) for y in ys)
    n = x.numel() * len(ys)
    dof = n - len(ys) - 1
    if dof >= 1:
        se = math.sqrt(rss / dof / sxx)
        q = _t_quantile(0.975, dof)
        lo, hi = b - q * se, b + q * se
    else:
        se, lo, hi = math.nan, math.nan, math.nan
    return Slope(b, se, lo, hi, float(ys[0].mean()) - b * float(x.mean()), int(n))


def _slope(widths: torch.Tensor, values: torch.Tensor) -> float:
    x = torch.log(widths.to(torch.float64))
    v = torch.log(values.to(torch.float64).clamp_min(1e-300))
    xc = x - x.mean()
    return float((xc * (v - v.mean())).sum() / (xc * xc).sum())


def train_and_compare(arch: Any, x_train: Any, y_train: Any, x_test: Any,
                      widths: Sequence[int] = (256, 512, 1024, 2048, 4096, 8192),
                      steps: Sequence[int] = (10, 30, 100),
                      learning_rate: Optional[float] = None, lr_fraction: float = 0.5,
                      seeds: Sequence[int] = (0, 1, 2), y_test: Any = None,
                      dtype: torch.dtype = torch.float64, progress: bool = False
                      ) -> DynamicsComparison:
    """Train real networks at several widths and measure their distance to the NTK prediction.

    Args:
      arch: architecture with ``arch.kernel(x1, x2, get='ntk')`` and
        ``arch.module(in_shape=..., width=w, seed=s)`` (NTK parameterization).
      x_train: ``(n, ...)`` inputs; y_train: ``(n, k)`` targets; x_test: ``(m, ...)`` inputs.
      widths: hidden widths to train (>= 2 of them for a slope).
      steps: full-batch GD step counts at which to compare (positive integers).
      learning_rate: SGD step size; default ``lr_fraction * max_learning_rate(ntk)``.
      seeds: initializations per width (distances are RMS-averaged over them).
      y_test: optional ``(m, k)`` test targets, to report kernel-regression and network RMSE.
      dtype: dtype of the networks and kernels (float64 recommended).
      progress: print one line per trained network.

    Returns:
      :class:`DynamicsComparison` (``.slope`` about -0.5, ``.to_text()`` for a table).
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ValueError(f"`widths` needs at least two positive widths, got {widths}")
    steps_l = sorted({int(s) for s in steps})
    if not steps_l or steps_l[0] < 1:
        raise ValueError(f"`steps` must be positive integers, got {list(steps)}")
    x_tr = torch.as_tensor(x_train, dtype=dtype)
    x_te = torch.as_tensor(x_test, dtype=dtype)
    y = torch.as_tensor(y_train, dtype=dtype)
    if y.ndim != 2 or y.shape[0] != x_tr.shape[0]:
        raise ValueError(f"`y_train` must be (n_train, n_outputs) = ({x_tr.shape[0]}, k), got "
                         f"{tuple(y.shape)}; for one output use y_train[:, None]")
    ntk_dd = arch.kernel(x_tr, None, get="ntk", dtype=torch.float64)
    ntk_td = arch.kernel(x_te, x_tr, get="ntk", dtype=torch.float64)
    if learning_rate is None:
        learning_rate = lr_fraction * _predict.max_learning_rate(ntk_dd, y.numel())
    lr = float(learning_rate)
    pf = _predict.gradient_descent_mse_discrete(ntk_dd, y, learning_rate=lr)
    steps_t = torch.tensor(steps_l, dtype=torch.float64)
    in_shape = tuple(x_tr.shape[1:])
    sq_tr = torch.zeros(len(widths), len(steps_l), dtype=torch.float64)
    sq_te = torch.zeros_like(sq_tr)
    net_rmse: List[float] = []
    outs_te, preds_te = [], []
    for wi, w in enumerate(widths):
        net_err = 0.0
        outs_te.append([])
        preds_te.append([])
        for seed in seeds:
            net = arch.module(in_shape=in_shape, width=w, seed=int(seed) + 7919 * wi, dtype=dtype)
            with torch.no_grad():
                f0, g0 = net(x_tr).to(torch.float64), net(x_te).to(torch.float64)
            pred_tr, pred_te = pf(steps_t, f0, g0, ntk_td)
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            rec_tr, rec_te = [], []
            done = 0
            for s in steps_l:
                for _ in range(s - done):
                    opt.zero_grad(set_to_none=True)
                    loss = 0.5 * ((net(x_tr) - y) ** 2).mean()
                    loss.backward()
                    opt.step()
                done = s
                with torch.no_grad():
                    rec_tr.append(net(x_tr).to(torch.float64))
                    rec_te.append(net(x_te).to(torch.float64))
            out_tr, out_te = torch.stack(rec_tr), torch.stack(rec_te)
            outs_te[-1].append(out_te[-1])
            preds_te[-1].append(pred_te[-1])
            sq_tr[wi] += ((out_tr - pred_tr) ** 2).mean(dim=(1, 2))
            sq_te[wi] += ((out_te - pred_te) ** 2).mean(dim=(1, 2))
            if y_test is not None:
                yt = torch.as_tensor(y_test, dtype=torch.float64)
                net_err += float(((out_te[-1] - yt) ** 2).mean())
            if progress:
                print(f"width {w} seed {seed}: test distance at step {steps_l[-1]} "
                      f"{float(((out_te[-1] - pred_te[-1]) ** 2).mean().sqrt()):.3e}", flush=True)
        net_rmse.append(math.sqrt(net_err / len(seeds)))
    train_rms = (sq_tr / len(seeds)).sqrt()
    test_rms = (sq_te / len(seeds)).sqrt()
    w_t = torch.tensor(widths, dtype=torch.float64)
    sl_tr = torch.tensor([_slope(w_t, train_rms[:, j]) for j in range(len(steps_l))])
    sl_te = torch.tensor([_slope(w_t, test_rms[:, j]) for j in range(len(steps_l))])
    kernel_rmse = None
    if y_test is not None:
        yt = torch.as_tensor(y_test, dtype=torch.float64)
        kr = _predict.gradient_descent_mse(ntk_dd, y)(None, None, 0.0, ntk_td)
        kernel_rmse = float(((kr - yt) ** 2).mean().sqrt())
    return DynamicsComparison(
        widths=w_t, steps=steps_t, times=steps_t * lr, learning_rate=lr,
        train_rms=train_rms, test_rms=test_rms, slopes_train=sl_tr, slopes_test=sl_te,
        slope=float(torch.cat([sl_tr, sl_te]).mean()), kernel_test_rmse=kernel_rmse,
        network_test_rmse=torch.tensor(net_rmse, dtype=torch.float64) if y_test is not None
        else None,
        extra={"test_outputs": torch.stack([torch.stack(o) for o in outs_te]),
               "test_predictions": torch.stack([torch.stack(p) for p in preds_te])},
        slope_fit=_common_slope(w_t, [train_rms[:, j] for j in range(len(steps_l))]
                                + [test_rms[:, j] for j in range(len(steps_l))]))
