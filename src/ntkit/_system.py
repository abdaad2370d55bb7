"""What the machine offers, read in one place: free memory and usable CPU cores.

Why one module: the default memory budgets (``arch.kernel``, ``features``, ``compute_kernel``,
``scale.solve``) and the worker counts (``compute_kernel``'s thread pool) must agree on what
"available" means. Cores are the ones this process may run on (``os.sched_getaffinity``: a
container or ``taskset`` limit), not the machine's total (``os.cpu_count``). Memory is the
device's: for CUDA tensors the free memory of their GPU (``torch.cuda.mem_get_info``), else RAM.

Example::

    >>> from ntkit._system import available_memory, available_cores
    >>> available_memory() > 0, available_cores() >= 1
    (True, True)
"""
from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["available_memory", "available_cores"]

_FALLBACK_MEMORY = 4 << 30


def _device_type(device: Any) -> str:
    """``'cpu'``, ``'cuda'``, ... of a ``torch.device``, a device string or a tensor."""
    if device is None:
        return "cpu"
    dev = getattr(device, "device", device)  # a tensor's device
    return str(getattr(dev, "type", dev)).split(":")[0]


def available_memory(device: Optional[Any] = None) -> int:
    """Bytes of memory available now where the work runs.

    ``device``: ``None`` or a CPU device/tensor: RAM (Linux ``MemAvailable``; else free physical
    pages; 4 GiB when neither can be read). A CUDA device (``torch.device``, ``'cuda:1'`` or a
    tensor on it): that GPU's free memory (``torch.cuda.mem_get_info``), since tiles of CUDA
    inputs live there, not in RAM.

    Example: ``available_memory(x.device)`` sizes tiles for ``x`` wherever it lives.
    """
    kind = _device_type(device)
    if kind == "cuda":
        import torch
        dev = getattr(device, "device", device)
        free, _total = torch.cuda.mem_get_info(torch.device(str(dev)))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_MEMORY


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where the
    platform has no affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
