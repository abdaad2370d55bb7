"""Allocator settings, in one place: reuse freed kernel-sized arrays instead of page-faulting
fresh ones.

Why: glibc's ``malloc`` serves every request above its *mmap threshold* (128 KiB at start,
raised after frees up to 32 MiB) with a fresh ``mmap``, and gives the top of its heap back to
the system once more than the *trim threshold* is free. A kernel evaluation allocates and
frees arrays of 1-200 MB for every tile and layer; each fresh mapping is zero-filled page by
page on first touch (a 64 MB fill: 23.5 ms fresh vs 7 ms on touched memory, measured here).
Raising both thresholds keeps these arrays in the heap, where the next tile reuses them.
Measured on the project's 2-core Intel Xeon VM, medians of 7, a process with the settings
against one without, alternated twice: FC ReLU NNGP+NTK of (4000, 784) 0.33 -> 0.25-0.27 s
float32 and 0.73-0.84 -> 0.50-0.56 s float64 (peak RSS +0-110 MB); the attention case of
``bench/bench_layers_vs_nt.py`` 0.19-0.20 -> 0.13-0.14 s float64. (Setting only one of the two
thresholds is worse than neither: either one turns glibc's dynamic adjustment of both off.)

:func:`configure` (called by ``ntkit/__init__.py``) sets ``M_MMAP_THRESHOLD`` = 256 MiB and
``M_TRIM_THRESHOLD`` = 512 MiB through ``mallopt`` on Linux with glibc, unless the user chose
allocator settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_``, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``) or set
``NTKIT_MALLOC=0``. The price: up to ~512 MiB of freed memory can stay with the process (its
resident size does not drop back after a large evaluation); arrays of 256 MiB and more are
mapped and returned as before.

Example::

    >>> import ntkit
    >>> ntkit._malloc.status()['set_by_ntkit']
    True
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Dict, Optional

__all__ = ["configure", "status", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameter numbers
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "MALLOC_MMAP_MAX_")
_applied: Optional[bool] = None
_why = "not configured yet"


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):   # musl, or no libc.so.6
        return None


def configure() -> bool:
    """Raise glibc's mmap and trim thresholds unless the user chose allocator settings.

    Returns True when this call set them (idempotent: later calls return the first result)."""
    global _applied, _why
    if _applied is not None:
        return _applied
    _applied = False
    env = os.environ
    if env.get("NTKIT_MALLOC", "1") == "0":
        _why = "NTKIT_MALLOC=0"
        return False
    user = [v for v in _USER_VARS if v in env]
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        _why = f"left to the user's {', '.join(user)}"
        return False
    libc = _glibc()
    if libc is None:
        _why = "not glibc"
        return False
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):   # pragma: no cover
        _why = "mallopt refused"
        return False
    _why = f"mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    _applied = True
    return True


def status() -> Dict[str, object]:
    """Whether ntkit set the allocator thresholds, and why (not)."""
    return dict(set_by_ntkit=bool(_applied), detail=_why)
