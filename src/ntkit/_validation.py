"""Input checks shared by the public entry points: clear errors naming the argument and the fix."""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import re
from typing import Any, Iterator, Optional, Sequence, Tuple, Union, overload

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
    if not all_finite(t):
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"`{name}` contains {bad} NaN/Inf value(s); clean or impute them first")
    given = t
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t is not given and not all_finite(t):  # (a narrower dtype can overflow)
        raise ValueError(f"`{name}` has values beyond the range of {t.dtype} (largest |x| = "
                         f"{float(x.abs().max() if torch.is_tensor(x) else np.abs(x).max()):.3g})"
                         f"; compute in float64 or rescale the inputs")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (no NaN, no +-Inf); ``True`` when empty or not
    floating point.

    Why not ``torch.isfinite(t).all()``: that allocates a boolean array and, on CPU, runs
    unvectorized (measured 0.8-1.1 ms for 384k float32 numbers on the project's 2-core CPU,
    i.e. more than the input Gram it guards); one min/max reduction is ~0.08 ms. NaN
    propagates through ``aminmax`` and an infinity is the minimum or the maximum, so both are
    finite exactly when every entry is. Complex tensors check their real and imaginary parts.
    """
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    lo, hi = extremes(t)
    return math.isfinite(lo) and math.isfinite(hi)


_EXTREMES: "contextvars.ContextVar[Optional[dict]]" = contextvars.ContextVar("ntkit_extremes",
                                                                            default=None)


@contextlib.contextmanager
def remembering_extremes() -> Iterator[None]:
    """Within the block, :func:`extremes` of a tensor it has seen and that torch has not written
    since (version counter) comes from memory: one public call checks its inputs and later
    scales them without a second pass. Scoped to one call, so a caller's writes between calls
    (also through NumPy views, which torch does not count) are never missed."""
    token = _EXTREMES.set({})
    try:
        yield
    finally:
        _EXTREMES.reset(token)


def extremes(t: torch.Tensor) -> Tuple[float, float]:
    """``(min, max)`` of a non-empty floating (or complex: of its real and imaginary parts)
    tensor; see :func:`remembering_extremes`."""
    memo = _EXTREMES.get()
    hit = memo.get(id(t)) if memo is not None else None
    if hit is not None and hit[0] is t and hit[1] == t._version:
        return hit[2], hit[3]
    r = torch.view_as_real(t) if t.is_complex() else t
    lo, hi = (float(v) for v in torch.aminmax(r.detach()))
    if memo is not None:   # (holds t: its id is not reused while the block runs)
        memo[id(t)] = (t, t._version, lo, hi)
    return lo, hi


def parse_get(get: Union[str, Sequence[str], None], allowed: Optional[Sequence[str]] = None
              ) -> Tuple[Tuple[str, ...], bool]:
    """Normalise ``get`` to a tuple of keys and whether a single tensor should be returned.

    ``allowed``: the valid keys (default :data:`GET_KEYS`, ``('nngp', 'ntk')``); ``get=None``
    asks for ``('nngp', 'ntk')``. Raises ``ValueError`` naming ``get`` and listing ``allowed``
    for an empty ``get``, an unknown key or a key asked twice.
    Example: ``parse_get('ntk') -> (('ntk',), True)``.
    """
    valid = GET_KEYS if allowed is None else tuple(allowed)
    if get is None:
        return GET_KEYS, False
    keys: Tuple[str, ...]
    if isinstance(get, str):
        keys, single = (get,), True
    else:
        keys, single = tuple(get), False
    if not keys:
        raise ValueError(f"`get` is empty; ask for one of {valid} or a tuple of them")
    for g in keys:
        if g not in valid:
            raise ValueError(f"`get` has unknown key {g!r}; valid keys are {valid}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"`get`={get!r} asks for a key twice; ask for each of {valid} once")
    return keys, single


def check_real(value: Any, name: str) -> float:
    """A finite real number (int/float/numpy scalar; not a bool or a string) as ``float``.

    Why strict: ``float('1')`` would silently accept ``W_std='1'``, and ``True`` is an int.
    Example: ``check_real(0.1, 'alpha') -> 0.1``; ``check_real(float('nan'), 'alpha')`` raises.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating,
                                                                      np.integer)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return v


def check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    """Check a variance-like hyper-parameter: a finite real number, positive (or non-negative
    with ``allow_zero``); strings and booleans are refused (see :func:`check_real`)."""
    v = check_real(value, name)
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'non-negative' if allow_zero else 'positive'} "
                         f"and finite, got {value!r}")
    return v


