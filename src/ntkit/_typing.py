"""The contracts of ntkit's seams: what a "kernel source", a "predict function" and a "memory
budget" are, and ONE adapter that turns any kernel source into a plain kernel function.

Why: the estimators, the ensemble predictor (``ntkit.predict``) and ``ntkit.compute_kernel``
all accept "an architecture, or anything with ``.kernel(x1, x2, get)``, or a function
``kernel_fn(x1, x2, get)``"; each used to normalise it its own way (tensor / dict / record
results, single-key ``get``, error messages). :func:`as_kernel_fn` is that normalisation, once.

* :class:`HasKernel`: an object with ``.kernel(x1, x2=None, get=..., **kwargs)`` (every
  ``ntkit.layers`` architecture, :class:`ntkit.estimators.ReluNTKFix`).
* :class:`KernelFunction`: neural-tangents' ``kernel_fn(x1, x2, get, **kwargs)``.
* ``KernelSource = HasKernel | KernelFunction``.
* :class:`PredictFn`: neural-tangents' ``predict_fn(t=None, x_test=None, get=None,
  compute_cov=False)`` as returned by ``gradient_descent_mse_ensemble``.
* The other ``ntkit.predict`` factories' functions, in neural-tangents' argument order:
  :class:`TimePredictFn` (``gradient_descent_mse``: ``t=None``, convergence),
  :class:`StepsPredictFn` (``gradient_descent_mse_discrete``), :class:`ODEPredictFn`
  (``gradient_descent``: a finite ``t`` is required) and :class:`GPPredictFn`
  (``gp_inference``).
* ``MemoryBudget = int | float | str | None``: bytes, or a string with a unit (``'2GB'``,
  ``'512MiB'``); ``None`` is the entry point's default. Parsed by
  :func:`ntkit._validation.parse_memory_budget`.

A source's result for ``get`` may be a record with ``.nngp`` / ``.ntk`` (:class:`ntkit.Kernel`),
a dict keyed by ``'nngp'`` / ``'ntk'``, or (for a single key) a bare matrix.

Example::

    >>> fn = as_kernel_fn(arch)                       # or ReluNTKFix(3, 1), or a kernel_fn
    >>> k = fn(x1, None, ("nngp", "ntk"))             # {'nngp': (n1, n1), 'ntk': (n1, n1)}
"""
from __future__ import annotations

from typing import (Any, Callable, Dict, Optional, Protocol, Sequence, Tuple, Union,
                    runtime_checkable)

import numpy as np
import torch

from ._validation import as_array

__all__ = ["HasKernel", "KernelFunction", "KernelSource", "PredictFn", "TimePredictFn",
           "StepsPredictFn", "ODEPredictFn", "GPPredictFn", "MemoryBudget", "KernelFn",
           "as_kernel_fn", "is_kernel_source"]

Get = Union[str, Sequence[str], None]
MemoryBudget = Union[int, float, str, None]
#: what :func:`as_kernel_fn` returns: ``fn(x1, x2 or None, keys) -> {key: (n1, n2) tensor}``
KernelFn = Callable[[Any, Optional[Any], Tuple[str, ...]], Dict[str, torch.Tensor]]


@runtime_checkable
class HasKernel(Protocol):
    """An object with a ``.kernel(x1, x2=None, get=..., **kwargs)`` method."""

    def kernel(self, x1: Any, x2: Any = None, get: Get = ("nngp", "ntk"),
               **kwargs: Any) -> Any: ...


@runtime_checkable
class KernelFunction(Protocol):
    """A function ``kernel_fn(x1, x2, get, **kwargs)`` (neural-tangents' ``kernel_fn``)."""

    def __call__(self, x1: Any, x2: Any, get: Get, **kwargs: Any) -> Any: ...


KernelSource = Union[HasKernel, KernelFunction]


class PredictFn(Protocol):
    """``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``: the mean outputs at
    time ``t`` on ``x_test`` (``None``: the training inputs), or ``(mean, covariance)`` with
    ``compute_cov``; neural-tangents' argument order."""

    def __call__(self, t: Any = None, x_test: Any = None, get: Get = None,
                 compute_cov: bool = False) -> Any: ...


