"""Subprocess for the SIGKILL tests: computes the slow RBF kernel of ``data(n)`` into STORE.

With ``NTKIT_KILL_AT=k`` the process SIGKILLs itself inside the k-th ``_mark_done`` call, i.e. after
that tile's data was written but before its done flag: the window a crash must not corrupt."""
import os
import signal
import sys

import ntkit
from ntkit.scale._store import KernelStore
from tests.scale._kernels import data, slow_rbf

store, n, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kill_at = int(os.environ.get("NTKIT_KILL_AT", "0"))
if kill_at:
    orig = KernelStore._mark_done
    count = [0]

    def mark(self, i, j):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        orig(self, i, j)
    KernelStore._mark_done = mark
ntkit.compute_kernel(slow_rbf, data(n), store=store, tile=tile, progress=False)
