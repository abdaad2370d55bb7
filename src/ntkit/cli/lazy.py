"""``ntkit lazy``: width (and output-scale) sweeps of the lazy-training diagnostics + figures.

Builds networks from an architecture text (``ntkit.layers.parse_arch``), measures gradient
norm, Hessian norm, kappa, and after training the relative weight change, kernel drift and the
gap to the linearized network (:mod:`ntkit.diagnostics`), fits log-log slopes, and writes CSV
tables, a text summary and figures to ``--out``.

Fully connected and convolutional architectures: ``--data`` is ``(n, d)`` for a network that
starts with ``Dense`` and ``(n, C, H, W)`` or ``(n, C, L)`` images for one that starts with
``Conv``; without ``--data``, synthetic points of ``--dim`` dimensions, or synthetic images of
``--image-shape`` (default ``3,8,8``) when the architecture starts with ``Conv``. An architecture
that does not fit the data (or maps an example to more than a vector of outputs) is refused
before any work, naming ``--arch`` and the data flag. ``run.json`` (and the head of
``summary.txt``) records what was used: the architecture text and its parsed form, the data
(path and SHA-256 of each file, or the synthetic shape and seed), shapes, widths, seeds, steps,
learning rates and the ntkit version.

Nothing is written unless every run trained without diverging: a numeric ``--lr`` at or above a
network's stable full-batch rate ``2 N / lambda_max`` is refused before training, and a run whose
loss ends above its initial value (or any non-finite measurement) fails the command. Outputs are
written to temporary files and moved into place together; a file of the same name in ``--out`` is
replaced only if an earlier run wrote it unchanged (manifest ``.ntkit_manifest.json``) or with
``--force``.

Example::

    ntkit lazy --arch "Dense(512), Erf(), Dense(1)" --widths 64,256,1024 --seeds 0,1 \\
        --steps 100 --alphas 1,4,16,64 --out lazy_out
    ntkit lazy --arch "Conv(16, 3, padding='SAME'), Relu(), GlobalAvgPool(), Dense(1)" \\
        --data images.npy --targets y.npy --widths 16,64 --out lazy_conv
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from .._files import OutFolder, sha256_file
from ._io import print_written

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


class _torch_threads:
    """``with _torch_threads(n):`` runs the block with ``torch.set_num_threads(n)``, then
    restores the previous count (small networks train fastest on one thread)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self.old)
        return False


def _first_linear(arch):
    """The first Dense/Conv layer data meets (walking ``serial`` from the input), or None."""
    layer = arch
    for _ in range(100):
        sub = getattr(layer, "layers", None)
        if type(layer).__name__ == "Serial" and isinstance(sub, tuple):
            nxt = next((s for s in sub if s.has_linear), None)
            if nxt is None:
                return None
            layer = nxt
            continue
        return layer if layer.has_linear else None
    return None


def _starts_with_conv(arch) -> bool:
    from ..layers import Conv
    return isinstance(_first_linear(arch), Conv)


def _image_shape(args, arch) -> Tuple[Optional[Tuple[int, ...]], str]:
    """Per-example shape of synthetic images (``None``: (n, --dim) points) and a note."""
    if args.dim is not None and (args.data is not None or args.image_shape is not None
                                 or _starts_with_conv(arch)):
        why = ("--data gives the inputs" if args.data is not None else "synthetic images "
               "have --image-shape" if args.image_shape is not None else "--arch starts with "
               "Conv, which takes images")
        raise ValueError(f"--dim sets synthetic (n, d) points, but {why}; drop --dim"
                         + ("" if args.data is not None else " (images: --image-shape C,H,W)"))
    if args.image_shape is not None:
        if args.data is not None:
            raise ValueError("--image-shape is for synthetic images; with --data the shape is "
                             "the file's (drop --image-shape)")
        shape = _ints(args.image_shape, "--image-shape")
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"--image-shape must be C,H,W or C,L (channels, then spatial "
                             f"sizes, all >= 1), got {args.image_shape}")
        return tuple(shape), ""
    if args.data is None and _starts_with_conv(arch):
        filt = _first_linear(arch).filter_shape
        ns = len(filt) if isinstance(filt, (tuple, list)) else 2
        return (3,) + (8,) * ns, (" (the architecture starts with Conv: default image shape; "
                                  "set it with --image-shape)")
    return None, ""


