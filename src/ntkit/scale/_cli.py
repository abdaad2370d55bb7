"""``ntkit kernel`` and ``ntkit solve``: kernel matrices from the command line, in memory or as a
tiled, resumable Zarr store computed in-process or on a Dask cluster.

Examples::

    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --get ntk --out k.npz     # in memory
    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --get ntk --store k.zarr  # tiled, resumable
    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --store k.zarr --scheduler tcp://host:8786
    ntkit kernel status k.zarr
    ntkit kernel verify k.zarr          # exit 0: every tile matches its checksum; 2: damaged
    ntkit solve --store k.zarr --y y.npy --diag-reg 1e-4 --out alpha.npy
"""
from __future__ import annotations

import argparse
import functools
import math
import os

import numpy as np

__all__ = ["register", "run_kernel", "run_solve"]

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _cli_errors(fn):
    """Run a subcommand with CLI-worded hints, and turn the store's state errors (busy,
    damaged, incomplete) into user errors: ``ntkit.cli.main`` prints those, like ``OSError``
    (permission denied, disk full: named with the flag of the path), as one line with exit
    code 2 -- no traceback."""
    @functools.wraps(fn)
    def run(args):
        from ._store import (cli_hints, StoreBusyError, StoreDamagedError,
                             StoreIncompleteError)
        try:
            with cli_hints():
                return fn(args)
        except (StoreBusyError, StoreDamagedError, StoreIncompleteError) as e:
            raise ValueError(str(e)) from None
    return run


