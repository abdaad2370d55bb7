"""scikit-learn estimators and kernel adapters built on infinite-width network kernels.

* By default both estimators **choose their own kernel and ridge** (depth 1-5, number of
  untrained first layers, bias, ridge) by exact leave-one-out error from one eigendecomposition
  per kernel, all kernels of a bias from one recursion pass; ``best_params_``, ``loo_scores_``.
  ``features=dim`` fits ridge regression on random features (:mod:`ntkit.features`) instead.
* :class:`NTKRegressor`: the prediction of an infinitely wide network trained by gradient flow on
  the squared loss -- at convergence (``t=None``: NTK kernel regression) or at time ``t`` --
  averaged over initializations, with its predictive std / covariance (Lee et al. 2019).
  ``kernel='nngp'`` gives the Bayesian (NNGP) posterior / readout-only training instead.
* :class:`NTKClassifier`: the same on centred one-hot targets (``onehot - 1/c``), class = argmax
  (``solver='svm'``: an SVC on the chosen kernel instead, the published UCI protocol);
  ``predict_proba`` = softmax of the outputs divided by a temperature fitted on leave-one-out
  outputs (exact closed form for ``t=None``), see the class docstring.
* :func:`kernel_callable`: a picklable callable ``k(X, Y) -> (n1, n2) ndarray`` for
  ``sklearn.svm.SVC(kernel=...)``, ``KernelRidge(kernel=...)`` and friends.
* :class:`NTKGPKernel`: a ``sklearn.gaussian_process.kernels.Kernel`` (combine it with
  ``ConstantKernel``/``WhiteKernel`` to learn a scale and a noise level).
* :class:`ReluNTKFix`: the bias-free fully-connected ReLU NTK of Arora et al. (2020)
  (arXiv:1910.01663) with the first ``fix`` layers frozen (their NTK terms dropped); usable as
  ``arch`` everywhere above.

All kernels and solves are float64; the ridge ``diag_reg`` is relative to the mean of the train
kernel's diagonal (neural-tangents' convention). scikit-learn is imported lazily.

Example::

    >>> from ntkit import NTKClassifier
    >>> from ntkit import layers as nl
    >>> clf = NTKClassifier(arch=nl.serial(nl.Dense(512, W_std=1.4, b_std=0.1), nl.Relu(),
    ...                                    nl.Dense(1, W_std=1.4, b_std=0.1)))
    >>> clf.fit(X_train, y_train).predict_proba(X_test)            # (m, n_classes)
    >>> from sklearn.svm import SVC
    >>> SVC(kernel=kernel_callable(ReluNTKFix(depth=3, fix=1))).fit(X_train, y_train)
"""
from __future__ import annotations

import hashlib
import math
import numbers
from typing import (Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple,
                    Union, overload)

import numpy as np
import torch

from ._linalg import factorize, sym_eigh
from ._settings import settings
from ._typing import HasKernel, as_kernel_fn
from ._uci_ntk import ReluNTKFix, iter_ntk_fix
from . import layers as nl
from .features import RidgeFit, features
from .layers import Layer, parse_arch
from .predict import gradient_descent_mse_ensemble
from ._validation import all_finite

try:  # scikit-learn is an optional extra; the module imports without it
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.gaussian_process.kernels import Kernel as _SkKernel
    _HAVE_SKLEARN = True
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    BaseEstimator = ClassifierMixin = RegressorMixin = object
    _SkKernel = object
    _HAVE_SKLEARN = False

__all__ = ["NTKRegressor", "NTKClassifier", "NTKGPKernel", "ReluNTKFix", "kernel_callable",
           "default_family", "loo_kernel_ridge"]

_F64 = torch.float64
_KINDS = ("ntk", "nngp")

#: one architecture: an ntkit architecture or any object with ``.kernel(x1, x2, get)`` (e.g.
#: :class:`ReluNTKFix`), or the text form of an ntkit architecture
_Arch = Union[str, HasKernel]
#: what ``arch=`` of the estimators accepts: None (the default), one architecture, or a list of
#: them to choose from
_ArchArg = Union[None, _Arch, Sequence[_Arch]]
#: one value, or a list to choose from (``diag_reg=``, ``C=``); None: the default grid
_Grid = Union[None, float, Sequence[float]]


def _need_sklearn():
    if not _HAVE_SKLEARN:
        raise ImportError("ntkit.estimators needs scikit-learn: pip install 'ntkit[sklearn]'")


# =========================================================================================
# architectures
# =========================================================================================

def default_arch():
    """The default architecture: 2 hidden ReLU layers, ``W_std = sqrt(2)``, ``b_std = 0.1``.

    ``W_std^2 = 2`` keeps the ReLU kernel's scale constant with depth (He initialization); the
    small bias lets the model fit a constant offset.
    """
    w, b = math.sqrt(2.0), 0.1
    return nl.serial(nl.Dense(512, W_std=w, b_std=b), nl.Relu(),
                     nl.Dense(512, W_std=w, b_std=b), nl.Relu(),
                     nl.Dense(1, W_std=w, b_std=b))


def _resolve_arch(arch):
    if arch is None:
        return default_arch()
    if isinstance(arch, str):
        return parse_arch(arch)
    if not (hasattr(arch, "kernel") and callable(arch.kernel)):
        raise TypeError(f"`arch` must be None, an ntkit architecture (e.g. "
                        f"ntkit.layers.serial(...)), its text form, or an object with a "
                        f".kernel(x1, x2, get) method such as ReluNTKFix; got "
                        f"{type(arch).__name__}")
    return arch


def _kernels(arch, x1: torch.Tensor, x2: Optional[torch.Tensor], keys: Sequence[str]
             ) -> Dict[str, torch.Tensor]:
    """``{key: (n1, n2) float64}`` from ``arch`` (anything :func:`ntkit._typing.as_kernel_fn`
    accepts); NaN/Inf entries are a ``ValueError``."""
    res = as_kernel_fn(arch, "arch")(x1, x2, tuple(keys))
    return {g: v.to(_F64) for g, v in res.items()}


def _check_kind(kernel) -> str:
    if kernel not in _KINDS:
        raise ValueError(f"`kernel` must be 'ntk' (trained network) or 'nngp' (Bayesian / "
                         f"readout-only), got {kernel!r}")
    return kernel


def _check_t(t):
    if t is None:
        return None
    try:
        tt = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"`t` must be None (convergence) or a non-negative number, got "
                        f"{t!r}") from None
    if math.isnan(tt) or tt < 0:
        raise ValueError(f"`t` must be None or >= 0, got {t!r}")
    return None if math.isinf(tt) else tt


def _check_nonneg(v, name):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {v!r}") from None
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {v!r}")
    return f


# =========================================================================================
# model selection by exact leave-one-out
# =========================================================================================