def check_std(value: float, name: str, allow_zero: bool = False) -> float:
    """A standard deviation whose square (the variance the kernel maps use) is a finite
    float64: ``W_std=1e200`` would make ``W_std**2`` overflow to ``inf``. Without
    ``allow_zero`` (a weight scale) the square must also be a normal number (``W_std=1e-200``
    would zero the kernel); with it (a bias scale) a square that underflows is a negligible
    bias, like ``0``.

    Example: ``check_std(1.5, 'W_std') -> 1.5``.
    """
    v = check_positive(value, name, allow_zero)
    sq = v * v
    if not math.isfinite(sq) or (not allow_zero and sq < np.finfo(np.float64).tiny):
        raise ValueError(f"`{name}`={value!r}: its square {name}**2 is not representable as a "
                         f"float64 (over/underflows); kernels scale with {name}**2, so use a "
                         f"value between 1e-150 and 1e150 (rescale the inputs instead)")
    return v


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@overload
def parse_memory_budget(value: None, name: str = ...) -> None: ...
@overload
def parse_memory_budget(value: Union[str, float], name: str = ...) -> int: ...
@overload
def parse_memory_budget(value: Any, name: str = ...) -> Optional[int]: ...


def parse_memory_budget(value: Any, name: str = "memory_budget") -> Optional[int]:
    """Bytes from a memory budget: ``None`` (the caller's default), a positive number of bytes
    (int, or a float that is a whole number >= 1), or a string with a unit: ``'2GB'`` (decimal:
    ``kB``/``MB``/``GB``/``TB`` = 10^3.. bytes), ``'512MiB'`` (binary: ``KiB``/``MiB``/``GiB``/
    ``TiB`` = 2^10.. bytes), ``'1e9'`` or ``'4096B'``.

    One convention for every entry point (``Layer.kernel``, ``compute_kernel``, ...). Raises
    ``TypeError``/``ValueError`` naming ``name`` for NaN, inf, zero, negative, booleans and
    anything else. Example: ``parse_memory_budget('2GB') -> 2000000000``.
    """
    if value is None:
        return None
    hint = (f"give `{name}` as a positive number of bytes or a string with a unit such as "
            f"'512MB' or '2GiB'")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"`{name}`={value!r} is not understood; {hint}")
        num = float(m.group(1)) * _UNITS[m.group(2).lower()]
    elif isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a number of bytes or a string like '2GB', got "
                        f"{type(value).__name__} {value!r}")
    else:
        num = float(value)
    if not math.isfinite(num) or num < 1:
        raise ValueError(f"`{name}` must be a positive, finite number of bytes (>= 1), got "
                         f"{value!r}; {hint}")
    return int(num)


def check_int(value: Any, name: str, minimum: int = 1, what: str = "") -> int:
    """An integer (``int``/numpy integer; not a bool) ``>= minimum`` as ``int``, else
    ``ValueError`` naming ``name`` (and ``what`` it counts, if given).
    Example: ``check_int(3, 'max_depth', 0, 'number of hidden ReLU layers') -> 3``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        desc = f" ({what})" if what else ""
        raise ValueError(f"`{name}`{desc} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def as_matrix(x: Any, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A detached, finite 2-D ``(n_samples, n_features)`` tensor in ``dtype`` from a tensor,
    ndarray or nested list (checks of :func:`as_tensor`, plus exactly two dims).
    Example: ``as_matrix(np.ones((3, 2)), 'x1').dtype -> torch.float64``."""
    t = as_tensor(x, name, dtype=dtype)
    if t.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (n_samples, n_features), got shape "
                         f"{tuple(t.shape)}; flatten the features, e.g. `{name}.reshape(n, -1)`")
    return t.detach()


def as_array(x: Any, name: str) -> torch.Tensor:
    """A real, finite tensor of any rank from a tensor (detached, dtype kept if floating), an
    ndarray, a nested list or a number (as float64). For matrices and vectors that are not
    batches of examples (kernels, targets, initial outputs); :func:`as_tensor` is for inputs.

    Raises ``TypeError`` (not numeric, complex) / ``ValueError`` (NaN/Inf) naming ``name``.
    Example: ``as_array([[1, 2]], 'k').dtype -> torch.float64``.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, (np.ndarray, list, tuple, numbers.Number, np.number)) \
            and not isinstance(x, (bool, np.bool_)):
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"`{name}` could not be converted to a numeric array: {e}") from None
    else:
        raise TypeError(f"`{name}` must be a torch.Tensor, numpy array or number, got "
                        f"{type(x).__name__}")
    if t.is_complex():
        raise TypeError(f"`{name}` must be real, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not all_finite(t):
        raise ValueError(f"`{name}` contains NaN/Inf values")
    return t


def check_model(model: Any, name: str = "model", trainable: bool = False) -> "torch.nn.Module":
    """``model`` if it is a ``torch.nn.Module`` (with ``trainable``: one that has a parameter
    with ``requires_grad=True``), else ``TypeError`` / ``ValueError`` naming ``name``.

    One check for the empirical kernels and the diagnostics. Example: ``check_model(net)``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(model).__name__}; wrap a "
                        "plain function in an nn.Module whose parameters are registered")
    if trainable and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"`{name}` has no trainable parameters (requires_grad=True)")
    return model


def check_momentum(momentum: Any, name: str = "momentum") -> float:
    """Heavy-ball momentum: a real number in ``[0, 1)`` (``0`` is plain gradient descent;
    ``1`` never converges). Example: ``check_momentum(0.9) -> 0.9``."""
    m = check_real(momentum, name)
    if not 0.0 <= m < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {momentum!r}")
    return m
