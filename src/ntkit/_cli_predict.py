"""``ntkit predict``: kernel matrices (.npy/.npz) + training targets -> outputs at times ``t``.

Gradient flow (default) or discrete gradient descent (``--discrete``: ``t`` counts GD steps of
size ``--learning-rate``) on ``1/2 mean (f - y)^2``, with neural-tangents' conventions
(:mod:`ntkit.predict`). Writes an ``.npz`` with ``t``, ``fx_train`` ``(T, n, k)`` and, given
``--k-test-train``, ``fx_test`` ``(T, m, k)``; ``t = inf`` is the converged (kernel regression)
prediction.

Example::

    ntkit predict --k-train-train ntk_train.npy --y-train y.npy --k-test-train ntk_test.npy \\
        --t 0,10,100,inf --out predictions.npz
"""
from __future__ import annotations

import argparse
import math
import os
from typing import List

import numpy as np
import torch

__all__ = ["register", "run", "load_matrix", "parse_floats"]


def load_matrix(path: str, what: str, key: str = "ntk") -> np.ndarray:
    """Load an array from ``.npy`` (or ``.npz``: entry ``key``, or its only entry)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        obj = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {what} from {path}: {e} (expected a .npy or .npz file)")
    if isinstance(obj, np.lib.npyio.NpzFile):
        names = list(obj.files)
        if key in names:
            arr = obj[key]
        elif len(names) == 1:
            arr = obj[names[0]]
        else:
            raise ValueError(f"{path} holds {names}; none is {key!r} (choose with --key)")
    else:
        arr = obj
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} in {path} is not numeric (dtype {arr.dtype})")
    return arr


def parse_floats(text: str, name: str) -> List[float]:
    """``'0,10,1e3,inf'`` -> floats; errors name the option."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers (e.g. 0,10,100,inf), got "
                         f"{text!r}") from None
    if not vals:
        raise ValueError(f"{name} is empty")
    return vals


def run(args: argparse.Namespace) -> int:
    from . import predict
    k_dd = load_matrix(args.k_train_train, "--k-train-train", args.key)
    y = load_matrix(args.y_train, "--y-train", "y")
    if y.ndim == 1:
        y = y[:, None]
    if k_dd.ndim != 2 or k_dd.shape[0] != k_dd.shape[1]:
        raise ValueError(f"--k-train-train must be a square (n, n) matrix, got {k_dd.shape}")
    if y.ndim != 2 or y.shape[0] != k_dd.shape[0]:
        raise ValueError(f"--y-train must be (n,) or (n, k) with n = {k_dd.shape[0]} (the kernel's "
                         f"size), got {y.shape}")
    k_td = None
    if args.k_test_train:
        k_td = load_matrix(args.k_test_train, "--k-test-train", args.key)
        if k_td.ndim != 2 or k_td.shape[1] != k_dd.shape[0]:
            raise ValueError(f"--k-test-train must be (m, {k_dd.shape[0]}), got {k_td.shape}")
    times = parse_floats(args.t, "--t")
    if any(t < 0 or math.isnan(t) for t in times):
        raise ValueError(f"--t must be >= 0 (or inf), got {args.t}")
    f0 = 0.0 if args.fx_train_0 is None else load_matrix(args.fx_train_0, "--fx-train-0", "f")
    g0 = None
    if k_td is not None:
        g0 = 0.0 if args.fx_test_0 is None else load_matrix(args.fx_test_0, "--fx-test-0", "f")
    if args.discrete:
        fn = predict.gradient_descent_mse_discrete(
            torch.from_numpy(k_dd), torch.from_numpy(y), learning_rate=args.learning_rate,
            diag_reg=args.diag_reg)
    else:
        fn = predict.gradient_descent_mse(torch.from_numpy(k_dd), torch.from_numpy(y),
                                          learning_rate=args.learning_rate,
                                          diag_reg=args.diag_reg)
    kt = None if k_td is None else torch.from_numpy(k_td)
    tr, te = [], []
    progress = None
    if not args.no_progress and len(times) > 1:
        try:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(times), desc="predict", leave=False)
        except ImportError:  # pragma: no cover
            progress = None
    for t in times:
        out = fn(None if math.isinf(t) else t, f0, g0, kt)
        a, b = (out if kt is not None else (out, None))
        tr.append(a.numpy())
        if b is not None:
            te.append(b.numpy())
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    result = {"t": np.array(times), "fx_train": np.stack(tr)}
    if te:
        result["fx_test"] = np.stack(te)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output folder does not exist: {out_dir}")
    np.savez(args.out, **result)
    mode = "GD steps" if args.discrete else "gradient flow"
    print(f"ntkit predict: {mode}, n={k_dd.shape[0]}, k={y.shape[1]}, "
          f"{'m=' + str(k_td.shape[0]) + ', ' if k_td is not None else ''}t={times}")
    for t, a in zip(times, tr):
        loss = 0.5 * float(((a - y) ** 2).mean())
        print(f"  t={t:<10g} train loss {loss:.4e}")
    print(f"wrote {os.path.abspath(args.out)} (arrays: {', '.join(result)})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="outputs of a network trained by GD, from its NTK (.npy files)",
        description="Closed-form outputs of an infinitely wide network trained on MSE by "
        "gradient flow (or discrete GD steps), from kernel matrices saved as .npy/.npz (e.g. by "
        "`ntkit kernel`). Writes t, fx_train (T, n, k) and fx_test (T, m, k) to an .npz.")
    p.add_argument("--k-train-train", required=True, metavar="NPY",
                   help="(n, n) train-train NTK (.npy, or .npz with entry --key)")
    p.add_argument("--y-train", required=True, metavar="NPY", help="(n,) or (n, k) targets")
    p.add_argument("--k-test-train", metavar="NPY", help="(m, n) test-train NTK (optional)")
    p.add_argument("--fx-train-0", metavar="NPY", help="initial train outputs (default 0)")
    p.add_argument("--fx-test-0", metavar="NPY", help="initial test outputs (default 0)")
    p.add_argument("--t", default="0,1,10,100,1000,inf",
                   help="comma-separated times (learning-rate units) or, with --discrete, GD "
                   "step counts; 'inf' = converged (default 0,1,10,100,1000,inf)")
    p.add_argument("--learning-rate", type=float, default=1.0,
                   help="time unit / GD step size (default 1)")
    p.add_argument("--discrete", action="store_true",
                   help="exact discrete GD steps instead of gradient flow")
    p.add_argument("--diag-reg", type=float, default=0.0,
                   help="ridge relative to the mean kernel diagonal (default 0)")
    p.add_argument("--key", default="ntk", help="entry to read from .npz kernel files "
                   "(default ntk)")
    p.add_argument("--out", default="predictions.npz", help="output .npz (default "
                   "predictions.npz)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
