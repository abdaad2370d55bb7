"""``ntkit demo``: the main job on an embedded data set (scikit-learn's bundled 8x8 digits).

1. Computes the exact NNGP and NTK of a default ReLU MLP, does kernel regression on one-hot
   targets and prints a table of test accuracy, kernel time and data size.
2. Writes one self-contained HTML report (:func:`build_report`) comparing the theory with real
   training on digits: network outputs vs the NTK prediction by width (distances, fitted slope,
   trajectories), an accuracy table (kernels vs trained networks), lazy-training scaling with
   width (NTK and standard parameterization) and output scale alpha with fitted slopes, and the
   figures that explain the picture (GP at init, trained ensembles, weights during training, the
   tangent model, the NTK ellipse, eigenmode decay).

``ntkit demo --quick`` runs a reduced version (about a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["load_digits_split", "default_arch", "kernel_regression_table", "build_report",
           "register"]


def load_digits_split(n_train: int = 1200, seed: int = 0):
    """Digits (1797 x 64, 10 classes): pixels centered, each row scaled to mean square 1.

    Returns ``x_train, y_train, x_test, y_test`` (float64 tensors, integer labels).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the demo needs scikit-learn: pip install 'ntkit[all]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16.0
    x = x - x.mean(0)
    x = x / x.norm(dim=1, keepdim=True) * np.sqrt(x.shape[1])   # each row: mean square 1
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if not 10 <= n_train < len(x):
        raise ValueError(f"`n_train` must be between 10 and {len(x) - 1}, got {n_train}")
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def default_arch(depth: int = 3, width: int = 512):
    """ReLU MLP with ``depth`` hidden layers, ``W_std^2 = 2``, small bias, 10 outputs."""
    from . import layers as nl
    hidden = []
    for _ in range(depth):
        hidden += [nl.Dense(width, W_std=2 ** 0.5, b_std=0.1), nl.Relu()]
    return nl.serial(*hidden, nl.Dense(10, W_std=1.0, b_std=0.1))


def _krr_predict(k_tt: torch.Tensor, k_st: torch.Tensor, y: torch.Tensor, reg: float):
    """Kernel regression ``k_st (k_tt + reg * mean(diag) I)^-1 y`` in float64."""
    n = k_tt.shape[0]
    a = k_tt + reg * torch.diagonal(k_tt).mean() * torch.eye(n, dtype=k_tt.dtype)
    chol = torch.linalg.cholesky(a)
    return k_st @ torch.cholesky_solve(y, chol)


def kernel_regression_table(n_train: int = 1200, depth: int = 3, reg: float = 1e-4,
                            progress: bool = True) -> List[Dict]:
    """Rows of {kernel, test_accuracy, kernel_seconds, n_train, n_test, dim}."""
    x_tr, y_tr, x_te, y_te = load_digits_split(n_train)
    arch = default_arch(depth)
    y = torch.nn.functional.one_hot(y_tr, 10).double() - 0.1
    x_all = torch.cat([x_tr, x_te])
    t0 = time.perf_counter()
    k = arch.kernel(x_all, get=("nngp", "ntk"), progress=progress, tile=512)
    secs = time.perf_counter() - t0
    n = len(x_tr)
    rows = []
    for name in ("nngp", "ntk"):
        kk = getattr(k, name)
        pred = _krr_predict(kk[:n, :n], kk[n:, :n], y, reg)
        acc = float((pred.argmax(1) == y_te).double().mean())
        rows.append(dict(kernel=name.upper(), test_accuracy=acc, kernel_seconds=secs,
                         n_train=n, n_test=len(x_te), dim=x_tr.shape[1]))
    return rows


def _print_table(rows: List[Dict]) -> None:
    print(f"{'kernel':<8}{'test acc':>10}{'kernel s':>10}{'n_train':>9}{'n_test':>8}{'dim':>5}")
    for r in rows:
        print(f"{r['kernel']:<8}{r['test_accuracy']:>10.4f}{r['kernel_seconds']:>10.2f}"
              f"{r['n_train']:>9d}{r['n_test']:>8d}{r['dim']:>5d}")



