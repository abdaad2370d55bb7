"""``compute_kernel``: tiled, resumable, executor-agnostic kernel computation into a Zarr store.

Design:

* The ``(n1, n2)`` matrix is cut into ``tile x tile`` blocks (upper triangle only when ``x2`` is
  ``None``). A tile is a pure function of its two input blocks, computed on one thread
  (``torch.set_num_threads(1)`` while it runs) from freshly copied contiguous inputs, so the same
  tile gives the same bits in-process, in a thread pool, or on any Dask worker.
* Tiles are submitted to an executor with a bounded number in flight; results come back to the
  calling process, which writes each tile's data and then its ``done`` flag (see ``_store``).
  Workers need no access to the store (a ``tcp://`` cluster without a shared filesystem works).
* The store's fingerprint (function, inputs, dtype, tiling, get, ntkit version) must match to
  resume; only tiles without a ``done`` flag are computed.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._system import available_cores, available_memory
from .._typing import as_kernel_fn
from .._validation import as_tensor, parse_get, parse_memory_budget
from ._store import (KernelStore, StoreLock, check_store_path, create_store, hint, n_tiles,
                     refuse_foreign, remove_store_contents, store_state, RESERVED, _NAME)
from .. import __version__
from ..layers import (LIVE_ARRAYS, Layer, check_mask_constant, check_supported, collapses_channels,
                      input_masks, masked_input, max_pixels, prepare_call_args)
from ._cluster import connect
from ._fingerprint import UnfingerprintableError, fingerprint

__all__ = ["compute_kernel"]

MAX_AUTO_TILE = 2048
MIN_AUTO_TILE = 256


# ---- one tile ---------------------------------------------------------------------------
_THREAD_LOCK = threading.Lock()
_THREAD_USERS = [0, 1]          # [active tiles in this process, saved torch thread count]


class _one_thread:
    """Run torch on one intra-op thread while a tile runs.

    ``torch.set_num_threads`` sets the calling thread's OpenMP setting (per thread) and MKL's
    (global), so every tile thread sets it itself; the saved count is restored when the last
    concurrent tile in this process ends (reference-counted, so tiles in a thread pool do not
    restore it under each other's feet). Without this, a pool thread's GEMM may run on several
    threads and round differently."""

    def __enter__(self):
        with _THREAD_LOCK:
            if _THREAD_USERS[0] == 0:
                _THREAD_USERS[1] = torch.get_num_threads()
            _THREAD_USERS[0] += 1
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        with _THREAD_LOCK:
            _THREAD_USERS[0] -= 1
            if _THREAD_USERS[0] == 0:
                torch.set_num_threads(_THREAD_USERS[1])


def _is_layer(obj) -> bool:
    return isinstance(obj, Layer)


def _has_kernel(obj) -> bool:
    """A kernel source with a ``.kernel(x1, x2, get)`` method (``ntkit._typing.HasKernel``)
    that is not an ntkit architecture, e.g. :class:`ntkit.estimators.ReluNTKFix`."""
    return not _is_layer(obj) and callable(getattr(obj, "kernel", None))


def _tile_call_args(args_a: Optional[Dict[str, Any]], args_b: Optional[Dict[str, Any]],
                    diag: bool) -> Dict[str, Any]:
    """``arch.kernel`` keyword arguments of a tile from the call-time arguments of its row
    block (``args_a``) and column block (``args_b``): ``name=a`` for a symmetric tile, else
    ``name=(a, b)``."""
    if not args_a:
        return {}
    if diag:
        return dict(args_a)
    if args_b is None:
        raise ValueError("internal error: call-time arguments of the column block are missing")
    return {name: (a, args_b[name]) for name, a in args_a.items()}


def compute_tile(fn, keys: Tuple[str, ...], xa, xb, diag: bool, dtype_name: str,
                 single_fn_output: bool, args_a: Optional[Dict[str, Any]] = None,
                 args_b: Optional[Dict[str, Any]] = None,
                 mask_constant: Optional[float] = None,
                 device: Optional[str] = None) -> Dict[str, np.ndarray]:
    """One tile ``K(xa, xb)`` (``diag``: the symmetric tile ``K(xa, xa)``) as numpy arrays.
    ``args_a`` / ``args_b``: the call-time arguments (``name -> per-example rows``) of the row
    and column blocks (architectures only); ``mask_constant``: ``arch.kernel``'s masking (one
    number shared by both blocks); ``device``: where the tile is computed (``'cuda'``; default
    the CPU): the input blocks go there and the results come back to host memory.

    Runs on the worker; deterministic: fresh contiguous inputs, one torch thread."""
    dtype = getattr(torch, dtype_name)
    dev = torch.device("cpu" if device is None else device)
    xa = torch.as_tensor(xa, dtype=dtype, device=dev).contiguous().clone()
    xb = xa if diag else torch.as_tensor(xb, dtype=dtype, device=dev).contiguous().clone()
    masking = {} if mask_constant is None else {"mask_constant": mask_constant}
    with _one_thread(), torch.no_grad():
        if _is_layer(fn):
            k = fn.kernel(xa, None if diag else xb, get=keys, dtype=dtype,
                          tile=max(xa.shape[0], xb.shape[0]), **masking,
                          **_tile_call_args(args_a, args_b, diag))
            out = {key: getattr(k, key) for key in keys}
        elif _has_kernel(fn):  # another kernel source, e.g. ReluNTKFix
            out = as_kernel_fn(fn, "arch_or_fn")(xa, None if diag else xb, keys)
        else:
            r = fn(xa, xb)
            if isinstance(r, dict):
                miss = [key for key in keys if key not in r]
                if miss:
                    raise KeyError(f"the kernel function returned keys {sorted(r)}, missing "
                                   f"{miss} requested by `get`")
                out = {key: r[key] for key in keys}
            elif single_fn_output:
                out = {keys[0]: r}
            else:
                raise TypeError(f"the kernel function returned a {type(r).__name__}; with "
                                f"get={keys} it must return a dict with those keys")
    res = {}
    for key, v in out.items():
        v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device="cpu")
        if tuple(v.shape[:2]) != (xa.shape[0], xb.shape[0]):
            raise ValueError(f"the kernel function returned {key!r} of shape {tuple(v.shape)} "
                             f"for blocks of {xa.shape[0]} and {xb.shape[0]} examples; expected "
                             f"({xa.shape[0]}, {xb.shape[0]}, ...)")
        res[key] = v.detach().to(dtype).cpu().numpy()
    return res


def _tile_from_blocks(fn, keys, blocks_a, blocks_b, i, j, diag, dtype_name, single,
                      args_a=None, args_b=None, mask_constant=None, device=None):
    """Worker entry point when inputs were scattered as lists of blocks (Dask)."""
    return compute_tile(fn, keys, blocks_a, None if diag else blocks_b, diag, dtype_name, single,
                        args_a, None if diag else args_b, mask_constant, device)


# ---- fingerprint -------------------------------------------------------------------------
def _describe_fn(fn) -> str:
    """What determines the numbers: a content hash of the architecture / function (its code,
    constants, closure values and parameters; see ``_fingerprint``), with a readable label."""
    if _is_layer(fn) or _has_kernel(fn):
        label = repr(fn)
        label = "architecture " + (label if len(label) <= 160 else label[:157] + "...")
    else:
        label = (f"function {getattr(fn, '__module__', None) or '?'}."
                 f"{getattr(fn, '__qualname__', None) or type(fn).__name__}")
    what = "the architecture" if _is_layer(fn) else "the kernel function"
    return f"{label} content sha256 {fingerprint(fn, what)[:32]}"


def _describe_x(x: Optional[torch.Tensor]) -> str:
    """Shape and sha256 of the inputs as given, in float64 (so a change of `dtype` alone is
    reported as a dtype change, not as different data)."""
    if x is None:
        return "None (x2 = x1, symmetric)"
    a = np.ascontiguousarray(x.detach().cpu().to(torch.float64).numpy())
    h = hashlib.sha256(a.view(np.uint8).reshape(-1).data).hexdigest()
    return f"shape {tuple(x.shape)} sha256 {h[:32]}"


def _describe_arg(a: torch.Tensor) -> str:
    """Shape and sha256 of one per-example call-time argument, floating values in float64 and
    integers in int64 (the kernel depends on the values, not on their storage dtype)."""
    t = a.detach().cpu()
    if t.is_complex():
        t = t.to(torch.complex128)
    elif t.is_floating_point():
        t = t.to(torch.float64)
    else:
        t = t.to(torch.int64)
    arr = np.ascontiguousarray(t.numpy())
    h = hashlib.sha256(arr.view(np.uint8).reshape(-1).data).hexdigest()
    return f"{'complex' if t.is_complex() else 'real' if t.is_floating_point() else 'int'} " \
           f"shape {tuple(a.shape)} sha256 {h[:32]}"


def _describe_call_args(args: Dict[str, Tuple[Any, Any]]) -> str:
    """The call-time arguments of a kernel (``pattern=...``): a store computed with other
    values (another graph) must never be resumed."""
    parts = []
    for name in sorted(args):
        a1, a2 = args[name]
        parts.append(f"{name}: x1 {_describe_arg(a1)}; x2 "
                     f"{'= x1' if a2 is None else _describe_arg(a2)}")
    return " | ".join(parts)


def _describe_mask_constant(c: float) -> str:
    """The masking of a kernel: ``repr`` of the constant (``nan``, ``-1000000000.0``); ``-0.0``
    and ``0.0`` mark the same entries and are described alike."""
    return repr(c + 0.0)


def _fingerprint(fn, x1, x2, dtype, tile, keys, fn_desc=None,
                 call_args: Optional[Dict[str, Tuple[Any, Any]]] = None,
                 mask_constant: Optional[float] = None) -> Dict[str, str]:
    fp = {"function": _describe_fn(fn) if fn_desc is None else fn_desc,
          "x1": _describe_x(x1), "x2": _describe_x(x2),
          "dtype": str(dtype).replace("torch.", ""), "tile": str(tile),
          "get": ",".join(keys), "ntkit_version": __version__}
    if call_args:   # only when given: stores written without them keep their fingerprint
        fp["call_args"] = _describe_call_args(call_args)
    if mask_constant is not None:   # likewise: stores without masks keep their fingerprint
        fp["mask_constant"] = _describe_mask_constant(mask_constant)
    return fp


def _mismatch_message(path, stored: Dict[str, str], now: Dict[str, str]) -> str:
    diffs = [f"{k}: stored {stored.get(k)!r}, now {now.get(k)!r}"
             for k in list(now) + [k for k in stored if k not in now]
             if stored.get(k) != now.get(k)]
    return (f"kernel store {path!r} was written by a different computation, so it cannot be "
            f"resumed; differing: " + "; ".join(diffs) + ". " +
            hint("Use a new `store` path, or pass overwrite=True to discard the stored tiles.",
                 "Use a new --store path, or pass --overwrite to discard the stored tiles."))


# ---- executors -------------------------------------------------------------------------
def _is_dask_client(ex) -> bool:
    return type(ex).__module__.split(".")[0] == "distributed" and hasattr(ex, "scatter")


def _workers(ex) -> int:
    if _is_dask_client(ex):
        return max(1, sum(ex.nthreads().values()))
    return int(getattr(ex, "_max_workers", 0) or available_cores())


def _default_workers() -> int:
    return max(1, min(torch.get_num_threads(), available_cores()))


# ---- tiling ---------------------------------------------------------------------------
def _auto_tile(fn, x1, n1, n2, n_keys, budget, in_flight) -> int:
    itemsize = x1.element_size()
    ns = x1.ndim - 2
    pix = math.prod(x1.shape[2:]) if ns else 1
    full = bool(ns and _is_layer(fn) and fn.needs_full_spatial(False))
    # the working set follows the largest array inside the network (upsampling layers)
    inner = max_pixels(fn, tuple(x1.shape[1:])) if ns and _is_layer(fn) else pix
    per_entry = LIVE_ARRAYS * itemsize * (inner * inner if full else inner) + \
        n_keys * itemsize * pix
    # working sets of the tiles in flight plus their results waiting to be written
    b = int(math.sqrt(max(budget, 1) / (2 * in_flight * per_entry)))
    if b < 1:
        raise MemoryError(f"memory_budget={budget} bytes cannot hold even a 1 x 1 tile of this "
                          f"kernel ({per_entry} bytes per entry x {2 * in_flight}); raise it")
    b = min(b, MAX_AUTO_TILE)
    # equal tiles, and at least ~2 per worker when that keeps tiles >= MIN_AUTO_TILE
    n = max(n1, n2)
    k = -(-n // b)
    while k < 8 and (k + 1) * MIN_AUTO_TILE <= n and _count(k, n1, n2) < in_flight:
        k += 1
    return max(1, -(-n // k))


def _count(k: int, n1: int, n2: int) -> int:
    return k * (k + 1) // 2 if n1 == n2 else k * k


# ---- main entry --------------------------------------------------------------------------
def compute_kernel(arch_or_fn: Union[Any, Callable], x1: Any, x2: Any = None, *,
                   get: Union[str, Sequence[str], None] = None, store: Any = "k.zarr",
                   tile: Optional[int] = None, executor: Any = None,
                   memory_budget: Union[int, float, str, None] = None, progress: bool = True,
                   dtype: torch.dtype = torch.float64, overwrite: bool = False,
                   mask_constant: Optional[float] = None, **call_args: Any) -> KernelStore:
    """Compute a kernel matrix tile by tile into a Zarr store; resumable, executor-agnostic.

    Args:
      arch_or_fn: an ``ntkit.layers`` architecture (its exact NNGP/NTK are computed), another
        object with ``.kernel(x1, x2, get)`` (e.g. :class:`ntkit.estimators.ReluNTKFix`), or a
        function ``fn(x1_block, x2_block) -> tensor (b1, b2, ...)`` or ``dict`` of them (must be
        picklable, e.g. module-level, for process/Dask executors).
      x1: ``(n1, *feature_shape)`` inputs; x2: ``(n2, *feature_shape)`` or ``None`` for ``x2 =
        x1`` (then only tiles ``i <= j`` are computed and reads mirror them).
      get: kernels to store: ``'ntk'``, ``'nngp'``, a tuple; default ``('nngp', 'ntk')`` for an
        architecture, ``'kernel'`` (the function's tensor output) for a function.
      store: path of the store folder (``'k.zarr'``; new, empty, or a store ntkit wrote), or
        ``None`` for an in-memory store. Refused before anything is touched: an empty path,
        ``.``/``..``, the current directory or a parent of it, the home directory, a
        filesystem root, a regular file, a non-empty folder ntkit did not create (no
        ``.ntkit-store`` marker), a symlink to one.
      tile: tile edge in examples; default: a resumed store's tile, else chosen from
        ``memory_budget`` (at most 2048).
      executor: where tiles run. ``None``: a thread pool in this process (one thread per core,
        each tile single-threaded). Any ``concurrent.futures.Executor``; a
        ``dask.distributed.Client`` (``Client()`` local cluster, ``Client('tcp://host:8786')``);
        a scheduler address ``'tcp://...'``, or ``'local'`` (a local cluster of one
        single-threaded process per core); clients/clusters made here are closed at the end.
        Tip: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which makes
        tiles ~2x slower; ``ntkit.scale.local_cluster(n)`` starts a cluster without it.
      memory_budget: bytes for the tiles in flight (default: half the available memory of
        the inputs' device: RAM, or the GPU's free memory for CUDA inputs), or a string with a
        unit such as ``'2GB'`` / ``'512MiB'``.
      progress: tqdm progress bar over tiles.
      dtype: ``torch.float64`` (default) or ``torch.float32``.
      overwrite: discard an existing store at ``store`` instead of resuming it (only a store
        ntkit created is ever deleted, and only the entries its marker lists).
      mask_constant: neural-tangents' masking of an architecture's padded inputs, as in
        ``arch.kernel(x1, x2, mask_constant=c)``: positions whose channels all equal ``c``
        (compared in the inputs' own dtype; ``NaN`` matches ``NaN``) are padding. One number
        for both inputs, part of the store's fingerprint (a store computed with another
        constant, or without one, is never resumed). Architectures only (``TypeError`` for
        kernel functions); layers without mask support raise ``ValueError`` before any tile
        runs.
      **call_args: call-time arguments of an architecture, as in ``arch.kernel`` (e.g.
        ``pattern=(p1, p2)`` for :class:`~ntkit.layers.Aggregate`, ``pattern=p`` when ``x2`` is
        ``None``): per-example arrays; each tile gets the rows of its blocks. They are part of
        the store's fingerprint (values hashed), so a store computed with other values is
        never resumed. Refused (``TypeError``) for kernel functions and other kernel sources,
        which receive input blocks only.

    Returns:
      a :class:`KernelStore`: ``h['ntk'][i0:i1, j0:j1]`` reads lazily, ``h.load('ntk')`` is the
      full tensor, ``h.status()`` the progress.

    Rerunning the same call after a crash or Ctrl-C computes only the missing tiles, and the
    result is bitwise identical to an uninterrupted run; the rerun also re-reads every finished
    tile, checks its CRC-32 and recomputes exactly the damaged ones (with a warning). A store
    written by a different computation (the content of the architecture or function -- code,
    constants, closure values --, inputs, call-time arguments, dtype, tiling, get or ntkit
    version) is refused with a
    message naming what differs; a function whose content cannot be hashed (e.g. it closes over
    an opaque object) is refused unless ``overwrite=True``. While it runs the call holds the
    store's lock file: a second writer gets :class:`~ntkit.scale.StoreBusyError`. Tiles with
    NaN/Inf raise ``ValueError``.

    Example::

        >>> arch = nl.serial(nl.Dense(512), nl.Relu(), nl.Dense(1))
        >>> h = ntkit.compute_kernel(arch, x, get='ntk', store='k.zarr', tile=1024)
        >>> K = h.load('ntk')                          # (n, n) float64 tensor
        >>> from dask.distributed import Client
        >>> h = ntkit.compute_kernel(arch, x, get='ntk', store='k.zarr', executor=Client())
    """
    is_arch = _is_layer(arch_or_fn) or _has_kernel(arch_or_fn)
    if not is_arch and not callable(arch_or_fn):
        raise TypeError(f"`arch_or_fn` must be an ntkit.layers architecture, an object with a "
                        f".kernel(x1, x2, get) method (e.g. ReluNTKFix), or a function "
                        f"fn(x1_block, x2_block) -> tensor, got {type(arch_or_fn).__name__}")
    keys: Tuple[str, ...]
    if is_arch:       # an architecture's kernels: the library's one `get` parser
        keys, single = parse_get(get)
    else:             # a function's kernels: any distinct names (checked as store names below)
        get = "kernel" if get is None else get
        single = isinstance(get, str)
        keys = (get,) if isinstance(get, str) else tuple(get)
        if not keys or len(set(keys)) != len(keys) or not all(isinstance(k, str) and k
                                                              for k in keys):
            raise ValueError(f"`get` must be a kernel name or a tuple of distinct names, got "
                             f"{get!r}")
    bad = [k for k in keys if k in RESERVED or not _NAME.match(k)]
    if bad:
        raise ValueError(f"`get` names {bad} cannot name stored kernels: use letters, digits, "
                         f"'_', '.', '-' (not starting with '.' or '-'), and not the reserved "
                         f"{RESERVED}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}")
    # Tiles are computed on the inputs' device (CUDA inputs: on their GPU; the input blocks are
    # kept in host memory, each tile's blocks go to the GPU and its results come back to be
    # written). The store does not depend on it (CPU and GPU tiles agree to rounding).
    device = _input_device(x1, x2)
    # inputs as given (hashed in float64 for the fingerprint), then in the working dtype
    if mask_constant is None:
        x1_in = as_tensor(x1, "x1").detach().cpu()
        x2_in = None if x2 is None else as_tensor(x2, "x2").detach().cpu()
        x1 = x1_in.to(dtype).contiguous()
        x2 = None if x2_in is None else x2_in.to(dtype).contiguous()
    else:
        mask_constant = _check_masking(arch_or_fn, mask_constant, x1, x2)
        # the padding as arch.kernel finds it (in the inputs' own dtype), kept through the
        # conversion to the working dtype; NaN/inf padding passes the finiteness check
        x1_in = masked_input(x1, "x1", None, mask_constant).detach().cpu()
        x2_in = None if x2 is None else masked_input(x2, "x2", None,
                                                     mask_constant).detach().cpu()
        x1 = masked_input(x1_in, "x1", dtype, mask_constant).contiguous()
        x2 = None if x2_in is None else masked_input(x2_in, "x2", dtype,
                                                     mask_constant).contiguous()
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"`x2` per-example shape {tuple(x2.shape[1:])} does not match `x1` "
                         f"{tuple(x1.shape[1:])}")
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    if n1 == 0 or n2 == 0:
        raise ValueError(f"`x1`/`x2` must hold at least one example, got {n1} and {n2}")
    if x1[0].numel() == 0:
        raise ValueError(f"`x1` has no features per example (shape {tuple(x1.shape)})")
    args = _prepare_call_args(arch_or_fn, call_args, n1, None if x2 is None else n2)
    budget = parse_memory_budget(memory_budget)
    if budget is None:
        budget = available_memory(device or "cpu") // 2
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, (int, np.integer))
                             or tile < 1):
        raise ValueError(f"`tile` must be a positive integer, got {tile!r}")
    # the store path is checked before anything runs (and before anything is touched)
    real = None
    if store is not None:
        real = check_store_path(store)
        store = os.fspath(store)

    own_client = own_cluster = None
    handle = None
    if isinstance(executor, str):
        own_client, own_cluster = connect(executor, _default_workers())
        executor = own_client
    elif executor is not None and not hasattr(executor, "submit"):
        raise TypeError(f"`executor` must be None, a concurrent.futures-style executor (with "
                        f".submit), a dask.distributed.Client or a 'tcp://...' address, got "
                        f"{type(executor).__name__}")
    try:
        # one accelerator runs one tile at a time: one thread feeds it (two tiles in flight
        # overlap the host work of one with the compute of the other)
        workers = (_default_workers() if device is None else 1) if executor is None \
            else _workers(executor)
        in_flight = 2 * workers
        handle = _open_or_create(arch_or_fn, x1, x2, x1_in, x2_in, keys, single, dtype, tile,
                                 store, real, overwrite, budget, in_flight, args,
                                 mask_constant, device)
        _run(handle, arch_or_fn, x1, x2, keys, single, dtype, executor, workers, in_flight,
             progress, args, mask_constant, device)
    finally:
        if handle is not None:
            handle._release_lock()
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
    return handle


def _input_device(x1: Any, x2: Any) -> Optional[str]:
    """The device the tiles run on: ``None`` for the CPU (numpy inputs included), else the
    inputs' device as a string (``'cuda:0'``), which a Dask worker can be sent. Inputs on two
    different devices are refused."""
    devs = {x.device for x in (x1, x2) if isinstance(x, torch.Tensor)}
    if len(devs) > 1:
        raise ValueError(f"`x1` and `x2` are on different devices ({', '.join(map(str, devs))}); "
                         f"move both to the device that should compute the kernel")
    dev = devs.pop() if devs else torch.device("cpu")
    return None if dev.type == "cpu" else str(dev)


def _check_masking(fn, mask_constant: Any, x1: Any, x2: Any) -> float:
    """``mask_constant`` checked for ``compute_kernel``: an architecture whose layers all
    honour masks, inputs whose padding covers whole positions where required; refused here,
    before any store is touched, rather than in the first tile."""
    if not _is_layer(fn):
        raise TypeError("compute_kernel got `mask_constant`, which only ntkit.layers "
                        "architectures take (arch.kernel(..., mask_constant=c)); a kernel "
                        "function or other kernel source receives input blocks only: apply "
                        "the masking inside it instead")
    c = check_mask_constant(mask_constant)
    check_supported(fn)
    collapse = collapses_channels(fn)
    for x, name in ((x1, "x1"), (x2, "x2")):
        if x is not None:
            input_masks(collapse, x, c, name)   # partial-channel padding: ValueError
    return c


def _prepare_call_args(fn, call_args: Dict[str, Any], n1: int,
                       n2: Optional[int]) -> Dict[str, Tuple[Any, Any]]:
    """``name -> (a1, a2 or None)`` CPU tensors of the call-time arguments (checked as
    ``arch.kernel`` checks them), ``{}`` when none were given."""
    if not call_args:
        return {}
    if not _is_layer(fn):
        raise TypeError(f"compute_kernel got call-time arguments {sorted(call_args)}, which "
                        f"only ntkit.layers architectures take (arch.kernel(..., name=...)); a "
                        f"kernel function or other kernel source receives input blocks only: "
                        f"close over its extra data instead")
    args = prepare_call_args(fn, call_args, n1, n2)
    return {name: (a1.detach().cpu(), None if a2 is None else a2.detach().cpu())
            for name, (a1, a2) in args.items()}


def _block_args(args: Dict[str, Tuple[Any, Any]], side: int, rows: slice
                ) -> Optional[Dict[str, Any]]:
    """The call-time arguments of rows ``rows`` of x1 (side 1) or x2 (side 2; x1's rows when
    x2 is x1)."""
    if not args:
        return None
    return {name: (a1 if side == 1 or a2 is None else a2)[rows].contiguous()
            for name, (a1, a2) in args.items()}


def _fn_description(fn, need: bool) -> str:
    """The function part of the fingerprint; if it cannot be computed, a never-matching
    description when ``need`` is False (overwrite / in-memory), else a clear error."""
    try:
        return _describe_fn(fn)
    except UnfingerprintableError as e:
        if need:
            raise ValueError(
                f"{e}. A store is resumed only when the kernel it holds is provably the same "
                f"computation; name it instead: pass a module-level function (or an "
                f"architecture / functools.partial of plain values), or "
                + hint("pass overwrite=True to recompute from scratch (such a store cannot be "
                       "resumed).", "pass --overwrite to recompute from scratch.")) from None
        import uuid
        return f"unfingerprintable ({e}) #{uuid.uuid4().hex}"


def _open_or_create(fn, x1, x2, x1_in, x2_in, keys, single, dtype, tile, store, real,
                    overwrite, budget, in_flight, args=None, mask=None,
                    device=None) -> KernelStore:
    """Resume our store at ``real`` or create a new one (in memory when ``real`` is None).

    Order, for a path: refuse a folder that is not ours (nothing touched); create the folder if
    absent; take the write lock; look again (another writer may have finished meanwhile):
    resume our valid store unless ``overwrite``; else probe the function, delete only the
    entries our marker lists, create. On failure the lock is released and a folder this call
    created is removed again if it is still empty."""
    import zarr
    if real is None:
        return create_store(zarr.storage.MemoryStore(), real=None,
                            **_geometry(fn, x1, x2, x1_in, x2_in, keys, single, dtype, tile,
                                        budget, in_flight, fn_desc=_fn_description(fn, False),
                                        args=args, mask=mask, device=device))
    state = store_state(real)
    if state in ("foreign", "legacy"):
        refuse_foreign(store, state)
    created_dir = False
    if state == "absent":
        try:
            os.makedirs(real)
            created_dir = True
        except FileExistsError:
            pass
        except OSError as e:
            raise ValueError(f"cannot create the store folder {store!r}: {e}") from None
    lock = None
    try:
        lock = StoreLock(real, store).acquire()
        state = store_state(real)                  # again, now that we hold the lock
        if state in ("foreign", "legacy"):
            refuse_foreign(store, state)
        if state == "ours" and not overwrite:
            h = _try_resume(fn, x1_in, x2_in, dtype, tile, keys, store, real, args, mask)
            if h is not None:
                h._lock = lock
                return h
            # our folder, but its creation was interrupted (nothing computed): recreate it
        geometry = _geometry(fn, x1, x2, x1_in, x2_in, keys, single, dtype, tile, budget,
                             in_flight, fn_desc=_fn_description(fn, need=not overwrite),
                             args=args, mask=mask, device=device)
        if state == "ours":
            remove_store_contents(real)            # only what the marker says is ours
        h = create_store(store, real=real, **geometry)
    except BaseException:
        if lock is not None:
            lock.release()
        if created_dir:
            try:
                os.rmdir(real)                     # only if still empty
            except OSError:
                pass
        raise
    h.path = store
    h._lock = lock
    return h


def _geometry(fn, x1, x2, x1_in, x2_in, keys, single, dtype, tile, budget, in_flight,
              fn_desc, args=None, mask=None, device=None) -> Dict[str, Any]:
    """Tile edge, per-entry shape and fingerprint of a new store; probes one 1 x 1 tile (the
    per-entry shape of conv kernels) so a failing function fails before anything is written."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    t = int(tile) if tile is not None else _auto_tile(fn, x1, n1, n2, len(keys), budget,
                                                      in_flight)
    first = _block_args(args or {}, 1, slice(0, 1))
    probe = compute_tile(fn, keys, x1[:1], None, True, str(dtype).replace("torch.", ""), single,
                         first, mask_constant=mask, device=device)
    _check_finite(probe, "the first diagonal entry")
    tail = tuple(probe[keys[0]].shape[2:])
    mirror = tuple(range(len(tail)))
    if _is_layer(fn) and tail:
        kk = fn.kernel(x1[:1], get=keys, dtype=dtype, mask_constant=mask, **(first or {}))
        ns = len(kk.shape1) - 1
        if ns and not kk.diagonal_spatial and len(tail) == 2 * ns:
            mirror = tuple(list(range(ns, 2 * ns)) + list(range(ns)))
    fp = _fingerprint(fn, x1_in, x2_in, dtype, t, keys, fn_desc=fn_desc, call_args=args,
                      mask_constant=mask)
    return dict(n1=n1, n2=n2, tile=t, keys=keys, symmetric=x2 is None, tail=tail,
                mirror=mirror, dtype=probe[keys[0]].dtype, fingerprint=fp)


