"""Float64 factorizations of symmetric PSD kernel matrices, shared by the prediction code.

Why: kernels from real data are often ill-conditioned (neural-tangents issues #76, #128, #198:
float32 Cholesky fails and predictions become NaN). Here every kernel matrix is

* converted to float64 (whatever the input dtype) and symmetrized;
* regularized with a ridge relative to its mean diagonal (``diag_reg * trace(K) / n``), or an
  absolute one on request — neural-tangents' ``diag_reg`` convention;
* factorized lazily: ``eigh`` for functions of the matrix (``exp(-K t)``, the pseudo-inverse:
  everything in :mod:`ntkit.predict`), Cholesky for plain linear solves
  (:meth:`Factorization.solve`, with a pseudo-inverse fallback when the matrix is singular);
* one numerical-null threshold: eigenvalues at or below ``cutoff = n * eps(dtype) * lambda_max``
  (``dtype`` the kernel's own floating type, float32 -> 1.2e-7, float64 -> 2.2e-16) are
  indistinguishable from rounding noise in the kernel and are treated as exactly zero
  (:meth:`Factorization.spectrum`), the default tolerance of ``numpy.linalg.matrix_rank``;
* checked: a matrix whose most negative eigenvalue is below ``-psd_tol * lambda_max`` raises a
  ``ValueError`` that names the argument and the fix (smaller negative eigenvalues are rounding
  noise and are clipped to zero);
* cached: :func:`factorize` returns the same :class:`Factorization` for the same tensor (same
  object, unmodified: ``tensor._version`` unchanged) and the same ridge, for as long as that tensor
  is alive, so repeated ``predict`` calls on one kernel factorize once.

Example::

    >>> f = factorize(k_train_train, diag_reg=1e-4)      # nothing computed yet
    >>> alpha = f.solve(y)                                # Cholesky (cached), (n, k) float64
    >>> evals, evecs = f.eigh()                           # eigh (cached), evals >= 0, ascending
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["Factorization", "factorize", "clear_cache", "as_square_matrix"]

_EPS64 = float(torch.finfo(torch.float64).eps)


def null_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the kernel's own dtype (float64 for non-float types), used by the
    numerical-null threshold ``n * eps * lambda_max``."""
    try:
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else _EPS64
    except TypeError:  # pragma: no cover
        return _EPS64


def default_psd_tol(dtype: torch.dtype) -> float:
    """Relative tolerance (to the largest eigenvalue) for negative eigenvalues of a PSD kernel.

    Rounding in a kernel computed in ``dtype`` makes eigenvalues slightly negative; beyond this the
    matrix is not a kernel matrix (or is far too noisy) and we refuse to continue.
    """
    return 1e-4 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8


def as_square_matrix(k: Any, name: str) -> torch.Tensor:
    """``k`` (tensor / ndarray) as a floating ``(n, n)`` tensor, finite, with clear errors."""
    if isinstance(k, np.ndarray):
        if not (np.issubdtype(k.dtype, np.number) or k.dtype == bool):
            raise TypeError(f"`{name}` must be numeric, got an array of dtype {k.dtype}")
        k = torch.from_numpy(np.ascontiguousarray(k))
    if not isinstance(k, torch.Tensor):
        hint = ""
        if hasattr(k, "ntk") or hasattr(k, "nngp"):
            hint = " (got a kernel record: pass `k.ntk` or `k.nngp`)"
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy array{hint}, "
                        f"got {type(k).__name__}")
    if k.is_complex():
        raise TypeError(f"`{name}` must be real, got dtype {k.dtype}")
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"`{name}` must be a square (n, n) kernel matrix, got shape "
                         f"{tuple(k.shape)}")
    if not k.is_floating_point():
        k = k.to(torch.float64)
    if k.numel() and not torch.isfinite(k).all():
        raise ValueError(f"`{name}` contains NaN/Inf values; recompute the kernel (in float64) "
                         f"before predicting")
    return k


