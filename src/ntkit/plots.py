"""The figures that explain the NTK picture, drawn from real computations (matplotlib, optional).

This module only draws: the networks are trained and the theory computed by the functions
that produce its inputs (:mod:`ntkit.diagnostics` sweeps, the experiments of
:mod:`ntkit._dynamics_demo`, :mod:`ntkit.predict`).

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (so it works
headless and leaks no global state) and saves it when ``path`` is given; the format follows the
extension (``.png``, ``.svg``, ``.pdf``). Functions whose point is motion also write a GIF with
``gif_path=`` (matplotlib's ``PillowWriter``; pillow ships with matplotlib).

================================  =============================================================
:func:`init_functions`            1-D networks at initialization vs the NNGP (a GP draw)
:func:`trained_functions`         many networks trained on a few 1-D points vs the NTK-GP
:func:`weight_matrices`           a hidden weight matrix during training at widths 10/100/1000
:func:`training_curves`           loss and relative weight change by width (from a sweep)
:func:`plot_scaling`              gradient norm ~ sqrt(m), Hessian norm ~ 1, kappa ~ 1/m, fits
:func:`tangent_model`             a one-parameter model, its tangent and normalized loss vs alpha
:func:`ntk_ellipse`               the 2-point NTK as an ellipse during training, several alpha
:func:`eigenmode_decay`           per-mode residual decay: theory curves, network dots
:func:`dynamics_comparison`       distance network vs kernel prediction by width (log-log)
:func:`trajectories`              network outputs vs their kernel prediction during training
================================  =============================================================

Example::

    >>> from ntkit import plots, diagnostics as dg
    >>> sw = dg.width_sweep(arch, x, y, widths=(64, 256, 1024))
    >>> plots.plot_scaling(sw, path='scaling.png'); plots.training_curves(sw, path='curves.svg')
    >>> from ntkit import _dynamics_demo as dd
    >>> plots.ntk_ellipse(dd.ntk_ellipse(alphas=(0.1, 1, 32)), path='ellipse.png')
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from ._text import plural
from ._validation import check_int as _check_count
from .predict import eigenmodes

__all__ = ["init_functions", "trained_functions", "weight_matrices", "training_curves",
           "plot_scaling", "tangent_model", "ntk_ellipse", "eigenmode_decay",
           "dynamics_comparison", "trajectories", "has_gif_support", "save"]

_F64 = torch.float64


def _mpl():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover
        raise ImportError("ntkit.plots needs matplotlib: pip install 'ntkit[all]' or "
                          "pip install matplotlib") from e
    return matplotlib, Figure


#: font sizes in points. Figures are drawn for the report's page (``ntkit.report``): at
#: ``_DPI`` = 100 px per inch and at most ``_MAX_WIDTH_IN`` inches wide they are never scaled
#: down, so the smallest text (8 pt) renders at 11 px, above ``report.MIN_TEXT_PX`` (9 px).
_FS = {"tick": 8.5, "label": 9.0, "title": 10.0, "suptitle": 10.5, "legend": 8.0, "note": 8.0}
_DPI = 100
_MAX_WIDTH_IN = 10.8          # report.PAGE_WIDTH_PX / _DPI, less a margin


def _figure(ncols: int = 1, nrows: int = 1, size=(4.2, 3.4), **kw):
    """A constrained-layout figure of ``nrows x ncols`` panels of ``size`` inches each, panels
    narrowed (same aspect kept for the height up to 25%) so the figure fits the report's page
    without being scaled down."""
    _, Figure = _mpl()
    w, h = size
    if w * ncols > _MAX_WIDTH_IN:
        shrink = _MAX_WIDTH_IN / (w * ncols)
        w, h = w * shrink, h * max(shrink, 0.75)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _log_formatter(v, _pos=None) -> str:
    if v <= 0 or not math.isfinite(v):
        return ""
    if 1e-3 <= v < 1e4:
        return f"{v:.4g}"
    e = math.floor(math.log10(v) + 1e-9)
    m = v / 10.0 ** e
    if abs(m - round(m)) < 1e-6 and round(m) == 1:
        return f"$10^{{{e}}}$"
    return f"${m:.2g}{{\\times}}10^{{{e}}}$"


class _LogTicks:
    """Locator for log axes with at least three labelled ticks in view: decades (every k-th
    one on long ranges), else 1-3, 1-2-5, 1-2-3-5-7 or 1..9 per decade; linear nice ticks on a
    range narrower than that. Built lazily (matplotlib's ``Locator`` base)."""

    def __new__(cls):
        from matplotlib.ticker import Locator, MaxNLocator

        class LogTicks(Locator):
            def __call__(self):
                lo, hi = self.axis.get_view_interval()
                return self.tick_values(lo, hi)

            def tick_values(self, vmin, vmax):
                vmin, vmax = sorted((float(vmin), float(vmax)))
                if not (vmax > 0 and math.isfinite(vmax)):
                    return []
                vmin = max(vmin, vmax * 1e-300, 1e-300)
                e0 = math.floor(math.log10(vmin)) - 1
                e1 = math.ceil(math.log10(vmax)) + 1
                n_dec = math.log10(vmax / vmin)
                stride = max(1, math.ceil(n_dec / 6))
                inside = [e for e in range(e0, e1 + 1)
                          if vmin * (1 - 1e-9) <= 10.0 ** e <= vmax * (1 + 1e-9)]
                decades = [10.0 ** e for e in inside if e % stride == 0]
                if len(decades) >= 3:
                    return decades
                for subs in ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0),
                             tuple(range(1, 10))):
                    ticks = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in subs
                             if vmin * (1 - 1e-9) <= m * 10.0 ** e <= vmax * (1 + 1e-9)]
                    if len(ticks) >= 3:
                        return ticks
                return [v for v in MaxNLocator(nbins=4).tick_values(vmin, vmax)
                        if vmin <= v <= vmax and v > 0]

        return LogTicks()


