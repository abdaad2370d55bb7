"""ntkit: Neural Tangent Kernels in PyTorch.

One architecture definition gives both the exact infinite-width kernels (NNGP and NTK) and the
finite ``torch.nn.Module`` they describe::

    >>> import torch, ntkit
    >>> from ntkit import layers as nl
    >>> arch = nl.serial(nl.Dense(512), nl.Relu(), nl.Dense(1))
    >>> x = torch.randn(10, 3, dtype=torch.float64)
    >>> k = arch.kernel(x, get=('nngp', 'ntk'))     # k.nngp, k.ntk: (10, 10)
    >>> net = arch.module(in_shape=3)               # the finite network, NTK parameterization

Public names are imported lazily, so ``import ntkit`` stays cheap and optional dependencies
(scikit-learn, matplotlib, dask, zarr) are only imported by the parts that need them.
"""
from __future__ import annotations

from . import _malloc, _threads

_threads.configure()   # before anything imports torch: OpenMP threads sleep instead of spinning
_malloc.configure()    # freed kernel-sized arrays are reused, not page-faulted afresh

import importlib  # noqa: E402
from typing import Any  # noqa: E402

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "Kernel": "ntkit.kernel",
    "monte_carlo_kernel": "ntkit.monte_carlo",
    "from_torch": "ntkit.layers",
    "empirical_ntk": "ntkit.empirical",
    "empirical_nngp": "ntkit.empirical",
    "linearize": "ntkit.empirical",
    "taylor_expand": "ntkit.empirical",
    "centered": "ntkit.empirical",
    "scaled": "ntkit.empirical",
    "compute_kernel": "ntkit.scale",
    "NTKRegressor": "ntkit.estimators",
    "NTKClassifier": "ntkit.estimators",
    "settings": "ntkit._settings",
}
_SUBMODULES = ("layers", "predict", "diagnostics", "plots", "report", "scale", "data",
               "estimators", "empirical", "kernel", "cli", "features")

__all__ = sorted(list(_EXPORTS) + list(_SUBMODULES) + ["__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"ntkit.{name}")
    raise AttributeError(f"module 'ntkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