def _load_array(path: str, flag: str, key: str, key_flag: str) -> np.ndarray:
    """A numeric array from ``.npy`` or ``.npz`` (entry ``key``, or its only entry), with
    messages naming the flag: missing, empty, corrupt or truncated files, pickled objects."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; expected a .npy or .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except PermissionError:
        raise ValueError(f"{flag} {path}: permission denied") from None
    if not head:
        raise ValueError(f"{flag} {path} is an empty file (0 bytes); expected a .npy or .npz "
                         f"array saved with numpy.save / numpy.savez")
    if head == NPY_MAGIC:
        try:
            with open(path, "rb") as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                read = {(1, 0): fmt.read_array_header_1_0,
                        (2, 0): fmt.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"unsupported .npy format version {version}")
                _, _, dtype = read(f)
        except Exception as e:
            raise ValueError(f"{flag} {path} is a corrupt .npy file (bad header: {e})") from None
        if dtype.hasobject:
            raise ValueError(f"{flag} {path} holds Python objects (dtype {dtype}), which ntkit "
                             f"does not unpickle; save a numeric array")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{flag} {path} is a corrupt or truncated .npy file "
                             f"({type(e).__name__}: {e})") from None
    elif head[:4] in ZIP_MAGIC:
        try:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key in names:
                    name = key
                elif len(names) == 1:
                    name = names[0]
                elif not names:
                    raise ValueError(f"{flag} {path} is an .npz archive with no arrays")
                else:
                    raise ValueError(f"{flag} {path} holds {names}; none is {key!r} (choose "
                                     f"with {key_flag})")
                arr = z[name]
        except ValueError as e:
            msg = str(e)
            if msg.startswith(flag):
                raise
            if "allow_pickle" in msg:
                raise ValueError(f"{flag} {path} holds Python objects, which ntkit does not "
                                 f"unpickle; save numeric arrays") from None
            raise ValueError(f"{flag} {path} is a corrupt or truncated .npz file "
                             f"({msg})") from None
        except Exception as e:
            raise ValueError(f"{flag} {path} is a corrupt or truncated .npz file "
                             f"({type(e).__name__}: {e})") from None
    else:
        raise ValueError(f"{flag} {path} is not a .npy or .npz file (it does not start with "
                         f"the NumPy or zip signature); save arrays with numpy.save")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{flag} in {path} must be a real numeric array, got dtype {arr.dtype}")
    return arr


def _load_x(path: str, what: str, key: str, flatten: bool) -> np.ndarray:
    x = _load_array(path, what, key, "--data-key")
    if x.ndim < 2:
        raise ValueError(f"{what} must be (n, d) or (n, C, *spatial), got shape {x.shape} from "
                         f"{path}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} {path} holds no examples (shape {x.shape})")
    if x[0].size == 0:
        raise ValueError(f"{what} {path} has no features per example (shape {x.shape})")
    if flatten:
        x = x.reshape(x.shape[0], -1)
    x = np.asarray(x, dtype=np.float64)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{what} {path} contains {bad} NaN/Inf value(s); clean or impute them")
    return x


def _keys(text: str):
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys or any(k not in ("nngp", "ntk") for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"--get must be nngp, ntk or nngp,ntk; got {text!r}")
    return keys


def _check_out(path: str, flag: str, suffixes) -> None:
    """``--out`` must name the file that is written: the right suffix, an existing folder."""
    if not path.endswith(tuple(suffixes)):
        raise ValueError(f"{flag} {path}: the file written must end with "
                         f"{' or '.join(suffixes)} (numpy would otherwise append the suffix)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; name a file")


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


def run_verify(path: str, progress: bool = True) -> int:
    """``ntkit kernel verify PATH``: exit 0 when every computed tile matches its checksum."""
    from ._store import verify_store
    rep = verify_store(path, progress=progress)
    print(rep)
    if rep.ok:
        return 0
    n = len({(i, j) for i, j, _, _ in rep.damaged})
    what = f"{n} damaged tile(s)" if n else "; ".join(rep.problems)
    raise ValueError(f"kernel store {path} is damaged ({what}); rerun the same `ntkit kernel "
                     f"... --store {path}` command to recompute the damaged tiles")


@_cli_errors
def run_kernel(args: argparse.Namespace) -> int:
    if args.arch == "status":
        return run_status(args.data)
    if args.arch == "verify":
        return run_verify(args.data, progress=not args.no_progress)
    from ..layers import parse_arch
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be a positive integer, got {args.tile}")
    budget = None
    if args.memory_budget is not None:
        if not math.isfinite(args.memory_budget) or args.memory_budget <= 0:
            raise ValueError(f"--memory-budget must be a positive number of GiB, got "
                             f"{args.memory_budget:g}")
        budget = max(1, int(args.memory_budget * 2**30))
    keys = _keys(args.get)
    if args.store is None:
        if args.scheduler is not None:
            raise ValueError("--scheduler needs --store (tiles of a distributed job are written "
                             "to a Zarr store)")
        if args.overwrite:
            raise ValueError("--overwrite applies to --store only")
        out = args.out or ("kernel.npy" if len(keys) == 1 else "kernel.npz")
        _check_out(out, "--out", (".npy", ".npz"))
        if out.endswith(".npy") and len(keys) > 1:
            raise ValueError(f"--out {out}: a .npy holds one kernel; use .npz for --get "
                             f"{args.get}")
    else:
        if args.out is not None:
            raise ValueError("--out and --store are exclusive (a store is read with ntkit.scale."
                             "open_store or `ntkit solve --store`)")
        from ._store import check_store_path
        check_store_path(args.store)                 # before any work: refused paths
    arch = parse_arch(args.arch)
    x1 = _load_x(args.data, "DATA", args.data_key, args.flatten)
    x2 = None if args.x2 is None else _load_x(args.x2, "--x2", args.data_key, args.flatten)
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"--x2 per-example shape {x2.shape[1:]} does not match DATA "
                         f"{x1.shape[1:]}")
    import torch
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    if args.store is None:
        k = arch.kernel(x1, x2, get=keys, dtype=dtype, memory_budget=budget,
                        progress=not args.no_progress, tile=args.tile)
        arrays = {key: getattr(k, key).numpy() for key in keys}
        for key, a in arrays.items():
            if not np.isfinite(a).all():
                raise ValueError(f"the {key} kernel has {int((~np.isfinite(a)).sum())} "
                                 f"NaN/Inf value(s); nothing was written. Check the inputs' "
                                 f"scale (and use --dtype float64)")
        if out.endswith(".npy"):
            np.save(out, arrays[keys[0]])
        else:
            np.savez(out, **arrays)
        shape = next(iter(arrays.values())).shape
        print(f"ntkit kernel: {arch!r}, {' x '.join(map(str, shape))} ({', '.join(keys)})")
        print(f"wrote {os.path.abspath(out)}")
        return 0
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


@_cli_errors
def run_solve(args: argparse.Namespace) -> int:
    from ._solve import solve
    from ._store import open_store
    if not math.isfinite(args.diag_reg) or args.diag_reg < 0:
        raise ValueError(f"--diag-reg must be a non-negative number, got {args.diag_reg:g}")
    if not 0 < args.tol < 1:
        raise ValueError(f"--tol must be in (0, 1) (a relative residual), got {args.tol:g}")
    if args.maxiter is not None and args.maxiter < 1:
        raise ValueError(f"--maxiter must be a positive integer, got {args.maxiter}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    _check_out(args.out, "--out", (".npy",))
    if args.predict_out and not args.predict_store:
        raise ValueError("--predict-out needs --predict-store")
    if args.predict_store:
        _check_out(args.predict_out or "predictions.npy", "--predict-out", (".npy",))
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
    y = _load_array(args.y, "--y", "y", "--y (an .npz entry named y)")
    if y.size and not np.isfinite(y.astype(np.float64)).all():
        raise ValueError(f"--y {args.y} contains NaN/Inf values")
    if args.one_hot:
        y = _one_hot(y)
    if y.ndim not in (1, 2) or y.shape[0] != h.n1:
        raise ValueError(f"--y must be (n,) or (n, k) with n = {h.n1} (the kernel's size), got "
                         f"shape {y.shape}")
    alpha, info = solve(h, y, key=args.key, method=args.method, diag_reg=args.diag_reg,
                        tol=args.tol, maxiter=args.maxiter,
                        preconditioner=None if args.preconditioner == "none"
                        else args.preconditioner, rank=args.rank,
                        progress=not args.no_progress, return_info=True)
    np.save(args.out, alpha.numpy())
    extra = (f", {info.iterations} CG passes, residual {float(info.residual.max()):.2e}"
             if info.method == "cg" else "")
    print(f"ntkit solve: {info.method}, n={h.n1}, ridge {info.ridge:.3g}{extra}, "
          f"{info.seconds:.1f} s")
    written = [args.out]
    if kt is not None:
        pred = kt[pkey].matmul(alpha, progress=not args.no_progress)
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
        "rerun after a crash resumes where it stopped (and recomputes any tile whose checksum no "
        "longer matches). `ntkit kernel status k.zarr` shows progress, `ntkit kernel verify "
        "k.zarr` checks every tile.")
    p.add_argument("arch", metavar="ARCH_SPEC",
                   help="architecture text, e.g. \"Dense(512, W_std=1.4), Relu(), Dense(1)\" "
                   "(or `status` / `verify` followed by a store path: progress / check every "
                   "tile's checksum, exit 2 if any is damaged)")
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
    p.add_argument("--overwrite", action="store_true", help="discard an existing --store "
                   "(only a store ntkit created is ever deleted)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_kernel)

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
    s.add_argument("--out", default="alpha.npy", help="output .npy (default alpha.npy)")
    s.add_argument("--predict-store", metavar="ZARR", help="test-train kernel store (m, n)")
    s.add_argument("--predict-out", metavar="NPY", help="predictions .npy (default "
                   "predictions.npy)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s.set_defaults(func=run_solve)