def _try_resume(fn, x1_in, x2_in, dtype, tile, keys, store, real,
                args=None, mask=None) -> Optional[KernelStore]:
    """Open our store for writing (repairing a damaged ledger) and check it holds this
    computation; ``None`` when its creation never finished (nothing computed in it)."""
    try:
        with open(os.path.join(real, "zarr.json"), encoding="utf-8") as f:
            import json
            valid = "ntkit_kernel_store" in json.load(f).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        valid = False
    if not valid:
        return None
    h = KernelStore(real, mode="r+", repair=True)
    h.path = store
    t = h.tile if tile is None else int(tile)
    now = _fingerprint(fn, x1_in, x2_in, dtype, t, keys,
                       fn_desc=_fn_description(fn, need=True), call_args=args,
                       mask_constant=mask)
    if h.fingerprint != now:
        raise ValueError(_mismatch_message(store, h.fingerprint, now))
    return h


def _check_finite(blocks: Dict[str, np.ndarray], where: str) -> None:
    for key, v in blocks.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            bad = int((~np.isfinite(v)).sum())
            raise ValueError(f"the kernel {key!r} has {bad} NaN/Inf value(s) in {where}; a store "
                             f"holds finite kernels only (NaN marks tiles not computed yet). "
                             f"Check the inputs' scale and the dtype (float64 has more range)")