# =========================================================================================
# the report
# =========================================================================================

def _settings(quick: bool) -> Dict:
    if quick:
        return dict(n_dyn=160, m_dyn=100, dyn_widths=(64, 256, 1024), dyn_steps=(10, 30),
                    dyn_seeds=(0,), n_lazy=16, lazy_widths=(32, 128, 512), lazy_seeds=(0, 1),
                    lazy_steps=30, alphas=(1.0, 8.0, 64.0), alpha_width=128, nets=4,
                    fn_steps=150, w_steps=60, e_steps=120, gif=False)
    return dict(n_dyn=400, m_dyn=300, dyn_widths=(128, 512, 2048, 8192), dyn_steps=(10, 30, 100),
                dyn_seeds=(0, 1), n_lazy=32, lazy_widths=(64, 256, 1024, 4096),
                lazy_seeds=(0, 1, 2), lazy_steps=100, alphas=(1.0, 4.0, 16.0, 64.0),
                alpha_width=256, nets=8, fn_steps=600, w_steps=300, e_steps=400, gif=True)


def _dyn_arch(width: int = 512):
    from . import layers as nl
    return nl.serial(nl.Dense(width, W_std=2 ** 0.5, b_std=0.1), nl.Relu(),
                     nl.Dense(10, W_std=1.0, b_std=0.1))


def _accuracy_rows(arch, x_tr, Y, x_te, lab_te, widths, steps, lr):
    """Test accuracy / RMSE of kernel predictions and of networks trained ``steps`` GD steps,
    and how often each network's predicted class equals that of its own NTK prediction (same
    initial outputs f_0, same steps)."""
    from . import predict
    k_dd = arch.kernel(x_tr, get="ntk")
    k_td = arch.kernel(x_te, x_tr, get="ntk")
    nngp = arch.kernel(torch.cat([x_tr, x_te]), get="nngp")
    n = len(x_tr)
    y_te = torch.nn.functional.one_hot(lab_te, 10).double() - 0.1
    rows = []

    def add(name, pred, ref=None):
        agree = None if ref is None else float((pred.argmax(1) == ref.argmax(1)).double().mean())
        rows.append({"model": name,
                     "test accuracy": float((pred.argmax(1) == lab_te).double().mean()),
                     "test RMSE": float(((pred - y_te) ** 2).mean().sqrt()),
                     "same class as its NTK prediction": agree})
    add("NNGP regression (t = inf)", _krr_predict(nngp[:n, :n], nngp[n:, :n], Y, 1e-6))
    add("NTK regression (t = inf)", predict.gradient_descent_mse(k_dd, Y)(None, None, 0.0, k_td))
    pf = predict.gradient_descent_mse_discrete(k_dd, Y, learning_rate=lr)
    add(f"NTK-GP mean after {steps} GD steps (f_0 = 0)", pf(steps, None, 0.0, k_td))
    for w in widths:
        net = arch.module(in_shape=x_tr.shape[1], width=int(w), seed=0)
        with torch.no_grad():
            f0, g0 = net(x_tr), net(x_te)
        _, ref = pf(steps, f0, g0, k_td)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            (0.5 * ((net(x_tr) - Y) ** 2).mean()).backward()
            opt.step()
        with torch.no_grad():
            add(f"network, width {w}, {steps} GD steps", net(x_te), ref)
    return rows


