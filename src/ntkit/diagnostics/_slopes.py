"""Log-log slopes with confidence intervals (Student t), for scaling laws in width or alpha."""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import torch

from .._validation import all_finite

__all__ = ["Slope", "fit_slope"]

_F64 = torch.float64


class Slope(NamedTuple):
    """Least-squares slope of ``log(value)`` vs ``log(x)`` with a 95% confidence interval
    (Student t with ``n_points - 2`` degrees of freedom, ``n_points - n_groups - 1`` for a
    grouped fit; ``nan`` bounds when no degree of freedom is left, e.g. ``n_points < 3``)."""
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


def fit_slope(x: Sequence[float], values: Sequence[float],
              groups: Optional[Sequence[Any]] = None) -> Slope:
    """Fit ``log(values) = slope * log(x) + intercept`` by least squares (all points pooled,
    e.g. every seed at every width). Non-positive values are rejected.

    ``groups`` (one label per point): one common slope with an intercept per group (several
    series over the same widths, e.g. distances at several step counts); the 95% CI then uses
    ``n_points - n_groups - 1`` degrees of freedom and ``intercept`` is that of the first group.

    Example: ``fit_slope([64, 256, 1024], [0.1, 0.05, 0.025]).slope  # -0.5``
    """
    xs = torch.as_tensor(list(x), dtype=_F64)
    vs = torch.as_tensor(list(values), dtype=_F64)
    if xs.shape != vs.shape or xs.numel() < 2:
        raise ValueError("`x` and `values` need the same length, at least 2 points")
    if (xs <= 0).any() or (vs <= 0).any() or not all_finite(vs):
        raise ValueError("log-log slopes need positive, finite `x` and `values`")
    lx, lv = xs.log(), vs.log()
    n = xs.numel()
    if groups is not None:
        return _grouped_slope(lx, lv, list(groups))
    xc = lx - lx.mean()
    sxx = float((xc ** 2).sum())
    if sxx == 0:
        raise ValueError("`x` has a single distinct value: no slope")
    b = float((xc * (lv - lv.mean())).sum()) / sxx
    a = float(lv.mean()) - b * float(lx.mean())
    if n > 2:
        resid = lv - (a + b * lx)
        se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / sxx)
        q = _t_quantile(0.975, n - 2)
        lo, hi = b - q * se, b + q * se
    else:
        se, lo, hi = math.nan, math.nan, math.nan
    return Slope(b, se, lo, hi, a, int(n))


def _grouped_slope(lx: torch.Tensor, lv: torch.Tensor, groups: list) -> Slope:
    """Common slope of several series, each with its own intercept (within-group least
    squares); Student-t CI on ``n - n_groups - 1`` degrees of freedom."""
    if len(groups) != lx.numel():
        raise ValueError(f"`groups` needs one label per point: {len(groups)} labels for "
                         f"{lx.numel()} points")
    labels = list(dict.fromkeys(groups))                   # first-seen order
    idx = [torch.tensor([i for i, g in enumerate(groups) if g == lab]) for lab in labels]
    xcs = [lx[i] - lx[i].mean() for i in idx]
    sxx = sum(float((xc * xc).sum()) for xc in xcs)
    if sxx == 0:
        raise ValueError("`x` has a single distinct value within every group: no slope")
    b = sum(float((xc * (lv[i] - lv[i].mean())).sum()) for xc, i in zip(xcs, idx)) / sxx
    rss = sum(float(((lv[i] - lv[i].mean() - b * xc) ** 2).sum()) for xc, i in zip(xcs, idx))
    n = lx.numel()
    dof = n - len(labels) - 1
    if dof >= 1:
        se = math.sqrt(rss / dof / sxx)
        q = _t_quantile(0.975, dof)
        lo, hi = b - q * se, b + q * se
    else:
        se, lo, hi = math.nan, math.nan, math.nan
    first = idx[0]
    return Slope(b, se, lo, hi, float(lv[first].mean()) - b * float(lx[first].mean()), int(n))
