"""``K @ V`` over a kernel store on a Dask cluster, for CG solves that scale out.

Each worker owns a contiguous range of tile rows of the symmetric kernel, ``K[r0:r1, :]``, read
once into its memory as float64 (from the store on a shared filesystem; an in-memory store's
rows are sent by this process instead). A product ``K @ V`` then broadcasts ``V`` (``n x k``)
to every worker, each returns its rows ``K[r0:r1, :] @ V`` and this process stacks them:

* memory per worker: ``(n / W) n`` float64 numbers (the full rows: a stored upper tile is read
  by the owners of both its row and its column range, so each worker's output is its own rows
  only, with no reduction across workers);
* traffic per product: ``n k`` floats to each worker, ``n k / W`` floats back from each;
* work per product: one GEMM ``(n / W) x n x k`` per worker, memory-bound (each kernel entry is
  read once per product).

The preconditioner, the diagonal and the CG vectors stay in this process (``O(n k)`` and
``O(n rank)``); only the ``n^2`` part of the work is distributed.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ._cluster import connect
from ._compute import _default_workers, _is_dask_client, _one_thread
from ._store import KernelStore, TiledMatrix, n_tiles, open_store

__all__: List[str] = []


def _worker_rows(path: str, key: str, r0: int, r1: int) -> np.ndarray:
    """(On a worker) rows ``r0:r1`` of the stored kernel, float64, checksums verified."""
    return open_store(path)[key][r0:r1, :].numpy().astype(np.float64, copy=False)


def _rows_matmul(block: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(On a worker) ``block @ v`` on one torch thread (a worker is one core)."""
    with _one_thread():
        return (torch.from_numpy(block) @ torch.from_numpy(v)).numpy()


def _split_rows(n: int, tile: int, parts: int) -> List[Tuple[int, int]]:
    """Contiguous row ranges on tile boundaries, as equal in rows as the tiles allow."""
    nb = n_tiles(n, tile)
    parts = max(1, min(parts, nb))
    edges = [round(k * nb / parts) for k in range(parts + 1)]
    return [(min(a * tile, n), min(b * tile, n)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class DaskRowsOp:
    """``K @ V`` for :func:`ntkit.scale.solve` with its rows spread over a Dask cluster's
    workers (one range per worker). ``close()`` releases the workers' copies."""

    def __init__(self, tm: TiledMatrix, client: Any):
        s: KernelStore = tm.store
        self.tm, self.client = tm, client
        self.n = s.n1
        self.device = torch.device("cpu")
        workers = sorted(client.scheduler_info()["workers"])
        if not workers:
            raise ValueError("the Dask cluster has no workers; start some or pass executor=None")
        self.ranges = _split_rows(self.n, s.tile, len(workers))
        self.workers = workers[:len(self.ranges)]
        on_disk = isinstance(s.path, str) and os.path.isdir(s.path)
        self.blocks = []
        for (r0, r1), w in zip(self.ranges, self.workers):
            if on_disk:  # each worker reads its own rows from the shared store
                f = client.submit(_worker_rows, os.path.abspath(s.path), tm.key, r0, r1,
                                  workers=[w], allow_other_workers=False, pure=False)
            else:        # an in-memory store: this process reads the rows and sends them
                rows = tm[r0:r1, :].numpy().astype(np.float64, copy=False)
                f = client.scatter(rows, workers=[w], broadcast=False, direct=True, hash=False)
            self.blocks.append(f)
        self._ready = False  # (the reads run on the workers while this process goes on)

    def _wait(self) -> None:
        if not self._ready:
            from distributed import wait
            wait(self.blocks)
            bad = [f for f in self.blocks if f.status != "finished"]
            if bad:
                bad[0].result()  # re-raises the worker's error (a damaged tile, a missing path)
            self._ready = True

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        self._wait()
        vn = np.ascontiguousarray(v.detach().to(torch.float64).cpu().numpy())
        vf = self.client.scatter(vn, broadcast=True, direct=True, hash=False)  # (fresh key: a
        # content-hashed one can name a just-released future of the previous product)
        futs = [self.client.submit(_rows_matmul, b, vf, workers=[w], allow_other_workers=False,
                                   pure=False) for b, w in zip(self.blocks, self.workers)]
        parts = self.client.gather(futs)
        return torch.from_numpy(np.concatenate(parts, axis=0))

    def close(self) -> None:
        for f in self.blocks:
            f.release()
        self.blocks = []


def resolve_client(executor: Any) -> Tuple[Any, Optional[Any], Optional[Any]]:
    """``(client, own_client, own_cluster)`` for ``executor``: a ``dask.distributed.Client``,
    a scheduler address ``'tcp://...'`` or ``'local'`` (:func:`~ntkit.scale._cluster.connect`,
    as ``compute_kernel`` takes them; the ``own_*`` handles are for the caller to close)."""
    if isinstance(executor, str):
        client, cluster = connect(executor, _default_workers())
        return client, client, cluster
    if _is_dask_client(executor):
        return executor, None, None
    raise TypeError(f"`executor` for solve must be None, a dask.distributed.Client, a "
                    f"'tcp://...' scheduler address or 'local', got {type(executor).__name__}")
