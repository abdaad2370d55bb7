"""Solvers for kernel regression systems ``(K + ridge I) alpha = y`` at scale.

* ``method='cholesky'``: the matrix is loaded in float64 and factorized (Cholesky, falling back
  to the eigendecomposition / pseudo-inverse of :mod:`ntkit._linalg` when the matrix is
  numerically singular) -- exact, ``O(n^3)``, ``~2 n^2`` floats for a store.
* ``method='cg'``: preconditioned conjugate gradients. ``K`` is only touched through ``K @ V``
  (for a :class:`~ntkit.scale.KernelStore` one streaming pass over the stored tiles per iteration,
  all right-hand sides at once; each column has its own CG coefficients and stops at its own
  tolerance). Convergence is declared on the *true* residual ``||y - (K + ridge) alpha|| / ||y||
  <= tol``, recomputed when the recurrence says converged (residual replacement), so the returned
  tolerance is honest even for condition numbers near 1e8.
* Preconditioners (built in one pass over the store):

  - ``'pivoted_cholesky'``: greedy pivoted Cholesky ``K ~ L L^T`` of rank ``rank`` (pivots chosen
    among a random pool of candidate columns when ``K`` is a store -- gathering arbitrary columns
    one at a time would cost a pass each), plus the remainder's mean diagonal:
    ``P = L L^T + (tr(K - L L^T) / n + ridge) I``, applied in ``O(n rank)`` with the Woodbury
    identity.
  - ``'nystrom'``: randomized Nystrom preconditioner (Frangella, Tropp & Udell 2023): ``K Omega``
    with a Gaussian ``Omega`` gives ``K ~ U diag(lam) U^T``, and
    ``P^-1 = U diag((lam_r + ridge) / (lam + ridge)) U^T + (I - U U^T)``.

Why not ``linear_operator``: its CG (``linear_cg``) is tuned for float32 Gaussian-process training
(global tolerance settings, early stopping on the recurrence residual), and its pivoted Cholesky
needs row access through a ``LinearOperator`` subclass, which for a tiled store costs one pass per
pivot. What we need -- float64, true-residual stopping, one-pass preconditioners over a tile
stream -- is ~150 lines here, without adding a dependency.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Optional, Tuple, Union, cast

import numpy as np
import torch

from .._linalg import Factorization, as_square_matrix, factorize
from .._system import available_memory
from .._validation import all_finite, parse_memory_budget
from ._store import KernelStore, TiledMatrix, hint

__all__ = ["solve", "SolveInfo"]


@dataclasses.dataclass
class SolveInfo:
    """What :func:`solve` did: ``method`` ('cholesky', 'eigh' or 'cg'), absolute ``ridge``,
    ``iterations`` (CG passes over K), ``residual`` (true relative residual per right-hand side),
    ``converged``, ``preconditioner``, ``rank``, ``seconds``."""
    method: str
    ridge: float
    iterations: int = 0
    residual: Optional[torch.Tensor] = None
    converged: bool = True
    preconditioner: Optional[str] = None
    rank: int = 0
    seconds: float = 0.0


# ---- operators --------------------------------------------------------------------------
class _DenseOp:
    def __init__(self, k: torch.Tensor):
        self.k = k
        self.n = k.shape[0]

    def diag(self) -> torch.Tensor:
        return torch.diagonal(self.k).clone()

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        return self.k @ v

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        return self.k[:, idx]

    def dense(self) -> torch.Tensor:
        return self.k

    @property
    def device(self) -> torch.device:
        return self.k.device


class _StoreOp:
    def __init__(self, tm, progress: bool):
        self.tm, self.progress = tm, progress
        self.n = tm.shape[0]

    def diag(self) -> torch.Tensor:
        return self.tm.diagonal().to(torch.float64)

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        return self.tm.matmul(v)

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """``K[:, idx]`` in one pass over the stored tiles."""
        ix = np.asarray(idx)
        out = np.zeros((self.n, len(ix)))
        s = self.tm.store
        for I, J, blk in self.tm.iter_tiles():
            m = (ix >= J.start) & (ix < J.stop)
            if m.any():
                out[I, np.nonzero(m)[0]] = blk[:, ix[m] - J.start]
            if s.symmetric and I != J:
                m = (ix >= I.start) & (ix < I.stop)
                if m.any():
                    out[J, np.nonzero(m)[0]] = blk[ix[m] - I.start, :].T
        return torch.from_numpy(out)

    def dense(self) -> torch.Tensor:
        return self.tm.load().to(torch.float64)

    device = torch.device("cpu")  # tiles are read from the store into host memory


def _as_operator(K, key: Optional[str], progress: bool):
    if isinstance(K, KernelStore):
        if key is None:
            key = "ntk" if "ntk" in K.keys else (K.keys[0] if len(K.keys) == 1 else None)
            if key is None:
                raise ValueError(f"the store holds {K.keys}; choose one with "
                                 + hint("key=...", "--key"))
        if key not in K.keys:
            raise ValueError(f"{hint('`key`', '--key')} {key!r} is not in kernel store "
                             f"{K.path!r}; it holds {', '.join(K.keys)}")
        K = K[key]
    if isinstance(K, TiledMatrix):
        s = K.store
        if not s.symmetric or s.tail:
            raise ValueError(f"`K` must be a symmetric train-train kernel (computed with "
                             f"x2=None), got a {s.n1} x {s.n2}{' spatial' if s.tail else ''} "
                             f"store {s.path!r}")
        s._require_complete()
        return _StoreOp(K, progress)
    k = as_square_matrix(K, "K").to(torch.float64)
    return _DenseOp(k)


# ---- preconditioners ---------------------------------------------------------------------
class _Woodbury:
    """``P = L L^T + diag(d)`` applied as ``P^{-1} v`` via Woodbury (``O(n r)`` per column)."""

    def __init__(self, L: torch.Tensor, d: torch.Tensor):
        self.L, self.dinv = L, 1.0 / d
        r = L.shape[1]
        C = torch.eye(r, dtype=L.dtype, device=L.device) + L.T @ (self.dinv[:, None] * L)
        self.C = torch.linalg.cholesky(C)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        dv = self.dinv[:, None] * v
        t = torch.cholesky_solve(self.L.T @ dv, self.C)
        return dv - self.dinv[:, None] * (self.L @ t)


class _NystromPrec:
    def __init__(self, U: torch.Tensor, lam: torch.Tensor, mu: float):
        self.U = U
        self.scale = (lam[-1] + mu) / (lam + mu) - 1.0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return v + self.U @ (self.scale[:, None] * (self.U.T @ v))


def _pivoted_cholesky(op, rank: int, ridge: float, pool: Optional[int], gen) -> Tuple[Any, int]:
    n = op.n
    d = op.diag().to(torch.float64)
    dmax = float(d.max()) if n else 0.0
    dev = op.device
    if pool is None or pool >= n:
        cand = torch.arange(n, device=dev)
        cols = op.dense() if isinstance(op, _DenseOp) else None
    else:  # drawn on the CPU (the same pool on every device)
        cand = torch.sort(torch.randperm(n, generator=gen, device="cpu")[:pool]).values.to(dev)
        cols = None
    colmat = op.columns(cand) if cols is None else None        # (n, |cand|), one pass
    L = torch.zeros(n, rank, dtype=torch.float64, device=dev)
    pos = {int(c): k for k, c in enumerate(cand)}
    m = 0
    for m in range(rank + 1):
        if m == rank:
            break
        dc = d[cand]
        k = int(torch.argmax(dc))
        i = int(cand[k])
        if float(d[i]) <= 1e-14 * max(dmax, 1e-300):
            break
        col = cols[:, i] if cols is not None else cast(torch.Tensor, colmat)[:, pos[i]]
        lv = (col - L[:, :m] @ L[i, :m]) / math.sqrt(float(d[i]))
        L[:, m] = lv
        d = (d - lv * lv).clamp_min(0.0)
        d[i] = 0.0
    L = L[:, :m]
    # a scalar for the remainder (its mean diagonal): measured to need 2-30x fewer iterations
    # than the exact remainder diagonal at condition numbers 1e6-1e8 without a ridge
    sigma2 = max(float(d.mean()) if n else 0.0, 1e-14 * max(dmax, 1e-300)) + ridge
    return _Woodbury(L, torch.full_like(d, sigma2)), m


def _nystrom(op, rank: int, ridge: float, gen) -> Tuple[Any, int]:
    n = op.n
    # the sketch is drawn on the CPU (the same on every device), then moved
    omega = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64,
                                        device="cpu").to(op.device))[0]
    Y = op.matmul(omega)                                         # one pass
    nu = math.sqrt(n) * float(torch.finfo(torch.float64).eps) * float(torch.linalg.norm(Y))
    Yn = Y + nu * omega
    C = torch.linalg.cholesky(0.5 * (omega.T @ Yn + (omega.T @ Yn).T))
    B = torch.linalg.solve_triangular(C, Yn.T, upper=False).T   # Yn C^{-T}
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (S * S - nu).clamp_min(0.0)
    keep = lam > 1e-14 * max(float(lam.max()), 1e-300)
    return _NystromPrec(U[:, keep], lam[keep], ridge), int(keep.sum())


# ---- CG ----------------------------------------------------------------------------------
def _cg(op, y: torch.Tensor, ridge: float, tol: float, maxiter: int, prec, progress: bool,
        anorm: float = 0.0):
    """Block PCG. Returns ``(x, passes, true relative residual, breakdown)``; ``breakdown``
    marks columns stopped because ``p^T (K + ridge) p <= eps ||K|| p^T p`` (a singular or
    indefinite system); iteration stops early if ``x`` becomes non-finite."""
    _anorm = anorm

    def A(v):
        return op.matmul(v) + ridge * v

    def M(v):
        return v if prec is None else prec(v)

    bnorm = torch.linalg.norm(y, dim=0).clamp_min(1e-300)
    breakdown = torch.zeros(y.shape[1], dtype=torch.bool, device=y.device)
    x = torch.zeros_like(y)
    r = y.clone()
    z = M(r)
    p = z.clone()
    rz = (r * z).sum(0)
    active = torch.ones(y.shape[1], dtype=torch.bool, device=y.device)
    res = torch.linalg.norm(r, dim=0) / bnorm
    from tqdm.auto import tqdm
    bar = tqdm(total=maxiter, desc="CG", disable=not progress, leave=False)
    it = 0
    checks = 0
    try:
        while it < maxiter:
            Ap = A(p)
            it += 1
            bar.update(1)
            pAp = (p * Ap).sum(0)
            # p^T (K + ridge) p <= 0 (to rounding): K + ridge is singular or indefinite along p,
            # CG cannot make progress on that column (it would stall, or run off to 1e20)
            pp = (p * p).sum(0)
            scale = pp * (10 * math.sqrt(op.n) * float(torch.finfo(torch.float64).eps)
                          * (_anorm + abs(ridge)))
            bad = active & ~(pAp > scale) & (pp > 0)
            if bad.any():
                breakdown |= bad
                active &= ~bad
            alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1.0),
                                torch.zeros_like(rz))
            x += alpha * p
            r -= alpha * Ap
            res = torch.linalg.norm(r, dim=0) / bnorm
            bar.set_postfix(residual=f"{float(res[active].max()) if active.any() else 0:.2e}")
            if not all_finite(x):
                break                                   # diverged: reported by the caller
            newly = active & (res <= tol)
            if newly.any() or it == maxiter or not active.any():
                # residual replacement: the recurrence drifts from the truth when K is
                # ill-conditioned; check (and restart from) the true residual
                r = y - A(x)
                it += 1
                checks += 1
                res = torch.linalg.norm(r, dim=0) / bnorm
                active = (res > tol) & ~breakdown
                if not active.any() or it >= maxiter:
                    break
                z = M(r)
                p = torch.where(active, z, torch.zeros_like(z))
                rz = (r * z).sum(0)
                continue
            z = M(r)
            rz_new = (r * z).sum(0)
            beta = torch.where(active, rz_new / torch.where(rz != 0, rz, 1.0),
                               torch.zeros_like(rz))
            p = torch.where(active, z + beta * p, torch.zeros_like(p))
            rz = rz_new
    finally:
        bar.close()
    return x, it, res, breakdown


# ---- dense ---------------------------------------------------------------------------------
DENSE_BYTES = 18      # bytes per entry of a store's dense solve: the matrix and its factor, + 12%


def _dense(op, y: torch.Tensor, diag_reg: float):
    """In-memory tensors: :func:`ntkit._linalg.factorize` (cached; Cholesky, eigh fallback).
    Stores: loaded once in float64, ridge added in place and factorized with ``cholesky_ex``
    (peak ~2 n^2 floats instead of ~5); only a singular matrix goes through the heavier
    ``Factorization`` for its eigh / pseudo-inverse fallback."""
    if isinstance(op, _DenseOp):
        f = factorize(op.k, diag_reg=diag_reg, name="K")
        return f.solve(y), SolveInfo("cholesky" if f.cholesky() is not None else "eigh", f.ridge)
    A = op.dense()
    n = A.shape[0]
    ridge = diag_reg * float(torch.diagonal(A).mean())
    A.diagonal().add_(ridge)
    L, err = torch.linalg.cholesky_ex(A)
    if int(err) == 0 and all_finite(torch.diagonal(L)):
        dL = torch.diagonal(L)
        if float(dL.min() / dL.max()) ** 2 > n * float(torch.finfo(torch.float64).eps):
            del A
            return torch.cholesky_solve(y, L), SolveInfo("cholesky", ridge)
    del L
    A.diagonal().sub_(ridge)
    f = Factorization(A, diag_reg=diag_reg, name="K")
    return f.solve(y), SolveInfo("eigh" if f.cholesky() is None else "cholesky", f.ridge)


# ---- public -------------------------------------------------------------------------------
def solve(K: Any, y: Any, *, key: Optional[str] = None, method: str = "auto",
          diag_reg: float = 0.0, tol: float = 1e-6, maxiter: Optional[int] = None,
          preconditioner: Optional[str] = "pivoted_cholesky", rank: Optional[int] = None,
          memory_budget: Union[int, float, str, None] = None, progress: bool = True, seed: int = 0,
          return_info: bool = False, on_nonconvergence: str = "raise", executor: Any = None
          ) -> Union[torch.Tensor, Tuple[torch.Tensor, SolveInfo]]:
    """Solve the kernel regression system ``(K + ridge I) alpha = y`` in float64.

    Args:
      K: ``(n, n)`` symmetric PSD kernel: a tensor / array, a :class:`KernelStore` (computed with
        ``x2=None``; ``key`` picks the kernel, default ``'ntk'``) or one of its ``TiledMatrix``.
      y: ``(n,)`` or ``(n, k)`` targets; all ``k`` columns are solved together.
      method: ``'cholesky'`` (dense float64; eigh/pseudo-inverse fallback when singular),
        ``'cg'`` (preconditioned conjugate gradients; a store is streamed tile by tile, one pass
        per iteration), or ``'auto'``: dense for tensors, and for stores when ``18 n^2`` bytes
        (matrix + Cholesky factor) fit in ``memory_budget``, else CG.
      diag_reg: ridge relative to the mean diagonal: ``ridge = diag_reg * trace(K) / n``.
      tol: CG stopping rule on the true relative residual ``||y - (K+ridge) alpha|| / ||y||``,
        per column.
      maxiter: CG passes over ``K`` (default ``min(max(10 n, 100), 2000)``).
      preconditioner: ``'pivoted_cholesky'`` (default), ``'nystrom'`` or ``None``.
      rank: preconditioner rank (default ``min(n, 200)``).
      memory_budget: bytes (default: half the available memory of ``K``'s device: RAM for a
        store), or a string with a unit such as
        ``'2GB'`` / ``'512MiB'``.
      progress: tqdm bar over CG iterations.
      seed: seed of the preconditioner's random choices (pivot pool / Gaussian sketch).
      return_info: also return a :class:`SolveInfo`.
      on_nonconvergence: ``'raise'`` (default): CG that does not reach ``tol`` within
        ``maxiter``, or breaks down because ``K + ridge`` is singular/indefinite, raises
        ``ValueError`` naming the fix (usually a ridge, ``diag_reg``); ``'warn'``: return the
        best iterate with a ``RuntimeWarning`` and ``info.converged = False``.
      executor: where CG's products ``K @ V`` run for a store. ``None`` (default): streamed
        tile by tile in this process. A ``dask.distributed.Client`` (e.g. the one that computed
        the store), a ``'tcp://...'`` scheduler address, or ``'local'`` (one single-threaded
        worker per core): each worker holds a contiguous range of the kernel's rows in memory
        (read once from the store; ``n^2 / W`` float64 numbers per worker) and every product
        sends ``V`` to all workers and gathers their rows, so the ``n^2`` work per iteration
        is split over the workers. With a store ``K`` and ``method='cg'`` (``'auto'`` picks
        it); the preconditioner and the CG vectors stay in this process.

    Returns:
      ``alpha`` with the shape of ``y`` (float64; on ``K``'s device for a tensor ``K``, e.g. a
      CUDA kernel is solved on its GPU, on ``y``'s for a store), and the :class:`SolveInfo` if
      asked. A non-finite result is always an error (whatever ``on_nonconvergence`` says).

    Example::

        >>> h = ntkit.compute_kernel(arch, x, get='ntk', store='k.zarr')
        >>> alpha = ntkit.scale.solve(h, y, diag_reg=1e-4, method='cg', tol=1e-8)
    """
    t0 = time.perf_counter()
    if method not in ("auto", "cholesky", "cg"):
        raise ValueError(f"`method` must be 'auto', 'cholesky' or 'cg', got {method!r}")
    if preconditioner not in ("pivoted_cholesky", "nystrom", None):
        raise ValueError(f"`preconditioner` must be 'pivoted_cholesky', 'nystrom' or None, got "
                         f"{preconditioner!r}")
    diag_reg = float(diag_reg)
    if not math.isfinite(diag_reg) or diag_reg < 0:
        raise ValueError(f"`diag_reg` must be a non-negative finite number, got {diag_reg!r}")
    if on_nonconvergence not in ("raise", "warn"):
        raise ValueError(f"`on_nonconvergence` must be 'raise' or 'warn', got "
                         f"{on_nonconvergence!r}")
    tol = float(tol)
    if not (0 < tol < 1):
        raise ValueError(f"`tol` must be in (0, 1) (a relative residual), got {tol!r}")
    op = _as_operator(K, key, progress)
    n = op.n
    if executor is not None and not isinstance(op, _StoreOp):
        raise ValueError("`executor` distributes a kernel store's rows; K is an in-memory "
                         "tensor here (solve it without executor=, or pass the KernelStore)")
    # (a tensor stays where it is: torch.as_tensor would move it to torch's default device)
    yt = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y), device="cpu")
    vec = yt.ndim == 1
    y_device = yt.device
    # computed where K is (its device for a tensor, host memory for a store)
    yt = (yt[:, None] if vec else yt).to(device=op.device, dtype=torch.float64)
    if yt.ndim != 2 or yt.shape[0] != n:
        raise ValueError(f"`y` must be (n,) or (n, k) with n = {n} (the kernel's size), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else np.shape(y)}")
    if not all_finite(yt):
        raise ValueError("`y` contains NaN/Inf values")
    budget = parse_memory_budget(memory_budget)
    budget = available_memory(op.device) // 2 if budget is None else budget
    if method == "auto":
        method = "cg" if executor is not None else "cholesky" if (
            isinstance(op, _DenseOp) or DENSE_BYTES * n * n <= budget) else "cg"
    if method == "cholesky":
        if executor is not None:
            raise ValueError("`executor` runs CG's products on a cluster; method='cholesky' "
                             "factorizes in this process (use method='cg' with executor=, or "
                             "drop executor=)")
        alpha, info = _dense(op, yt, diag_reg)
    else:
        if maxiter is None:
            maxiter = min(max(10 * n, 100), 2000)
        if isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer)) or maxiter < 1:
            raise ValueError(f"`maxiter` must be a positive integer, got {maxiter!r}")
        d = op.diag()
        ridge = diag_reg * float(d.mean())
        r = min(n, 200) if rank is None else int(rank)
        if r < 1 and preconditioner is not None:
            raise ValueError(f"`rank` must be a positive integer, got {rank!r}")
        gen = torch.Generator().manual_seed(int(seed))
        mop: Any = op
        owned: Tuple[Any, ...] = ()
        if executor is not None:   # the workers start reading their rows now
            from ._dist import DaskRowsOp, resolve_client
            client, *rest = resolve_client(executor)
            owned = tuple(rest)
            mop = DaskRowsOp(op.tm, client)
        try:
            prec, used = None, 0
            if preconditioner == "pivoted_cholesky":
                pool = None if isinstance(op, _DenseOp) else int(min(
                    n, max(4 * r, r + 1), max(r, budget // (4 * 8 * max(n, 1)))))
                prec, used = _pivoted_cholesky(op, r, ridge, pool, gen)
            elif preconditioner == "nystrom":
                prec, used = _nystrom(mop, r, ridge, gen)
            alpha, its, res, broke = _cg(mop, yt, ridge, tol, int(maxiter), prec, progress,
                                         anorm=float(d.abs().max()) if n else 0.0)
        finally:
            if mop is not op:
                mop.close()
            for h in owned:
                if h is not None:
                    h.close()
        finite = all_finite(alpha) and all_finite(res)
        conv = finite and bool((res <= tol).all())
        info = SolveInfo("cg", ridge, its, res, conv, preconditioner, used)
        if not conv:
            anorm = float(torch.linalg.norm(alpha)) if finite else float("nan")
            why = ("diverged to NaN/Inf" if not finite else
                   f"broke down: K + ridge is singular or indefinite along a search direction, "
                   f"||alpha|| = {anorm:.3g}" if bool(broke.any()) else
                   f"stopped after {its} passes, ||alpha|| = {anorm:.3g}")
            fix = hint(f"add a ridge (diag_reg=1e-6 or larger, relative to the mean diagonal; "
                       f"now {diag_reg:g}), raise `maxiter` (now {maxiter}) or `rank`, or use "
                       f"method='cholesky' if K fits in memory (pseudo-inverse for a singular K)",
                       f"add a ridge (--diag-reg 1e-6 or larger, relative to the mean diagonal; "
                       f"now {diag_reg:g}), raise --maxiter (now {maxiter}) or --rank, or use "
                       f"--method cholesky if K fits in memory (pseudo-inverse for a singular K)")
            msg = (f"CG did not converge: relative residual "
                   f"{float(res.max()) if finite else float('nan'):.3g} > tol={tol:g} ({why}); "
                   f"{fix}")
            if not finite or on_nonconvergence == "raise":
                raise ValueError(msg + ("" if not finite else hint(
                    "; or pass on_nonconvergence='warn' to get the best iterate", "")))
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if not all_finite(alpha):
        raise ValueError(f"the {info.method} solve produced NaN/Inf coefficients (K is too "
                         f"ill-conditioned in float64); " + hint(
                             "add a ridge with diag_reg (e.g. 1e-6)", "add a ridge with "
                             "--diag-reg (e.g. 1e-6)"))
    info.seconds = time.perf_counter() - t0
    alpha = alpha[:, 0] if vec else alpha
    if isinstance(op, _StoreOp):  # back where y was given (a dense solve is where K is)
        alpha = alpha.to(y_device)
    return (alpha, info) if return_info else alpha