def _style_log_axis(axis) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter
    if not isinstance(axis.get_major_locator(), FixedLocator):
        axis.set_major_locator(_LogTicks())
        axis.set_major_formatter(FuncFormatter(_log_formatter))
    axis.set_minor_locator(LogLocator(subs="all"))
    axis.set_minor_formatter(NullFormatter())


def _finish(fig):
    """House style for the report: no text below the ``_FS`` sizes, and log axes with enough
    labelled ticks (:class:`_LogTicks`). Applied by :func:`save` to every figure."""
    from matplotlib.text import Text
    floor = min(_FS.values())
    for ax in fig.axes:
        ax.tick_params(which="major", labelsize=_FS["tick"])
        for lab in (ax.xaxis.label, ax.yaxis.label):
            lab.set_fontsize(max(lab.get_fontsize(), _FS["label"]))
        for t in (ax.title, ax._left_title, ax._right_title):
            t.set_fontsize(max(t.get_fontsize(), _FS["title"]))
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                _style_log_axis(axis)
    if fig._suptitle is not None:
        fig._suptitle.set_fontsize(max(fig._suptitle.get_fontsize(), _FS["suptitle"]))
    for t in fig.findobj(Text):                 # legends, annotations, colorbar labels
        if t.get_fontsize() < floor:
            t.set_fontsize(floor)
    return fig


def save(fig, path: Optional[str], dpi: int = 110):
    """Apply the house style (readable fonts, labelled log ticks) and save ``fig`` to ``path``
    (format from the extension: png, svg, pdf); returns ``fig``."""
    _finish(fig)
    if path is not None:
        ext = str(path).rsplit(".", 1)[-1].lower()
        if ext not in ("png", "svg", "pdf", "jpg", "jpeg"):
            raise ValueError(f"`path` must end in .png, .svg, .pdf or .jpg, got {path!r}")
        fig.savefig(path, dpi=dpi)
    return fig


def has_gif_support() -> bool:
    """Whether GIFs can be written (pillow installed, matplotlib's PillowWriter available)."""
    try:
        import PIL  # noqa: F401
        from matplotlib.animation import PillowWriter  # noqa: F401
        return True
    except ImportError:
        return False


def _gif(fig, update: Callable[[int], Any], frames: int, path: str, fps: int = 8) -> str:
    if not has_gif_support():
        raise ImportError("writing GIFs needs pillow (pip install pillow)")
    if not str(path).lower().endswith(".gif"):
        raise ValueError(f"`gif_path` must end in .gif, got {path!r}")
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    if fig.canvas is None or type(fig.canvas).__name__ == "FigureCanvasBase":
        FigureCanvasAgg(fig)
    anim = FuncAnimation(fig, update, frames=frames, blit=False)
    anim.save(path, writer=PillowWriter(fps=fps), dpi=80)
    return path


# =========================================================================================
# 1-D function pictures
# =========================================================================================

