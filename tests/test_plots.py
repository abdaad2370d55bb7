"""Figures are built headless (Agg, no pyplot) and checked for content: axes, series, data; and
for readability on the report's page: text at least MIN_TEXT_PX rendered, every log axis with at
least three labelled ticks in view, near-empty panels that say so."""
import math

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from ntkit import diagnostics as dg  # noqa: E402
from ntkit import layers as nl  # noqa: E402
from ntkit import _dynamics_demo as dd  # noqa: E402
from ntkit import plots  # noqa: E402
from ntkit.report import MIN_TEXT_PX, PAGE_WIDTH_PX, smallest_text_px  # noqa: E402

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def lines_with_data(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 0
            and all(math.isfinite(float(v)) for v in ln.get_ydata())]


def labelled_ticks(axis):
    """Tick labels that are drawn (non-empty, inside the view) on ``axis`` after a draw."""
    lo, hi = sorted(axis.get_view_interval())
    n = 0
    for loc, fmt in ((axis.get_major_locator(), axis.get_major_formatter()),
                     (axis.get_minor_locator(), axis.get_minor_formatter())):
        locs = [v for v in loc() if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
        fmt.set_locs(locs)
        n += sum(1 for i, v in enumerate(locs) if fmt(v, i).strip())
    return n


def assert_readable(fig):
    """Readable in the report: not scaled down by the page, text >= MIN_TEXT_PX there, and
    every log axis carries at least three labelled ticks."""
    assert fig.get_figwidth() * 100 <= PAGE_WIDTH_PX
    assert smallest_text_px(fig) >= MIN_TEXT_PX          # (draws the figure)
    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                assert labelled_ticks(axis) >= 3, (ax.get_title(), axis.axis_name)


@pytest.fixture(scope="module")
def sweep():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    arch = nl.serial(nl.Dense(32), nl.Erf(), nl.Dense(1))
    return dg.width_sweep(arch, x, y, widths=(16, 64, 256), seeds=(0, 1), steps=20,
                          learning_rate=1.0, hessian_steps=15)


def test_init_functions_is_a_gp_draw(tmp_path):
    fig = plots.init_functions(dd.init_functions(n_nets=5, width=128),
                               path=str(tmp_path / "init.png"))
    assert_readable(fig)
    assert fig.axes[0].get_title().startswith("5 random networks")
    one = plots.init_functions(dd.init_functions(n_nets=1, width=16))
    assert one.axes[0].get_title().startswith("1 random network of")   # grammar
    ax = fig.axes[0]
    assert len(lines_with_data(ax)) == 5 and len(ax.collections) == 1   # nets + NNGP band
    assert (tmp_path / "init.png").stat().st_size > 5000
    # the band is the NNGP's +-2 sd: the networks' spread must be of that size
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() > 0.3 and band.min() < -0.3


def test_trained_functions_fit_the_points():
    fig = plots.trained_functions(dd.trained_functions(n_nets=3, width=128, steps=200))
    assert_readable(fig)
    ax = fig.axes[0]
    nets = [ln for ln in lines_with_data(ax) if ln.get_linestyle() == "-"]
    assert len(nets) == 3
    pts = [ln for ln in ax.get_lines() if ln.get_marker() == "o"][0]
    xt, yt = pts.get_xdata(), pts.get_ydata()
    for ln in nets:       # every trained network passes near the training points
        xs, ys = ln.get_xdata(), ln.get_ydata()
        for a, b in zip(xt, yt):
            i = abs(xs - a).argmin()
            assert abs(ys[i] - b) < 0.2


def test_weight_matrices_and_gif(tmp_path):
    gif = str(tmp_path / "w.gif")
    fig = plots.weight_matrices(dd.weight_changes(widths=(10, 100), steps=20), n_frames=3,
                                gif_path=gif if plots.has_gif_support() else None)
    assert_readable(fig)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 6                               # 2 widths x 3 times
    first = images[0].get_array()
    assert abs(first).max() == 0                          # step 0: no change yet
    narrow_last, wide_last = images[2].get_array(), images[5].get_array()
    assert abs(narrow_last).max() > 5 * abs(wide_last).max()   # wide networks move less
    if plots.has_gif_support():
        with open(gif, "rb") as f:
            assert f.read(6) in (b"GIF87a", b"GIF89a")


def test_scaling_and_training_curves(sweep, tmp_path):
    fig = plots.plot_scaling(sweep, path=str(tmp_path / "s.svg"))
    assert_readable(fig)
    assert len(fig.axes) == 4                             # grad, Hessian, kappa, weight change
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert len(lines_with_data(ax)) >= 2              # dots + fitted line (+ theory)
        dots = lines_with_data(ax)[0]
        assert len(dots.get_xdata()) == 6                 # 3 widths x 2 seeds
    assert "slope" in fig.axes[2].get_legend().get_texts()[1].get_text()
    assert open(tmp_path / "s.svg").read(200).lstrip().startswith("<?xml")
    fig = plots.training_curves(sweep)
    assert_readable(fig)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert len(lines_with_data(ax)) == 3              # one curve per width


def test_tangent_model_converges_to_tangent():
    fig = plots.tangent_model((1, 4, 64))
    assert_readable(fig)
    ax = fig.axes[0]
    curves = lines_with_data(ax)
    assert len(curves) == 5                               # 3 alphas, tangent, target
    tangent = curves[3].get_ydata()
    gaps = [abs(c.get_ydata() - tangent).max() for c in curves[:3]]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05 * gaps[0]


def test_ntk_ellipse_lazy_for_large_alpha(tmp_path):
    fig = plots.ntk_ellipse(dd.ntk_ellipse(alphas=(0.25, 16.0), steps=40), n_ellipses=3,
                            gif_path=str(tmp_path / "e.gif") if plots.has_gif_support() else None)
    assert_readable(fig)
    assert len(fig.axes) == 2
    for ax in fig.axes:       # ellipses + path, linearized path, target, start
        assert len(lines_with_data(ax)) == 3 + 4

    def spread(ax):      # how much the ellipses differ from the first one
        ells = lines_with_data(ax)[:3]
        return max(abs(e.get_xdata() - ells[0].get_xdata()).max() for e in ells)

    def path_gap(ax):    # largest distance between the network's path and the linearized one
        net, lin = lines_with_data(ax)[3:5]
        return max(math.hypot(a - c, b - d) for a, b, c, d in zip(
            net.get_xdata(), net.get_ydata(), lin.get_xdata(), lin.get_ydata()))
    assert spread(fig.axes[1]) < 0.2 * spread(fig.axes[0])
    # what the caption claims, measured: the kernel moves and the path leaves the linear one
    # for small alpha; both frozen for large alpha
    (a0, ch0, gap0), (a1, ch1, gap1) = fig.ntk_changes
    assert (a0, a1) == (0.25, 16.0) and ch1 < 0.2 * ch0 and gap1 < 0.2 * gap0
    assert math.isclose(path_gap(fig.axes[0]), gap0, rel_tol=1e-9)
    assert math.isclose(path_gap(fig.axes[1]), gap1, rel_tol=1e-9)
    for ax in fig.axes:       # the linearized model (GD on a fixed kernel) reaches the target
        lin = lines_with_data(ax)[4]
        assert abs(lin.get_xdata()[-1] - 1.0) < 0.05 and abs(lin.get_ydata()[-1] + 0.3) < 0.05
    assert "%" in fig.axes[0].get_title()


def test_weight_matrices_say_when_nothing_visible_moves():
    fig = plots.weight_matrices(dd.weight_changes(widths=(10, 300), steps=20), n_frames=2)
    axes = [ax for ax in fig.axes if ax.get_images()]
    last_narrow, first_wide, last_wide = axes[1], axes[2], axes[3]
    scale = float(last_narrow.get_images()[0].get_array().__abs__().max())
    peak = float(abs(last_wide.get_images()[0].get_array()).max())
    assert peak < 0.15 * scale                            # would look blank ...
    (note,) = [t.get_text() for t in last_wide.texts]     # ... so it says what is there
    assert f"{peak:.2g} sd" in note and "too small to see" in note
    assert f"{100 * peak / scale:.2g}%" in note
    assert "no change yet" in first_wide.texts[0].get_text()
    assert not last_narrow.texts                          # visible change: no words on it


def test_log_ticks_label_at_least_three_values():
    loc = plots._LogTicks()
    for lo, hi in ((0.03, 0.2), (1.0, 30.0), (1e-5, 1e3), (1.1, 1.3), (0.045, 0.061),
                   (2e-3, 9e-3), (1e-300, 1.0)):
        ticks = loc.tick_values(lo, hi)
        assert len(ticks) >= 3, (lo, hi, ticks)
        assert all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks), (lo, hi, ticks)
        assert len(ticks) <= 12
    assert [plots._log_formatter(v) for v in (0.05, 1.0, 300.0, 1e-5, 2e-5)] == [
        "0.05", "1", "300", "$10^{-5}$", "$2{\\times}10^{-5}$"]


