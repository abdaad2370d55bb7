"""``ntkit kernel``: kernel matrices of an architecture on data, in memory or as a tiled,
resumable Zarr store computed in-process or on a Dask cluster (:mod:`ntkit.scale`).

Examples::

    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --get ntk --out k.npz     # in memory
    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --get ntk --store k.zarr  # tiled, resumable
    ntkit kernel "Dense(512), Relu(), Dense(1)" x.npy --store k.zarr --scheduler tcp://host:8786
    ntkit kernel status k.zarr
    ntkit kernel verify k.zarr          # exit 0: every tile matches its checksum; 2: damaged
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np

from ._io import check_out_path, load_array, store_errors

__all__ = ["register", "run_kernel", "run_status", "run_verify"]


def _load_x(path: str, what: str, key: str, flatten: bool) -> np.ndarray:
    x = load_array(path, what, key, "--data-key")
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
        from ..scale import local_cluster
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
    from ..scale import open_store
    h = open_store(path)
    print(h.status())
    for k, v in h.fingerprint.items():
        print(f"  {k}: {v}")
    return 0


def run_verify(path: str, progress: bool = True) -> int:
    """``ntkit kernel verify PATH``: exit 0 when every computed tile matches its checksum."""
    from ..scale import verify_store
    rep = verify_store(path, progress=progress)
    print(rep)
    if rep.ok:
        return 0
    n = len({(i, j) for i, j, _, _ in rep.damaged})
    what = f"{n} damaged tile(s)" if n else "; ".join(rep.problems)
    raise ValueError(f"kernel store {path} is damaged ({what}); rerun the same `ntkit kernel "
                     f"... --store {path}` command to recompute the damaged tiles")


def memory_budget_flag(text: str) -> int:
    """Bytes from ``--memory-budget``, in the library's one convention
    (:func:`ntkit._validation.parse_memory_budget`, as ``memory_budget=``): a size with a unit
    (``2GB``, ``512MiB``, ``4096B``) or a bare number of bytes (``1e9``). A bare number below
    1 MiB is refused: ``--memory-budget 4`` would be 4 bytes, surely meant as ``4GB``."""
    from .._validation import parse_memory_budget
    text = str(text).strip()
    try:
        bare = float(text)
    except ValueError:
        bare = None
    if bare is not None and math.isfinite(bare) and 0 < bare < 2**20:
        raise ValueError(f"--memory-budget {text} would be {text} bytes; write a unit, e.g. "
                         f"--memory-budget {text}GB")
    try:
        return parse_memory_budget(text, "--memory-budget")
    except (TypeError, ValueError):
        raise ValueError(f"--memory-budget must be a positive size with a unit such as 512MB or "
                         f"2GiB (or a number of bytes, e.g. 1e9), got {text!r}") from None


@store_errors
def run_kernel(args: argparse.Namespace) -> int:
    if args.arch == "status":
        return run_status(args.data)
    if args.arch == "verify":
        return run_verify(args.data, progress=not args.no_progress)
    from ..layers import parse_arch
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be a positive integer, got {args.tile}")
    budget = None if args.memory_budget is None else memory_budget_flag(args.memory_budget)
    keys = _keys(args.get)
    if args.store is None:
        if args.scheduler is not None:
            raise ValueError("--scheduler needs --store (tiles of a distributed job are written "
                             "to a Zarr store)")
        if args.overwrite:
            raise ValueError("--overwrite applies to --store only")
        out = args.out or ("kernel.npy" if len(keys) == 1 else "kernel.npz")
        check_out_path(out, "--out", (".npy", ".npz"))
        if out.endswith(".npy") and len(keys) > 1:
            raise ValueError(f"--out {out}: a .npy holds one kernel; use .npz for --get "
                             f"{args.get}")
    else:
        if args.out is not None:
            raise ValueError("--out and --store are exclusive (a store is read with ntkit.scale."
                             "open_store or `ntkit solve --store`)")
        from ..scale import check_store_path
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
    from ..scale import compute_kernel
    client, cluster = _executor(args)
    try:
        h = compute_kernel(arch, x1, x2, get=keys, store=args.store, tile=args.tile,
                           executor=client, memory_budget=budget,
                           progress=not args.no_progress, dtype=dtype, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("\ninterrupted; finished tiles are kept -- rerun the same command to resume")
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
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory for tiles in flight: a size with a unit such as 512MB or 2GiB "
                   "(a bare number is bytes; default: half the available RAM)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing --store "
                   "(only a store ntkit created is ever deleted)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_kernel)