def _run(h: KernelStore, fn, x1, x2, keys, single, dtype, executor, workers, in_flight,
         progress, args=None, mask=None, device=None) -> None:
    todo = h.missing()
    # tiles flagged done are re-read and checked: damaged ones are recomputed, not trusted
    rep = h.verify(progress=progress)
    if rep.damaged:
        bad = sorted({(i, j) for i, j, _, _ in rep.damaged})
        import warnings
        warnings.warn(f"kernel store {h.path!r}: {len(bad)} damaged tile(s) "
                      f"{bad[:10]}{' ...' if len(bad) > 10 else ''} will be recomputed "
                      f"({rep.damaged[0][3]})", RuntimeWarning, stacklevel=3)
        for ij in bad:
            h._mark_undone(*ij)
        todo = sorted(set(todo) | set(bad))
    if not todo:
        return
    dname = str(dtype).replace("torch.", "")
    xa_all = x1.numpy()
    xb_all = xa_all if x2 is None else x2.numpy()
    t = h.tile
    nb1, nb2 = n_tiles(h.n1, t), n_tiles(h.n2, t)
    total = len(h.pairs())
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=total - len(todo), desc="kernel tiles", unit="tile",
               disable=not progress)
    own_pool = None
    if executor is None:
        from concurrent.futures import ThreadPoolExecutor
        own_pool = executor = ThreadPoolExecutor(workers, thread_name_prefix="ntkit-tile")
    dask = _is_dask_client(executor)
    try:
        if dask:
            from distributed import as_completed as dask_completed
            rows_f = executor.scatter([xa_all[h.rows(i)] for i in range(nb1)])
            cols_f = rows_f if x2 is None else executor.scatter(
                [xb_all[h.cols(j)] for j in range(nb2)])
            rargs_f = cargs_f = [None] * max(nb1, nb2)
            if args:
                rargs_f = executor.scatter([_block_args(args, 1, h.rows(i))
                                            for i in range(nb1)])
                cargs_f = rargs_f if x2 is None else executor.scatter(
                    [_block_args(args, 2, h.cols(j)) for j in range(nb2)])

            def submit(i, j):
                return executor.submit(_tile_from_blocks, fn, keys, rows_f[i], cols_f[j], i, j,
                                       x2 is None and i == j, dname, single, rargs_f[i],
                                       cargs_f[j], mask, device, pure=False)
            ac = dask_completed()
        else:
            import concurrent.futures as cf

            def submit(i, j):
                diag = x2 is None and i == j
                return executor.submit(compute_tile, fn, keys, xa_all[h.rows(i)],
                                       None if diag else xb_all[h.cols(j)], diag, dname, single,
                                       _block_args(args or {}, 1, h.rows(i)),
                                       None if diag else _block_args(args or {}, 2, h.cols(j)),
                                       mask, device)
        pending = list(reversed(todo))
        live: Dict[Any, Tuple[int, int]] = {}
        if dask:
            while pending and len(live) < in_flight:
                ij = pending.pop()
                f = submit(*ij)
                live[f] = ij
                ac.add(f)
            for f in ac:
                ij = live.pop(f)
                blocks = f.result()
                _check_finite(blocks, f"tile {ij} (rows {h.rows(ij[0]).start}:"
                                      f"{h.rows(ij[0]).stop}, columns {h.cols(ij[1]).start}:"
                                      f"{h.cols(ij[1]).stop})")
                h._write_tile(*ij, blocks)
                bar.update(1)
                if pending:
                    nij = pending.pop()
                    nf = submit(*nij)
                    live[nf] = nij
                    ac.add(nf)
        else:
            while pending or live:
                while pending and len(live) < in_flight:
                    ij = pending.pop()
                    live[submit(*ij)] = ij
                done, _ = cf.wait(list(live), return_when=cf.FIRST_COMPLETED)
                for f in done:
                    ij = live.pop(f)
                    blocks = f.result()
                    _check_finite(blocks, f"tile {ij} (rows {h.rows(ij[0]).start}:"
                                          f"{h.rows(ij[0]).stop}, columns "
                                          f"{h.cols(ij[1]).start}:{h.cols(ij[1]).stop})")
                    h._write_tile(*ij, blocks)
                    bar.update(1)
    except BaseException:
        for f in list(locals().get("live", {})):
            f.cancel()
        raise
    finally:
        bar.close()
        if own_pool is not None:
            own_pool.shutdown(wait=True, cancel_futures=True)
