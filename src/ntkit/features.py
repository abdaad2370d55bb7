"""Random feature maps of NNGP/NTK kernels and linear models on them, for data sets too large
for an ``n x n`` kernel.

``features(arch, x, dim)`` returns ``phi`` with ``phi(x1) @ phi(x2).T ~= arch.kernel(x1, x2)``
(relative error ~ ``dim^-1/2``; see :mod:`ntkit.layers._feature_ops` for the construction), and
:func:`ridge` fits ridge regression in the primal: ``D x D`` normal equations in float64, one
eigendecomposition for every ridge value, the ridge chosen on a validation split. Kernel
regression with the exact kernel is the ``dim -> infinity`` limit.

Example::

    >>> from ntkit import layers as nl, features as nf
    >>> arch = nl.serial(nl.Conv(64, 3, padding='SAME'), nl.Relu(), nl.GlobalAvgPool(),
    ...                  nl.Dense(10))
    >>> phi_tr = nf.features(arch, x_train, dim=512, seed=0)      # (n, 1025)
    >>> phi_va = nf.features(arch, x_val, dim=512, seed=0)         # the same map: same seed
    >>> fit = nf.ridge(phi_tr, y_onehot, phi_val=phi_va, y_val=y_val_onehot, score='accuracy')
    >>> pred = fit.predict(nf.features(arch, x_test, dim=512, seed=0))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union, overload

import torch

from ._validation import as_tensor
from .layers import Layer, feature_dim

__all__ = ["features", "feature_dim", "ridge", "RidgeFit", "normal_equations"]

Tensor = torch.Tensor

if TYPE_CHECKING:
    # For type checkers only: the return type of ``features`` follows ``get`` (a string: one
    # tensor; a tuple or list of keys, or None: a dict). At run time ``features`` IS the
    # implementation in ``ntkit.layers`` (imported below), so nothing changes; the signature
    # here is kept equal to it by tests/test_types.py.
    from ._typing import MemoryBudget

    _Keys = Union[Tuple[str, ...], List[str], None]

    @overload
    def features(arch: Layer, x: Any, dim: int = ..., get: str = ..., *, seed: int = ...,
                 method: str = ..., out_dim: Optional[int] = ..., dtype: torch.dtype = ...,
                 memory_budget: MemoryBudget = ..., chunk: Optional[int] = ...,
                 progress: bool = ..., mask_constant: Optional[float] = ...,
                 frozen: Sequence[int] = ..., readout: str = ...,
                 **call_args: Any) -> Tensor: ...

    @overload
    def features(arch: Layer, x: Any, dim: int = ..., *, get: _Keys, seed: int = ...,
                 method: str = ..., out_dim: Optional[int] = ..., dtype: torch.dtype = ...,
                 memory_budget: MemoryBudget = ..., chunk: Optional[int] = ...,
                 progress: bool = ..., mask_constant: Optional[float] = ...,
                 frozen: Sequence[int] = ..., readout: str = ...,
                 **call_args: Any) -> Dict[str, Tensor]: ...

    @overload
    def features(arch: Layer, x: Any, dim: int, get: _Keys, *, seed: int = ...,
                 method: str = ..., out_dim: Optional[int] = ..., dtype: torch.dtype = ...,
                 memory_budget: MemoryBudget = ..., chunk: Optional[int] = ...,
                 progress: bool = ..., mask_constant: Optional[float] = ...,
                 frozen: Sequence[int] = ..., readout: str = ...,
                 **call_args: Any) -> Dict[str, Tensor]: ...

    @overload   # `get` of a type known only as str-or-sequence: either
    def features(arch: Layer, x: Any, dim: int = ...,
                 get: Union[str, Sequence[str], None] = ..., *, seed: int = ...,
                 method: str = ..., out_dim: Optional[int] = ..., dtype: torch.dtype = ...,
                 memory_budget: MemoryBudget = ..., chunk: Optional[int] = ...,
                 progress: bool = ..., mask_constant: Optional[float] = ...,
                 frozen: Sequence[int] = ..., readout: str = ...,
                 **call_args: Any) -> Union[Tensor, Dict[str, Tensor]]: ...

    def features(arch: Layer, x: Any, dim: int = 1024,
                 get: Union[str, Sequence[str], None] = "ntk", *, seed: int = 0,
                 method: str = "rf", out_dim: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, memory_budget: MemoryBudget = None,
                 chunk: Optional[int] = None, progress: bool = False,
                 mask_constant: Optional[float] = None, frozen: Sequence[int] = (),
                 readout: str = "gaussian",
                 **call_args: Any) -> Union[Tensor, Dict[str, Tensor]]: ...
else:
    from .layers import features


@dataclass(frozen=True)
class RidgeFit:
    """A fitted primal ridge model ``f(x) = phi(x) @ weights + intercept``.

    ``ridge`` is the chosen regularization (absolute, added to ``phi.T phi``); ``scores`` maps
    every ridge value tried to its validation score (empty without a validation split)."""
    weights: Tensor
    intercept: Tensor
    ridge: float
    scores: Dict[float, float] = field(default_factory=dict)
    score_name: str = "mse"

    def predict(self, phi: Tensor) -> Tensor:
        """``(n, D) -> (n, k)`` predictions (float64)."""
        phi = as_tensor(phi, "phi")
        if phi.ndim != 2 or phi.shape[1] != self.weights.shape[0]:
            raise ValueError(f"`phi` must be (n, {self.weights.shape[0]}) features from the same "
                             f"map, got shape {tuple(phi.shape)}")
        w = self.weights.to(phi.device)
        return _matmul64(phi, w) + self.intercept.to(phi.device)


def _matmul64(a: Tensor, w: Tensor, chunk: int = 8192) -> Tensor:
    """``a @ w`` in float64 without converting all of ``a`` at once."""
    out = [a[s:s + chunk].to(torch.float64) @ w for s in range(0, a.shape[0], chunk)]
    return torch.cat(out, 0)


def normal_equations(phi: Tensor, y: Tensor, chunk: int = 8192
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(phi^T phi, phi^T y, column means of phi, mean of y)`` accumulated in float64 over row
    chunks (``phi`` may be float32 and larger than a float64 copy would allow)."""
    d = phi.shape[1]
    a = torch.zeros((d, d), dtype=torch.float64, device=phi.device)
    b = torch.zeros((d, y.shape[1]), dtype=torch.float64, device=phi.device)
    s = torch.zeros(d, dtype=torch.float64, device=phi.device)
    for i in range(0, phi.shape[0], chunk):
        p = phi[i:i + chunk].to(torch.float64)
        a.addmm_(p.T, p)
        b.addmm_(p.T, y[i:i + chunk].to(device=phi.device, dtype=torch.float64))
        s += p.sum(0)
    return a, b, s / phi.shape[0], y.to(torch.float64).mean(0)


