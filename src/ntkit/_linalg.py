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
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._validation import all_finite

__all__ = ["Factorization", "factorize", "clear_cache", "as_square_matrix", "sym_eigh",
           "matmul_lower"]

_EPS64 = float(torch.finfo(torch.float64).eps)
_EPS32 = float(torch.finfo(torch.float32).eps)

#: Use SciPy's LAPACK/BLAS (``syevd`` divide and conquer, ``trmm``) for CPU float32/float64
#: matrices when SciPy is installed (an optional dependency, imported lazily). Measured on the
#: 2-core CI machine, n = 2000 float64: ``scipy.linalg.eigh(driver='evd')`` 1.5-2x faster than
#: ``torch.linalg.eigh``. ``False`` forces the torch implementations (tests compare the two).
USE_SCIPY = True
_SCIPY: Any = None

#: the float32 eigendecomposition of a float32 kernel is used only when every eigenvalue is at
#: least this fraction of the largest (condition number <= 1e4), and at least twice the
#: numerical-null cutoff ``n eps32``: see :meth:`Factorization.working_spectrum`.
F32_MIN_RATIO = 1e-4


def _scipy_linalg():
    """``scipy.linalg`` or ``None`` (not installed, or :data:`USE_SCIPY` is False)."""
    global _SCIPY
    if not USE_SCIPY:
        return None
    if _SCIPY is None:
        try:
            import scipy.linalg as sl
            import scipy.linalg.blas  # noqa: F401
            _SCIPY = sl
        except Exception:  # pragma: no cover - scipy missing or broken
            _SCIPY = False
    return _SCIPY or None


#: below this matrix size SciPy's BLAS runs on ONE thread: its OpenBLAS threads busy-wait, and
#: beside other busy processes small calls slowed down up to ~30x (measured: ``NTKClassifier()``
#: on pima, 6.9 s with OpenBLAS's default threads vs 0.25 s with one, load average ~7, 2 cores)
SCIPY_MIN_N = 1024
_THREADPOOL: Any = None


class _BlasThreads:
    """Context manager: SciPy's BLAS uses at most ``torch.get_num_threads()`` threads inside it,
    and one thread for matrices smaller than :data:`SCIPY_MIN_N` (threadpoolctl, installed with
    scikit-learn; a no-op without it): never more BLAS threads than torch was told to use."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> "_BlasThreads":
        global _THREADPOOL
        self._ctx: Any = None
        if _THREADPOOL is None:
            try:
                from threadpoolctl import ThreadpoolController
                _THREADPOOL = ThreadpoolController()
            except Exception:  # pragma: no cover - threadpoolctl missing
                _THREADPOOL = False
        if _THREADPOOL:
            k = max(1, torch.get_num_threads()) if self.n >= SCIPY_MIN_N else 1
            self._ctx = _THREADPOOL.limit(limits=k, user_api="blas")
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def _scipy_ok(*ts: torch.Tensor) -> Any:
    sl = _scipy_linalg()
    if sl is None:
        return None
    for t in ts:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or \
                t.requires_grad:
            return None
    return sl


def sym_eigh(a: torch.Tensor, overwrite: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(evals ascending, evecs)`` of the symmetric matrix ``a`` (its lower triangle is read).

    LAPACK's divide-and-conquer ``syevd`` through SciPy for CPU float32/float64 tensors when
    SciPy is available (faster than ``torch.linalg.eigh`` on CPU; BLAS threads capped, see
    :class:`_BlasThreads`), else ``torch.linalg.eigh``;
    both give the same numbers to rounding (``tests/test_predict_fast_paths.py``). The
    eigenvectors may come back column-major (a non-contiguous tensor). ``overwrite=True`` lets
    SciPy use ``a``'s memory as workspace (only for a temporary the caller discards).
    """
    sl = _scipy_ok(a)
    if sl is not None and a.ndim == 2 and a.shape[0] > 0:
        # a is symmetric: its transpose is the same matrix, already in Fortran order
        arr = a.detach().numpy().T
        try:
            with _BlasThreads(arr.shape[0]):
                w, v = sl.eigh(arr, lower=False, driver="evd", check_finite=False,
                               overwrite_a=overwrite)
        except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - did not converge
            pass
        else:
            return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(a)