def init_functions(result, *, path: Optional[str] = None):
    """Networks of a 1-D input at random initialization against their NNGP: the outputs of an
    infinitely wide network at init are a Gaussian process with covariance ``arch.kernel``.

    ``result``: what :func:`ntkit._dynamics_demo.init_functions` returns (grid, NNGP standard
    deviation, the networks' outputs); drawn with the band ``0 +- 2 sqrt(K(x, x))``.
    Example: ``init_functions(_dynamics_demo.init_functions(arch), path='init.png')``.
    """
    r = result
    fig, ax = _figure(size=(5.5, 3.8))
    ax = ax[0, 0]
    xp = r.xs[:, 0].numpy()
    ax.fill_between(xp, (-2 * r.sd).numpy(), (2 * r.sd).numpy(), color="0.85",
                    label="NNGP: mean 0, ±2 sd")
    for out in r.outputs:
        ax.plot(xp, out.numpy(), lw=1.1, alpha=0.85)
    ax.set_xlabel("input x")
    ax.set_ylabel("network output f(x)")
    ax.set_title(f"{plural(len(r.outputs), 'random network')} of width {r.width} at "
                 f"initialization")
    ax.legend(loc="upper left", fontsize=_FS["legend"])
    return save(fig, path)


def trained_functions(result, *, path: Optional[str] = None):
    """Many networks trained by full-batch GD on a few 1-D points, against the NTK-GP: the
    infinite ensemble of infinitely wide networks trained for the same time has the mean and
    covariance of :func:`ntkit.predict.gradient_descent_mse_ensemble`.

    ``result``: what :func:`ntkit._dynamics_demo.trained_functions` returns (grid, NTK-GP mean
    and sd, the trained networks' outputs, the training points).

    Example: ``trained_functions(_dynamics_demo.trained_functions(steps=500), path='t.png')``.
    """
    r = result
    fig, ax = _figure(size=(5.5, 3.8))
    ax = ax[0, 0]
    xp = r.xs[:, 0].numpy()
    m, sd = r.mean, r.sd
    ax.fill_between(xp, (m - 2 * sd).numpy(), (m + 2 * sd).numpy(), color="0.85",
                    label=f"NTK-GP at t={r.steps}: mean ±2 sd")
    ax.plot(xp, m.numpy(), color="k", lw=1.5, ls="--", label="NTK-GP mean")
    for out in r.outputs:
        ax.plot(xp, out.numpy(), lw=1.0, alpha=0.8)
    ax.plot(r.x_train[:, 0].numpy(), r.y_train[:, 0].numpy(), "o", color="crimson", ms=6,
            label="training points", zorder=5)
    ax.set_xlabel("input x")
    ax.set_ylabel("f(x)")
    ax.set_title(f"{plural(len(r.outputs), 'network')} (width {r.width}) after "
                 f"{plural(r.steps, 'GD step')}")
    ax.legend(loc="upper left", fontsize=_FS["legend"])
    return save(fig, path)


# =========================================================================================
# weights during training
# =========================================================================================

_FAINT = 0.15      # a panel whose largest entry is under 15% of the colour scale looks blank