class Factorization:
    """``K + ridge * I`` in float64 with lazily computed, cached Cholesky and eigendecomposition.

    Args:
      k: ``(n, n)`` symmetric PSD kernel (any floating dtype; converted to float64 on its device).
      diag_reg: ridge strength. Relative (default): ``ridge = diag_reg * trace(k) / n``.
      diag_reg_absolute_scale: if True, ``ridge = diag_reg``.
      name: argument name used in error messages.
      psd_tol: relative tolerance for negative eigenvalues (default from ``k.dtype``).

    Attributes:
      matrix: the regularized float64 matrix; ``ridge``: the absolute ridge added; ``n``.
    """

    def __init__(self, k: Any, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                 name: str = "k_train_train", psd_tol: Optional[float] = None):
        k = as_square_matrix(k, name)
        diag_reg = float(diag_reg)
        if not math.isfinite(diag_reg) or diag_reg < 0:
            raise ValueError(f"`diag_reg` must be a non-negative finite number, got {diag_reg!r}")
        self.name = name
        self.input_dtype = k.dtype
        self.psd_tol = default_psd_tol(k.dtype) if psd_tol is None else float(psd_tol)
        m = k.detach().to(torch.float64)
        n = m.shape[0]
        scale = float(m.abs().max()) if n else 0.0
        asym = float((m - m.T).abs().max()) if n else 0.0
        if asym > max(self.psd_tol, 1e3 * _EPS64) * max(scale, 1e-300):
            raise ValueError(
                f"`{name}` is not symmetric (max |K - K^T| = {asym:.3g}, max |K| = {scale:.3g}); "
                f"pass the train-train kernel k(x_train, x_train)")
        m = 0.5 * (m + m.T)
        mean_diag = float(torch.diagonal(m).mean()) if n else 0.0
        self.ridge = diag_reg if diag_reg_absolute_scale else diag_reg * mean_diag
        if not math.isfinite(self.ridge):
            raise ValueError(f"`diag_reg`={diag_reg!r} gives a non-finite ridge ({self.ridge!r}) "
                             f"for `{name}`; use a smaller `diag_reg`")
        if self.ridge:
            m = m.clone()
            m.diagonal().add_(self.ridge)
        self.matrix = m
        self.n = n
        self._chol: Optional[torch.Tensor] = None
        self._chol_failed = False
        self._eigh: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._spectrum: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._lock = threading.RLock()

    # ---- eigendecomposition -----------------------------------------------------------
    def eigh(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(evals, evecs)`` of the regularized matrix, ascending, negatives clipped to 0.

        Raises ``ValueError`` if the matrix is not PSD beyond ``psd_tol``.
        """
        with self._lock:
            if self._eigh is None:
                evals, evecs = torch.linalg.eigh(self.matrix)
                if self.n and not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
                    raise ValueError(
                        f"`{self.name}`: the eigendecomposition overflowed (entries up to "
                        f"{float(self.matrix.abs().max()):.3g}); rescale the kernel (predictions "
                        f"are invariant to scaling K and t inversely)")
                top = float(evals.abs().max()) if self.n else 0.0
                low = float(evals.min()) if self.n else 0.0
                if low < -self.psd_tol * top:
                    raise ValueError(
                        f"`{self.name}` is not positive semi-definite: smallest eigenvalue "
                        f"{low:.4g} vs largest {top:.4g} (relative {low / top:.3g}, tolerance "
                        f"{self.psd_tol:.1g}). Pass a valid kernel matrix (symmetric PSD), compute "
                        f"it in float64, or add a ridge with `diag_reg` (e.g. diag_reg=1e-6)")
                self._eigh = (evals.clamp_min(0.0), evecs)
            return self._eigh

    @property
    def cutoff(self) -> float:
        """The numerical-null threshold ``n * eps(dtype) * lambda_max``: eigenvalues at or below
        it are treated as exactly zero (null space). ``dtype`` is the kernel's input dtype: a
        float32 kernel carries rounding noise of relative size ~eps32, so smaller eigenvalues
        are not determined by the data."""
        evals, _ = self.eigh()
        top = float(evals[-1]) if self.n else 0.0
        return max(self.n, 1) * null_eps(self.input_dtype) * top

    def spectrum(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(evals, evecs, live)``: eigenvalues ascending with the numerical null space
        (``evals <= cutoff``) set to exactly 0, eigenvectors, and the boolean mask of the modes
        above the cutoff. Every prediction (finite ``t`` and ``t = inf``) uses this, so
        numerically-null modes are treated identically at all times: they do not move."""
        with self._lock:
            if self._spectrum is None:
                evals, evecs = self.eigh()
                live = evals > self.cutoff
                self._spectrum = (torch.where(live, evals, torch.zeros_like(evals)), evecs, live)
            return self._spectrum

    def pinv_solve(self, b: torch.Tensor) -> torch.Tensor:
        """``K^+ b`` with the pseudo-inverse of :meth:`spectrum` (null space dropped), for ``b``
        of shape ``(n, ...)``, float64. Unlike :meth:`solve` (Cholesky when it succeeds), this is
        exactly the ``t -> inf`` limit of the eigen-based gradient-flow predictions."""
        evals, evecs, live = self.spectrum()
        b = b.to(torch.float64)
        shape = b.shape
        inv = _safe_reciprocal(evals, 0.0)
        x = evecs @ (inv[:, None] * (evecs.T @ b.reshape(self.n, -1)))
        return x.reshape(shape)

    # ---- Cholesky and solves ----------------------------------------------------------
    def cholesky(self) -> Optional[torch.Tensor]:
        """Lower Cholesky factor, or ``None`` when the matrix is numerically singular."""
        with self._lock:
            if self._chol is None and not self._chol_failed:
                if self.n == 0:
                    self._chol_failed = True
                else:
                    L, info = torch.linalg.cholesky_ex(self.matrix)
                    if int(info) == 0 and bool(torch.isfinite(L).all()):
                        d = torch.diagonal(L)
                        # pivots tiny relative to the largest mean the matrix is singular to
                        # working precision: the pseudo-inverse is the meaningful solve then.
                        ratio = float(d.min() / d.max()) ** 2
                        if ratio > self.n * _EPS64:
                            self._chol = L
                        else:
                            self._chol_failed = True
                    else:
                        self._chol_failed = True
            return self._chol

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``K^{-1} b`` (``K^+ b`` if singular) for ``b`` of shape ``(n, ...)``, in float64."""
        b = b.to(torch.float64)
        shape = b.shape
        b2 = b.reshape(self.n, -1)
        L = self.cholesky()
        if L is not None:
            x = torch.cholesky_solve(b2, L)
        else:
            x = self.apply(lambda lam: _safe_reciprocal(lam, self.cutoff), b2)
        return x.reshape(shape)

    def apply(self, fn, b: torch.Tensor) -> torch.Tensor:
        """``V diag(fn(evals)) V^T b`` for ``b`` of shape ``(n, p)`` (a function of the matrix)."""
        evals, evecs = self.eigh()
        return evecs @ (fn(evals)[:, None] * (evecs.T @ b.to(torch.float64)))

    def pinv_evals(self) -> torch.Tensor:
        """``1 / evals`` with the null space (``evals <= cutoff``) mapped to 0."""
        evals, _ = self.eigh()
        return _safe_reciprocal(evals, self.cutoff)


def _safe_reciprocal(lam: torch.Tensor, cutoff: float) -> torch.Tensor:
    keep = lam > cutoff
    return torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)),
                       torch.zeros_like(lam))


# ---- cache ------------------------------------------------------------------------------
_CACHE: Dict[int, List[Tuple[tuple, Factorization]]] = {}
_REFS: Dict[int, Any] = {}
_MAX_PER_TENSOR = 4
_CACHE_LOCK = threading.RLock()


def _forget(key: int) -> None:
    with _CACHE_LOCK:
        _CACHE.pop(key, None)
        _REFS.pop(key, None)


def factorize(k: Any, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
              name: str = "k_train_train", psd_tol: Optional[float] = None) -> Factorization:
    """A (cached) :class:`Factorization` of ``k + ridge * I``.

    Torch tensors are cached by identity while alive and unmodified (in-place changes bump
    ``tensor._version`` and invalidate the entry); other inputs are factorized afresh.
    """
    if not isinstance(k, torch.Tensor):
        return Factorization(k, diag_reg, diag_reg_absolute_scale, name, psd_tol)
    sig = (k._version, k.data_ptr() if k.numel() else 0, tuple(k.shape), tuple(k.stride()),
           k.dtype, str(k.device), float(diag_reg), bool(diag_reg_absolute_scale), psd_tol)
    key = id(k)
    with _CACHE_LOCK:
        ref = _REFS.get(key)
        if ref is not None and ref() is k:
            for s, f in _CACHE.get(key, []):
                if s == sig:
                    f.name = name
                    return f
    f = Factorization(k, diag_reg, diag_reg_absolute_scale, name, psd_tol)
    with _CACHE_LOCK:
        ref = _REFS.get(key)
        if ref is None or ref() is not k:
            try:
                _REFS[key] = weakref.ref(k, lambda _r, key=key: _forget(key))
            except TypeError:  # pragma: no cover - tensors support weakrefs
                return f
            _CACHE[key] = []
        entries = [(s, g) for s, g in _CACHE[key] if s[0] == sig[0]]  # drop stale versions
        entries.append((sig, f))
        _CACHE[key] = entries[-_MAX_PER_TENSOR:]
    return f


def clear_cache() -> None:
    """Drop every cached factorization (frees their memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _REFS.clear()
