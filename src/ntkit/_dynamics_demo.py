"""Real networks against the kernel prediction: the experiments behind ``ntkit demo``.

:func:`train_and_compare` is the check behind the demo's dynamics table; the other functions
run the experiments that :mod:`ntkit.plots` draws (networks at initialization and trained vs
the NNGP / NTK-GP, a weight matrix during training, the 2-point NTK ellipse, output
trajectories vs their NTK prediction). Every network is trained by
:func:`ntkit.diagnostics.train`; the theory comes from :mod:`ntkit.predict`.

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
from ._validation import check_int as _check_count
from .diagnostics import fit_slope, train
from . import layers as nl
from .empirical import centered, empirical_ntk, scaled

__all__ = ["train_and_compare", "DynamicsComparison", "init_functions", "InitFunctions",
           "trained_functions", "TrainedFunctions", "weight_changes", "WeightChanges",
           "ntk_ellipse", "EllipseRuns", "trajectories", "Trajectories"]


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

    def outputs(step, net):
        with torch.no_grad():
            return net(x_tr).to(torch.float64), net(x_te).to(torch.float64)

    sq_tr = torch.zeros(len(widths), len(steps_l), dtype=torch.float64)
    sq_te = torch.zeros_like(sq_tr)
    net_rmse: List[float] = []
    outs_te: List[List[Any]] = []
    preds_te: List[List[Any]] = []
    for wi, w in enumerate(widths):
        net_err = 0.0
        outs_te.append([])
        preds_te.append([])
        for seed in seeds:
            net = arch.module(in_shape=in_shape, width=w, seed=int(seed) + 7919 * wi, dtype=dtype)
            with torch.no_grad():
                f0, g0 = net(x_tr).to(torch.float64), net(x_te).to(torch.float64)
            pred_tr, pred_te = pf(steps_t, f0, g0, ntk_td)
            rec = train(net, x_tr, y, steps=steps_l[-1], learning_rate=lr,
                        record_steps=steps_l, linearization=False,
                        measure_kernel_drift=False, measure=outputs)
            got = dict(zip(rec.steps.tolist(), rec.measured))
            rec_tr = [got[s][0] for s in steps_l]
            rec_te = [got[s][1] for s in steps_l]
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
    sl_tr = torch.tensor([fit_slope(widths, train_rms[:, j].tolist()).slope
                          for j in range(len(steps_l))])
    sl_te = torch.tensor([fit_slope(widths, test_rms[:, j].tolist()).slope
                          for j in range(len(steps_l))])
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


def _common_slope(widths: torch.Tensor, series: List[torch.Tensor]):
    """One log-log slope of several series over the same widths, an intercept per series
    (:func:`ntkit.diagnostics.fit_slope` with ``groups``)."""
    w = widths.tolist()
    return fit_slope(w * len(series), [float(v) for s in series for v in s],
                     groups=[i for i in range(len(series)) for _ in w])


# =========================================================================================
# the experiments behind the figures of ntkit.plots (which only draws what these return)
# =========================================================================================

_F64 = torch.float64


def _default_1d_arch():
    return nl.serial(nl.Dense(512, W_std=1.5, b_std=0.5), nl.Erf(),
                     nl.Dense(1, W_std=1.5, b_std=0.1))


def _grid(x_range, n=200):
    lo, hi = float(x_range[0]), float(x_range[1])
    if not hi > lo:
        raise ValueError(f"`x_range` must be (low, high) with low < high, got {x_range!r}")
    return torch.linspace(lo, hi, n, dtype=_F64)[:, None]


def _quiet_train(net, x, y, steps, lr, **kw):
    """Full-batch GD with :func:`ntkit.diagnostics.train`, measuring nothing extra."""
    return train(net, x, y, steps=steps, learning_rate=lr, linearization=False,
                 measure_kernel_drift=False, **kw)


@dataclass
class InitFunctions:
    """Networks of a 1-D input at initialization and their NNGP: xs ``(G, 1)`` grid; sd
    ``(G,)`` NNGP standard deviation ``sqrt(K(x, x))``; outputs ``(n_nets, G)``; width."""
    xs: torch.Tensor
    sd: torch.Tensor
    outputs: torch.Tensor
    width: int


def init_functions(arch: Any = None, *, width: int = 512, n_nets: int = 12,
                   x_range=(-3.0, 3.0), seed: int = 0) -> InitFunctions:
    """``n_nets`` networks ``arch.module(1, width=width, seed=seed + i)`` (default: a
    one-hidden-layer erf network) over ``x_range``, and the NNGP standard deviation of
    ``arch.kernel``. Drawn by :func:`ntkit.plots.init_functions`."""
    arch = _default_1d_arch() if arch is None else arch
    _check_count(n_nets, "n_nets")
    xs = _grid(x_range)
    sd = arch.kernel(xs, get="nngp").diagonal().clamp_min(0).sqrt()
    outs = []
    for i in range(n_nets):
        net = arch.module(in_shape=1, width=width, seed=seed + i)
        with torch.no_grad():
            outs.append(net(xs)[:, 0].to(_F64))
    return InitFunctions(xs, sd, torch.stack(outs), int(width))


@dataclass
class TrainedFunctions:
    """Networks of a 1-D input trained on a few points, and the NTK-GP at the same time.

    Attributes: xs ``(G, 1)`` grid; mean, sd ``(G,)`` NTK-GP mean and standard deviation after
    ``steps`` GD steps; outputs ``(n_nets, G)`` the trained networks on the grid; x_train,
    y_train ``(n, 1)``; width, steps, learning_rate."""
    xs: torch.Tensor
    mean: torch.Tensor
    sd: torch.Tensor
    outputs: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    width: int
    steps: int
    learning_rate: float


def trained_functions(arch: Any = None, x_train: Any = None, y_train: Any = None, *,
                      width: int = 512, n_nets: int = 10, steps: int = 1000,
                      lr_fraction: float = 0.5, x_range=(-3.0, 3.0),
                      seed: int = 0) -> TrainedFunctions:
    """Train ``n_nets`` networks by full-batch GD on a few 1-D points (default: 5 points of
    ``sin``; architecture: a one-hidden-layer erf network) at ``lr_fraction`` times the stable
    rate of the infinite-width NTK, next to the NTK-GP of
    :func:`ntkit.predict.gradient_descent_mse_ensemble` at the same time.
    Drawn by :func:`ntkit.plots.trained_functions`."""
    arch = _default_1d_arch() if arch is None else arch
    _check_count(n_nets, "n_nets")
    _check_count(steps, "steps")
    if x_train is None:
        x_train = torch.tensor([[-2.0], [-1.0], [0.0], [1.2], [2.2]], dtype=_F64)
        y_train = torch.sin(1.5 * x_train)
    x_train = torch.as_tensor(x_train, dtype=_F64)
    y_train = torch.as_tensor(y_train, dtype=_F64)
    if x_train.ndim != 2 or x_train.shape[1] != 1 or y_train.shape != (x_train.shape[0], 1):
        raise ValueError(f"`x_train` and `y_train` must be (n, 1) each, got "
                         f"{tuple(x_train.shape)} and {tuple(y_train.shape)}")
    xs = _grid(x_range)
    ntk = arch.kernel(x_train, get="ntk")
    lr = lr_fraction * _predict.max_learning_rate(ntk, y_train.numel())
    ens = _predict.gradient_descent_mse_ensemble(arch, x_train, y_train, learning_rate=lr)
    mean, cov = ens(x_test=xs, t=float(steps), get="ntk", compute_cov=True)
    outs = []
    for i in range(n_nets):
        net = arch.module(in_shape=1, width=width, seed=seed + i)
        _quiet_train(net, x_train, y_train, steps, lr)
        with torch.no_grad():
            outs.append(net(xs)[:, 0].to(_F64))
    return TrainedFunctions(xs, mean[:, 0], cov.diagonal().clamp_min(0).sqrt(),
                            torch.stack(outs), x_train, y_train, int(width), int(steps), lr)


def _square_param(net, width):
    for name, p in net.named_parameters():
        if p.ndim == 2 and p.shape[0] == width and p.shape[1] == width:
            return name
    for name, p in net.named_parameters():
        if p.ndim == 2:
            return name
    raise ValueError("the network has no 2-D weight matrix to draw")


@dataclass
class WeightChanges:
    """A hidden weight matrix during training, per width: ``runs`` is a list of
    ``(width, final relative weight change, {step: (W_t - W_0) / sd(W_0)})``."""
    runs: List[tuple]
    steps: int


def weight_changes(arch: Any = None, x: Any = None, y: Any = None, *,
                   widths: Sequence[int] = (10, 100, 1000), steps: int = 300,
                   learning_rate: Any = "auto", seed: int = 0) -> WeightChanges:
    """Train one network per width (full-batch GD, :func:`ntkit.diagnostics.train`; default: two
    hidden erf layers on 8 1-D points of ``sin``) and keep its hidden-to-hidden weight matrix
    at about 25 steps. Drawn by :func:`ntkit.plots.weight_matrices`."""
    if arch is None:
        arch = nl.serial(nl.Dense(100, W_std=1.5, b_std=0.3), nl.Erf(),
                         nl.Dense(100, W_std=1.5, b_std=0.3), nl.Erf(), nl.Dense(1, W_std=1.5))
    if x is None:
        x = torch.linspace(-2, 2, 8, dtype=_F64)[:, None]
        y = torch.sin(2 * x)
    _check_count(steps, "steps")
    every = max(1, steps // 24)
    runs = []
    for w in widths:
        net = arch.module(in_shape=tuple(torch.as_tensor(x).shape[1:]), width=int(w), seed=seed)
        name = _square_param(net, int(w))
        rec = train(net, x, y, steps=steps, learning_rate=learning_rate, record_every=every,
                    linearization=False, measure_kernel_drift=False, snapshot=name)
        w0 = rec.snapshots[0]
        sd0 = float(w0.std()) or 1.0
        runs.append((int(w), float(rec.rel_weight_change[-1]),
                     {s: (v - w0) / sd0 for s, v in rec.snapshots.items()}))
    return WeightChanges(runs, int(steps))


@dataclass
class EllipseRuns:
    """Training ``alpha (f - f_0)`` on two points, per alpha. ``runs``: list of ``(alpha,
    outputs (T+1, 2), kernels [(step, Theta_t (2, 2))], linearized outputs (T+1, 2), relative
    kernel change, max path gap)``; target ``(2,)``."""
    runs: List[tuple]
    target: torch.Tensor


def ntk_ellipse(arch: Any = None, x2: Any = None, y2: Any = None, *,
                alphas: Sequence[float] = (0.1, 1.0, 32.0), width: int = 16, steps: int = 400,
                lr_fraction: float = 0.3, seed: int = 0) -> EllipseRuns:
    """Train ``alpha (f - f_0)`` by GD on two points (loss divided by ``alpha^2``, learning rate
    ``lr_fraction`` times the stable rate of the initial kernel), recording the outputs at every
    step and the empirical NTK ``Theta_t`` about 20 times, next to the linearized model's path
    (:func:`ntkit.predict.gradient_descent_mse_discrete` with ``Theta_0``, exact for GD).
    Drawn by :func:`ntkit.plots.ntk_ellipse`."""
    if arch is None:
        arch = nl.serial(nl.Dense(16, W_std=1.5, b_std=0.2), nl.Erf(), nl.Dense(1, W_std=1.5))
    if x2 is None:
        x2 = torch.tensor([[1.0, 0.2], [0.7, 0.7]], dtype=_F64)     # correlated inputs: an
        y2 = torch.tensor([[1.0], [-0.3]], dtype=_F64)              # elongated NTK ellipse
    x2 = torch.as_tensor(x2, dtype=_F64)
    y2 = torch.as_tensor(y2, dtype=_F64)
    if x2.shape[0] != 2 or y2.shape != (2, 1):
        raise ValueError(f"`x2` must hold 2 points and `y2` be (2, 1), got {tuple(x2.shape)}, "
                         f"{tuple(y2.shape)}")
    _check_count(steps, "steps")
    rec_every = max(1, steps // 20)
    runs = []
    for a in alphas:
        a = float(a)
        if not a > 0:
            raise ValueError(f"`alphas` must be positive, got {a}")
        base = arch.module(in_shape=tuple(x2.shape[1:]), width=width, seed=seed)
        net = scaled(centered(base), a)
        # in the scaled coordinates the model's NTK is a^2 Theta and its loss is divided by a^2
        k0 = empirical_ntk(net, x2, dtype=_F64) / a ** 2
        lr = lr_fraction * _predict.max_learning_rate(k0, y2.numel())

        def kernel(s, m, a=a):
            if s % rec_every == 0 or s == steps:
                return empirical_ntk(m, x2, dtype=_F64) / a ** 2
            return None

        rec = _quiet_train(net, x2, y2, steps, lr, loss_scale=1.0 / a ** 2, record_every=1,
                           record_outputs=True, measure=kernel)
        traj = rec.outputs[:, :, 0]
        kernels = [(int(s), k) for s, k in zip(rec.steps.tolist(), rec.measured) if k is not None]
        # the linearized model: same loss, same steps, kernel frozen at Theta_0
        lin = _predict.gradient_descent_mse_discrete(kernels[0][1], y2, learning_rate=lr)(
            torch.arange(steps + 1, dtype=_F64), traj[0][:, None])[:, :, 0]
        change = float((kernels[-1][1] - kernels[0][1]).norm() / kernels[0][1].norm())
        gap = float((traj - lin).norm(dim=1).max())
        runs.append((a, traj, kernels, lin, change, gap))
    return EllipseRuns(runs, y2[:, 0])


@dataclass
class Trajectories:
    """One test output during GD per width: ``runs`` is a list of ``(width, network outputs,
    NTK prediction)`` at ``steps`` (lists); example, output: which output is followed."""
    steps: List[int]
    runs: List[tuple]
    example: int
    output: int


def trajectories(arch: Any, x_train: Any, y_train: Any, x_test: Any, *,
                 widths: Sequence[int] = (64, 512, 4096), steps: int = 200,
                 lr_fraction: float = 0.5, example: int = 0, output: int = 0,
                 seed: int = 0) -> Trajectories:
    """Train one network per width by full-batch GD and follow output ``output`` of test example
    ``example``, next to the NTK prediction for that very network (same ``f_0``, same steps:
    :func:`ntkit.predict.gradient_descent_mse_discrete`). Drawn by
    :func:`ntkit.plots.trajectories`."""
    x_tr = torch.as_tensor(x_train, dtype=_F64)
    x_te = torch.as_tensor(x_test, dtype=_F64)
    y = torch.as_tensor(y_train, dtype=_F64)
    if y.ndim != 2 or y.shape[0] != x_tr.shape[0]:
        raise ValueError(f"`y_train` must be (n_train, k), got {tuple(y.shape)}")
    if not 0 <= example < x_te.shape[0] or not 0 <= output < y.shape[1]:
        raise ValueError(f"`example` must be < {x_te.shape[0]} and `output` < {y.shape[1]}")
    _check_count(steps, "steps")
    k_dd = arch.kernel(x_tr, get="ntk")
    k_td = arch.kernel(x_te, x_tr, get="ntk")
    lr = lr_fraction * _predict.max_learning_rate(k_dd, y.numel())
    pf = _predict.gradient_descent_mse_discrete(k_dd, y, learning_rate=lr)
    every = max(1, steps // 40)
    rec_steps = list(range(0, steps + 1, every))
    if rec_steps[-1] != steps:
        rec_steps.append(steps)
    runs = []
    for w in widths:
        net = arch.module(in_shape=tuple(x_tr.shape[1:]), width=int(w), seed=seed)
        with torch.no_grad():
            f0, g0 = net(x_tr), net(x_te)
        # step 0 is f_0 by definition; predict is asked for steps >= 1 only (its step-0 value
        # is not finite when a mode's GD factor 1 - lr lambda / N is exactly 0, as at half the
        # stable rate, the default)
        _, pred = pf(torch.tensor(rec_steps[1:], dtype=_F64), f0, g0, k_td)
        pred = torch.cat([g0.to(_F64)[None], pred])

        def watch(s, m):
            with torch.no_grad():
                return float(m(x_te[example:example + 1])[0, output])

        rec = _quiet_train(net, x_tr, y, steps, lr, record_every=every, measure=watch)
        assert rec.steps.tolist() == rec_steps
        runs.append((int(w), rec.measured, pred[:, example, output].tolist()))
    return Trajectories(rec_steps, runs, int(example), int(output))
