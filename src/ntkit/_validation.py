"""Input checks shared by the public entry points: clear errors naming the argument and the fix."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

GET_KEYS = ("nngp", "ntk")


def as_tensor(x: Any, name: str, dtype: Optional[torch.dtype] = None,
              min_ndim: int = 2) -> torch.Tensor:
    """Convert ``x`` (tensor, ndarray or nested list) to a finite floating tensor.

    Raises ``TypeError``/``ValueError`` naming ``name`` on wrong type, rank, dtype or NaN/Inf.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, (np.ndarray, list, tuple)) or np.isscalar(x):
        try:
            arr = np.asarray(x)
        except Exception as e:  # ragged lists etc.
            raise TypeError(f"`{name}` could not be converted to an array: {e}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                       or arr.dtype == bool):
            raise TypeError(f"`{name}` must be numeric, got an array of dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy array, got "
                        f"{type(x).__name__}")
    if t.is_complex():
        raise TypeError(f"`{name}` must be real, got complex dtype {t.dtype}")
    if t.ndim < min_ndim:
        raise ValueError(
            f"`{name}` must have at least {min_ndim} dims (batch first, e.g. (n, d)), got shape "
            f"{tuple(t.shape)}; for a single example use `{name}[None]`, for 1-D features use "
            f"`{name}[:, None]`")
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.numel() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"`{name}` contains {bad} NaN/Inf value(s); clean or impute them first")
    return t


def parse_get(get: Union[str, Sequence[str], None]) -> Tuple[Tuple[str, ...], bool]:
    """Normalise ``get`` to a tuple of keys and whether a single tensor should be returned."""
    if get is None:
        return GET_KEYS, False
    if isinstance(get, str):
        keys, single = (get,), True
    else:
        keys, single = tuple(get), False
    if not keys:
        raise ValueError("`get` is empty; ask for 'nngp', 'ntk' or ('nngp', 'ntk')")
    for g in keys:
        if g not in GET_KEYS:
            raise ValueError(f"`get` has unknown key {g!r}; valid keys are {GET_KEYS}")
    return keys, single


def check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    """Check a variance-like hyper-parameter."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'non-negative' if allow_zero else 'positive'} "
                         f"and finite, got {value!r}")
    return v


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)
