"""``ntkit kernel`` and ``ntkit solve``: kernel matrices from the command line, in memory or as a
tiled, resumable Zarr store computed in-process or on a Dask cluster.

Examples::

    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --get ntk --out k.npz     # in memory
    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --get ntk --store k.zarr  # tiled, resumable
    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --store k.zarr --scheduler tcp://host:8786
    ntkit kernel status k.zarr
    ntkit solve --store k.zarr --y y.npy --diag-reg 1e-4 --out alpha.npy
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

__all__ = ["register", "run_kernel", "run_solve"]


def _load_x(path: str, what: str, key: str, flatten: bool) -> np.ndarray:
    from .._cli_predict import load_matrix
    x = load_matrix(path, what, key)
    if x.ndim < 2:
        raise ValueError(f"{what} must be (n, d) or (n, C, *spatial), got shape {x.shape} from "
                         f"{path}")
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return np.asarray(x, dtype=np.float64)


def _keys(text: str):
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys or any(k not in ("nngp", "ntk") for k in keys):
        raise ValueError(f"--get must be nngp, ntk or nngp,ntk; got {text!r}")
    return keys


def _executor(args):
    if args.scheduler is None:
        return None, None
    try:
        from distributed import Client
    except ImportError:
        raise ValueError("--scheduler needs dask.distributed: pip install 'ntkit[scale]'") \
            from None
    if args.scheduler == "local":
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        from ._cluster import local_cluster
        cluster = local_cluster(args.workers)
        return Client(cluster), cluster
    if not args.scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise ValueError(f"--scheduler must be 'local' or an address like tcp://host:8786, got "
                         f"{args.scheduler!r}")
    try:
        return Client(args.scheduler, timeout="20s"), None
    except (OSError, TimeoutError) as e:
        raise ValueError(f"cannot reach the Dask scheduler at {args.scheduler}: {e}") from None


def run_status(path: str) -> int:
    from ._store import open_store
    h = open_store(path)
    print(h.status())
    for k, v in h.fingerprint.items():
        print(f"  {k}: {v}")
    return 0


def run_kernel(args: argparse.Namespace) -> int:
    if args.arch == "status":
        return run_status(args.data)
    from ..layers import parse_arch
    arch = parse_arch(args.arch)
    keys = _keys(args.get)
    x1 = _load_x(args.data, "DATA", args.data_key, args.flatten)
    x2 = None if args.x2 is None else _load_x(args.x2, "--x2", args.data_key, args.flatten)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be a positive integer, got {args.tile}")
    if args.store is None:
        if args.scheduler is not None:
            raise ValueError("--scheduler needs --store (tiles of a distributed job are written "
                             "to a Zarr store)")
        out = args.out or ("kernel.npy" if len(keys) == 1 else "kernel.npz")
        if out.endswith(".npy") and len(keys) > 1:
            raise ValueError(f"--out {out}: a .npy holds one kernel; use .npz for --get "
                             f"{args.get}")
        k = arch.kernel(x1, x2, get=keys, dtype=dtype, memory_budget=budget,
                        progress=not args.no_progress, tile=args.tile)
        arrays = {key: getattr(k, key).numpy() for key in keys}
        if out.endswith(".npy"):
            np.save(out, arrays[keys[0]])
        else:
            np.savez(out, **arrays)
        shape = next(iter(arrays.values())).shape
        print(f"ntkit kernel: {arch!r}, {' x '.join(map(str, shape))} ({', '.join(keys)})")
        print(f"wrote {os.path.abspath(out)}")
        return 0
    if args.out is not None:
        raise ValueError("--out and --store are exclusive (a store is read with ntkit.scale."
                         "open_store or `ntkit solve --store`)")
    from ._compute import compute_kernel
    client, cluster = _executor(args)
    try:
        h = compute_kernel(arch, x1, x2, get=keys, store=args.store, tile=args.tile,
                           executor=client, memory_budget=budget,
                           progress=not args.no_progress, dtype=dtype, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished tiles are kept -- rerun the same command to resume")
        return 130
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    print(f"ntkit kernel: {arch!r}")
    print(h.status())
    print(f"wrote {os.path.abspath(args.store)}")
    return 0


def run_solve(args: argparse.Namespace) -> int:
    from .._cli_predict import load_matrix
    from ._solve import solve
    from ._store import open_store
    h = open_store(args.store)
    y = load_matrix(args.y, "--y", "y")
    if args.one_hot:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"--one-hot needs integer labels of shape (n,), got {y.dtype} "
                             f"{y.shape}")
        y = np.eye(int(y.max()) + 1)[y]
    try:
        alpha, info = solve(h, y, key=args.key, method=args.method, diag_reg=args.diag_reg,
                            tol=args.tol, maxiter=args.maxiter,
                            preconditioner=None if args.preconditioner == "none"
                            else args.preconditioner, rank=args.rank,
                            progress=not args.no_progress, return_info=True)
    except RuntimeError as e:                       # e.g. an incomplete store
        raise ValueError(str(e)) from None
    np.save(args.out, alpha.numpy())
    extra = (f", {info.iterations} CG passes, residual {float(info.residual.max()):.2e}"
             if info.method == "cg" else "")
    print(f"ntkit solve: {info.method}, n={h.n1}, ridge {info.ridge:.3g}{extra}, "
          f"{info.seconds:.1f} s")
    written = [args.out]
    if args.predict_store:
        kt = open_store(args.predict_store)
        key = args.key or ("ntk" if "ntk" in kt.keys else kt.keys[0])
        if kt.n2 != h.n1:
            raise ValueError(f"--predict-store must be (m, {h.n1}) (test x train), got "
                             f"{kt.n1} x {kt.n2}")
        try:
            pred = kt[key].matmul(alpha, progress=not args.no_progress)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
        out = args.predict_out or "predictions.npy"
        np.save(out, pred.numpy())
        written.append(out)
    from ..cli import print_written
    print_written(written)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "kernel", help="exact NNGP/NTK of an architecture on data (.npy/.npz or a Zarr store)",
        description="Kernel matrices of an architecture on a data file. Without --store the "
        "matrix is computed in memory and saved to --out (.npy/.npz). With --store it is computed "
        "tile by tile into a Zarr store, in-process or on a Dask cluster (--scheduler), and a "
        "rerun after a crash resumes where it stopped. `ntkit kernel status k.zarr` shows "
        "progress.")
    p.add_argument("arch", metavar="ARCH_SPEC",
                   help="architecture text, e.g. \"Dense(512, W_std=1.4), Relu(), Dense(1)\" "
                   "(or `status` followed by a store path)")
    p.add_argument("data", metavar="DATA", help="(n, ...) inputs, .npy or .npz (entry --data-key)")
    p.add_argument("--x2", metavar="NPY", help="second inputs (n2, ...): computes K(DATA, x2)")
    p.add_argument("--data-key", default="x", help="entry of .npz inputs (default x)")
    p.add_argument("--flatten", action="store_true", help="flatten each example to a vector")
    p.add_argument("--get", default="nngp,ntk", help="nngp, ntk or nngp,ntk (default)")
    p.add_argument("--store", metavar="ZARR", help="tiled, resumable Zarr store (e.g. k.zarr)")
    p.add_argument("--out", metavar="PATH", help="in-memory mode output (.npy for one kernel, "
                   ".npz; default kernel.npz)")
    p.add_argument("--tile", type=int, default=None, help="tile edge in examples (default: "
                   "from the memory budget, or the store's)")
    p.add_argument("--scheduler", default=None, metavar="ADDR", help="'local' (a LocalCluster "
                   "of --workers processes) or a Dask scheduler address tcp://host:8786")
    p.add_argument("--workers", type=int, default=2, help="workers of --scheduler local "
                   "(default 2)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="memory for tiles in flight, GiB (default: half the available RAM)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing --store")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_kernel)

    s = sub.add_parser(
        "solve", help="kernel regression weights alpha = (K + ridge)^-1 y from a kernel store",
        description="Solves (K + ridge I) alpha = y for a train-train kernel store: dense "
        "float64 Cholesky when it fits in memory, else preconditioned conjugate gradients "
        "streaming the tiles. Optionally predicts K_test,train @ alpha from a second store.")
    s.add_argument("--store", required=True, metavar="ZARR", help="train-train kernel store")
    s.add_argument("--y", required=True, metavar="NPY", help="(n,) or (n, k) targets")
    s.add_argument("--one-hot", action="store_true", help="--y holds integer class labels")
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
    s.add_argument("--out", default="alpha.npy", help="output .npy (default alpha.npy)")
    s.add_argument("--predict-store", metavar="ZARR", help="test-train kernel store (m, n)")
    s.add_argument("--predict-out", metavar="NPY", help="predictions .npy (default "
                   "predictions.npy)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s.set_defaults(func=run_solve)
