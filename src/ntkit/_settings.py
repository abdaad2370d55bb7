"""Switches for tests and benchmarks, in one object instead of private module globals.

``ntkit.settings`` reads the current values and, called with keyword arguments, is a context
manager that overrides them for the block and restores them afterwards (also on error)::

    >>> import ntkit
    >>> ntkit.settings.empirical_method is None
    True
    >>> with ntkit.settings(empirical_method="A"):       # force one contraction method
    ...     ntkit.settings.empirical_method
    'A'

Switches (all default ``None``, meaning "ntkit decides"):

* ``tile_limit``: ``arch.kernel`` stops after this many tiles and raises
  ``ntkit.layers._tiling.TileLimitReached`` (with the per-tile timings), so a benchmark can
  extrapolate a huge kernel's time from its first tiles under the real tiling plan.
* ``empirical_method``: ``'A'`` or ``'B'`` forces the per-layer contraction method of
  ``empirical_ntk(..., implementation='structured')`` (normally chosen by cost).
* ``selection_budget``: a positive number ``B``; the default estimators
  (``ntkit.NTKClassifier()`` / ``NTKRegressor()``) plan their model selection so that selection
  plus final fit cost at most ``B`` single fits at the largest depth in their cost model
  (``None``: ``ntkit.estimators._COST_BUDGET`` = 3). Smaller values make the selection
  two-stage (screening on a subset) on smaller data sets.
* ``fused``: ``True`` / ``False`` force the fused numba kernels of the layer kernel maps
  (``ntkit.layers._fused``) on or off; ``None`` follows the ``NTKIT_FUSED`` environment variable
  (on unless it is ``'0'``). ``True`` without a working numba raises ``ImportError`` when a kernel
  map first asks for the fused path, instead of silently running the torch path a benchmark
  meant to compare against. The environment variable stays the way to set it for worker
  processes (a switch set here is not seen by a spawned process).

The values are process-wide (not per thread): an override is seen by every thread while the
block runs, as the old module globals were. Unknown names and invalid values raise
``TypeError`` / ``ValueError``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator

from ._validation import check_int, check_positive

__all__ = ["settings"]

_DEFAULTS: Dict[str, Any] = {"tile_limit": None, "empirical_method": None,
                             "selection_budget": None, "fused": None}


def _check(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "tile_limit":
        return check_int(value, "tile_limit")
    if name == "empirical_method":
        if value not in ("A", "B"):
            raise ValueError(f"`empirical_method` must be None (chosen by cost), 'A' or 'B', "
                             f"got {value!r}")
        return value
    if name == "selection_budget":
        return check_positive(value, "selection_budget")
    if name == "fused":
        if not isinstance(value, bool):
            raise TypeError(f"`fused` must be None (follow NTKIT_FUSED), True or False, "
                            f"got {value!r}")
        return value
    raise AssertionError(name)  # pragma: no cover - every default is checked above


class Settings:
    """The current switches (attributes) and ``settings(**changes)`` to override them."""

    def __init__(self) -> None:
        self._values: Dict[str, Any] = dict(_DEFAULTS)
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values")
        if values is None or name not in values:
            raise AttributeError(f"ntkit.settings has no switch {name!r}; switches: "
                                 f"{sorted(_DEFAULTS)}")
        return values[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"set ntkit.settings switches in a block: "
                             f"`with ntkit.settings({name}=...):`")

    def __dir__(self):
        return sorted(_DEFAULTS)

    def as_dict(self) -> Dict[str, Any]:
        """A copy of the current values."""
        return dict(self._values)

    @contextlib.contextmanager
    def __call__(self, **changes: Any) -> Iterator["Settings"]:
        unknown = sorted(set(changes) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"ntkit.settings got unknown switch(es) {unknown}; switches: "
                            f"{sorted(_DEFAULTS)}")
        checked = {k: _check(k, v) for k, v in changes.items()}
        with self._lock:
            old = {k: self._values[k] for k in checked}
            self._values.update(checked)
        try:
            yield self
        finally:
            with self._lock:
                self._values.update(old)

    def __repr__(self) -> str:
        return "ntkit.settings(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"


settings = Settings()
