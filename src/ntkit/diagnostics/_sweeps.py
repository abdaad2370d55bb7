"""Width and output-scale (alpha) sweeps of the lazy-training diagnostics, and their result."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Union

import torch
from torch import nn

from ._common import _F64, _as_x, _check_int
from ._norms import lazy_scales
from ._slopes import Slope, fit_slope
from ._training import _Diverged, train
from ..layers import Layer
from ..empirical import centered, scaled

if TYPE_CHECKING:
    import pandas

__all__ = ["METRICS", "THEORY", "LazySweep", "width_sweep", "alpha_sweep",
           "arch_parameterization"]


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

    def to_pandas(self) -> pandas.DataFrame:
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


def arch_parameterization(arch: Any) -> str:
    """The ``parameterization`` shared by every layer of an ntkit architecture that has one
    (``'ntk'``, ``'standard'``), ``'mixed'`` if they differ, ``'unknown'`` if none has one.

    The walk is :meth:`ntkit.layers.Layer.walk` (declared sub-layer fields, as in ``serial``
    and ``parallel``), reading each layer's declared ``parameterization`` field, so it names no
    attribute it has to guess. Example: ``arch_parameterization(nl.serial(nl.Dense(8),
    nl.Relu(), nl.Dense(1))) -> 'ntk'``."""
    if not isinstance(arch, Layer):
        return "unknown"
    found: Set[str] = set()
    for sub in arch.walk():
        if dataclasses.is_dataclass(sub) and any(f.name == "parameterization"
                                                 for f in dataclasses.fields(sub)):
            v = sub.parameterization
            if isinstance(v, str):
                found.add(v)
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
    if isinstance(model, Layer):
        shape = tuple(x.shape[1:]) if in_shape is None else in_shape
        label = parameterization or arch_parameterization(model)

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

    Other arguments are as in :func:`width_sweep`; ``'auto'`` learning rates are computed for
    the scaled model and loss, so they do not change with ``alpha`` when centered.

    Example::

        >>> sw = alpha_sweep(net, x, y, alphas=(1, 4, 16, 64), steps=100)
        >>> sw.slope('kappa')                  # about -1
    """
    x, seeds = _common_checks(x, y, seeds, steps)
    al = [float(a) for a in alphas]
    if len(set(al)) < 2 or min(al) <= 0 or not all(math.isfinite(a) for a in al):
        raise ValueError(f"`alphas` needs at least two distinct positive values, got "
                         f"{list(alphas)}")
    if isinstance(model, nn.Module):
        if len(seeds) != 1:
            raise ValueError("`model` is a single nn.Module (one initialization): give one seed, "
                             "or pass a factory `() -> nn.Module` / an architecture for several")
        label = "module"

        def build(s):
            return copy.deepcopy(model).to(_F64)
    elif isinstance(model, Layer):
        shape = tuple(x.shape[1:]) if in_shape is None else in_shape
        label = arch_parameterization(model)

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
