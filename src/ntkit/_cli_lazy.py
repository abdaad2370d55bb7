"""``ntkit lazy``: width (and output-scale) sweeps of the lazy-training diagnostics + figures.

Builds networks from an architecture text (``ntkit.layers.parse_arch``), measures gradient
norm, Hessian norm, kappa, and after training the relative weight change, kernel drift and the
gap to the linearized network (:mod:`ntkit.diagnostics`), fits log-log slopes, and writes CSV
tables, a text summary and figures to ``--out``.

Nothing is written unless every run trained without diverging: a numeric ``--lr`` at or above a
network's stable full-batch rate ``2 N / lambda_max`` is refused before training, and a run whose
loss ends above its initial value (or any non-finite measurement) fails the command. Outputs are
written to temporary files and moved into place together; a file of the same name in ``--out`` is
replaced only if an earlier run wrote it unchanged (manifest ``.ntkit_manifest.json``) or with
``--force``.

Example::

    ntkit lazy --arch "Dense(512), Erf(), Dense(1)" --widths 64,256,1024 --seeds 0,1 \\
        --steps 100 --alphas 1,4,16,64 --out lazy_out
"""
from __future__ import annotations

import argparse
import math
from typing import List

__all__ = ["register", "run"]

# Python argument names in messages from ntkit.diagnostics -> this command's flags
_PY_NAMES = {"learning_rate": "--lr", "lanczos_steps": "--hessian-steps",
             "batch_size": "--batch-size", "alphas": "--alphas", "widths": "--widths",
             "seeds": "--seeds", "steps": "--steps"}


def _ints(text: str, name: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{name} is empty")
    return vals


def _at_least(v, flag: str, minimum: int) -> None:
    if v is not None and v < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {v}")


def _load_xy(args):
    import numpy as np
    import torch
    from ._cli_io import load_matrix
    if args.data is None:
        if args.targets is not None:
            raise ValueError("--targets needs --data (the inputs the targets belong to)")
        g = torch.Generator().manual_seed(args.data_seed)
        x = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True) * args.dim ** 0.5
        y = torch.sin(x @ torch.ones(args.dim, dtype=torch.float64) / args.dim ** 0.5)[:, None]
        return x, y, (f"synthetic: {args.n} Gaussian points in {args.dim} dims, "
                      f"y = sin(<x, 1>/sqrt d)")
    if args.targets is None:
        raise ValueError("--data needs --targets (a .npy with (n,) or (n, k) targets)")
    x = torch.from_numpy(np.asarray(load_matrix(args.data, "--data", "x"), dtype=np.float64))
    y = torch.from_numpy(np.asarray(load_matrix(args.targets, "--targets", "y"),
                                    dtype=np.float64))
    if y.ndim == 1:
        y = y[:, None]
    if x.ndim < 2 or y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"--data must be (n, d) and --targets (n,) or (n, k) with the same n; "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y, f"{args.data}: {x.shape[0]} examples"


def _stable_limit(arch, x, width: int, seed: int) -> float:
    """Largest stable full-batch GD rate ``2 N / lambda_max`` of the network at init."""
    import torch
    from . import diagnostics as dg
    net = arch.module(in_shape=tuple(x.shape[1:]), width=width, seed=seed, dtype=torch.float64)
    return dg._auto_lr(net, x, 1.0, 1.0)


def _check_converging(sweep, arch, x, lr, lr_text: str, label: str) -> None:
    """Refuse a sweep with diverged training or non-finite measurements (no slopes from it)."""
    for r in sweep.rows:
        bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"{label} {r[sweep.kind]:g}, seed {r['seed']}: {', '.join(bad)} "
                             f"not finite (the network diverged or overflowed); lower --lr "
                             f"or use --lr auto; nothing was written")
    for c in sweep.curves:
        loss = c["loss"]
        if loss and (not all(math.isfinite(v) for v in loss) or loss[-1] > loss[0]):
            hint = ""
            if sweep.kind == "width" and lr != "auto":
                hint = (f" (stable limit of that network at init: "
                        f"{_stable_limit(arch, x, int(c['value']), int(c['seed'])):.4g})")
            raise ValueError(f"training diverged at {label} {c['value']:g}, seed {c['seed']}: "
                             f"loss {loss[0]:.4g} at init -> {loss[-1]:.4g} after the last step "
                             f"with --lr {lr_text}{hint}; lower --lr or use --lr auto (half the "
                             f"stable rate); nothing was written")