def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` principal components, each scaled to mean square 1."""
    xc = x - x.mean(0)
    _, _, vt = torch.linalg.svd(xc, full_matrices=False)
    z = xc @ vt[:k].T
    return z / z.pow(2).mean(0).sqrt()


class _threads:
    """Run small-network work on one thread (tiny ops lose to thread sync, badly so on a busy
    machine); restores the previous setting."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _slope_rows(sweep, label):
    th = sweep.theory
    rows = []
    for m, s in sweep.slopes.items():
        if m in ("residual", "final_loss"):
            continue
        rows.append(dict(sweep=label, metric=m, slope=s.slope, ci_low=s.low, ci_high=s.high,
                         theory=th.get(m)))
    return rows


def _lecun_factory(d: int):
    from torch import nn

    def make(width: int):
        net = nn.Sequential(nn.Linear(d, width, bias=False), nn.Tanh(),
                            nn.Linear(width, 1, bias=False))
        with torch.no_grad():
            net[0].weight.normal_(0.0, d ** -0.5)        # LeCun: variance 1 / fan_in
            net[2].weight.normal_(0.0, width ** -0.5)
        return net.double()
    return make


def build_report(path: str, *, quick: bool = False, kernel_rows: Optional[List[Dict]] = None,
                 progress: bool = True, log=print) -> str:
    """Write the demo's self-contained HTML report to ``path`` and return ``path``.

    ``quick=True`` shrinks every experiment (about a minute on 2 cores); ``kernel_rows`` are the
    rows of :func:`kernel_regression_table` (included as the first table when given).
    """
    import os
    from . import diagnostics as dg, layers as nl, plots, predict
    from ._dynamics_demo import train_and_compare
    from .report import Report
    S = _settings(quick)
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output folder does not exist: {out_dir}")
    rep = Report("ntkit: neural tangent kernels vs real training on digits",
                 "Exact infinite-width kernels, the training dynamics they predict, and how lazy "
                 "real networks are, measured on scikit-learn's bundled 8x8 digits"
                 + (" (quick run: reduced sizes)." if quick else "."))
    t_all = time.perf_counter()
    if kernel_rows:
        rep.heading("1. Kernel regression")
        rep.text("Exact NNGP and NTK of a ReLU MLP (closed-form arc-cosine recursion), kernel "
                 "regression on one-hot targets (ridge 1e-4 relative to the mean diagonal).")
        rep.table(kernel_rows)

    # ---- 2. real networks vs the kernel prediction ------------------------------------
    log("[report] training networks of increasing width against the NTK prediction ...")
    x_tr, lab_tr, x_te, lab_te = load_digits_split(S["n_dyn"], seed=1)
    x_te, lab_te = x_te[:S["m_dyn"]], lab_te[:S["m_dyn"]]
    Y = torch.nn.functional.one_hot(lab_tr, 10).double() - 0.1
    Y_te = torch.nn.functional.one_hot(lab_te, 10).double() - 0.1
    arch = _dyn_arch()
    res = train_and_compare(arch, x_tr, Y, x_te, widths=S["dyn_widths"], steps=S["dyn_steps"],
                            seeds=S["dyn_seeds"], y_test=Y_te, progress=False)
    log(res.to_text())
    rep.heading("2. Real networks vs the NTK prediction")
    rep.text(f"One-hidden-layer ReLU networks (NTK parameterization, 10 outputs) trained by "
             f"full-batch gradient descent on {S['n_dyn']} digits (loss 1/2 mean (f - y)^2, "
             f"learning rate {res.learning_rate:.3g} = half the stable rate). For each network the "
             f"prediction uses its own initial outputs f_0 and the exact discrete-step solution "
             f"of the linearized dynamics with the infinite-width NTK. Theory (Jacot et al. 2018, "
             f"Lee et al. 2019): the distance shrinks like width^-1/2. Fitted mean log-log slope: "
             f"{res.slope:+.3f}.")
    rep.figure(plots.dynamics_comparison(res), "RMS distance between trained networks and "
               "the kernel prediction, by width, at several step counts (dashed: width^-1/2).")
    T = int(max(S["dyn_steps"]))
    rep.figure(plots.trajectories(arch, x_tr, Y, x_te, widths=S["dyn_widths"][::2] if
                                  len(S["dyn_widths"]) > 3 else S["dyn_widths"], steps=T,
                                  lr_fraction=0.5, example=0, output=int(lab_te[0])),
               f"Output (true class) of one test digit during training: networks (solid) vs "
               f"their NTK prediction (dashed).")
    rep.code(res.to_text())
    log("[report] accuracy table ...")
    acc = _accuracy_rows(arch, x_tr, Y, x_te, lab_te, S["dyn_widths"], T, res.learning_rate)
    rep.heading("3. Accuracy: kernels vs trained networks")
    rep.text(f"{S['n_dyn']} training / {len(x_te)} test digits. Networks trained {T} full-batch "
             f"GD steps from one initialization each; the NTK prediction at {T} steps is the "
             f"mean over initializations (f_0 = 0).")
    rep.table(acc)

    # ---- 4. lazy-training scaling --------------------------------------------------------
    log("[report] lazy-training sweeps over width and alpha ...")
    xl, labl, _, _ = load_digits_split(max(S["n_lazy"], 10), seed=2)
    xl = _pca(xl, 8)      # 8 principal components: the width must dominate the input dimension
    yl = (2.0 * (labl % 2 == 0).double() - 1.0)[:, None]     # even vs odd digit
    tanh_arch = nl.serial(nl.Dense(512), nl.Elementwise(torch.tanh), nl.Dense(1))
    sw_ntk = dg.width_sweep(tanh_arch, xl, yl, S["lazy_widths"], seeds=S["lazy_seeds"],
                            steps=S["lazy_steps"], progress=progress)
    sw_std = dg.width_sweep(_lecun_factory(xl.shape[1]), xl, yl, S["lazy_widths"],
                            seeds=S["lazy_seeds"], steps=0, parameterization="standard",
                            progress=progress)
    base = tanh_arch.module(in_shape=xl.shape[1], width=S["alpha_width"], seed=0)
    sw_a = dg.alpha_sweep(base, xl, yl, S["alphas"], steps=S["lazy_steps"],
                          parameterization="ntk", progress=progress)
    rep.heading("4. Lazy training, measured")
    rep.text(f"One-hidden-layer tanh networks on {len(xl)} digits (8 principal components, "
             "each of mean square 1; target: even vs odd). "
             "Chizat & Bach's inverse relative scale kappa = ||h(w0) - y|| ||D²h(w0)|| / "
             "||Dh(w0)||² (norms: RMS over the stacked outputs, Euclidean over parameters; the "
             "Hessian norm by Lanczos on Hessian-vector products, alternated with the output "
             "direction). Standard (LeCun) initialization: gradient norm ~ width^1/2, Hessian "
             "norm ~ 1, kappa ~ 1/width. NTK parameterization: flat gradient norm, Hessian norm "
             "and kappa ~ width^-1/2 (a max over neurons adds a slowly growing factor), relative "
             "weight change after training ~ width^-1/2. Scaling a centered network by alpha "
             "(loss / alpha²): kappa ~ 1/alpha.")
    rep.table(_slope_rows(sw_std, "width, standard (LeCun)") + _slope_rows(sw_ntk, "width, NTK")
              + _slope_rows(sw_a, f"alpha (centered, width {S['alpha_width']})"),
              caption="fitted log-log slopes with 95% confidence intervals, all seeds pooled")
    rep.figure(sw_std.plot(), "Standard (LeCun) parameterization, at initialization.")
    rep.figure(sw_ntk.plot(), "NTK parameterization, trained with full-batch GD.")
    rep.figure(plots.training_curves(sw_ntk), "Loss, relative weight change and gap to the "
               "linearized network during training, by width (NTK parameterization).")
    rep.figure(sw_a.plot(metrics=["kappa", "rel_weight_change", "kernel_drift", "lin_gap"]),
               "Output scale alpha (centered model).")
    rep.code(sw_std.to_text() + "\n\n" + sw_ntk.to_text() + "\n\n" + sw_a.to_text())

    # ---- 5. pictures of the theory ------------------------------------------------------
    log("[report] figures of the theory ...")
    rep.heading("5. Pictures of the theory")
    rep.figure(plots.init_functions(n_nets=S["nets"] + 4), "At initialization a wide network "
               "is a draw from a Gaussian process whose covariance is the NNGP kernel.")
    rep.figure(plots.trained_functions(n_nets=S["nets"], steps=S["fn_steps"]),
               "Networks trained on 5 points agree with the NTK-GP (mean and spread) at the same "
               "training time.")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        gif = S["gif"] and plots.has_gif_support()
        gw = os.path.join(tmp, "weights.gif") if gif else None
        rep.figure(plots.weight_matrices(steps=S["w_steps"], gif_path=gw),
                   "A hidden-to-hidden weight matrix during training (change from init, in units "
                   "of the initial spread): at width 1000 it barely moves.")
        if gw:
            rep.image(gw, "The same, animated.")
        rep.figure(plots.tangent_model(), "A one-parameter model alpha (h(w) - h(w0)) and "
                   "its tangent: as alpha grows, the model and its normalized loss become those "
                   "of the linear (tangent) model.")
        ge = os.path.join(tmp, "ellipse.gif") if gif else None
        rep.figure(plots.ntk_ellipse(steps=S["e_steps"], gif_path=ge),
                   "The NTK on two inputs drawn as an ellipse, during training, with the output "
                   "trajectory inside: it moves for small alpha and is frozen for large alpha.")
        if ge:
            rep.image(ge, "The same, animated.")
    k_dd = arch.kernel(x_tr, get="ntk")
    lr = 0.5 * predict.max_learning_rate(k_dd, Y.numel())
    net = arch.module(in_shape=x_tr.shape[1], width=int(S["dyn_widths"][-1]), seed=0)
    with torch.no_grad():
        f0 = net(x_tr)
    rec = dg.train(net, x_tr, Y, steps=T, learning_rate=lr, record_every=max(1, T // 20),
                   linearization=False, measure_kernel_drift=False, record_outputs=True)
    tgrid = torch.arange(1, T + 1, dtype=torch.float64)
    rep.figure(plots.eigenmode_decay(k_dd, Y, fx_train_0=f0, learning_rate=lr, t=tgrid,
                                     network_steps=rec.steps, network_outputs=rec.outputs,
                                     discrete=True),
               f"Eigenmodes of the digits NTK: under GD mode i's residual shrinks by "
               f"|1 - lr lambda_i / N| per step (lines; the gradient-flow limit is "
               f"exp(-lambda_i lr t / N)), so large-eigenvalue modes are learned first; dots: a "
               f"width-{S['dyn_widths'][-1]} network trained by GD, projected on the same modes.")
    rep.text(f"Total time {time.perf_counter() - t_all:.0f} s.")
    return rep.save(path)


def run(args: argparse.Namespace) -> int:
    import os
    if not args.no_report and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise FileNotFoundError(f"--out: folder does not exist: "
                                f"{os.path.dirname(os.path.abspath(args.out))}")
    n_train = args.n_train if args.n_train is not None else (300 if args.quick else 1200)
    depth = args.depth if args.depth is not None else (1 if args.quick else 3)
    print(f"ntkit demo: exact NNGP/NTK kernel regression on digits "
          f"(ReLU MLP, {depth} hidden layers, {n_train} training images)")
    rows = kernel_regression_table(n_train, depth, progress=not args.no_progress)
    _print_table(rows)
    if args.no_report:
        return 0
    with _threads(1):
        path = build_report(args.out, quick=args.quick, kernel_rows=rows,
                            progress=not args.no_progress)
    print(f"report: {os.path.abspath(path)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="main job: kernels vs networks on the embedded digits data, "
                       "HTML report",
                       description="Exact NNGP/NTK kernel regression on scikit-learn's bundled "
                       "digits (printed table), then a self-contained HTML report comparing the "
                       "theory with real training: network vs kernel trajectories by width, "
                       "accuracy, lazy-training scaling with fitted slopes, explanatory figures.")
    p.add_argument("--n-train", type=int, default=None,
                   help="training examples of the kernel table (default 1200, --quick 300)")
    p.add_argument("--depth", type=int, default=None,
                   help="hidden layers of the kernel table's MLP (default 3, --quick 1)")
    p.add_argument("--out", default="ntkit_report.html", help="report file (default "
                   "ntkit_report.html)")
    p.add_argument("--quick", action="store_true", help="reduced sizes (about a minute)")
    p.add_argument("--no-report", action="store_true", help="only print the kernel table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
