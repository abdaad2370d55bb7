"""Thread settings, in one place: keep ntkit's speed on a machine shared with busy processes.

Why: torch's intra-op pool, MKL's BLAS/LAPACK and numba's parallel kernels all run on the GNU
OpenMP runtime (``libgomp``, one copy per process). By default its idle threads *spin* at every
barrier for up to ~300k iterations before sleeping. On an idle machine that saves a wake-up;
beside one busy process on 2 cores the spinning thread steals the core from the thread that
holds the work, at every one of the thousands of barriers of an ``eigh`` or a fused kernel pass.
Measured on the 2-core CI-like machine under load: the FC ReLU kernel of (4000, 784) took 40 s
with the default policy and 1.0 s with ``OMP_WAIT_POLICY=PASSIVE`` (CNN+Flatten 18.7 s vs 0.49 s;
``eigh`` of a 1200 x 1200 matrix 5.1-7.7 s vs 1.2-1.5 s, with 4x the CPU time burnt spinning).

``libgomp`` reads its settings once, when it is loaded (by ``import torch``), so the policy has
to be in the environment before torch is imported: :func:`configure` is called first thing by
``ntkit/__init__.py`` (``import ntkit`` before ``import torch``, or ``python -m ntkit``). It only
sets ``OMP_WAIT_POLICY=PASSIVE`` when the user set neither ``OMP_WAIT_POLICY`` nor
``GOMP_SPINCOUNT`` and no OpenMP runtime is loaded yet; ``NTKIT_OMP_PASSIVE=0`` opts out. When
torch came first, :func:`status` says so and the variable must be exported by the user.

Example::

    >>> import ntkit                      # before torch: sets OMP_WAIT_POLICY=PASSIVE
    >>> import torch
    >>> ntkit._threads.status()['omp_wait_policy']
    'PASSIVE'
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional

from . import _system  # os only: safe before torch is imported

__all__ = ["configure", "status"]

_RUNTIMES = ("libgomp", "libiomp", "libomp")
_applied: Optional[bool] = None


def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime is already mapped into this process (then it read its env)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
        return any(r in maps for r in _RUNTIMES)
    except OSError:  # not Linux: assume loaded iff torch is imported
        return "torch" in sys.modules


def configure() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if it can still take effect and the user chose nothing.

    Returns True when it was set by this call (idempotent: later calls return the first result).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    env = os.environ
    if env.get("NTKIT_OMP_PASSIVE", "1") == "0":
        return False
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env or "KMP_BLOCKTIME" in env:
        return False
    if _openmp_loaded():
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    _applied = True
    return True


def status() -> Dict[str, object]:
    """What is in effect: wait policy, whether ntkit set it, OpenMP loaded, usable cores
    (:func:`ntkit._system.available_cores`, the one place that reads them)."""
    cores = _system.available_cores()
    return dict(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                gomp_spincount=os.environ.get("GOMP_SPINCOUNT"),
                set_by_ntkit=bool(_applied), openmp_loaded=_openmp_loaded(), cores=cores)