#: hidden ReLU layers of the default family (the paper's depths 1..5)
DEFAULT_DEPTHS = (0, 1, 2, 3, 4)
#: bias std of the default family, in units of ``sqrt(d)`` (the input's scale after
#: standardization: ``|x|^2 ~= d``)
DEFAULT_BIASES = (0.0, 1.0)
#: ridge values (relative to the mean diagonal of the train kernel) tried by default
DEFAULT_RIDGES = tuple(float(10.0 ** e) for e in np.arange(-6.0, 1.01, 0.5))
#: cost model of the selection (seconds, one thread of a 2-core x86 CPU, fitted to timings):
#: a single classifier fit costs ``F + A n^2 + B n^3`` (overhead, kernel recursion to depth 5,
#: Cholesky + inverse for the LOO temperature); the LOO of one candidate kernel on ``m`` rows
#: ``P + E2 m^2 + E3 m^3`` (eigh + 15 ridges) plus ``FLOP`` per multiply-add of the held-out
#: predictions and of extra classes. :func:`_selection_plan` keeps a default fit within
#: ``_COST_BUDGET`` single fits at the largest depth, but always allows ``_COST_FLOOR_S``
#: seconds of selection (tiny data sets, where a single fit takes a few milliseconds).
_COST = dict(F=2.7e-3, A=4.2e-8, B=1.36e-10, P=2.5e-4, E2=5e-8, E3=2.2e-10, FLOP=1e-10)
_COST_BUDGET = 3.0
#: the plan aims at this fraction of the budget: the cost model's terms are within about +-15%
#: of timings on an idle 2-core machine (n = 500-4000; eigh and Cholesky cost per n^3 drift
#: with cache sizes), and planning to the full budget gave 3.15 single fits on bank (n = 3391)
_COST_MARGIN = 0.85
_COST_FLOOR_S = 0.1
#: classification with more classes than this: the selection scores the centred one-hot targets
#: projected on ``_PROJ_CLASSES`` random centred directions (:func:`_class_projection`; an
#: unbiased estimate of the squared error summed over all classes), so that its cost does not
#: grow with the number of classes (100 classes: ~1500 right-hand sides per kernel otherwise)
_PROJ_CLASSES = 16
#: rows per class at least in the screening's LOO set (with fewer, rows left out are often the
#: only ones of their class); ``_MIN_ROWS_PROJ`` with projected targets. 2 per class would fit
#: the budget at 100 classes and n = 1200 (2.0-2.9x a single fit measured on plant-shape /
#: plant-texture) but chose worse kernels there (plant-texture folds 0 and 2: 84.0 / 85.75%
#: against 86.25 / 88.25% with 3 per class), so 3 is kept: ~3-4x at n = 1200, within the budget
#: from n ~ 1500 on (the model's floor binds below)
_MIN_ROWS = 3
_MIN_ROWS_PROJ = 3
#: classification criterion: 'accuracy' (LOO accuracy, ties broken by LOO squared error) or
#: 'mse' (LOO squared error on the centred one-hot targets); see NTKClassifier
_CLASSIFIER_CRITERION = "mse"


def default_family(d: int, kernel: str = "ntk", depths: Optional[Sequence[int]] = None,
                   biases: Optional[Sequence[float]] = None) -> List[ReluNTKFix]:
    """The candidate kernels of the default estimators: :class:`ReluNTKFix` for every depth in
    ``depths``, ``fix`` in ``0..depth`` (``fix = depth`` only for ``kernel='nngp'``, where
    ``fix`` does not matter) and bias ``b * sqrt(d)`` for ``b`` in ``biases`` (defaults:
    :data:`DEFAULT_DEPTHS`, :data:`DEFAULT_BIASES`)."""
    depths = DEFAULT_DEPTHS if depths is None else depths
    biases = DEFAULT_BIASES if biases is None else biases
    out = []
    for b in biases:
        for h in depths:
            for f in range(h + 1):
                if kernel == "nngp" and f != h:
                    continue
                out.append(ReluNTKFix(h, f, bias=float(b) * math.sqrt(d)))
    return out


def _eigh(K: torch.Tensor):
    """Eigendecomposition of the symmetric part of ``K`` (eigenvalues clamped at 0) by
    :func:`ntkit._linalg.sym_eigh` (SciPy's ``syevd`` when installed, BLAS threads capped: one
    below 1024 rows, torch's count above; torch's ``eigh`` otherwise)."""
    lam, V = sym_eigh(0.5 * (K + K.T), overwrite=True)
    return lam.to(K.device).clamp_min(0.0), V.to(K.device)


