"""``ntkit solve``: kernel regression weights ``alpha = (K + ridge I)^-1 y`` from a kernel store
(:func:`ntkit.scale.solve`), and optionally predictions ``K_test,train @ alpha``.

Example::

    ntkit solve --store k.zarr --y y.npy --diag-reg 1e-4 --out alpha.npy \\
        --predict-store kt.zarr --predict-out predictions.npy
    ntkit solve --store k.zarr --y y.npy --diag-reg 1e-4 --method cg --scheduler local
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from ._io import check_out_path, load_array, print_written, store_errors

__all__ = ["register", "run_solve"]


def _one_hot(y: np.ndarray) -> np.ndarray:
    """Integer class labels 0..C-1 (integer dtype, or floats with integral values) -> (n, C)."""
    if y.ndim != 1:
        raise ValueError(f"--one-hot needs class labels of shape (n,), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            bad = y[~np.isfinite(y) | (y != np.round(y))][0]
            raise ValueError(f"--one-hot needs integer class labels 0..C-1, got the non-integer "
                             f"value {float(bad):g}")
    if (y < 0).any():
        raise ValueError(f"--one-hot needs class labels 0..C-1, got the negative label "
                         f"{y[y < 0][0].item():g} (it would silently become a class of its own)")
    labels = y.astype(np.int64)
    classes = int(labels.max()) + 1
    if classes > max(65536, 2 * y.shape[0]):
        raise ValueError(f"--one-hot: the largest label is {classes - 1}, which would make "
                         f"{classes} classes for {y.shape[0]} examples; relabel them 0..C-1")
    out = np.zeros((y.shape[0], classes))
    out[np.arange(y.shape[0]), labels] = 1.0
    return out


@store_errors
def run_solve(args: argparse.Namespace) -> int:
    from ..scale import open_store, solve
    if not math.isfinite(args.diag_reg) or args.diag_reg < 0:
        raise ValueError(f"--diag-reg must be a non-negative number, got {args.diag_reg:g}")
    if not 0 < args.tol < 1:
        raise ValueError(f"--tol must be in (0, 1) (a relative residual), got {args.tol:g}")
    if args.maxiter is not None and args.maxiter < 1:
        raise ValueError(f"--maxiter must be a positive integer, got {args.maxiter}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    check_out_path(args.out, "--out", (".npy",))
    if args.predict_out and not args.predict_store:
        raise ValueError("--predict-out needs --predict-store")
    if args.predict_store:
        check_out_path(args.predict_out or "predictions.npy", "--predict-out", (".npy",))
    h = open_store(args.store)
    if args.key is not None and args.key not in h.keys:
        raise ValueError(f"--key {args.key!r} is not in kernel store {args.store}; it holds "
                         f"{', '.join(h.keys)}")
    kt = None
    if args.predict_store:
        kt = open_store(args.predict_store)
        pkey = args.key or ("ntk" if "ntk" in kt.keys else kt.keys[0])
        if pkey not in kt.keys:
            raise ValueError(f"--key {pkey!r} is not in --predict-store {args.predict_store}; "
                             f"it holds {', '.join(kt.keys)}")
        if kt.n2 != h.n1:
            raise ValueError(f"--predict-store must be (m, {h.n1}) (test x train), got "
                             f"{kt.n1} x {kt.n2}")
    y = load_array(args.y, "--y", "y", "--y (an .npz entry named y)")
    if y.size and not np.isfinite(y.astype(np.float64)).all():
        raise ValueError(f"--y {args.y} contains NaN/Inf values")
    if args.one_hot:
        y = _one_hot(y)
    if y.ndim not in (1, 2) or y.shape[0] != h.n1:
        raise ValueError(f"--y must be (n,) or (n, k) with n = {h.n1} (the kernel's size), got "
                         f"shape {y.shape}")
    if args.scheduler is not None and args.method == "cholesky":
        raise ValueError("--scheduler runs CG's products on a cluster; --method cholesky "
                         "factorizes in this process (use --method cg, or drop --scheduler)")
    from .kernel import _executor
    client, cluster = _executor(args)
    try:
        alpha, info = solve(h, y, key=args.key, method=args.method, diag_reg=args.diag_reg,
                            tol=args.tol, maxiter=args.maxiter,
                            preconditioner=None if args.preconditioner == "none"
                            else args.preconditioner, rank=args.rank,
                            progress=not args.no_progress, return_info=True, executor=client)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    np.save(args.out, alpha.numpy())
    extra = (f", {info.iterations} CG passes, residual {float(info.residual.max()):.2e}"
             if info.method == "cg" and info.residual is not None else "")
    print(f"ntkit solve: {info.method}, n={h.n1}, ridge {info.ridge:.3g}{extra}, "
          f"{info.seconds:.1f} s")
    written = [args.out]
    if kt is not None:
        pred = kt[pkey].matmul(alpha, progress=not args.no_progress)
        out = args.predict_out or "predictions.npy"
        np.save(out, pred.numpy())
        written.append(out)
    print_written(written)
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "solve", help="kernel regression weights alpha = (K + ridge)^-1 y from a kernel store",
        description="Solves (K + ridge I) alpha = y for a train-train kernel store: dense "
        "float64 Cholesky when it fits in memory, else preconditioned conjugate gradients "
        "streaming the tiles. Optionally predicts K_test,train @ alpha from a second store.")
    s.add_argument("--store", required=True, metavar="ZARR", help="train-train kernel store")
    s.add_argument("--y", required=True, metavar="NPY", help="(n,) or (n, k) targets")
    s.add_argument("--one-hot", action="store_true", help="--y holds integer class labels "
                   "0..C-1")
    s.add_argument("--key", default=None, help="kernel in the store (default ntk)")
    s.add_argument("--method", choices=("auto", "cholesky", "cg"), default="auto")
    s.add_argument("--diag-reg", type=float, default=0.0,
                   help="ridge relative to the mean diagonal (default 0)")
    s.add_argument("--tol", type=float, default=1e-6, help="CG relative residual (default 1e-6)")
    s.add_argument("--maxiter", type=int, default=None, help="CG passes (default min(10 n, "
                   "2000))")
    s.add_argument("--preconditioner", choices=("pivoted_cholesky", "nystrom", "none"),
                   default="pivoted_cholesky")
    s.add_argument("--rank", type=int, default=None, help="preconditioner rank (default 200)")
    s.add_argument("--scheduler", default=None, metavar="ADDR", help="run CG's products K @ V "
                   "on a Dask cluster, each worker holding a range of the kernel's rows: "
                   "'local' (--workers processes) or a scheduler address tcp://host:8786")
    s.add_argument("--workers", type=int, default=2, help="workers of --scheduler local "
                   "(default 2)")
    s.add_argument("--out", default="alpha.npy", help="output .npy (default alpha.npy)")
    s.add_argument("--predict-store", metavar="ZARR", help="test-train kernel store (m, n)")
    s.add_argument("--predict-out", metavar="NPY", help="predictions .npy (default "
                   "predictions.npy)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s.set_defaults(func=run_solve)