def matmul_lower(x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``x @ low`` for a lower-triangular ``low`` ``(n, n)`` and ``x`` ``(..., n)``: BLAS
    ``trmm`` (half the flops of a general product) through SciPy when available, else
    ``torch.matmul``. Only the lower triangle of ``low`` is read by ``trmm``; it must be zero
    above the diagonal for the torch fallback to agree."""
    sl = _scipy_ok(x, low)
    if sl is None or x.dtype != low.dtype or x.numel() == 0:
        return torch.matmul(x, low)
    shape = x.shape
    b = x.detach().reshape(-1, shape[-1]).numpy()
    # row-major  X L  ==  column-major  (L^T X^T): trmm on the transposes, no copies
    fn = sl.blas.dtrmm if x.dtype == torch.float64 else sl.blas.strmm
    with _BlasThreads(low.shape[-1]):
        out = fn(1.0, low.detach().numpy().T, b.T, side=0, lower=0, trans_a=0)
    return torch.from_numpy(np.ascontiguousarray(out.T)).reshape(shape)


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
    if k.numel() and not all_finite(k):
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
        self._working: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._lock = threading.RLock()

    # ---- eigendecomposition -----------------------------------------------------------
    @property
    def has_eigh(self) -> bool:
        """Whether :meth:`eigh` has already run (its result is kept): a caller that needs
        either factorization reuses the eigendecomposition instead of adding a Cholesky."""
        return self._eigh is not None

    def eigh(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(evals, evecs)`` of the regularized matrix, ascending, negatives clipped to 0.

        Raises ``ValueError`` if the matrix is not PSD beyond ``psd_tol``.
        """
        with self._lock:
            if self._eigh is None:
                evals, evecs = sym_eigh(self.matrix)
                if self.n and not (all_finite(evals) and all_finite(evecs)):
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

    def working_spectrum(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`spectrum` in the kernel's own precision where that is safe: for a float32
        kernel, ``(evals, evecs, live)`` in **float32** when the float32 eigendecomposition
        shows a well-conditioned matrix, otherwise (and for every other dtype) the float64
        :meth:`spectrum`. Used by the ensemble predictor, which then computes in that dtype.

        The accuracy check (no silently wrong answer): the float32 result is kept only if
        every eigenvalue is at least ``max(F32_MIN_RATIO, 2 n eps32)`` times the largest
        (condition number at most ``1e4``, every mode far above the numerical-null cutoff
        ``n eps32 lambda_max`` so no mode is classified differently from the float64 path;
        float32 ``syevd`` eigenvalues are accurate to ``~ n^(1/2) eps32 lambda_max``, far below
        that margin). Then the float32 factorization's backward error ``~ eps32 ||K||`` is of
        the order of the rounding already in a float32 kernel, and predictions differ from
        the float64 path by at most ``~ cond(K) eps32 <= 1.2e-3`` relative to their scale
        (``~1e-6`` measured on the benchmark kernels). An ill-conditioned, singular or non-PSD
        float32 kernel falls back to the float64 eigendecomposition (which also does the PSD
        check)."""
        with self._lock:
            if self._working is None:
                self._working = self._float32_spectrum() or self.spectrum()
            return self._working

    def _float32_spectrum(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.input_dtype != torch.float32 or not self.n or self._eigh is not None:
            return None
        evals, evecs = sym_eigh(self.matrix.to(torch.float32), overwrite=True)
        if not (all_finite(evals) and all_finite(evecs)):
            return None
        top, low = float(evals[-1]), float(evals[0])
        if not top > 0 or low < max(F32_MIN_RATIO, 2.0 * self.n * _EPS32) * top:
            return None
        return evals, evecs, torch.ones_like(evals, dtype=torch.bool)

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
                    if int(info) == 0 and all_finite(L):
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


def _forgetter(key: int) -> Callable[[Any], None]:
    """The weakref callback that drops ``key``'s cache entries when its tensor dies."""
    return lambda _r: _forget(key)


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
                _REFS[key] = weakref.ref(k, _forgetter(key))
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
