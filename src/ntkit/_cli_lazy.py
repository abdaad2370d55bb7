"""``ntkit lazy``: width (and output-scale) sweeps of the lazy-training diagnostics + figures.

Builds networks from an architecture text (``ntkit.layers.parse_arch``), measures gradient
norm, Hessian norm, kappa, and after training the relative weight change, kernel drift and the
gap to the linearized network (:mod:`ntkit.diagnostics`), fits log-log slopes, and writes CSV
tables, a text summary and figures to ``--out``.

Example::

    ntkit lazy --arch "Dense(512), Erf(), Dense(1)" --widths 64,256,1024 --seeds 0,1 \\
        --steps 100 --alphas 1,4,16,64 --out lazy_out
"""
from __future__ import annotations

import argparse
import os
from typing import List

import numpy as np
import torch

__all__ = ["register", "run"]


def _ints(text: str, name: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{name} is empty")
    return vals


def _load_xy(args):
    from ._cli_predict import load_matrix
    if args.data is None:
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
    if x.ndim < 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"--data must be (n, d) and --targets (n,) or (n, k); got {tuple(x.shape)}"
                         f" and {tuple(y.shape)}")
    return x, y, f"{args.data}: {x.shape[0]} examples"


def run(args: argparse.Namespace) -> int:
    from .layers import parse_arch
    arch = parse_arch(args.arch)
    widths = _ints(args.widths, "--widths")
    seeds = _ints(args.seeds, "--seeds")
    if len(set(widths)) < 2 or min(widths) < 1:
        raise ValueError(f"--widths needs at least two distinct positive widths, got {args.widths}")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    lr = args.lr
    if lr != "auto":
        try:
            lr = float(lr)
        except ValueError:
            raise ValueError(f"--lr must be 'auto' or a positive number, got {args.lr!r}") from None
        if not lr > 0:
            raise ValueError(f"--lr must be 'auto' or a positive number, got {args.lr!r}")
    alphas = None
    if args.alphas:
        from ._cli_predict import parse_floats
        alphas = parse_floats(args.alphas, "--alphas")
        if min(alphas) <= 0 or len(set(alphas)) < 2:
            raise ValueError(f"--alphas needs at least two distinct positive values, got "
                             f"{args.alphas}")
    x, y, desc = _load_xy(args)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    os.makedirs(args.out, exist_ok=True)
    print(f"ntkit lazy: {arch!r}\n  data: {desc}\n  widths {widths}, seeds {seeds}, "
          f"{args.steps} steps, lr {lr}, {'GD' if args.batch_size is None else 'SGD'}")
    from ._demo import _threads
    with _threads(args.threads):
        return _run(args, arch, widths, seeds, lr, alphas, x, y)


def _run(args, arch, widths, seeds, lr, alphas, x, y) -> int:
    from . import diagnostics as dg, plots
    ext = args.format
    written = []
    sw = dg.width_sweep(arch, x, y, widths, seeds=seeds, steps=args.steps, learning_rate=lr,
                        batch_size=args.batch_size, progress=not args.no_progress,
                        hessian_steps=args.hessian_steps)
    summary = [sw.to_text()]
    written.append(sw.to_csv(os.path.join(args.out, "width_sweep.csv")))
    written.append(os.path.join(args.out, f"width_scaling.{ext}"))
    plots.plot_scaling(sw, path=written[-1])
    if args.steps > 0:
        written.append(os.path.join(args.out, f"width_training.{ext}"))
        plots.training_curves(sw, path=written[-1])
    if alphas is not None:
        aw = args.alpha_width or widths[len(widths) // 2]
        net = arch.module(in_shape=tuple(x.shape[1:]), width=aw, seed=seeds[0])
        sa = dg.alpha_sweep(net, x, y, alphas, seeds=seeds[:1], center=not args.no_center,
                            steps=args.steps, learning_rate=lr, batch_size=args.batch_size,
                            progress=not args.no_progress, hessian_steps=args.hessian_steps,
                            parameterization=dg._arch_parameterization(arch))
        summary.append(f"(alpha sweep at width {aw})\n" + sa.to_text())
        written.append(sa.to_csv(os.path.join(args.out, "alpha_sweep.csv")))
        written.append(os.path.join(args.out, f"alpha_scaling.{ext}"))
        plots.plot_scaling(sa, path=written[-1])
    text = "\n\n".join(summary)
    print(text)
    written.append(os.path.join(args.out, "summary.txt"))
    with open(written[-1], "w") as f:
        f.write(text + "\n")
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
    p.add_argument("--out", default="ntkit_lazy", help="output folder (default ntkit_lazy)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