def loo_kernel_ridge(K: Any, Y: Any, ridges: Any, K_test_train: Any = None
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Exact leave-one-out predictions of kernel ridge regression for many ridges at once.

    With ``K = V diag(l) V^T`` (one ``eigh``) and ``H = K (K + r I)^-1 = V diag(l / (l + r)) V^T``
    the LOO residual is ``(y - H y)_i / (1 - H_ii)``; both numerator and denominator are computed
    as ``V diag(r / (l + r)) ...`` (no cancellation when ``H_ii -> 1``).

    Args:
      K: ``(n, n)`` train kernel (float64). Y: ``(n, c)`` targets.
      ridges: ``(R,)`` ABSOLUTE ridge values, all ``> 0``.
      K_test_train: optional ``(m, n)`` kernel of held-out points against the train points.

    Returns:
      ``(loo, pred)``: ``loo (R, n, c)`` LOO predictions, ``pred (R, m, c)`` predictions of the
      model fitted on all ``n`` rows for the held-out points (None without ``K_test_train``).

    Example::

        >>> loo, _ = loo_kernel_ridge(K, Y, [1e-3, 1e-2])     # loo[0, i] = f_{-i}(x_i)
    """
    K = torch.as_tensor(K, dtype=_F64)
    Y = torch.as_tensor(Y, dtype=_F64)
    r = torch.as_tensor(ridges, dtype=_F64).reshape(-1)
    if not bool((r > 0).all()):
        raise ValueError("`ridges` must all be > 0 for leave-one-out (ridge 0 interpolates)")
    lam, V = _eigh(K)
    return _loo_eig(lam, V, Y, r, K_test_train)


def _loo_eig(lam: torch.Tensor, V: torch.Tensor, Y: torch.Tensor, r: torch.Tensor,
             K_test_train: Any = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`loo_kernel_ridge` from a given eigendecomposition ``K = V diag(lam) V^T``
    (reused when the same kernel is scored for several target matrices)."""
    n, c = Y.shape
    W = V.T @ Y                                              # (n, c)
    G = r[:, None] / (lam[None, :] + r[:, None])             # (R, n): r / (l + r)
    R = len(r)
    M = (G[:, :, None] * W[None]).permute(1, 0, 2).reshape(n, R * c)
    res = (V @ M).reshape(n, R, c).permute(1, 0, 2)           # (I - H) y
    den = G @ (V * V).T                                       # (R, n): 1 - H_ii
    loo = Y[None] - res / den[:, :, None]
    pred = None
    if K_test_train is not None:
        Kt = torch.as_tensor(K_test_train, dtype=_F64)
        KV = Kt @ V                                           # (m, n)
        inv = 1.0 / (lam[None, :] + r[:, None])               # (R, n)
        M = (inv[:, :, None] * W[None]).permute(1, 0, 2).reshape(n, R * c)
        pred = (KV @ M).reshape(Kt.shape[0], R, c).permute(1, 0, 2)
    return loo, pred


def _class_projection(c: int, k: int, seed: int) -> torch.Tensor:
    """``(c, k)`` matrix ``Q sqrt((c - 1) / k)``, ``Q`` a random orthonormal frame of the
    ``(c - 1)``-dimensional space of centred class vectors (rows of ``onehot - 1/c`` and of
    every residual of them lie in it): for any ``(n, c)`` residual ``E`` with centred rows,
    ``E[|E Q'|^2] = |E|^2`` over the draw of ``Q``. Selection among many classes scores
    ``Y Q'`` instead of ``Y`` (``k`` instead of ``c`` right-hand sides per ridge); the same
    ``Q'`` (seed) for every candidate, so their differences are far less noisy than each
    estimate."""
    rng = np.random.default_rng(seed + 7919)
    G = rng.standard_normal((c, k))
    G -= G.mean(0, keepdims=True)
    Q, _ = np.linalg.qr(G)
    return torch.as_tensor(Q * math.sqrt((c - 1) / k), dtype=_F64)


def _kernel_blocks(cands, XA: torch.Tensor, Xall: Optional[torch.Tensor], kind: str,
                   keep: Optional[Dict[int, Dict[str, torch.Tensor]]] = None):
    """Yield ``(index, K)`` with ``K = k(XA, Xall)`` (``(m, n_all)``; ``Xall=None``: ``(m, m)``)
    for every candidate; all :class:`ReluNTKFix` candidates with the same bias come from ONE
    recursion pass (the depth-``h`` kernels are by-products of the deepest one). ``keep``: a
    dict that receives ``{index: {"nngp": K, "ntk": K}}`` (copies, both kinds from the same
    pass): the final fit's kernels after the selection's stage 2, not computed twice."""
    groups: Dict[float, list] = {}
    for i, a in enumerate(cands):
        if isinstance(a, ReluNTKFix):
            a._check()
            groups.setdefault(float(a.bias), []).append(i)
        else:
            ks = _kernels(a, XA, Xall, ("nngp", "ntk") if keep is not None else (kind,))
            if keep is not None:
                keep[i] = ks
            yield i, ks[kind]
    for b, idx in groups.items():
        want: Dict[Tuple[int, int], list] = {}
        for i in idx:
            h, f = int(cands[i].depth), int(cands[i].fix)
            want.setdefault((h, h if kind == "nngp" else f), []).append(i)
        top = max(h for h, _ in want)
        for h, f, K in iter_ntk_fix(XA, Xall, max_depth=top, copy=False, bias=b):
            if keep is not None:          # as ReluNTKFix.kernel: ntk at f = fix, nngp at f = h
                for i in idx:
                    if int(cands[i].depth) == h:
                        if f == int(cands[i].fix):
                            keep.setdefault(i, {})["ntk"] = K.clone()
                        if f == h:
                            keep.setdefault(i, {})["nngp"] = K.clone()
            for i in want.get((h, f), ()):
                yield i, K


def _score_table(P: torch.Tensor, Y: torch.Tensor, y_idx, col_w: torch.Tensor):
    """``(mse (R,), acc (R,) or None)`` of predictions ``P (R, N, c)`` against ``Y (N, c)``."""
    mse = (((P - Y[None]) ** 2) * col_w).sum(-1).mean(-1)
    mse = torch.where(torch.isfinite(mse), mse, torch.full_like(mse, math.inf))
    acc = None
    if y_idx is not None:
        acc = (P.argmax(-1) == y_idx[None]).to(_F64).mean(-1)
        acc = torch.where(torch.isfinite(P).all(-1).all(-1), acc, torch.zeros_like(acc))
    return mse, acc


def _cost_budget() -> float:
    """Selection budget in single fits: ``ntkit.settings.selection_budget`` or
    :data:`_COST_BUDGET`."""
    b = settings.selection_budget
    return _COST_BUDGET if b is None else float(b)


def _selection_plan(n: int, n_kernels: int, n_passes: int, n_ridges: int, c: int,
                    min_rows: int = 0, c_out: int = 0) -> Tuple[int, int]:
    """``(m, k)``: rows ``m`` of the first (screening) stage and number ``k`` of kernels
    re-scored by exact LOO on all ``n`` rows in the second stage.

    ``(n, 0)`` when the exact LOO of every kernel on all rows fits the budget. Otherwise stage 2
    gets the largest ``k >= 1`` whose full-``n`` LOO costs at most half the budget (at least
    one: the ridge, and the model, are then always chosen on all ``n`` rows, where the
    screening's ``m``-row fits would favour larger ridges), stage 1 the largest ``m`` that fits
    the rest. Budget: ``selection + final fit(n) <= _COST_MARGIN * _COST_BUDGET * single fit(n)``
    (a margin for the model's error; or
    ``_COST_FLOOR_S`` seconds of selection, whichever is larger); the final fit after a
    selection costs ``F + A n^2`` (its temperature comes from the selection's LOO outputs).
    ``m >= min_rows`` whatever the budget (classification: 3 rows per class -- with fewer, the
    screening's LOO predicts mostly classes absent from its rows and ranks kernels at random --
    :data:`_MIN_ROWS_PROJ` with more than :data:`_PROJ_CLASSES` classes, whose targets are
    then projected: ``c`` is the number of scored target columns and ``c_out`` the number of
    classes of the winner's held-out outputs, computed once per kernel at most; for 100 classes
    the plan stays within the budget from ``n ~ 1500`` on). The budget is
    ``ntkit.settings.selection_budget`` (default :data:`_COST_BUDGET`).
    Deterministic: a model of the cost, not a measurement."""
    k = _COST
    single = k["F"] + k["A"] * n * n + k["B"] * float(n) ** 3
    budget = max(_COST_MARGIN * _cost_budget() * single - (k["F"] + k["A"] * n * n),
                 _COST_FLOOR_S)

    def per_kernel(m):
        m = float(m)
        rest = min(n - m, m)                         # held-out rows scored in stage 1
        return (k["P"] + k["E2"] * m * m + k["E3"] * m ** 3
                + k["FLOP"] * (m * m * n_ridges * max(c - 2, 0) + m * m * rest
                               + rest * m * n_ridges * c + (m + rest) * m * c_out))

    def cost(m):
        return n_kernels * per_kernel(m) + n_passes * k["A"] * m * n
    if cost(n) <= budget:
        return n, 0
    full = per_kernel(n) + k["A"] * n * n            # one kernel: its recursion + LOO on n rows
    n_full = int(max(1, min(n_kernels - 1, (0.5 * budget) // full)))
    rest = budget - n_full * full
    lo, hi = min(n, 10), n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= rest else (lo, mid)
    lo = max(lo, min(n, int(min_rows)))
    return (n, 0) if lo >= n else (lo, n_full)


def _selection_order(n: int, y_idx, seed: int) -> np.ndarray:
    """Row order of the screening stage: its first ``m`` rows are the LOO set. A random
    permutation (``seed``); for classification stratified -- every class spread evenly over the
    order (sort by ``(rank within the class + u) / class size``, ``u`` uniform), so that any
    prefix holds each class in proportion (a class with ``n_c`` rows is in the first ``m`` rows
    about ``m n_c / n`` times, and at least once for ``m >= n / n_c``)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if y_idx is None:
        return perm
    y = np.asarray(y_idx)[perm]
    counts = np.bincount(y)
    rank = np.empty(n)
    for cls in np.flatnonzero(counts):
        pos = np.flatnonzero(y == cls)
        rank[pos] = (np.arange(len(pos)) + rng.random(len(pos))) / len(pos)
    return perm[np.argsort(rank, kind="stable")]


def _select(cands, ridges, X: torch.Tensor, Y: torch.Tensor, y_idx, kind: str, seed: int,
            criterion: str):
    """Score every (candidate, ridge) by exact LOO (two stages for large n, see
    :func:`_selection_plan`).

    Returns ``(best_index, best_ridge, table, n_loo, heldout_best, refined, kernels)``: ``table`` the
    stage-1 rows (LOO on the first ``n_loo`` rows of :func:`_selection_order` + held-out
    predictions for the next ``min(n_loo, n - n_loo)`` rows), ``heldout_best`` ``(n, c)`` the winner's held-out outputs in
    the original row order (exact LOO outputs on all rows after stage 2), ``refined`` the
    stage-2 rows (exact LOO on all ``n`` rows; empty when stage 1 used all rows), ``kernels``
    the winner's ``{"nngp", "ntk"}`` train kernels on all rows when stage 2 computed them
    (else None).
    """
    n, c = Y.shape
    n_passes = len({float(a.bias) for a in cands if isinstance(a, ReluNTKFix)}) + \
        sum(not isinstance(a, ReluNTKFix) for a in cands)
    proj = None
    if y_idx is not None and criterion == "mse" and c > _PROJ_CLASSES:
        proj = _class_projection(c, _PROJ_CLASSES, seed)
    min_rows = 0 if y_idx is None else (_MIN_ROWS_PROJ if proj is not None else _MIN_ROWS) * c
    m, n_full = _selection_plan(n, len(cands), n_passes, len(ridges),
                                c if proj is None else _PROJ_CLASSES, min_rows,
                                0 if proj is None else c)
    order = np.arange(n) if m == n else _selection_order(n, y_idx, seed)
    order_all = order
    order = order[:min(n, 2 * m)]            # LOO rows + at most m held-out rows
    o = torch.as_tensor(order)
    Ys_all = Y if proj is None else Y @ proj                 # the targets that are scored
    Xo, Yo, Yso = X[o], Y[o], Ys_all[o]
    yo = None if y_idx is None else torch.as_tensor(np.asarray(y_idx)[order])
    var = Y.var(0, unbiased=False) if y_idx is None else torch.ones(Ys_all.shape[1], dtype=_F64)
    col_w = 1.0 / torch.where(var > 0, var, torch.ones_like(var))
    rel = torch.tensor(ridges, dtype=_F64)

    def key_of(row):
        return (row["mse"],) if (row["accuracy"] is None or criterion == "mse") else \
            (-row["accuracy"], row["mse"])

    def score(blocks, Ys, Yfull, ys, mm):
        """Rows of every (kernel, ridge); the best's held-out outputs on ``Yfull``."""
        rows, best, per_cand, state = [], None, {}, None
        for i, K in blocks:
            Kaa = K[:, :mm]
            scale = float(torch.diagonal(Kaa).mean())
            scale = scale if math.isfinite(scale) and scale > 0 else 1.0
            r_abs = rel * scale
            Kt = None if mm == K.shape[1] else K[:, mm:].T
            lam, V = _eigh(Kaa)                  # one eigendecomposition per kernel
            loo, pred = _loo_eig(lam, V, Ys[:mm], r_abs, Kt)
            P = loo if pred is None else torch.cat([loo, pred], 1)
            mse, acc = _score_table(P, Ys, None if proj is not None else ys, col_w)
            new_best = None
            for j, r in enumerate(ridges):
                row = dict(index=i, diag_reg=float(r), mse=float(mse[j]),
                           accuracy=None if acc is None else float(acc[j]))
                rows.append(row)
                key = key_of(row)
                if i not in per_cand or key < per_cand[i]:
                    per_cand[i] = key
                if best is None or key < best[0]:
                    best, new_best = (key, i, float(r), P[j]), j
            if new_best is not None and proj is not None and mm == n:
                state = (lam, V, r_abs[new_best:new_best + 1])
            del lam, V, Kt
        if state is not None and best is not None:
            # the winner's outputs for all c classes (temperature), from its eigenvectors:
            # computed once, after the last candidate, and only when they are used (LOO on all
            # n rows: a screening on m < n rows is always followed by stage 2's outputs)
            lf, _ = _loo_eig(state[0], state[1], Yfull, state[2])
            best = best[:3] + (lf[0],)
        return rows, best, per_cand

    rows, best, per_cand = score(_kernel_blocks(cands, Xo[:m], None if m == len(o) else Xo,
                                                kind), Yso, Yo, yo, m)
    if best is None or not math.isfinite(best[0][-1]):
        raise ValueError("no candidate architecture / ridge gave a finite leave-one-out error; "
                         "check the inputs' scale or pass `diag_reg` values > 0")
    refined = []
    if m < n:                      # stage 2: exact LOO on all rows for the best n_full kernels
        top = sorted(per_cand, key=lambda i: (per_cand[i], i))[:n_full]
        sub = [cands[i] for i in top]
        kept: Dict[int, Dict[str, torch.Tensor]] = {}
        blocks = ((top[j], K) for j, K in _kernel_blocks(sub, X, None, kind, keep=kept))
        yi = None if y_idx is None else torch.as_tensor(np.asarray(y_idx))
        refined, best2, _ = score(blocks, Ys_all, Y, yi, n)
        if best2 is not None and math.isfinite(best2[0][-1]):
            _, bi, br, held = best2
            return bi, br, rows, m, held, refined, kept.get(top.index(bi))
        _, bi, br, _ = best               # no finite full-n score: the screening's winner
        return bi, br, rows, m, None, refined, None
    _, bi, br, held = best
    inv = np.empty(n, dtype=np.int64)
    inv[order_all] = np.arange(n)
    return bi, br, rows, m, held[torch.as_tensor(inv)], refined, None


def _primal_loo(phi: torch.Tensor, Y: torch.Tensor, rel):
    """Exact LOO of ridge regression on features ``phi (n, D)``, every ridge at once.

    ``H = Phi (Phi^T Phi + r I)^-1 Phi^T``; with ``Phi^T Phi = U diag(s) U^T`` and ``P = Phi U``:
    ``H_ii = sum_j P_ij^2 / (s_j + r)``. Ridges are relative to ``trace(Phi^T Phi) / n`` (the
    mean diagonal of the feature kernel, as ``diag_reg`` for exact kernels). Returns
    ``(loo (R, n, c), solve, scale)`` with ``solve(j) -> (D, c)`` weights for ridge ``j``.
    With ``D >= n`` the same model is solved in the dual (``n x n`` kernel ``Phi Phi^T``).
    """
    n, D = phi.shape
    if D >= n:                        # fewer rows than features: the dual (n x n) is cheaper
        K = phi @ phi.T
        scale = float(torch.diagonal(K).mean())
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        r = torch.as_tensor(rel, dtype=_F64).reshape(-1) * scale
        loo, _ = loo_kernel_ridge(K, Y, r)
        lam, V = _eigh(K)
        W = V.T @ Y

        def solve_dual(j):            # w = Phi^T (K + r I)^-1 Y
            return phi.T @ (V @ (W / (lam + r[j])[:, None]))
        return loo, solve_dual, scale
    A = phi.T @ phi
    scale = float(torch.diagonal(A).sum()) / n
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    s, U = torch.linalg.eigh(0.5 * (A + A.T))
    s = s.clamp_min(0.0)
    P = phi @ U
    W = P.T @ Y
    r = torch.as_tensor(rel, dtype=_F64).reshape(-1) * scale
    inv = 1.0 / (s[None, :] + r[:, None])                     # (R, D)
    R, c = len(r), Y.shape[1]
    M = (inv[:, :, None] * W[None]).permute(1, 0, 2).reshape(D, R * c)
    fitted = (P @ M).reshape(n, R, c).permute(1, 0, 2)
    h = inv @ (P * P).T                                       # (R, n)
    loo = Y[None] - (Y[None] - fitted) / (1.0 - h)[:, :, None]

    def solve(j):
        return U @ (inv[j][:, None] * W)
    return loo, solve, scale


def _feature_arch(arch, d: int, kind: str):
    """``(layers architecture, get)`` giving random features for ``arch``."""
    if isinstance(arch, ReluNTKFix):
        h, f = arch._check()
        if kind == "nngp" or f == h:
            return arch.as_layers(d), "nngp"
        if f == 0:
            return arch.as_layers(d), "ntk"
        raise ValueError(f"`features` supports ReluNTKFix with fix=0 or fix=depth (the NTK / "
                         f"NNGP of a network); got {arch!r}: use the exact kernel "
                         f"(features=None) for 0 < fix < depth")
    if isinstance(arch, Layer):
        return arch, kind
    raise TypeError(f"`features` needs an ntkit.layers architecture or ReluNTKFix as `arch`, "
                    f"got {type(arch).__name__}")


def _is_list(v) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim == 1)


# =========================================================================================
# shared fitting / prediction
# =========================================================================================

class _NTKBase(BaseEstimator):
    """Chooses the kernel and ridge (exact LOO), stores training inputs and kernels; predicts
    with :mod:`ntkit.predict` (exact kernels) or a primal ridge model (random features)."""

    # ---- configuration ------------------------------------------------------------------
    def _plan(self, d: int):
        kind = _check_kind(self.kernel)
        t = _check_t(self.t)
        lr = _check_nonneg(self.learning_rate, "learning_rate")
        if lr == 0:
            raise ValueError("`learning_rate` must be > 0")
        arch = self.arch
        if arch is None:
            cands = default_family(d, kind) if t is None else [default_arch()]
        elif _is_list(arch):
            if len(arch) == 0:
                raise ValueError("`arch` is an empty list; pass None (default family), one "
                                 "architecture or a non-empty list of them")
            cands = [_resolve_arch(a) for a in arch]
        else:
            cands = [_resolve_arch(arch)]
        dr = self.diag_reg
        if dr is None:
            ridges = list(DEFAULT_RIDGES) if t is None else [1e-4]
        elif _is_list(dr):
            if len(dr) == 0:
                raise ValueError("`diag_reg` is an empty list; pass None (chosen by LOO), a "
                                 "number or a non-empty list")
            ridges = [_check_nonneg(v, "diag_reg") for v in dr]
        else:
            ridges = [_check_nonneg(dr, "diag_reg")]
        if len(cands) * len(ridges) > 1:
            if t is not None:
                raise ValueError("choosing among several `arch`/`diag_reg` values uses the "
                                 "exact leave-one-out of kernel regression, i.e. t=None; with "
                                 "a finite `t` pass one architecture and one `diag_reg`")
            if min(ridges) <= 0:
                raise ValueError("`diag_reg` values to choose from must be > 0 (leave-one-out "
                                 "is undefined for interpolation)")
        std = self.standardize
        if isinstance(std, str) and std == "auto":
            std = arch is None or all(isinstance(a, ReluNTKFix) for a in cands)
        elif not isinstance(std, (bool, np.bool_)):
            raise ValueError(f"`standardize` must be 'auto', True or False, got {std!r}")
        feats = self.features
        if feats is not None:
            if isinstance(feats, bool) or not isinstance(feats, numbers.Integral) or feats < 1:
                raise ValueError(f"`features` must be None (exact kernel) or a positive int "
                                 f"(random-feature width), got {feats!r}")
            if t is not None:
                raise ValueError("`features` fits kernel ridge regression (t=None); finite "
                                 "training time `t` needs the exact kernel (features=None)")
        rs = self.random_state
        if rs is None:
            seed = 0
        elif isinstance(rs, numbers.Integral) and not isinstance(rs, bool) and int(rs) >= 0:
            seed = int(rs)
        else:
            raise ValueError(f"`random_state` must be None or an int >= 0, got {rs!r}")
        return kind, t, cands, ridges, bool(std), seed

    def _transform(self, X) -> torch.Tensor:
        Xt = torch.tensor(np.asarray(X, dtype=np.float64))
        if self.scaler_ is not None:
            mean, scale = self.scaler_
            Xt = (Xt - mean) / scale
        return Xt

    # ---- fitting --------------------------------------------------------------------------
    def _fit_core(self, X: np.ndarray, Y: np.ndarray, y_idx=None, need_ridge: bool = True):
        n, d = X.shape
        kind, t, cands, ridges, std, seed = self._plan(d)
        if not need_ridge and len(cands) == 1:
            ridges = ridges[:1]       # the ridge is not used (solver='svm'): no selection
        self.scaler_: Optional[Tuple[torch.Tensor, torch.Tensor]]
        if std:
            mean = torch.tensor(X.mean(0))
            sd = torch.tensor(X.std(0))
            self.scaler_ = (mean, torch.where(sd > 0, sd, torch.ones_like(sd)))
        else:
            self.scaler_ = None
        Xt = self._transform(X)
        Yt = torch.tensor(np.asarray(Y, dtype=np.float64))
        self.y_fit_ = Yt
        self._loo_best: Any = None
        if self.features is not None:
            return self._fit_features(cands, ridges, Xt, Yt, y_idx, kind, seed)
        crit = _CLASSIFIER_CRITERION
        kernels = None
        if len(cands) * len(ridges) == 1:
            arch, reg = cands[0], ridges[0]
            self.loo_scores_ = None
            self.selection_size_ = 0
        else:
            bi, reg, rows, m, self._loo_best, refined, kernels = _select(
                cands, ridges, Xt, Yt, y_idx, kind, seed, crit)
            arch = cands[bi]
            self.loo_scores_ = self._table(cands, rows)
            if refined:
                self.loo_scores_["refined"] = self._table(cands, refined)
            self.selection_size_ = m
        self.best_params_ = {"arch": arch, "diag_reg": reg}
        self.arch_, self.diag_reg_ = arch, reg
        self.X_fit_ = Xt
        if kernels is not None and set(kernels) == {"nngp", "ntk"} and all(
                all_finite(k) for k in kernels.values()):
            self.k_train_train_ = kernels          # stage 2's pass computed them already
        else:
            self.k_train_train_ = _kernels(arch, Xt, None, ("nngp", "ntk"))
        return self

    @staticmethod
    def _table(cands, rows) -> dict:
        keys = [(r["index"], r["diag_reg"]) for r in rows]
        mse = np.array([r["mse"] for r in rows])
        out = {"params": [{"arch": cands[i], "diag_reg": r} for i, r in keys],
               "mse": mse}
        if rows[0]["accuracy"] is not None:
            out["accuracy"] = np.array([r["accuracy"] for r in rows])
        return out

    def _fit_features(self, cands, ridges, Xt, Yt, y_idx, kind, seed):
        d = Xt.shape[1]
        crit = _CLASSIFIER_CRITERION
        var = Yt.var(0, unbiased=False) if y_idx is None else torch.ones(Yt.shape[1],
                                                                           dtype=_F64)
        col_w = 1.0 / torch.where(var > 0, var, torch.ones_like(var))
        yi = None if y_idx is None else torch.as_tensor(np.asarray(y_idx))
        rel = [r if r > 0 else 0.0 for r in ridges]
        best, rows = None, []
        for i, a in enumerate(cands):
            layers, get = _feature_arch(a, d, kind)
            phi = features(layers, Xt, dim=int(self.features), get=get, seed=seed,
                           dtype=_F64).to(_F64)
            loo, solve, scale = _primal_loo(phi, Yt, rel)
            mse, acc = _score_table(loo, Yt, yi, col_w)
            for j, r in enumerate(ridges):
                row = dict(index=i, diag_reg=float(r), mse=float(mse[j]),
                           accuracy=None if acc is None else float(acc[j]))
                rows.append(row)
                key = (row["mse"],) if (acc is None or crit == "mse") else \
                    (-row["accuracy"], row["mse"])
                if best is None or key < best[0]:
                    w = solve(j)
                    best = (key, i, float(r), loo[j], w, scale, layers, get)
        _, bi, reg, loo_b, w, scale, layers, get = best
        self.loo_scores_ = self._table(cands, rows) if len(rows) > 1 else None
        self.selection_size_ = Xt.shape[0] if len(rows) > 1 else 0
        self.best_params_ = {"arch": cands[bi], "diag_reg": reg}
        self.arch_, self.diag_reg_ = cands[bi], reg
        self._feature_map = (layers, get, seed)
        self.ridge_fit_ = RidgeFit(weights=w, intercept=torch.zeros(Yt.shape[1], dtype=_F64),
                                   ridge=reg * scale)
        self._loo_best = loo_b
        return self

    # ---- prediction -----------------------------------------------------------------------
    def _predict_fn(self):
        X_fit, cache = self.X_fit_, self.k_train_train_
        arch = self.arch_

        def kfn(x1, x2, get):
            keys = (get,) if isinstance(get, str) else tuple(get)
            if x2 is None and x1 is X_fit:
                return {g: cache[g] for g in keys}
            return _kernels(arch, x1, x2, keys)
        return gradient_descent_mse_ensemble(kfn, X_fit, self.y_fit_,
                                             learning_rate=self.learning_rate,
                                             diag_reg=self.diag_reg_)

    def _outputs_t(self, Xt: torch.Tensor, compute_cov: bool = False):
        """Mean ``(m, k)`` float64 numpy (and ``(m, m)`` covariance if asked); standardized
        inputs."""
        if self.features is not None:
            if compute_cov:
                raise ValueError("`return_std`/`return_cov` need the exact kernel "
                                 "(features=None); random features give the mean only")
            layers, get, seed = self._feature_map
            phi = features(layers, Xt, dim=int(self.features), get=get, seed=seed, dtype=_F64)
            return self.ridge_fit_.predict(phi.to(_F64)).numpy(), None
        res = self._predict_fn()(x_test=Xt, t=_check_t(self.t), get=self.kernel,
                                 compute_cov=compute_cov)
        if compute_cov:
            return res.mean.numpy(), res.covariance.numpy()
        return res.numpy(), None

    def _outputs(self, X: np.ndarray, compute_cov: bool = False):
        return self._outputs_t(self._transform(X), compute_cov)


# =========================================================================================
# regressor
# =========================================================================================

class NTKRegressor(RegressorMixin, _NTKBase):
    """Infinitely wide network trained by gradient flow on MSE, as a scikit-learn regressor.

    Prediction = mean over random initializations of the network's output after training time
    ``t`` (``t=None``: convergence, i.e. kernel regression ``K_xd K^-1 y``), with the NTK
    (``kernel='ntk'``, all layers trained) or the NNGP (``kernel='nngp'``: readout-only training,
    equivalently the Bayesian posterior mean). ``return_std``/``return_cov`` give the spread of
    that ensemble (Lee et al. 2019, eq. 16; for 'nngp' at ``t=None`` the GP posterior).

    **Chooses its own model by default.** With ``arch=None`` and ``diag_reg=None`` (and
    ``t=None``) the estimator picks, by exact leave-one-out (LOO) error of kernel ridge
    regression, among the FC ReLU kernels of :func:`default_family` (depths 1-5 = 0-4 hidden
    layers, ``fix`` = 0..depth first layers untrained, bias 0 or ``sqrt(d)``: 30 kernels, all
    from two recursion passes) and 15 ridges ``10^-6 .. 10^1``. One eigendecomposition per kernel
    gives the LOO residuals ``(y - Hy)_i / (1 - H_ii)`` for every ridge at once (see
    :func:`loo_kernel_ridge`; exact LOO is preferred to GCV: same cost here, and no
    approximation). An ``eigh`` costs ~1.6x the Cholesky + inverse of a single fit, so to keep
    a default fit within ~3x a single fit at the largest depth, beyond ~150-200 rows the
    selection has two stages (:func:`_selection_plan`, a cost model): (1) screening: exact LOO
    on a subset of ``selection_size_`` rows (random, ``random_state``; stratified by class for
    the classifier, and at least 3 rows per class), plus as many further rows scored as
    held-out data; (2) the best screened kernel(s) -- at least one, more while half the budget
    allows -- are re-scored by exact LOO on ALL rows for every ridge, and the winner of that
    full-``n`` LOO is the model (screening on ``m < n`` rows alone chose too large ridges: on
    the UCI sets ~1-4 points lower accuracy for n ~ 500-2000). Tiny data sets always get ~0.1 s
    of selection (one-stage full LOO below ~180 rows). The choice is in ``best_params_``, every
    score in ``loo_scores_`` (``params``, ``mse``; the stage-2 scores under ``'refined'``, same
    layout). Pass a list to
    ``arch`` or ``diag_reg`` to choose among your own values; pass one of each (e.g.
    ``arch=ReluNTKFix(3, 1), diag_reg=1e-3``) for exactly that model, no selection.

    Args:
      arch: None (the default family above; with a finite ``t``: :func:`default_arch`), an
        ntkit architecture (``ntkit.layers.serial(...)``), its text form, an object with
        ``.kernel(x1, x2, get)`` (e.g. :class:`ReluNTKFix`), or a list of these to choose from.
      kernel: ``'ntk'`` or ``'nngp'``.
      t: training time (neural-tangents units: loss ``1/2 mean (f-y)^2``, time x learning
        rate), or None for convergence. Selection needs ``t=None``.
      diag_reg: ridge relative to the mean diagonal of the train kernel; None = chosen by LOO
        from ``DEFAULT_RIDGES`` (``1e-4`` with a finite ``t``); a list = chosen from it.
      learning_rate: time unit (``absolute time = learning_rate * t``).
      normalize_y: standardise targets (mean 0, std 1) before fitting, undo on prediction.
      standardize: z-score the features with the training mean / std (as the UCI protocol of
        Arora et al. 2020, whose inputs are standardized); ``'auto'`` = on for ``arch=None`` and
        :class:`ReluNTKFix` kernels (they assume standardized inputs), off otherwise.
      features: None (exact kernel) or a width ``dim``: ridge regression in the primal on
        ``ntkit.features.features(arch, x, dim, seed=random_state or 0)`` random features
        (float64, memory ``n x D``), ridge chosen by exact primal LOO (leverages from the
        ``D x D`` eigendecomposition). ``arch`` must be ntkit layers or a ReluNTKFix with
        ``fix`` 0 or ``depth``; the default family is then restricted to those.
      random_state: seed of the selection split (large n) and of the random features.

    Shapes: ``X`` (n, d); ``y`` (n,) or (n, k); ``predict`` -> (m,) or (m, k), std (m,) or
    (m, k), cov (m, m) or (m, m, k) (as ``GaussianProcessRegressor``).

    Example::

        >>> reg = NTKRegressor().fit(X, y)              # chooses depth, fix, bias, ridge
        >>> reg.best_params_                            # {'arch': ReluNTKFix(...), 'diag_reg': ...}
        >>> mean, std = reg.predict(X_test, return_std=True)
        >>> NTKRegressor(arch=ReluNTKFix(3, 1), diag_reg=1e-3).fit(X, y)   # no selection
    """

    def __init__(self, arch: _ArchArg = None, kernel: str = "ntk", t: Optional[float] = None,
                 diag_reg: _Grid = None, learning_rate: float = 1.0, normalize_y: bool = False,
                 standardize: Union[bool, str] = "auto", features: Optional[int] = None,
                 random_state: Optional[int] = None):
        self.arch = arch
        self.kernel = kernel
        self.t = t
        self.diag_reg = diag_reg
        self.learning_rate = learning_rate
        self.normalize_y = normalize_y
        self.standardize = standardize
        self.features = features
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def fit(self, X: Any, y: Any) -> NTKRegressor:
        """Fit on ``X`` (n, d) and ``y`` (n,) or (n, k); computes the train kernels once."""
        _need_sklearn()
        from sklearn.utils.validation import validate_data
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        Y = y.reshape(len(y), -1).astype(np.float64)
        self._y_1d = y.ndim == 1
        if self.normalize_y:
            self._y_mean = Y.mean(0)
            std = Y.std(0)
            self._y_std = np.where(std > 0, std, 1.0)
        else:
            self._y_mean = np.zeros(Y.shape[1])
            self._y_std = np.ones(Y.shape[1])
        return self._fit_core(X, (Y - self._y_mean) / self._y_std)

    @overload
    def predict(self, X: Any, return_std: Literal[False] = ...,
                return_cov: Literal[False] = ...) -> np.ndarray: ...

    @overload
    def predict(self, X: Any, return_std: bool = ...,
                return_cov: bool = ...) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]: ...

    def predict(self, X: Any, return_std: bool = False, return_cov: bool = False
                ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Mean prediction, optionally with the std or the covariance of the ensemble.

        Returns ``mean`` or ``(mean, std)`` or ``(mean, cov)`` (not both std and cov).
        """
        _need_sklearn()
        from sklearn.utils.validation import check_is_fitted, validate_data
        if return_std and return_cov:
            raise ValueError("ask for at most one of `return_std` and `return_cov`")
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        mean, cov = self._outputs(X, compute_cov=return_std or return_cov)
        mean = mean * self._y_std + self._y_mean
        if self._y_1d:
            mean = mean[:, 0]
        if not (return_std or return_cov):
            return mean
        if return_std:
            var = np.clip(np.diag(cov), 0.0, None)
            std = np.sqrt(var)[:, None] * self._y_std
            return mean, (std[:, 0] if self._y_1d else std)
        cov = cov[:, :, None] * (self._y_std ** 2)
        return mean, (cov[:, :, 0] if self._y_1d else cov)


# =========================================================================================
# classifier
# =========================================================================================

def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _fit_temperature(F: np.ndarray, y_idx: np.ndarray) -> float:
    """Temperature ``T`` minimising the smoothed cross-entropy of ``softmax(F / T)``.

    The labels are smoothed with weight ``eps = 1 / (n + 1)`` on the uniform distribution (as if
    one extra, uninformative observation had been seen): without it ``T -> 0`` whenever all
    held-out outputs are classified correctly, i.e. infinitely confident probabilities.
    """
    n = F.shape[0]
    if not np.isfinite(F).all() or n < 2:
        return 1.0
    spread = float(np.abs(F).max())
    if spread == 0:
        return 1.0
    eps = 1.0 / (n + 1)

    def nll(log_t):
        z = F / math.exp(log_t)
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -float((1 - eps) * np.mean(logp[np.arange(n), y_idx]) + eps * np.mean(logp))
    # golden-section search on log T over a wide bracket around the output scale
    lo, hi = math.log(spread) - 12.0, math.log(spread) + 6.0
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))


_SOLVERS = ("krr", "svm")
#: C values of solver='svm' (the published protocol's grid, on the un-normalised kernel)
DEFAULT_SVM_C = tuple(float(10.0 ** e) for e in range(-2, 5))
_SVM_CV_FOLDS = 3
_SVM_C_FALLBACK = 1.0


def _svc_outputs(dec: np.ndarray, c: int) -> np.ndarray:
    """SVC decision values as ``(m, c)`` outputs: binary ``f`` -> ``[-f/2, f/2]`` (so that
    output 1 - output 0 = ``f``), multi-class: the one-vs-rest shape as is."""
    dec = np.asarray(dec, dtype=np.float64)
    if dec.ndim == 1:
        return np.stack([-0.5 * dec, 0.5 * dec], 1)
    return dec.reshape(len(dec), c)


class NTKClassifier(ClassifierMixin, _NTKBase):
    """Infinitely wide network trained on centred one-hot targets, as a scikit-learn classifier.

    Targets are ``onehot(y) - 1/c`` (Arora et al.'s convention); the outputs ``F`` (m, c) are the
    :class:`NTKRegressor` predictions (gradient flow to time ``t``, or kernel regression), the
    class is ``argmax F``. ``decision_function`` returns ``F`` (binary: ``F[:, 1] - F[:, 0]``).

    **Chooses its own model by default**, exactly as :class:`NTKRegressor` (depth, ``fix``,
    bias and ridge by exact leave-one-out; ``best_params_``, ``loo_scores_`` with ``params``,
    ``mse``, ``accuracy``). The criterion is the LOO *squared error* of the centred one-hot
    outputs (summed over classes), not the LOO accuracy: on 18 UCI data sets (4 given folds
    each) the squared error chose models with 75.7% mean test accuracy against 75.0% for the
    accuracy criterion -- the accuracy of ``n`` LOO argmaxes is a coarse, noisy step function of
    the configuration (many ties, decided by a handful of points), while the squared error
    varies smoothly and still rewards the margin of the right class. With more than
    :data:`_PROJ_CLASSES` (16) classes the selection scores the targets projected on 16 random
    centred directions (seed ``random_state``): an unbiased estimate of that squared error
    whose cost does not grow with the number of classes (the screening still keeps 3 rows per
    class); ``loo_scores_`` then has no ``accuracy`` (the winner's held-out outputs for the
    temperature are still exact, for all classes). On plant-texture (100 classes, n = 1200)
    this cut a default fit from ~1.9 to ~1.3 s CPU (~3.5x a single fit instead of ~5x).

    ``predict_proba`` = ``softmax(F / T)``. With ``temperature='auto'`` ``T`` is fitted at
    ``fit`` time by minimising the cross-entropy (labels smoothed by ``1/(n+1)`` towards
    uniform, so that separable data do not give ``T = 0``) of held-out outputs: exact
    leave-one-out outputs of the kernel regression for ``t=None`` (closed form
    ``y_i - a_i / (K^-1)_ii``, one extra ``O(n^3)`` inverse; after a selection, the winner's
    held-out outputs from the selection, at no extra cost); for finite ``t`` (no exact LOO shortcut) the in-sample outputs at time
    ``t`` are used, which is less reliable (more confident) -- pass a float to fix ``T``.
    The argmax, hence accuracy, does not depend on ``T``.

    **solver.** ``'krr'`` (default): the kernel regression above -- as accurate as the SVM on
    the UCI benchmark at a fraction of its cost, and the only one whose selection is exact LOO.
    ``'svm'``: the published protocol's classifier (Arora et al. 2020): ``sklearn.svm.SVC
    (kernel='precomputed', C, break_ties=True)`` on the un-normalised train kernel of the
    chosen (or given) ``arch`` (inputs z-scored with the training rows' mean / std, as
    ``standardize``; the protocol's data come standardized over all rows). LOO is not exact
    for an SVM, so: the kernel is chosen by the kernel-regression LOO above, then ``C`` from
    ``C`` (None: :data:`DEFAULT_SVM_C` = the protocol's ``10^-2 .. 10^4``) by stratified
    3-fold CV accuracy on the training rows (``random_state``; ties: smallest ``C``), refitted on
    all rows; ``cv_scores_`` (``C``, ``accuracy``), ``C_``, ``best_params_['C']``.
    ``predict_proba`` = softmax of the decision values (binary ``[-f/2, f/2]``) over a
    temperature fitted on the out-of-fold decision values. Costs 21 extra SVC fits (not within
    the 3x budget). With a class of a single row ``C`` can't be cross-validated: ``C = 1`` and a
    warning.

    Args: as :class:`NTKRegressor` (no ``normalize_y``), plus ``temperature``: ``'auto'`` or a
    positive float; ``solver``: ``'krr'`` or ``'svm'``; ``C``: None, a number or a list (only
    with ``solver='svm'``).

    Example::

        >>> clf = NTKClassifier().fit(X, y)                    # chooses for itself
        >>> clf.best_params_, clf.predict(X_test), clf.predict_proba(X_test)
        >>> NTKClassifier(arch=ReluNTKFix(3, 1), diag_reg=1e-3).fit(X, y)    # exactly that
    """
    svc_: Any   # the fitted sklearn.svm.SVC (solver='svm'), else None

    def __init__(self, arch: _ArchArg = None, kernel: str = "ntk", t: Optional[float] = None,
                 diag_reg: _Grid = None, learning_rate: float = 1.0,
                 temperature: Union[str, float] = "auto", standardize: Union[bool, str] = "auto",
                 features: Optional[int] = None, random_state: Optional[int] = None,
                 solver: str = "krr", C: _Grid = None):
        self.arch = arch
        self.kernel = kernel
        self.t = t
        self.diag_reg = diag_reg
        self.learning_rate = learning_rate
        self.temperature = temperature
        self.standardize = standardize
        self.features = features
        self.random_state = random_state
        self.solver = solver
        self.C = C

    def _check_solver(self):
        """``(solver, C values)``; errors name the argument and the fix."""
        solver = self.solver
        if solver not in _SOLVERS:
            raise ValueError(f"`solver` must be 'krr' (kernel regression on one-hot targets) or "
                             f"'svm' (SVC on the chosen kernel), got {solver!r}")
        C = self.C
        if solver == "krr":
            if C is not None:
                raise ValueError("`C` is the SVM's penalty: pass it with solver='svm', or "
                                 "leave C=None for solver='krr' (whose ridge is `diag_reg`)")
            return solver, None
        if _check_t(self.t) is not None:
            raise ValueError("solver='svm' fits an SVM on the converged kernel; `t` must be None")
        if self.features is not None:
            raise ValueError("solver='svm' needs the exact kernel; pass features=None")
        if C is None:
            Cs = list(DEFAULT_SVM_C)
        elif _is_list(C):
            if len(C) == 0:
                raise ValueError("`C` is an empty list; pass None (chosen by internal CV), a "
                                 "number > 0 or a non-empty list of them")
            Cs = [_check_nonneg(v, "C") for v in C]
        else:
            Cs = [_check_nonneg(C, "C")]
        if min(Cs) <= 0:
            raise ValueError(f"`C` values must be > 0, got {C!r}")
        return solver, Cs

    def fit(self, X: Any, y: Any) -> NTKClassifier:
        """Fit on ``X`` (n, d) and labels ``y`` (n,) with at least two classes."""
        _need_sklearn()
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import validate_data
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        c = len(self.classes_)
        if c < 2:
            raise ValueError(f"NTKClassifier needs at least 2 classes in `y`, got only class "
                             f"{self.classes_[0]!r}; a classifier can't train when only one "
                             f"class is present")
        temp = self.temperature
        if not (isinstance(temp, str) and temp == "auto"):
            if _check_nonneg(temp, "temperature") == 0:
                raise ValueError("`temperature` must be 'auto' or > 0")
        solver, Cs = self._check_solver()
        held: Any   # held-out outputs (an ndarray whenever the temperature is fitted)
        Y = np.eye(c)[y_idx] - 1.0 / c
        self._fit_core(X, Y, y_idx, need_ridge=solver == "krr")
        self.svc_ = None
        if solver == "svm":
            held = self._fit_svm(y_idx, Cs)
        else:
            held = self._heldout_outputs(Y) if isinstance(temp, str) else None
        if isinstance(temp, str):
            self.temperature_ = _fit_temperature(held, y_idx)
        else:
            self.temperature_ = float(temp)
        self._loo_best = None
        return self

    def _fit_svm(self, y_idx: np.ndarray, Cs) -> np.ndarray:
        """SVC on the (chosen) un-normalised train kernel; ``C`` by stratified internal CV.

        Returns held-out outputs ``(n, c)`` for the temperature: the out-of-fold decision values
        of the chosen ``C`` (in-sample ones when ``C`` is not cross-validated)."""
        import warnings
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import SVC
        K = self.k_train_train_[self.kernel].numpy()
        n, c = len(y_idx), len(self.classes_)
        folds = min(_SVM_CV_FOLDS, int(np.bincount(y_idx).min()))
        self.cv_scores_ = None
        oof = None
        if len(Cs) > 1 and folds < 2:
            warnings.warn("solver='svm': a class has a single training row, so C can't be "
                          f"cross-validated; using C={_SVM_C_FALLBACK} (pass `C` to choose)",
                          UserWarning)
            Cs = [_SVM_C_FALLBACK]
        if len(Cs) > 1:
            _, _, _, _, _, seed = self._plan(self.X_fit_.shape[1])
            splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed)
                          .split(np.zeros(n), y_idx))
            accs = []
            best: Optional[Tuple[float, Any, np.ndarray]] = None
            for C in Cs:
                F = np.empty((n, c))
                for tr, va in splits:
                    svc = SVC(kernel="precomputed", C=C, break_ties=True)
                    svc.fit(K[np.ix_(tr, tr)], y_idx[tr])
                    F[va] = _svc_outputs(svc.decision_function(K[np.ix_(va, tr)]), c)
                acc = float(np.mean(F.argmax(1) == y_idx))
                accs.append(acc)
                if best is None or acc > best[0]:      # ties: the smallest C (listed first)
                    best = (acc, C, F)
            self.cv_scores_ = {"C": np.array(Cs), "accuracy": np.array(accs)}
            assert best is not None  # Cs is not empty
            _, C, oof = best
        else:
            C = Cs[0]
        self.svc_ = SVC(kernel="precomputed", C=C, break_ties=True).fit(K, y_idx)
        self.C_ = C
        self.best_params_ = dict(self.best_params_, C=C)
        if oof is None:
            oof = _svc_outputs(self.svc_.decision_function(K), c)
        return oof

    def _heldout_outputs(self, Y: np.ndarray) -> np.ndarray:
        if getattr(self, "_loo_best", None) is not None:   # held-out outputs of the selection
            return self._loo_best.numpy()
        if _check_t(self.t) is not None:
            F, _ = self._outputs_t(self.X_fit_)
            return F
        fac = factorize(self.k_train_train_[self.kernel], self.diag_reg_, False,
                        "k_train_train")
        n = fac.n
        A_inv = fac.solve(torch.eye(n, dtype=_F64, device=fac.matrix.device))
        alpha = A_inv @ torch.as_tensor(Y, dtype=_F64, device=A_inv.device)
        dinv = torch.diagonal(A_inv)
        if not bool((dinv > 0).all()):
            F, _ = self._outputs_t(self.X_fit_)
            return F
        return (torch.as_tensor(Y, dtype=_F64) - (alpha / dinv[:, None]).cpu()).numpy()

    def _raw(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted, validate_data
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        if getattr(self, "svc_", None) is not None:
            Kt = _kernels(self.arch_, self._transform(X), self.X_fit_, (self.kernel,))
            return _svc_outputs(self.svc_.decision_function(Kt[self.kernel].numpy()),
                                len(self.classes_))
        F, _ = self._outputs(X)
        return F

    def decision_function(self, X: Any) -> np.ndarray:
        """Network outputs ``(m, c)``; for two classes ``(m,)`` = output 1 minus output 0."""
        _need_sklearn()
        F = self._raw(X)
        return F[:, 1] - F[:, 0] if F.shape[1] == 2 else F

    def predict(self, X: Any) -> np.ndarray:
        """Class labels ``(m,)``: argmax of the outputs."""
        _need_sklearn()
        F = self._raw(X)
        return self.classes_[np.argmax(F, axis=1)]

    def predict_proba(self, X: Any) -> np.ndarray:
        """``softmax(outputs / temperature_)``, shape ``(m, n_classes)``, columns = classes_."""
        _need_sklearn()
        F = self._raw(X)
        return _softmax(F / self.temperature_)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`."""
        _need_sklearn()
        F = self._raw(X)
        z = F / self.temperature_
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))


# =========================================================================================
# adapters for scikit-learn's own models
# =========================================================================================

class _KernelCallable:
    """Picklable ``k(X, Y) -> ndarray`` for scikit-learn's ``kernel=`` arguments."""

    def __init__(self, arch: _ArchArg, get: str):
        self.arch = _resolve_arch(arch)
        self.get = _check_kind(get)

    def __call__(self, X: Any, Y: Any = None) -> np.ndarray:
        x1 = torch.tensor(np.asarray(X, dtype=np.float64))
        x1 = x1.reshape(len(x1), -1) if x1.ndim == 1 else x1
        x2 = None if Y is None else torch.tensor(np.asarray(Y, dtype=np.float64))
        if x2 is not None and x2.ndim == 1:
            x2 = x2.reshape(len(x2), -1)
        return _kernels(self.arch, x1, x2, (self.get,))[self.get].numpy()

    def __repr__(self) -> str:
        return f"kernel_callable({self.arch!r}, get={self.get!r})"


def kernel_callable(arch: Union[None, _Arch] = None,
                    get: str = "ntk") -> Callable[..., np.ndarray]:
    """A callable ``k(X, Y)`` returning the ``(n1, n2)`` float64 NTK/NNGP matrix as numpy.

    For ``SVC(kernel=...)``, ``KernelRidge(kernel=...)``, ``SpectralClustering(affinity=...)``:
    scikit-learn calls it with the two sample arrays. Picklable (the fitted SVC can be saved).
    For a grid over many C values, precompute once instead: ``K = kernel_callable(a)(X, X)`` and
    ``SVC(kernel='precomputed')``.

    Example::

        >>> from sklearn.svm import SVC
        >>> svc = SVC(kernel=kernel_callable(ReluNTKFix(depth=3, fix=1)), C=10).fit(X, y)
    """
    return _KernelCallable(arch, get)


_GP_CACHE: Dict[tuple, np.ndarray] = {}


class NTKGPKernel(_SkKernel):
    """NTK/NNGP as a ``sklearn.gaussian_process.kernels.Kernel`` (no tunable hyper-parameters).

    Combine it with scikit-learn's kernels to learn a scale and noise by marginal likelihood:
    ``ConstantKernel() * NTKGPKernel(arch) + WhiteKernel()``.

    Args:
      arch: as in :class:`NTKRegressor` (None: :func:`default_arch`).
      get: ``'ntk'`` or ``'nngp'`` (the NNGP is the exact GP prior of the wide network).

    Example::

        >>> from sklearn.gaussian_process import GaussianProcessRegressor
        >>> from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel
        >>> gpr = GaussianProcessRegressor(ConstantKernel() * NTKGPKernel(get="nngp")
        ...                                + WhiteKernel()).fit(X, y)
    """

    def __init__(self, arch: Union[None, _Arch] = None, get: str = "nngp"):
        _need_sklearn()
        self.arch = arch
        self.get = get

    def _fn(self):
        return _KernelCallable(self.arch, self.get)

    def __call__(self, X: Any, Y: Any = None, eval_gradient: bool = False
                 ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        if Y is not None and eval_gradient:
            raise ValueError("Gradient can only be evaluated when Y is None.")
        if Y is None:
            # the marginal-likelihood optimizer re-evaluates k(X, X) on clones of this kernel at
            # every step: remember the last few train matrices (keyed by content)
            Xa = np.ascontiguousarray(X, dtype=np.float64)
            key = (repr(self.arch), self.get, Xa.shape,
                   hashlib.blake2b(Xa.tobytes(), digest_size=16).hexdigest())
            K = _GP_CACHE.get(key)
            if K is None:
                K = self._fn()(Xa, None)
                _GP_CACHE[key] = K
                while len(_GP_CACHE) > 4:
                    _GP_CACHE.pop(next(iter(_GP_CACHE)))
            K = K.copy()
        else:
            K = self._fn()(X, Y)
        if eval_gradient:
            return K, np.empty((K.shape[0], K.shape[1], 0))
        return K

    def diag(self, X: Any) -> np.ndarray:
        """``k(x, x)`` for each row of ``X`` (computed exactly, row by row in one batch)."""
        x = torch.tensor(np.asarray(X, dtype=np.float64))
        fn = self._fn()
        # the kernel maps are per pair, so the diagonal of k(X, X) can be taken blockwise
        out = np.empty(len(x))
        step = 512
        for i in range(0, len(x), step):
            out[i:i + step] = np.diag(fn(x[i:i + step].numpy()))
        return out

    def is_stationary(self) -> bool:
        return False

    @property
    def requires_vector_input(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"NTKGPKernel(arch={self.arch!r}, get={self.get!r})"
