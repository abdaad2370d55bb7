"""Subprocess for the SIGKILL tests: computes the slow RBF kernel of ``data(n)`` into STORE.

``python -m tests.scale._kill_script STORE N TILE [overwrite]``

With ``NTKIT_KILL_AT=k`` the process SIGKILLs itself at the k-th tile, in the phase named by
``NTKIT_KILL_PHASE``:

* ``sums`` (default): inside ``_mark_done`` -- the tile's data and checksums are on disk, its
  done flag is not (the window a crash must not corrupt);
* ``data``: inside ``_write_sums`` -- the data is written, its checksums are not;
* ``done``: right after ``_mark_done`` -- the tile is complete, the next one not started;
* ``create``: right after the ownership marker is written, before the Zarr group exists;
* ``remove``: (with ``overwrite``) after the old store's entries were deleted, before the new
  store is created.

The lock file of the killed process stays behind, as after a real crash."""
import os
import signal
import sys

import ntkit
from ntkit.scale import _store
from ntkit.scale._store import KernelStore
from tests.scale._kernels import data, slow_rbf

store, n, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
overwrite = len(sys.argv) > 4 and sys.argv[4] == "overwrite"
kill_at = int(os.environ.get("NTKIT_KILL_AT", "0"))
phase = os.environ.get("NTKIT_KILL_PHASE", "sums")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def patch(owner, name, before: bool):
    orig = getattr(owner, name)
    count = [0]

    def hooked(*a, **k):
        count[0] += 1
        if before and count[0] == kill_at:
            die()
        out = orig(*a, **k)
        if not before and count[0] == kill_at:
            die()
        return out
    setattr(owner, name, hooked)


if kill_at:
    if phase == "sums":
        patch(KernelStore, "_mark_done", before=True)
    elif phase == "data":
        patch(KernelStore, "_write_sums", before=True)
    elif phase == "done":
        patch(KernelStore, "_mark_done", before=False)
    elif phase == "create":
        patch(_store, "_write_marker", before=False)
    elif phase == "remove":
        patch(_store, "remove_store_contents", before=False)
    else:
        raise SystemExit(f"unknown NTKIT_KILL_PHASE {phase!r}")
    if phase == "remove":
        from ntkit.scale import _compute
        _compute.remove_store_contents = _store.remove_store_contents
ntkit.compute_kernel(slow_rbf, data(n), store=store, tile=tile, progress=False,
                     overwrite=overwrite)