def _load_xy(args, image_shape=None):
    """Inputs, targets, a one-line description and the record of the data for run.json."""
    import numpy as np
    import torch
    from ._io import load_matrix
    if args.data is None:
        if args.targets is not None:
            raise ValueError("--targets needs --data (the inputs the targets belong to)")
        g = torch.Generator().manual_seed(args.data_seed)
        shape = (args.dim or 4,) if image_shape is None else tuple(image_shape)
        d = math.prod(shape)
        x = torch.randn(args.n, d, generator=g, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True) * d ** 0.5
        y = torch.sin(x @ torch.ones(d, dtype=torch.float64) / d ** 0.5)[:, None]
        x = x.reshape((args.n,) + shape)
        what = ("Gaussian points in " + str(d) + " dims" if image_shape is None else
                "Gaussian images of shape " + str(shape))
        formula = "y = sin(<x, 1>/sqrt d)" + ("" if image_shape is None else
                                              " (x flattened, d = C*prod(spatial))")
        rec = dict(source="synthetic", kind="points" if image_shape is None else "images",
                   x_shape=list(x.shape), y_shape=list(y.shape), seed=int(args.data_seed),
                   inputs="i.i.d. N(0, 1), each example scaled to norm sqrt(d)",
                   targets=formula)
        return x, y, f"synthetic: {args.n} {what}, {formula}", rec
    if args.targets is None:
        raise ValueError("--data needs --targets (a .npy with (n,) or (n, k) targets)")
    x = torch.from_numpy(np.asarray(load_matrix(args.data, "--data", "x"), dtype=np.float64))
    y = torch.from_numpy(np.asarray(load_matrix(args.targets, "--targets", "y"),
                                    dtype=np.float64))
    if y.ndim == 1:
        y = y[:, None]
    if x.ndim < 2 or y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"--data must be (n, d) or (n, C, *spatial) images and --targets (n,) "
                         f"or (n, k) with the same n; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    rec = dict(source="file", path=os.path.abspath(args.data), sha256=sha256_file(args.data),
               x_shape=list(x.shape),
               targets=dict(path=os.path.abspath(args.targets), sha256=sha256_file(args.targets),
                            shape=list(y.shape)))
    return x, y, (f"{args.data}: {x.shape[0]} examples of shape {tuple(x.shape[1:])} "
                  f"(sha256 {rec['sha256'][:12]}...)"), rec


def _check_fits(arch, x, width: int, seed: int, data_flag: str) -> Tuple[int, ...]:
    """Refuse (naming ``--arch`` and ``data_flag``) an architecture that does not take this
    data's examples to a vector of outputs; returns the per-example output shape."""
    import torch
    shape = tuple(x.shape[1:])
    conv = _starts_with_conv(arch)
    if conv and len(shape) < 2:
        raise ValueError(f"--arch starts with Conv, which needs images (n, C, H, W) or (n, C, L), "
                         f"but {data_flag} gives examples of shape {shape}; pass image "
                         f"{'--data' if data_flag == '--data' else '--image-shape C,H,W'}, or "
                         f"start --arch with Dense for (n, d) data")
    try:
        net = arch.module(in_shape=shape, width=width, seed=seed, dtype=torch.float64)
        with torch.no_grad():
            out = net(x[:1].to(torch.float64))
    except (ValueError, RuntimeError, TypeError, IndexError) as e:
        raise ValueError(f"--arch does not fit {data_flag} (examples of shape {shape}): "
                         f"{str(e).strip()}; change --arch or {data_flag}") from None
    if out.ndim != 2:
        hint = ("; add GlobalAvgPool() or Flatten() before the readout Dense in --arch (for "
                "a network of Dense layers only: Flatten() first), or pass (n, d) data"
                if len(shape) >= 2 else "")
        raise ValueError(f"--arch maps each example of {data_flag} (shape {shape}) to shape "
                         f"{tuple(out.shape[1:])}, not to a vector of outputs{hint}")
    return tuple(out.shape[1:])


def _stable_limit(arch, x, width: int, seed: int) -> float:
    """Largest stable full-batch GD rate ``2 N / lambda_max`` of the network at init."""
    import torch
    from .. import diagnostics as dg
    net = arch.module(in_shape=tuple(x.shape[1:]), width=width, seed=seed, dtype=torch.float64)
    return dg.auto_lr(net, x)


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
    from ..layers import parse_arch
    from ._io import parse_floats
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
    names = ["width_sweep.csv", f"width_scaling.{ext}", f"width_training.{ext}", "summary.txt",
             "run.json"]
    if alphas is not None:
        names += ["alpha_sweep.csv", f"alpha_scaling.{ext}"]
    out = OutFolder(args.out, "--out", force=args.force)
    out.check(names)
    try:
        arch = parse_arch(args.arch)
    except ValueError as e:
        raise ValueError(f"--arch: {e}") from None
    image_shape, note = _image_shape(args, arch)
    x, y, desc, data_rec = _load_xy(args, image_shape)
    if args.data is not None:           # messages about `x`/`y` then concern these files
        args._py_names = dict(_PY_NAMES, x="--data", y="--targets")
    if args.batch_size is not None and args.batch_size > x.shape[0]:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {x.shape[0]} "
                         f"examples")
    data_flag = ("--data" if args.data is not None else
                 "--image-shape" if image_shape is not None else "--dim")
    with _torch_threads(args.threads):
        out_shape = _check_fits(arch, x, min(widths), seeds[0], data_flag)
    record = _record(args, arch, widths, seeds, alphas, x, out_shape, data_rec)
    print(f"ntkit lazy: {arch!r}\n  data: {desc}{note}\n  widths {widths}, seeds {seeds}, "
          f"{args.steps} steps, lr {lr}, {'GD' if args.batch_size is None else 'SGD'}")
    with _torch_threads(args.threads):
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
        return _run(args, arch, widths, seeds, lr, alphas, x, y, out, record)