def _score(pred: Tensor, y: Tensor, name: str) -> float:
    if name == "mse":
        return float(((pred - y) ** 2).mean())
    return float((pred.argmax(1) == y.argmax(1)).double().mean())


def ridge(phi: Tensor, y: Tensor, ridge: Union[None, float, Sequence[float]] = None, *,
          phi_val: Optional[Tensor] = None, y_val: Optional[Tensor] = None,
          score: str = "mse", relative: bool = True, fit_intercept: bool = False,
          solver: str = "auto") -> RidgeFit:
    """Ridge regression on features: in the primal (``D x D``) for ``n >= D``, in the dual
    (``n x n``) for ``n < D``.

    Solves ``min_w |phi w - y|^2 + r |w|^2`` for every ridge value ``r`` from one float64
    eigendecomposition -- of ``phi^T phi`` (primal, cost ``n D^2 + D^3``) or of ``phi phi^T``
    (dual, cost ``n^2 D + n^3``; ``w = phi^T (phi phi^T + r)^-1 y``, the same weights for
    ``r > 0``) -- and keeps the value with the best validation score.

    Args:
      phi: ``(n, D)`` training features; y: ``(n,)`` or ``(n, k)`` targets (e.g. one-hot).
      ridge: one value or a list; default ``10^-6 .. 10^1`` (13 values) when a validation split
        is given, else ``1e-6``.
      phi_val, y_val: validation features and targets; required to choose among several values.
      score: ``'mse'`` (lower is better) or ``'accuracy'`` (argmax over columns, higher is better).
      relative: ridge values are relative to ``trace(phi^T phi) / D`` (default) or absolute.
      fit_intercept: centre features and targets (an unpenalized intercept).
      solver: ``'auto'`` (dual when ``n < D``), ``'primal'`` or ``'dual'``. At ``ridge=0`` the
        dual gives the minimum-norm interpolant where the primal system is singular.

    Returns:
      :class:`RidgeFit` with ``weights (D, k)``, ``intercept (k,)``, the chosen ``ridge`` and
      the validation ``scores``.
    """
    phi = as_tensor(phi, "phi")
    y = as_tensor(y, "y", min_ndim=1)
    y2 = y[:, None] if y.ndim == 1 else y
    if phi.ndim != 2:
        raise ValueError(f"`phi` must be (n, D) features, got shape {tuple(phi.shape)}")
    if y2.ndim != 2 or y2.shape[0] != phi.shape[0]:
        raise ValueError(f"`y` must have {phi.shape[0]} rows like `phi`, got shape "
                         f"{tuple(y.shape)}")
    if score not in ("mse", "accuracy"):
        raise ValueError(f"`score` must be 'mse' or 'accuracy', got {score!r}")
    if solver not in ("auto", "primal", "dual"):
        raise ValueError(f"`solver` must be 'auto', 'primal' or 'dual', got {solver!r}")
    if (phi_val is None) != (y_val is None):
        raise ValueError("pass both `phi_val` and `y_val` (the validation split), or neither")
    if ridge is None:
        ridges = [10.0 ** e for e in range(-6, 2)] if phi_val is not None else [1e-6]
        ridges = sorted(set(ridges + ([10 ** (e + 0.5) for e in range(-6, 1)]
                                      if phi_val is not None else [])))
    else:
        ridges = [float(ridge)] if isinstance(ridge, (int, float)) else [float(r) for r in ridge]
    if not ridges or any(not math.isfinite(r) or r < 0 for r in ridges):
        raise ValueError(f"`ridge` values must be finite and >= 0, got {ridge!r}")
    if len(ridges) > 1 and phi_val is None:
        raise ValueError("several `ridge` values need a validation split to choose from: pass "
                         "`phi_val` and `y_val`")
    n, d = phi.shape
    dual = solver == "dual" or (solver == "auto" and n < d)
    if dual:
        # phi (centred if fit_intercept) as float64 rows; w = phi^T U (L + r)^-1 U^T y
        mx = phi.to(torch.float64).mean(0) if fit_intercept else None
        my = y2.to(device=phi.device, dtype=torch.float64).mean(0)
        p64 = phi.to(torch.float64) - (mx if mx is not None else 0.0)
        yc = y2.to(device=phi.device, dtype=torch.float64) - (my if fit_intercept else 0.0)
        a = p64 @ p64.T                                 # (n, n) Gram
        b = yc
        if mx is None:
            mx = torch.zeros(d, dtype=torch.float64, device=phi.device)
    else:
        a, b, mx, my = normal_equations(phi, y2)
        if fit_intercept:   # centred normal equations
            a = a - n * torch.outer(mx, mx)
            b = b - n * torch.outer(mx, my)
    a = 0.5 * (a + a.T)
    # the same relative scale either way: trace(phi^T phi) / D
    scale = float(torch.diagonal(a).sum()) / d if relative else 1.0
    if not math.isfinite(scale):
        raise ValueError("`phi` gives non-finite normal equations; check the features")
    if scale <= 0:
        scale = 1.0
    lam, vec = torch.linalg.eigh(a)
    lam = lam.clamp_min(0)
    # below this the system is singular to float64 precision: solving it would return huge,
    # meaningless weights without an error (e.g. ridge 0 with duplicated rows or n > rank)
    tiny = float(lam.max()) * max(a.shape) * torch.finfo(torch.float64).eps
    vb = vec.T @ b                                      # (D, k) primal, (n, k) dual
    if dual:
        # map back to feature space once: weights(r) = (phi^T U) (vb / (lam + r)); phi^T U is
        # (D, n)
        vec = p64.T @ vec
        del p64

    def weights(r: float) -> Tensor:
        den = lam + r * scale
        if bool((den <= tiny).any()):
            raise ValueError(f"the ridge system is singular at ridge={r:g} (to float64 "
                             f"precision); use a larger ridge")
        w: Tensor = vec @ (vb / den[:, None])
        return w

    def intercept(w: Tensor) -> Tensor:
        return (my - mx @ w) if fit_intercept else torch.zeros_like(my)

    scores: Dict[float, float] = {}
    best = ridges[0]
    if phi_val is not None:
        pv = as_tensor(phi_val, "phi_val")
        yv = as_tensor(y_val, "y_val", min_ndim=1)
        yv = (yv[:, None] if yv.ndim == 1 else yv).to(torch.float64)
        if pv.ndim != 2 or pv.shape[1] != phi.shape[1] or yv.shape != (pv.shape[0], y2.shape[1]):
            raise ValueError(f"`phi_val`/`y_val` must be ({'m'}, {phi.shape[1]}) and "
                             f"(m, {y2.shape[1]}), got {tuple(pv.shape)} and {tuple(yv.shape)}")
        pvv = _matmul64(pv, vec)                        # (m, D): once for every ridge value
        for r in ridges:
            den = lam + r * scale
            if bool((den <= tiny).any()):
                continue
            coef = vb / den[:, None]
            pred = pvv @ coef
            if fit_intercept:
                pred = pred + (my - (mx @ vec) @ coef)
            scores[r] = _score(pred, yv.to(pred.device), score)
        if not scores:
            raise ValueError("no ridge value gives a solvable system; use ridge > 0")
        pick = min if score == "mse" else max
        best = pick(scores, key=lambda r: (scores[r], -r if score == "mse" else r))
    w = weights(best)
    return RidgeFit(weights=w, intercept=intercept(w), ridge=best * scale, scores=scores,
                    score_name=score)