def test_dynamics_figures_readable():
    from ntkit._dynamics_demo import train_and_compare
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=F64)
    xt = torch.randn(4, 3, generator=g, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    arch = nl.serial(nl.Dense(64, W_std=1.5, b_std=0.1), nl.Relu(), nl.Dense(1, W_std=1.5))
    res = train_and_compare(arch, x, y, xt, widths=(16, 64, 256), steps=(2, 5), seeds=(0,))
    fig = plots.dynamics_comparison(res)
    assert_readable(fig)
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    fig = plots.trajectories(dd.trajectories(arch, x, y, xt, widths=(16, 64), steps=5))
    assert_readable(fig)


def test_eigenmode_decay_with_network_dots():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=F64)
    y = torch.randn(8, 1, generator=g, dtype=F64)
    arch = nl.serial(nl.Dense(64), nl.Relu(), nl.Dense(1))
    k = arch.kernel(x, get="ntk")
    t = torch.logspace(-1, 3, 30, dtype=F64)
    outs = torch.stack([y + (0.5 ** s) for s in range(4)])
    fig = plots.eigenmode_decay(k, y, t=t, n_modes=3, network_steps=[0, 1, 2, 3],
                                network_outputs=outs)
    assert_readable(fig)
    ax = fig.axes[0]
    curves = lines_with_data(ax)
    assert len(curves) == 3 + 3                           # theory + network dots per mode
    top = curves[0].get_ydata()
    assert top[0] > 0.9 and top[-1] < 1e-3 and (top[1:] <= top[:-1] + 1e-15).all()
    assert fig.axes[1].get_yscale() == "log"
    # discrete GD theory: mode i shrinks by |1 - lr lam_i / N| per step (lam from eigvalsh)
    lr = 0.7
    fig = plots.eigenmode_decay(k, y, learning_rate=lr, t=torch.arange(1, 6.0), n_modes=2,
                                discrete=True)
    lam = torch.linalg.eigvalsh(k).flip(0)
    top = lines_with_data(fig.axes[0])[0]
    expect = (1 - lr * lam[0] / 8).abs() ** torch.arange(1, 6, dtype=F64)
    assert list(top.get_xdata()) == [1, 2, 3, 4, 5]
    assert torch.allclose(torch.as_tensor(top.get_ydata(), dtype=F64), expect.to(F64), rtol=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="path"):
        plots.tangent_model(path="fig.bmp")
    with pytest.raises(ValueError, match="alphas"):
        plots.tangent_model((0, 1))
    with pytest.raises(ValueError, match="x_range"):
        dd.init_functions(x_range=(1, 0))