def weight_matrices(result, *, n_frames: int = 4, path: Optional[str] = None,
                    gif_path: Optional[str] = None):
    """A hidden-to-hidden weight matrix during training, at several widths: the change
    ``W_t - W_0`` in units of the initial entries' standard deviation, one shared colour scale.
    Narrow networks visibly rewire; at width 1000 the matrix barely moves (lazy training).
    A panel whose largest change is under 15% of the colour scale says so in words (its
    largest change in units of the initial spread), so that "nothing visible" is not mistaken
    for a missing picture.

    Args:
      result: what :func:`ntkit._dynamics_demo.weight_changes` returns (per width the final
        relative weight change and the matrix's change at every record).
      n_frames: columns (times) in the figure; gif_path: also write a GIF over all records.

    Example: ``weight_matrices(weight_changes(widths=(10, 100, 1000)), path='weights.png')``.
    """
    _check_count(n_frames, "n_frames", 2)
    runs = result.runs
    rec_steps = list(runs[0][2])
    cols = [rec_steps[round(i * (len(rec_steps) - 1) / (n_frames - 1))] for i in range(n_frames)]
    vmax = max(float(d[rec_steps[-1]].abs().max()) for _, _, d in runs) or 1.0
    fig, axes = _figure(n_frames, len(runs), size=(2.2, 2.2))
    ims = []
    for r, (w, rel, d) in enumerate(runs):
        row = []
        for c, s in enumerate(cols):
            ax = axes[r, c]
            im = ax.imshow(d[s].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {s}", fontsize=_FS["title"])
            if c == 0:
                ax.set_ylabel(f"width {w}\n|Δθ|/|θ0|={rel:.2g}",
                              fontsize=_FS["label"])
            peak = float(d[s].abs().max())
            if peak < _FAINT * vmax:           # would look empty: say what is there
                msg = ("W_0: no change yet" if s == rec_steps[0] else
                       f"max |ΔW| = {peak:.2g} sd\n= {100 * peak / vmax:.2g}% of the\n"
                       f"colour scale:\ntoo small to see")
                ax.text(0.5, 0.5, msg, transform=ax.transAxes, ha="center", va="center",
                        fontsize=_FS["note"], color="0.25")
            row.append(im)
        ims.append(row)
    fig.colorbar(ims[0][0], ax=axes, shrink=0.8, label="(W_t - W_0) / sd(W_0)")
    fig.suptitle("hidden weight matrix change during training", fontsize=_FS["suptitle"])
    save(fig, path)
    if gif_path is not None:
        gfig, gax = _figure(len(runs), 1, size=(2.6, 2.8))
        gims, notes = [], []
        for c, (w, _, d) in enumerate(runs):
            gims.append(gax[0, c].imshow(d[rec_steps[0]].numpy(), cmap="RdBu_r", vmin=-vmax,
                                         vmax=vmax, interpolation="nearest"))
            gax[0, c].set_title(f"width {w}", fontsize=_FS["title"])
            gax[0, c].set_xticks([])
            gax[0, c].set_yticks([])
            gax[0, c].set_xlabel(" ", fontsize=_FS["label"])
            notes.append(gax[0, c].xaxis.label)
        title = gfig.suptitle("")

        def upd(i):
            s = rec_steps[i]
            for im, note, (_, _, d) in zip(gims, notes, runs):
                im.set_data(d[s].numpy())
                note.set_text(f"max |ΔW| = {float(d[s].abs().max()):.2g} sd")
            title.set_text(f"W_t - W_0, step {s}")
            return gims

        _gif(gfig, upd, len(rec_steps), gif_path)
    return fig


# =========================================================================================
# sweep figures
# =========================================================================================

_LABELS = {"jacobian_norm": "gradient norm ||Dh||", "hessian_norm": "Hessian norm ||D²h||",
           "kappa": "kappa", "residual": "residual ||h - y||",
           "rel_weight_change": "relative weight change", "kernel_drift": "kernel drift",
           "lin_gap": "max gap to linearization", "final_loss": "final loss"}


def _cmap(n):
    import matplotlib
    cm = matplotlib.colormaps["viridis"]
    return [cm(0.1 + 0.8 * i / max(n - 1, 1)) for i in range(n)]


def _log_ticks(ax, xvalues):
    """Major x ticks at the swept values, plain labels; no minor tick labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    ax.xaxis.set_major_locator(FixedLocator(xvalues))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def training_curves(sweep, *, path: Optional[str] = None):
    """Loss and relative weight change during training, one curve per swept value (geometric
    mean over seeds). ``sweep``: a :class:`~ntkit.diagnostics.LazySweep` run with ``steps > 0``.
    Example: ``training_curves(width_sweep(arch, x, y, (64, 256)), path='curves.png')``."""
    if not sweep.curves:
        raise ValueError("the sweep has no training curves: run it with steps > 0")
    vals = sorted({c["value"] for c in sweep.curves})
    fig, axes = _figure(3 if any(c["lin_gap"] for c in sweep.curves) else 2, size=(4.0, 3.3))
    keys = [("loss", "training loss"), ("rel_weight_change", "|θ_t - θ_0| / |θ_0|"),
            ("lin_gap", "RMS |f_net - f_lin|")][:axes.shape[1]]
    for color, v in zip(_cmap(len(vals)), vals):
        cs = [c for c in sweep.curves if c["value"] == v]
        steps = cs[0]["steps"]
        for ax, (k, lab) in zip(axes[0], keys):
            data = torch.tensor([c[k] for c in cs], dtype=_F64)
            gm = data.clamp_min(1e-300).log().mean(0).exp()
            mask = gm > 1e-299
            xs = [s for s, ok in zip(steps, mask.tolist()) if ok]
            ax.plot(xs, gm[mask].numpy(), color=color, lw=1.6, label=f"{sweep.kind} {v:g}")
            ax.set_ylabel(lab)
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=_FS["legend"])
    fig.suptitle(f"training by {sweep.kind} ({sweep.parameterization} parameterization, "
                 f"{sweep.settings.get('optimizer', 'GD')})", fontsize=_FS["suptitle"])
    return save(fig, path)


def plot_scaling(sweep, metrics: Optional[Sequence[str]] = None, *, path: Optional[str] = None):
    """Log-log scaling of the lazy-training quantities against width (or alpha): every seed as a
    dot, the fitted line with its slope and 95% CI in the legend, the theoretical slope dashed.
    Default metrics: gradient norm, Hessian norm, kappa (+ relative weight change if trained).
    Example: ``plot_scaling(sweep, path='scaling.png')``."""
    if metrics is None:
        metrics = ["jacobian_norm", "hessian_norm", "kappa"]
        if any(r.get("rel_weight_change") for r in sweep.rows):
            metrics.append("rel_weight_change")
    metrics = list(metrics)
    for m in metrics:
        if m not in _LABELS:
            raise ValueError(f"unknown metric {m!r}; choose from {list(_LABELS)}")
    ncols = len(metrics) if len(metrics) <= 3 else (2 if len(metrics) == 4 else 3)
    nrows = -(-len(metrics) // ncols)
    fig, axes = _figure(ncols, nrows, size=(3.6, 3.2))
    axes = axes.reshape(-1)
    for ax in axes[len(metrics):]:
        ax.remove()
    theory = sweep.theory
    for ax, m in zip(axes, metrics):
        pts = [(r[sweep.kind], r[m]) for r in sweep.rows if r.get(m) and r[m] > 0]
        if not pts:
            ax.set_title(f"{_LABELS[m]}: not measured", fontsize=_FS["title"])
            continue
        xs = torch.tensor([p[0] for p in pts], dtype=_F64)
        ys = torch.tensor([p[1] for p in pts], dtype=_F64)
        ax.loglog(xs.numpy(), ys.numpy(), "o", color="tab:blue", alpha=0.6, ms=4,
                  label="each seed")
        grid = torch.logspace(math.log10(float(xs.min())), math.log10(float(xs.max())), 50,
                              dtype=_F64)
        try:
            s = sweep.slope(m)
            ax.loglog(grid.numpy(), (math.exp(s.intercept) * grid ** s.slope).numpy(),
                      color="tab:red", lw=1.8, label=f"fit: slope {s}")
            if m in theory:
                anchor = math.exp(s.intercept) * float(grid[0]) ** s.slope
                ax.loglog(grid.numpy(), (anchor * (grid / grid[0]) ** theory[m]).numpy(),
                          color="k", ls="--", lw=1.0, label=f"theory {theory[m]:+.2g}")
        except ValueError:
            pass
        _log_ticks(ax, sorted({float(v) for v in xs.tolist()}))
        lo, hi = float(ys.min()), float(ys.max())
        if hi / lo < 10:                       # show at least one decade: flat looks flat
            mid = math.sqrt(lo * hi)
            ax.set_ylim(mid / math.sqrt(10) * 0.8, mid * math.sqrt(10) * 1.25)
        ax.set_xlabel(sweep.kind)
        ax.set_title(_LABELS[m], fontsize=_FS["title"])
        ax.legend(fontsize=_FS["legend"])
    desc = (f"{sweep.parameterization} parameterization" if sweep.kind == "width"
            else ("centered, " if sweep.centered else "not centered, ") + "output scale alpha")
    fig.suptitle(f"lazy-training scales vs {sweep.kind} ({desc})", fontsize=_FS["suptitle"])
    return save(fig, path)


# =========================================================================================
# output scale alpha: one-parameter model, 2-point NTK ellipse
# =========================================================================================

def tangent_model(alphas: Sequence[float] = (1.0, 2.0, 4.0, 16.0), *,
                  h: Callable[[torch.Tensor], torch.Tensor] = torch.sin, w0: float = 0.3,
                  target: float = 1.5, path: Optional[str] = None):
    """A one-parameter model ``alpha (h(w) - h(w0))`` and its tangent at ``w0`` as ``alpha``
    grows (Chizat & Bach). In the normalized coordinate ``s = alpha (w - w0)`` the model is
    ``alpha (h(w0 + s / alpha) - h(w0)) -> h'(w0) s`` (its tangent), and the normalized loss
    ``alpha^2 F_alpha = 1/2 (alpha (h - h(w0)) - y*)^2`` tends to the tangent model's parabola:
    for large ``alpha`` the minimizer is reached by moving ``w`` only ``O(1/alpha)``.

    Example: ``tangent_model((1, 4, 16), path='tangent.png')``.
    """
    al = [float(a) for a in alphas]
    if not al or min(al) <= 0:
        raise ValueError(f"`alphas` must be positive numbers, got {list(alphas)}")
    w0t = torch.tensor(w0, dtype=_F64, requires_grad=True)
    h0t = h(w0t)
    (dh,) = torch.autograd.grad(h0t, w0t)
    slope, h0 = float(dh), float(h0t.detach())
    if slope == 0:
        raise ValueError("h'(w0) = 0: the tangent model is constant; pick another w0")
    s_star = target / slope
    s = torch.linspace(-0.6 * abs(s_star), 1.8 * abs(s_star), 400, dtype=_F64) * math.copysign(
        1, s_star)
    fig, axes = _figure(2, size=(4.4, 3.5))
    colors = _cmap(len(al))
    for c, a in zip(colors, al):
        with torch.no_grad():
            out = a * (h(w0 + s / a) - h0)
        axes[0, 0].plot(s.numpy(), out.numpy(), color=c, lw=1.6, label=f"alpha = {a:g}")
        axes[0, 1].plot(s.numpy(), (0.5 * (out - target) ** 2).numpy(), color=c, lw=1.6,
                        label=f"alpha = {a:g}")
    axes[0, 0].plot(s.numpy(), (slope * s).numpy(), "k--", lw=1.2, label="tangent h'(w0) s")
    axes[0, 0].axhline(target, color="crimson", lw=0.8, ls=":", label="target y*")
    axes[0, 1].plot(s.numpy(), (0.5 * (slope * s - target) ** 2).numpy(), "k--", lw=1.2,
                    label="tangent model")
    axes[0, 0].set_xlabel("s = alpha (w - w0)")
    axes[0, 0].set_ylabel("alpha (h(w) - h(w0))")
    axes[0, 0].set_title("model and its tangent", fontsize=_FS["title"])
    axes[0, 1].set_xlabel("s = alpha (w - w0)")
    axes[0, 1].set_ylabel("alpha² F_alpha(w)")
    axes[0, 1].set_title("normalized loss surface", fontsize=_FS["title"])
    axes[0, 1].set_ylim(-0.02 * target ** 2, 0.75 * target ** 2)
    for ax in axes[0]:
        ax.legend(fontsize=_FS["legend"])
    return save(fig, path)


def _ellipse_xy(center, K, scale, n=100):
    ev, V = torch.linalg.eigh(K)
    root = V @ torch.diag(ev.clamp_min(0).sqrt()) @ V.T
    t = torch.linspace(0, 2 * math.pi, n, dtype=_F64)
    circle = torch.stack([t.cos(), t.sin()])
    pts = center[:, None] + scale * (root @ circle)
    return pts[0].numpy(), pts[1].numpy()


def ntk_ellipse(result, *, n_ellipses: int = 6, path: Optional[str] = None,
                gif_path: Optional[str] = None):
    """The empirical NTK on two training points, a 2x2 matrix drawn as an ellipse, evolving while
    ``alpha (f - f_0)`` is trained on them by GD (loss divided by ``alpha^2``), one panel per
    ``alpha``. The ellipse ``{y + c Theta_t^(1/2) u : |u| = 1}`` is centered on the target, scaled
    so the initial output lies on the first one; the output trajectory (red) runs inside it,
    next to the path of the linearized model, which keeps ``Theta_0`` (dashed). Each panel's
    title gives the kernel's relative change ``|Theta_T - Theta_0| / |Theta_0|`` (Frobenius)
    and the largest distance between the two paths. Lazy (large alpha): the ellipses coincide
    and the path is the linear one; small alpha: the kernel rotates and stretches and the path
    departs from it.

    ``result``: what :func:`ntkit._dynamics_demo.ntk_ellipse` returns. Returns the figure;
    ``fig.ntk_changes`` holds ``(alpha, relative kernel change, max path gap)`` per panel.
    Example: ``ntk_ellipse(_dynamics_demo.ntk_ellipse(alphas=(0.1, 1, 32)), path='e.png')``.
    """
    _check_count(n_ellipses, "n_ellipses", 2)
    runs = result.runs
    fig, axes = _figure(len(runs), size=(3.5, 3.6))
    target = result.target
    for ax, (a, traj, kernels, lin, change, gap) in zip(axes[0], runs):
        K0 = kernels[0][1]
        r0 = traj[0] - target
        scale = float(torch.sqrt(r0 @ torch.linalg.solve(K0, r0)))
        idx = sorted({round((len(kernels) - 1) ** (i / (n_ellipses - 1))) if i else 0
                      for i in range(n_ellipses)})          # log-spaced: early changes show
        colors = _cmap(len(idx))
        for c, i in zip(colors, idx):
            ex, ey = _ellipse_xy(target, kernels[i][1], scale)
            ax.plot(ex, ey, color=c, lw=1.3, label=f"Θ at step {kernels[i][0]}")
        ax.plot(traj[:, 0].numpy(), traj[:, 1].numpy(), "-", color="crimson", lw=1.8,
                label="outputs (f(x1), f(x2))")
        ax.plot(lin[:, 0].numpy(), lin[:, 1].numpy(), "--", color="k", lw=1.2,
                label="linearized model (Θ_0 frozen)")
        ax.plot([float(target[0])], [float(target[1])], "k*", ms=10, label="target")
        ax.plot([float(traj[0, 0])], [float(traj[0, 1])], "ko", ms=4)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("f(x1)")
        ax.set_ylabel("f(x2)")
        ax.set_title(f"alpha = {a:g}\nΘ changes {100 * change:.2g}%, path gap {gap:.2g}",
                     fontsize=_FS["title"])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    ncol = min(4, len(labels))
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=_FS["legend"])
    fig.suptitle("2-point NTK ellipse during training (centered model, output scale alpha)",
                 fontsize=_FS["suptitle"])
    fig.ntk_changes = [(a, change, gap) for a, _, _, _, change, gap in runs]
    save(fig, path)
    if gif_path is not None:
        gfig, gax = _figure(len(runs), size=(3.2, 3.2))
        artists = []
        for ax, (a, traj, kernels, lin, _, _) in zip(gax[0], runs):
            K0 = kernels[0][1]
            r0 = traj[0] - target
            scale = float(torch.sqrt(r0 @ torch.linalg.solve(K0, r0)))
            ex, ey = _ellipse_xy(target, K0, scale)
            ax.plot(ex, ey, color="0.7", lw=1.0)
            ax.plot(lin[:, 0].numpy(), lin[:, 1].numpy(), "--", color="0.4", lw=1.0)
            (ell,) = ax.plot(ex, ey, color="tab:blue", lw=1.6)
            (path_line,) = ax.plot([], [], color="crimson", lw=1.6)
            (dot,) = ax.plot([], [], "o", color="crimson", ms=5)
            ax.plot([float(target[0])], [float(target[1])], "k*", ms=9)
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_title(f"alpha = {a:g}", fontsize=_FS["title"])
            artists.append((ell, path_line, dot, traj, kernels, scale))
        n_frames = min(len(r[2]) for r in runs)

        def upd(i):
            out = []
            for ell, pl, dot, traj, kernels, scale in artists:
                ex, ey = _ellipse_xy(target, kernels[i][1], scale)
                ell.set_data(ex, ey)
                j = kernels[i][0]                   # step of this frame
                pl.set_data(traj[:j + 1, 0].numpy(), traj[:j + 1, 1].numpy())
                dot.set_data([float(traj[j, 0])], [float(traj[j, 1])])
                out += [ell, pl, dot]
            return out

        _gif(gfig, upd, n_frames, gif_path)
    return fig


# =========================================================================================
# eigenmodes, kernel vs network
# =========================================================================================

def eigenmode_decay(k_train_train: Any, y_train: Any, *, fx_train_0: Any = 0.0,
                    learning_rate: float = 1.0, t: Any = None, n_modes: int = 5,
                    network_steps: Any = None, network_outputs: Any = None,
                    discrete: bool = False, path: Optional[str] = None):
    """Per-mode residual decay under gradient flow: mode ``i`` of ``Theta`` shrinks as
    ``exp(-lambda_i lr t / N)`` (:func:`ntkit.predict.eigenmodes`), so top modes are learned
    first. Optional dots: a trained network's residual ``f_t - y`` projected on the same modes
    (``network_outputs`` ``(R, n, k)`` at ``network_steps`` ``(R,)``), normalized by its value at
    step 0. ``discrete=True``: theory for gradient-descent steps of size ``learning_rate``,
    ``|1 - lr lambda_i / N|^t`` at integer ``t`` (exact for GD on the linear model).

    Example: ``eigenmode_decay(ntk_dd, y, learning_rate=lr, t=torch.logspace(0, 4, 60))``.
    """
    _check_count(n_modes, "n_modes")
    modes = eigenmodes(k_train_train, y_train, fx_train_0=fx_train_0,
                       learning_rate=learning_rate)
    lam = modes.eigenvalues
    if t is None:
        ts = modes.timescales[:n_modes]
        hi = float(ts[torch.isfinite(ts)].max()) if torch.isfinite(ts).any() else 1e3
        t = torch.logspace(math.log10(max(hi, 1.0)) - 3, math.log10(max(hi, 1.0)) + 1, 80,
                           dtype=_F64)
    t = torch.as_tensor(t, dtype=_F64)
    k = min(n_modes, lam.numel())
    fig, axes = _figure(2, size=(4.4, 3.4))
    ax = axes[0, 0]
    colors = _cmap(k)
    if discrete:
        t = torch.unique(torch.clamp(torch.round(t), min=1.0))
        factor = (1.0 - learning_rate * lam / modes.size).abs()
        decay = factor[None, :] ** t[:, None]                 # (T, n)
    else:
        decay = modes.decay(t)                                 # (T, n)
    for i in range(k):
        ax.plot(t.numpy(), decay[:, i].numpy(), color=colors[i], lw=1.6,
                label=f"mode {i + 1}: λ={float(lam[i]):.3g}")
    if network_outputs is not None:
        outs = torch.as_tensor(network_outputs, dtype=_F64)
        st = torch.as_tensor(network_steps, dtype=_F64)
        y = torch.as_tensor(y_train, dtype=_F64).reshape(outs.shape[1:])
        proj = torch.einsum("ni,rnk->rik", modes.eigenvectors, outs - y)   # (R, n, k)
        mag = proj.norm(dim=-1)
        rel = mag / mag[0].clamp_min(1e-300)
        for i in range(k):
            ax.plot(st.numpy(), rel[:, i].numpy(), "o", color=colors[i], ms=3.5,
                    alpha=0.8)
        ax.plot([], [], "ko", ms=3.5, label="trained network")
    ax.set_xscale("log")
    ax.set_xlabel("GD steps" if discrete else "time t (learning-rate units)")
    ax.set_ylabel("mode residual / initial")
    ax.set_title("eigenmode decay", fontsize=_FS["title"])
    ax.legend(fontsize=_FS["legend"])
    ax2 = axes[0, 1]
    ax2.semilogy(range(1, lam.numel() + 1), lam.clamp_min(1e-300).numpy(), ".-", ms=3)
    ax2.set_xlabel("mode index")
    ax2.set_ylabel("NTK eigenvalue")
    ax2.set_title("spectrum", fontsize=_FS["title"])
    return save(fig, path)


def dynamics_comparison(result, *, path: Optional[str] = None):
    """Distance between trained networks and the kernel prediction vs width (log-log), one line
    per step count, from :func:`ntkit._dynamics_demo.train_and_compare`, with the theory slope
    ``-1/2``. Example: ``dynamics_comparison(train_and_compare(arch, ...), path='dist.png')``."""
    w = result.widths.numpy()
    fig, axes = _figure(2, size=(4.2, 3.4))
    colors = _cmap(len(result.steps))
    for ax, data, slopes, name in ((axes[0, 0], result.train_rms, result.slopes_train, "train"),
                                   (axes[0, 1], result.test_rms, result.slopes_test, "test")):
        for j, s in enumerate(result.steps.tolist()):
            ax.loglog(w, data[:, j].numpy(), "o-", color=colors[j], lw=1.4,
                      label=f"step {int(s)}: slope {float(slopes[j]):+.2f}")
        ref = data[0, -1] * (result.widths / result.widths[0]) ** -0.5
        ax.loglog(w, ref.numpy(), "k--", lw=1.0, label="width^-1/2")
        _log_ticks(ax, w.tolist())
        ax.set_xlabel("width")
        ax.set_ylabel(f"RMS |f_net - f_NTK| ({name})")
        ax.set_title(f"{name} outputs", fontsize=_FS["title"])
        ax.legend(fontsize=_FS["legend"])
    fig.suptitle(f"real networks vs NTK prediction (GD, lr={result.learning_rate:.3g})",
                 fontsize=_FS["suptitle"])
    return save(fig, path)


def trajectories(result, *, path: Optional[str] = None):
    """Output of one test example during full-batch GD for networks of several widths (solid)
    next to the NTK prediction for that very network (same initial outputs, same steps: dashed,
    :func:`ntkit.predict.gradient_descent_mse_discrete`). The curves merge as width grows.

    ``result``: what :func:`ntkit._dynamics_demo.trajectories` returns.
    Example: ``trajectories(_dynamics_demo.trajectories(arch, x, y, xt), path='traj.png')``.
    """
    r = result
    fig, axes = _figure(len(r.runs), size=(3.3, 3.1), sharey=True)
    for ax, (w, actual, pred) in zip(axes[0], r.runs):
        ax.plot(r.steps, actual, color="tab:blue", lw=2, label="network")
        ax.plot(r.steps, pred, color="k", ls="--", lw=1.3, label="NTK prediction")
        gap = max(abs(a - p) for a, p in zip(actual, pred))
        ax.set_title(f"width {w}: max gap {gap:.2g}", fontsize=_FS["title"])
        ax.set_xlabel("GD step")
    axes[0, 0].set_ylabel(f"f(x_test[{r.example}])[{r.output}]")
    axes[0, 0].legend(fontsize=_FS["legend"])
    return save(fig, path)