class TimePredictFn(Protocol):
    """``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``: the outputs
    at time(s) ``t`` of gradient flow (``None`` or ``inf``: convergence); the train outputs,
    the test outputs, or both as a tuple. Neural-tangents' ``gradient_descent_mse`` order."""

    def __call__(self, t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                 k_test_train: Any = None) -> Any: ...


class StepsPredictFn(Protocol):
    """``predict_fn(steps=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``: as
    :class:`TimePredictFn` after whole numbers of discrete gradient-descent ``steps``."""

    def __call__(self, steps: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                 k_test_train: Any = None) -> Any: ...


class ODEPredictFn(Protocol):
    """``predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None)``: as
    :class:`TimePredictFn` for any loss, where ``t`` is required and finite (a loss such as
    cross-entropy has no limit at ``t = inf``)."""

    def __call__(self, t: Any, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                 k_test_train: Any = None) -> Any: ...


class GPPredictFn(Protocol):
    """``predict_fn(get=None, k_test_train=None, k_test_test=None)``: the exact posteriors
    (``'nngp'``, ``'ntk'``, ``'ntkgp'``) on the training set or, with ``k_test_train``, on
    the test set (with ``k_test_test`` also their covariances). Neural-tangents'
    ``gp_inference`` order."""

    def __call__(self, get: Get = None, k_test_train: Any = None,
                 k_test_test: Any = None) -> Any: ...


def is_kernel_source(obj: Any) -> bool:
    """Whether ``obj`` has a callable ``.kernel`` or is itself callable."""
    return callable(getattr(obj, "kernel", None)) or callable(obj)


def as_kernel_fn(source: Any, name: str = "kernel_fn", **kwargs: Any) -> KernelFn:
    """``fn(x1, x2, keys) -> {key: tensor}`` calling ``source`` with ``get`` = the single key
    (a string) or the tuple of keys, and ``**kwargs`` on every call.

    ``source`` is anything with a callable ``.kernel`` (preferred when both exist) or a
    callable ``kernel_fn(x1, x2, get)``; otherwise ``TypeError`` naming ``name``. Each result
    part is checked with :func:`ntkit._validation.as_array` (real, finite; a tensor keeps its
    dtype): a missing key is a ``ValueError``, a bare matrix answering several keys a
    ``TypeError`` -- never a silently reused matrix.

    Example::

        >>> as_kernel_fn(ReluNTKFix(2, 1), "arch")(x1, x2, ("ntk",))["ntk"].shape
        torch.Size([n1, n2])
    """
    if callable(getattr(source, "kernel", None)):
        method = source.kernel

        def call(x1: Any, x2: Any, get: Get) -> Any:
            return method(x1, x2, get=get, **kwargs)
    elif callable(source):
        def call(x1: Any, x2: Any, get: Get) -> Any:
            return source(x1, x2, get, **kwargs)
    else:
        raise TypeError(f"`{name}` must be an architecture (with a `.kernel(x1, x2, get)` "
                        f"method) or a callable kernel_fn(x1, x2, get) returning .nngp/.ntk, "
                        f"got {type(source).__name__}")

    def fn(x1: Any, x2: Optional[Any], keys: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
        keys = tuple(keys)
        res = call(x1, x2, keys[0] if len(keys) == 1 else keys)
        out = {}
        for g in keys:
            v: Any
            if isinstance(res, (torch.Tensor, np.ndarray)):
                if len(keys) != 1:
                    raise TypeError(f"`{name}` returned a single matrix for get={keys}; it must "
                                    f"return an object or dict with .nngp and .ntk")
                v = res
            else:
                v = res.get(g) if isinstance(res, dict) else getattr(res, g, None)
                if v is None:
                    raise ValueError(f"`{name}(...)` has no {g!r} kernel; compute it with "
                                     f"get=('nngp', 'ntk')")
            out[g] = as_array(v, f"{name}(...).{g}")
        return out
    return fn