def test_plots_only_draws():
    """Issue 17: the figures train nothing and import no engine; their experiments do."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(plots))
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"backward", "SGD", "step", "optim"}
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not mods & {"diagnostics", "empirical", "layers", "_dynamics_demo"}, mods


def _gd(net, x, y, lr, steps, scale=1.0, watch=None):
    """The loop plots.py used to run (full-batch GD on scale * 1/2 mean (f - y)^2)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    seen = []
    for s in range(steps + 1):
        if watch is not None:
            with torch.no_grad():
                seen.append(watch(net))
        if s == steps:
            break
        opt.zero_grad(set_to_none=True)
        (0.5 * ((net(x) - y) ** 2).mean() * scale).backward()
        opt.step()
    return seen


def test_figure_experiments_match_a_hand_written_gd_loop():
    """The experiments train through diagnostics.train: same networks as a plain GD loop."""
    from ntkit import predict
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=F64)
    xt = torch.randn(3, 2, generator=g, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    arch = nl.serial(nl.Dense(8, W_std=1.5, b_std=0.1), nl.Erf(), nl.Dense(1, W_std=1.5))
    res = dd.trajectories(arch, x, y, xt, widths=(8, 32), steps=12, example=1)
    lr = 0.5 * predict.max_learning_rate(arch.kernel(x, get="ntk"), y.numel())
    for w, actual, _ in res.runs:
        net = arch.module(in_shape=2, width=w, seed=0)
        ref = _gd(net, x, y, lr, 12, watch=lambda n: float(n(xt[1:2])[0, 0]))
        assert actual == pytest.approx([ref[s] for s in res.steps], rel=1e-12, abs=1e-14)
    # the ellipse: alpha (f - f_0) trained on the loss divided by alpha^2
    from ntkit.empirical import centered, empirical_ntk, scaled
    ell = dd.ntk_ellipse(alphas=(0.5,), steps=15)
    a, traj, kernels, lin, _, _ = ell.runs[0]
    x2 = torch.tensor([[1.0, 0.2], [0.7, 0.7]], dtype=F64)
    y2 = torch.tensor([[1.0], [-0.3]], dtype=F64)
    ea = nl.serial(nl.Dense(16, W_std=1.5, b_std=0.2), nl.Erf(), nl.Dense(1, W_std=1.5))
    base = ea.module(in_shape=2, width=16, seed=0)
    net = scaled(centered(base), a)
    k0 = empirical_ntk(net, x2, dtype=F64) / a ** 2
    assert torch.allclose(kernels[0][1], k0, rtol=1e-12)
    lr = 0.3 * 2 * 2 / float(torch.linalg.eigvalsh(k0)[-1])
    ref = torch.stack(_gd(net, x2, y2, lr, 15, 1 / a ** 2, watch=lambda n: n(x2)[:, 0].clone()))
    assert torch.allclose(traj, ref, rtol=1e-10, atol=1e-13)
    assert [s for s, _ in kernels] == list(range(16))        # rec_every = max(1, 15 // 20)