def _record(args, arch, widths, seeds, alphas, x, out_shape, data_rec) -> Dict[str, Any]:
    """What this run used (written to run.json; its head also opens summary.txt)."""
    import platform
    import torch
    from .. import __version__
    from .. import diagnostics as dg
    aw = None if alphas is None else (args.alpha_width or widths[len(widths) // 2])
    return dict(
        command="ntkit lazy", ntkit_version=__version__, torch_version=torch.__version__,
        python_version=platform.python_version(),
        arch=dict(text=args.arch, parsed=repr(arch),
                  parameterization=dg.arch_parameterization(arch)),
        data=data_rec, input_shape=list(x.shape[1:]), output_shape=list(out_shape),
        n=int(x.shape[0]), widths=list(widths), seeds=list(seeds), steps=int(args.steps),
        lr=args.lr if args.lr == "auto" else float(args.lr),
        optimizer="GD" if args.batch_size is None else "SGD", batch_size=args.batch_size,
        hessian_steps=int(args.hessian_steps), alphas=alphas, alpha_width=aw,
        alpha_centered=None if alphas is None else not args.no_center,
        alpha_seed=None if alphas is None else seeds[0])


def _record_text(rec: Dict[str, Any]) -> str:
    d = rec["data"]
    if d["source"] == "file":
        data = (f"{d['path']} (sha256 {d['sha256']}), shape {tuple(d['x_shape'])}\n"
                f"targets:      {d['targets']['path']} (sha256 {d['targets']['sha256']}), "
                f"shape {tuple(d['targets']['shape'])}")
    else:
        data = (f"synthetic {d['kind']}, shape {tuple(d['x_shape'])}, seed {d['seed']}; "
                f"{d['targets']}")
    lines = [f"ntkit lazy (ntkit {rec['ntkit_version']}, torch {rec['torch_version']})",
             f"architecture: {rec['arch']['text']}",
             f"  parsed:     {rec['arch']['parsed']}",
             f"data:         {data}",
             f"shapes:       example {tuple(rec['input_shape'])} -> output "
             f"{tuple(rec['output_shape'])}, n = {rec['n']}",
             f"widths {rec['widths']}, seeds {rec['seeds']}, {rec['steps']} steps, lr "
             f"{rec['lr']}, {rec['optimizer']}"
             + ("" if rec["batch_size"] is None else f" (batch {rec['batch_size']})")
             + f", {rec['hessian_steps']} Hessian (Lanczos) steps"]
    if rec["alphas"] is not None:
        lines.append(f"alphas {rec['alphas']} at width {rec['alpha_width']}, seed "
                     f"{rec['alpha_seed']}, centered: {rec['alpha_centered']}")
    return "\n".join(lines)


def _runs(sweep) -> List[Dict[str, Any]]:
    """Per-run learning rate and size (``--lr auto`` chooses one per network)."""
    return [{sweep.kind: r[sweep.kind], "seed": r["seed"], "learning_rate": r["learning_rate"],
             "n_params": r.get("n_params")} for r in sweep.rows]


def _run(args, arch, widths, seeds, lr, alphas, x, y, out, record) -> int:
    import json
    from .. import diagnostics as dg, plots
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
                            parameterization=dg.arch_parameterization(arch))
        _check_converging(sa, arch, x, lr, args.lr, "alpha")
    # everything measured and checked: write all outputs (temporary names, then into place)
    try:
        summary = [_record_text(record), sw.to_text()]
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
        record = dict(record, runs=dict(width=_runs(sw),
                                        alpha=None if sa is None else _runs(sa)))
        with open(out.stage("run.json"), "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        written = out.commit()
    except BaseException:
        out.discard()
        raise
    print(text)
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
    p.add_argument("--data", metavar="NPY", help="(n, d) inputs, or (n, C, H, W) / (n, C, L) "
                   "images for an architecture starting with Conv (.npy); default synthetic")
    p.add_argument("--targets", metavar="NPY", help="(n,) or (n, k) targets for --data")
    p.add_argument("--n", type=int, default=24, help="synthetic examples (default 24)")
    p.add_argument("--dim", type=int, default=None, help="synthetic input dimension (default 4)")
    p.add_argument("--image-shape", metavar="C,H,W", default=None, help="synthetic image "
                   "shape per example, e.g. 3,8,8 or 3,16 (default 3,8,8 when --arch starts "
                   "with Conv and there is no --data)")
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