def run(args: argparse.Namespace) -> int:
    import torch
    from ._cli_io import OutFolder, parse_floats
    from .layers import parse_arch
    widths = _ints(args.widths, "--widths")
    seeds = _ints(args.seeds, "--seeds")
    if len(set(widths)) < 2 or min(widths) < 1:
        raise ValueError(f"--widths needs at least two distinct positive widths, got {args.widths}")
    if min(seeds) < 0:
        raise ValueError(f"--seeds must be >= 0, got {args.seeds}")
    _at_least(args.steps, "--steps", 0)
    _at_least(args.n, "--n", 2)
    _at_least(args.dim, "--dim", 1)
    _at_least(args.batch_size, "--batch-size", 1)
    _at_least(args.hessian_steps, "--hessian-steps", 2)
    _at_least(args.alpha_width, "--alpha-width", 1)
    _at_least(args.threads, "--threads", 1)
    lr = args.lr
    if lr != "auto":
        try:
            lr = float(lr)
        except ValueError:
            raise ValueError(f"--lr must be 'auto' or a positive number, got {args.lr!r}") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"--lr must be 'auto' or a positive number, got {args.lr!r}")
    alphas = None
    if args.alphas:
        alphas = parse_floats(args.alphas, "--alphas")
        if not all(a > 0 and math.isfinite(a) for a in alphas) or len(set(alphas)) < 2:
            raise ValueError(f"--alphas needs at least two distinct positive values, got "
                             f"{args.alphas}")
    if args.alpha_width is not None and alphas is None:
        raise ValueError("--alpha-width needs --alphas (it sets the width of the alpha sweep)")
    ext = args.format
    names = ["width_sweep.csv", f"width_scaling.{ext}", f"width_training.{ext}", "summary.txt"]
    if alphas is not None:
        names += ["alpha_sweep.csv", f"alpha_scaling.{ext}"]
    out = OutFolder(args.out, "--out", force=args.force)
    out.check(names)
    try:
        arch = parse_arch(args.arch)
    except ValueError as e:
        raise ValueError(f"--arch: {e}") from None
    x, y, desc = _load_xy(args)
    if args.data is not None:           # messages about `x`/`y` then concern these files
        args._py_names = dict(_PY_NAMES, x="--data", y="--targets")
    if args.batch_size is not None and args.batch_size > x.shape[0]:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {x.shape[0]} "
                         f"examples")
    print(f"ntkit lazy: {arch!r}\n  data: {desc}\n  widths {widths}, seeds {seeds}, "
          f"{args.steps} steps, lr {lr}, {'GD' if args.batch_size is None else 'SGD'}")
    from ._demo import _threads
    with _threads(args.threads):
        if lr != "auto" and args.steps > 0 and args.batch_size is None:
            aw = args.alpha_width or widths[len(widths) // 2]
            for w in sorted(set(widths + ([aw] if alphas is not None else []))):
                limit = _stable_limit(arch, x, w, seeds[0])
                if lr >= limit:
                    raise ValueError(f"--lr {args.lr} is at or above the stable limit "
                                     f"{limit:.4g} of full-batch gradient descent for width {w} "
                                     f"(seed {seeds[0]}; 2 N / lambda_max of its NTK): training "
                                     f"would diverge; use a smaller --lr or --lr auto (half the "
                                     f"limit of each network)")
        return _run(args, arch, widths, seeds, lr, alphas, x, y, out)


def _run(args, arch, widths, seeds, lr, alphas, x, y, out) -> int:
    from . import diagnostics as dg, plots
    ext = args.format
    sw = dg.width_sweep(arch, x, y, widths, seeds=seeds, steps=args.steps, learning_rate=lr,
                        batch_size=args.batch_size, progress=not args.no_progress,
                        hessian_steps=args.hessian_steps)
    _check_converging(sw, arch, x, lr, args.lr, "width")
    sa = aw = None
    if alphas is not None:
        aw = args.alpha_width or widths[len(widths) // 2]
        net = arch.module(in_shape=tuple(x.shape[1:]), width=aw, seed=seeds[0])
        sa = dg.alpha_sweep(net, x, y, alphas, seeds=seeds[:1], center=not args.no_center,
                            steps=args.steps, learning_rate=lr, batch_size=args.batch_size,
                            progress=not args.no_progress, hessian_steps=args.hessian_steps,
                            parameterization=dg._arch_parameterization(arch))
        _check_converging(sa, arch, x, lr, args.lr, "alpha")
    # everything measured and checked: write all outputs (temporary names, then into place)
    try:
        summary = [sw.to_text()]
        sw.to_csv(out.stage("width_sweep.csv"))
        plots.plot_scaling(sw, path=out.stage(f"width_scaling.{ext}"))
        if args.steps > 0:
            plots.training_curves(sw, path=out.stage(f"width_training.{ext}"))
        if sa is not None:
            summary.append(f"(alpha sweep at width {aw})\n" + sa.to_text())
            sa.to_csv(out.stage("alpha_sweep.csv"))
            plots.plot_scaling(sa, path=out.stage(f"alpha_scaling.{ext}"))
        text = "\n\n".join(summary)
        with open(out.stage("summary.txt"), "w") as f:
            f.write(text + "\n")
        written = out.commit()
    except BaseException:
        out.discard()
        raise
    print(text)
    from .cli import print_written
    print_written(written)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "lazy", help="lazy-training sweeps over width and output scale, with figures",
        description="Gradient norm, Hessian norm, kappa (Chizat & Bach), relative weight change, "
        "kernel drift and linearization gap of networks of increasing width (and of a centered "
        "network scaled by alpha), with fitted log-log slopes, CSV tables and figures.")
    p.add_argument("--arch", default="Dense(512), Erf(), Dense(1)",
                   help="architecture text, e.g. \"Dense(512, W_std=1.5), Relu(), Dense(1)\" "
                   "(hidden widths are replaced by --widths)")
    p.add_argument("--data", metavar="NPY", help="(n, d) inputs (.npy); default synthetic data")
    p.add_argument("--targets", metavar="NPY", help="(n,) or (n, k) targets for --data")
    p.add_argument("--n", type=int, default=24, help="synthetic examples (default 24)")
    p.add_argument("--dim", type=int, default=4, help="synthetic input dimension (default 4)")
    p.add_argument("--data-seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--widths", default="64,256,1024", help="comma-separated (default "
                   "64,256,1024)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=100, help="training steps, 0 = only measure at "
                   "init (default 100)")
    p.add_argument("--lr", default="auto", help="learning rate or 'auto' (half the stable rate)")
    p.add_argument("--batch-size", type=int, default=None, help="SGD minibatch (default: "
                   "full-batch GD)")
    p.add_argument("--alphas", default=None, help="also sweep the output scale, e.g. 1,4,16,64")
    p.add_argument("--alpha-width", type=int, default=None, help="width of the alpha-sweep "
                   "network (default: the middle width)")
    p.add_argument("--no-center", action="store_true", help="alpha sweep without centering")
    p.add_argument("--hessian-steps", type=int, default=40, help="Lanczos steps for the "
                   "Hessian norm (default 40)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small "
                   "networks run fastest on one)")
    p.add_argument("--format", choices=("png", "svg"), default="png", help="figure format")
    p.add_argument("--out", default="ntkit_lazy", help="output folder (default ntkit_lazy); "
                   "files of the same names are replaced only if an earlier ntkit run wrote "
                   "them unchanged")
    p.add_argument("--force", action="store_true", help="replace files in --out that ntkit "
                   "did not write")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run, _py_names=_PY_NAMES)
