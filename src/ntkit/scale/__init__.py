"""Kernels beyond one machine's patience: tiled, resumable, distributed kernel matrices on disk,
and solvers for kernel systems that do not fit in memory.

* :func:`compute_kernel` splits a kernel matrix into tiles (upper triangle only for ``x2=None``),
  runs them on any ``concurrent.futures``-style executor or a ``dask.distributed.Client``, writes
  each finished tile to a Zarr store and resumes after a crash, bitwise identically.
* :class:`KernelStore` (the handle it returns; also :func:`open_store`) reads tiles lazily
  (``h['ntk'][i0:i1, j0:j1]``), loads the matrix (``h.load('ntk')``), reports ``h.status()``
  and streams ``h['ntk'].matmul(v)`` in one pass over the tiles. Every tile read is checked
  against the CRC-32 stored with it; :func:`verify_store` (CLI ``ntkit kernel verify``) checks
  them all, and rerunning the computation recomputes exactly the damaged ones.
* :func:`solve` solves ``(K + ridge I) alpha = y``: dense float64 Cholesky (eigh fallback) when
  ``K`` fits in memory, else preconditioned conjugate gradients streaming tiles from the store.

Example::

    >>> import ntkit
    >>> from ntkit import layers as nl
    >>> arch = nl.serial(nl.Dense(512), nl.Relu(), nl.Dense(1))
    >>> h = ntkit.compute_kernel(arch, x_train, get='ntk', store='k.zarr')
    >>> alpha = ntkit.scale.solve(h, y_train, diag_reg=1e-4)           # (n, k)
    >>> kt = ntkit.compute_kernel(arch, x_test, x_train, get='ntk', store='kt.zarr')
    >>> pred = kt['ntk'].matmul(alpha)                                  # (m, k)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:       # what type checkers and the API docs see; at run time: __getattr__
    from ._cluster import local_cluster
    from ._compute import compute_kernel
    from ._solve import SolveInfo, solve
    from ._store import (KernelStore, StoreBusyError, StoreDamagedError, StoreIncompleteError,
                         StoreStatus, TiledMatrix, VerifyReport, open_store, verify_store)
    from ._store import check_store_path as check_store_path   # for ntkit.cli, not __all__
    from ._store import cli_hints as cli_hints

# public name -> private module (imported on first use: `ntkit kernel --help` stays fast)
_EXPORTS = {
    "compute_kernel": "_compute", "KernelStore": "_store", "TiledMatrix": "_store",
    "StoreStatus": "_store", "open_store": "_store", "verify_store": "_store",
    "VerifyReport": "_store", "StoreDamagedError": "_store", "StoreBusyError": "_store",
    "StoreIncompleteError": "_store", "solve": "_solve", "SolveInfo": "_solve",
    "local_cluster": "_cluster",
    # for the `ntkit` command (not in __all__): refuse a --store path before any work, and
    # word the store's messages with flags instead of Python arguments
    "check_store_path": "_store", "cli_hints": "_store",
}

__all__ = ["compute_kernel", "KernelStore", "TiledMatrix", "StoreStatus", "open_store", "solve",
           "SolveInfo", "local_cluster", "verify_store", "VerifyReport", "StoreDamagedError",
           "StoreBusyError", "StoreIncompleteError"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(__all__) | set(globals()))
