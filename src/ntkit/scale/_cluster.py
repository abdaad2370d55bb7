"""A local Dask cluster tuned for kernel tiles."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from distributed import LocalCluster

__all__ = ["local_cluster", "connect"]


def local_cluster(n_workers: int) -> LocalCluster:
    """A Dask ``LocalCluster`` of ``n_workers`` single-threaded worker processes, started without
    the ``MALLOC_TRIM_THRESHOLD_=65536`` Dask's nanny sets by default: that setting turns off
    glibc's adaptive mmap threshold, so every multi-MB temporary of a kernel tile becomes a fresh
    ``mmap`` (page faults), measured ~1.7-3x slower elementwise arc-cosine recursions."""
    import dask
    from distributed import LocalCluster
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                            dashboard_address=None)


def connect(address: str, n_workers: int) -> Tuple[Any, Optional[Any]]:
    """``(client, own_cluster)`` for an executor given as a string: ``'local'`` starts
    :func:`local_cluster` of ``n_workers`` (returned, for the caller to close after the
    client), anything else is a scheduler address (``'tcp://host:8786'``)."""
    from distributed import Client
    if address == "local":
        cluster = local_cluster(n_workers)
        return Client(cluster), cluster
    return Client(address), None
