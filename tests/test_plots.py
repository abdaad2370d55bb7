"""Figures are built headless (Agg, no pyplot) and checked for content: axes, series, data."""
import math

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from ntkit import diagnostics as dg  # noqa: E402
from ntkit import layers as nl  # noqa: E402
from ntkit import plots  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def lines_with_data(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 0
            and all(math.isfinite(float(v)) for v in ln.get_ydata())]


@pytest.fixture(scope="module")
def sweep():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    arch = nl.serial(nl.Dense(32), nl.Erf(), nl.Dense(1))
    return dg.width_sweep(arch, x, y, widths=(16, 64, 256), seeds=(0, 1), steps=20,
                          learning_rate=1.0, hessian_steps=15)


def test_init_functions_is_a_gp_draw(tmp_path):
    fig = plots.init_functions(n_nets=5, width=128, path=str(tmp_path / "init.png"))
    ax = fig.axes[0]
    assert len(lines_with_data(ax)) == 5 and len(ax.collections) == 1   # nets + NNGP band
    assert (tmp_path / "init.png").stat().st_size > 5000
    # the band is the NNGP's +-2 sd: the networks' spread must be of that size
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() > 0.3 and band.min() < -0.3


def test_trained_functions_fit_the_points():
    fig = plots.trained_functions(n_nets=3, width=128, steps=200)
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
    fig = plots.weight_matrices(widths=(10, 100), steps=20, n_frames=3,
                                gif_path=gif if plots.has_gif_support() else None)
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
    fig = sweep.plot(str(tmp_path / "s.svg"))
    assert len(fig.axes) == 4                             # grad, Hessian, kappa, weight change
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert len(lines_with_data(ax)) >= 2              # dots + fitted line (+ theory)
        dots = lines_with_data(ax)[0]
        assert len(dots.get_xdata()) == 6                 # 3 widths x 2 seeds
    assert "slope" in fig.axes[2].get_legend().get_texts()[1].get_text()
    assert open(tmp_path / "s.svg").read(200).lstrip().startswith("<?xml")
    fig = plots.training_curves(sweep)
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert len(lines_with_data(ax)) == 3              # one curve per width


def test_tangent_model_converges_to_tangent():
    fig = plots.tangent_model((1, 4, 64))
    ax = fig.axes[0]
    curves = lines_with_data(ax)
    assert len(curves) == 5                               # 3 alphas, tangent, target
    tangent = curves[3].get_ydata()
    gaps = [abs(c.get_ydata() - tangent).max() for c in curves[:3]]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05 * gaps[0]


def test_ntk_ellipse_lazy_for_large_alpha(tmp_path):
    fig = plots.ntk_ellipse(alphas=(0.25, 16.0), steps=60, n_ellipses=3,
                            gif_path=str(tmp_path / "e.gif") if plots.has_gif_support() else None)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(lines_with_data(ax)) == 3 + 3          # ellipses + path, target, start

    def spread(ax):      # how much the ellipses differ from the first one
        ells = lines_with_data(ax)[:3]
        return max(abs(e.get_xdata() - ells[0].get_xdata()).max() for e in ells)
    assert spread(fig.axes[1]) < 0.2 * spread(fig.axes[0])


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
        plots.init_functions(x_range=(1, 0))
