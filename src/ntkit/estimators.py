"""scikit-learn estimators and kernel adapters built on infinite-width network kernels.

* :class:`NTKRegressor`: the prediction of an infinitely wide network trained by gradient flow on
  the squared loss -- at convergence (``t=None``: NTK kernel regression) or at time ``t`` --
  averaged over initializations, with its predictive std / covariance (Lee et al. 2019).
  ``kernel='nngp'`` gives the Bayesian (NNGP) posterior / readout-only training instead.
* :class:`NTKClassifier`: the same on centred one-hot targets (``onehot - 1/c``), class = argmax;
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
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

try:  # scikit-learn is an optional extra; the module imports without it
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.gaussian_process.kernels import Kernel as _SkKernel
    _HAVE_SKLEARN = True
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    BaseEstimator = ClassifierMixin = RegressorMixin = object
    _SkKernel = object
    _HAVE_SKLEARN = False

__all__ = ["NTKRegressor", "NTKClassifier", "NTKGPKernel", "ReluNTKFix", "kernel_callable"]

_F64 = torch.float64
_KINDS = ("ntk", "nngp")


def _need_sklearn():
    if not _HAVE_SKLEARN:
        raise ImportError("ntkit.estimators needs scikit-learn: pip install 'ntkit[sklearn]'")


# =========================================================================================
# architectures
# =========================================================================================

class ReluNTKFix:
    """Bias-free FC ReLU NTK of Arora et al. (2020) with the first ``fix`` layers not trained.

    ``depth`` = number of hidden ReLU layers (the paper's depth minus one; ``depth=0`` is the
    linear kernel ``X1 X2^T``), ``0 <= fix <= depth``. Computed from ``S = X1 X2^T`` with no
    ``1/d`` factor, exactly as the paper's code: ``ntk`` drops the terms of the first ``fix``
    weight layers; ``nngp`` is the prior covariance of the readout's input (independent of
    ``fix``). Use it as ``arch=`` of the estimators or in :func:`kernel_callable`.

    Example::

        >>> k = ReluNTKFix(depth=2, fix=1).kernel(x1, x2, get="ntk")      # (n1, n2) float64
    """

    def __init__(self, depth: int = 2, fix: int = 0):
        self.depth = depth
        self.fix = fix

    def _check(self) -> Tuple[int, int]:
        d, f = self.depth, self.fix
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ValueError(f"`depth` must be an integer >= 0 (hidden ReLU layers), got {d!r}")
        if isinstance(f, bool) or not isinstance(f, numbers.Integral) or not 0 <= f <= d:
            raise ValueError(f"`fix` must be an integer in [0, depth={d}], got {f!r}")
        return int(d), int(f)

    def kernel(self, x1, x2=None, get=("nngp", "ntk"), **_):
        from ._uci_ntk import iter_ntk_fix
        depth, fix = self._check()
        single = isinstance(get, str)
        keys = (get,) if single else tuple(get)
        for g in keys:
            if g not in _KINDS:
                raise ValueError(f"`get` has unknown key {g!r}; valid keys are {_KINDS}")
        out: Dict[str, torch.Tensor] = {}
        for h, f, K in iter_ntk_fix(x1, x2, max_depth=depth, copy=True):
            if h != depth:
                continue
            if f == fix and "ntk" in keys:
                out["ntk"] = K
            if f == depth and "nngp" in keys:
                out["nngp"] = K
        return out[keys[0]] if single else out

    def __repr__(self) -> str:
        return f"ReluNTKFix(depth={self.depth!r}, fix={self.fix!r})"

    def __eq__(self, other) -> bool:
        return (type(other) is type(self) and other.depth == self.depth
                and other.fix == self.fix)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.depth, self.fix))


def default_arch():
    """The default architecture: 2 hidden ReLU layers, ``W_std = sqrt(2)``, ``b_std = 0.1``.

    ``W_std^2 = 2`` keeps the ReLU kernel's scale constant with depth (He initialization); the
    small bias lets the model fit a constant offset.
    """
    from . import layers as nl
    w, b = math.sqrt(2.0), 0.1
    return nl.serial(nl.Dense(512, W_std=w, b_std=b), nl.Relu(),
                     nl.Dense(512, W_std=w, b_std=b), nl.Relu(),
                     nl.Dense(1, W_std=w, b_std=b))


def _resolve_arch(arch):
    if arch is None:
        return default_arch()
    if isinstance(arch, str):
        from .layers import parse_arch
        return parse_arch(arch)
    if not (hasattr(arch, "kernel") and callable(arch.kernel)):
        raise TypeError(f"`arch` must be None, an ntkit architecture (e.g. "
                        f"ntkit.layers.serial(...)), its text form, or an object with a "
                        f".kernel(x1, x2, get) method such as ReluNTKFix; got "
                        f"{type(arch).__name__}")
    return arch


def _kernels(arch, x1: torch.Tensor, x2: Optional[torch.Tensor], keys: Sequence[str]
             ) -> Dict[str, torch.Tensor]:
    keys = tuple(keys)
    res = arch.kernel(x1, x2, get=keys[0] if len(keys) == 1 else keys)
    out = {}
    for g in keys:
        if isinstance(res, torch.Tensor):
            v = res
        elif isinstance(res, dict):
            v = res[g]
        else:
            v = getattr(res, g)
        v = torch.as_tensor(v).to(_F64)
        if not torch.isfinite(v).all():
            raise ValueError(f"the architecture's {g} kernel has NaN/Inf entries; check the "
                             f"inputs' scale and the architecture")
        out[g] = v
    return out


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
# shared fitting / prediction
# =========================================================================================

class _NTKBase(BaseEstimator):
    """Stores training inputs and kernels; predicts with :mod:`ntkit.predict`."""

    def _fit_kernels(self, X: np.ndarray, Y: np.ndarray):
        _check_kind(self.kernel)
        _check_t(self.t)
        _check_nonneg(self.diag_reg, "diag_reg")
        lr = _check_nonneg(self.learning_rate, "learning_rate")
        if lr == 0:
            raise ValueError("`learning_rate` must be > 0")
        arch = _resolve_arch(self.arch)
        Xt = torch.tensor(np.asarray(X, dtype=np.float64))
        k_dd = _kernels(arch, Xt, None, ("nngp", "ntk"))
        self.arch_ = arch
        self.X_fit_ = Xt
        self.k_train_train_ = k_dd
        self.y_fit_ = torch.tensor(np.asarray(Y, dtype=np.float64))
        return self

    def _predict_fn(self):
        from .predict import gradient_descent_mse_ensemble
        X_fit, cache = self.X_fit_, self.k_train_train_
        arch = self.arch_

        def kfn(x1, x2, get):
            keys = (get,) if isinstance(get, str) else tuple(get)
            if x2 is None and x1 is X_fit:
                return {g: cache[g] for g in keys}
            return _kernels(arch, x1, x2, keys)
        return gradient_descent_mse_ensemble(kfn, X_fit, self.y_fit_,
                                             learning_rate=self.learning_rate,
                                             diag_reg=self.diag_reg)

    def _outputs(self, X: np.ndarray, compute_cov: bool = False):
        """Mean ``(m, k)`` float64 numpy (and ``(m, m)`` covariance if asked)."""
        Xt = torch.tensor(np.asarray(X, dtype=np.float64))
        res = self._predict_fn()(x_test=Xt, t=_check_t(self.t), get=self.kernel,
                                 compute_cov=compute_cov)
        if compute_cov:
            return res.mean.numpy(), res.covariance.numpy()
        return res.numpy(), None


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

    Args:
      arch: ntkit architecture (``ntkit.layers.serial(...)``), its text form, an object with
        ``.kernel(x1, x2, get)`` (e.g. :class:`ReluNTKFix`), or None for :func:`default_arch`.
      kernel: ``'ntk'`` or ``'nngp'``.
      t: training time (neural-tangents units: loss ``1/2 mean (f-y)^2``, time x learning
        rate), or None for convergence.
      diag_reg: ridge relative to the mean diagonal of the train kernel (stabilises the solve).
      learning_rate: time unit (``absolute time = learning_rate * t``).
      normalize_y: standardise targets (mean 0, std 1) before fitting, undo on prediction.

    Shapes: ``X`` (n, d); ``y`` (n,) or (n, k); ``predict`` -> (m,) or (m, k), std (m,) or
    (m, k), cov (m, m) or (m, m, k) (as ``GaussianProcessRegressor``).

    Example::

        >>> reg = NTKRegressor(t=100.0).fit(X, y)
        >>> mean, std = reg.predict(X_test, return_std=True)
    """

    def __init__(self, arch=None, kernel: str = "ntk", t: Optional[float] = None,
                 diag_reg: float = 1e-4, learning_rate: float = 1.0, normalize_y: bool = False):
        self.arch = arch
        self.kernel = kernel
        self.t = t
        self.diag_reg = diag_reg
        self.learning_rate = learning_rate
        self.normalize_y = normalize_y

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def fit(self, X, y):
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
        return self._fit_kernels(X, (Y - self._y_mean) / self._y_std)

    def predict(self, X, return_std: bool = False, return_cov: bool = False):
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


class NTKClassifier(ClassifierMixin, _NTKBase):
    """Infinitely wide network trained on centred one-hot targets, as a scikit-learn classifier.

    Targets are ``onehot(y) - 1/c`` (Arora et al.'s convention); the outputs ``F`` (m, c) are the
    :class:`NTKRegressor` predictions (gradient flow to time ``t``, or kernel regression), the
    class is ``argmax F``. ``decision_function`` returns ``F`` (binary: ``F[:, 1] - F[:, 0]``).

    ``predict_proba`` = ``softmax(F / T)``. With ``temperature='auto'`` ``T`` is fitted at
    ``fit`` time by minimising the cross-entropy (labels smoothed by ``1/(n+1)`` towards
    uniform, so that separable data do not give ``T = 0``) of held-out outputs: exact
    leave-one-out outputs of the kernel regression for ``t=None`` (closed form ``y_i - a_i / (K^-1)_ii``, one extra
    ``O(n^3)`` inverse); for finite ``t`` (no exact LOO shortcut) the in-sample outputs at time
    ``t`` are used, which is less reliable (more confident) -- pass a float to fix ``T``.
    The argmax, hence accuracy, does not depend on ``T``.

    Args: as :class:`NTKRegressor` (no ``normalize_y``), plus ``temperature``: ``'auto'`` or a
    positive float.

    Example::

        >>> clf = NTKClassifier(arch=ReluNTKFix(depth=3, fix=1)).fit(X, y)
        >>> clf.predict(X_test), clf.predict_proba(X_test)
    """

    def __init__(self, arch=None, kernel: str = "ntk", t: Optional[float] = None,
                 diag_reg: float = 1e-4, learning_rate: float = 1.0, temperature="auto"):
        self.arch = arch
        self.kernel = kernel
        self.t = t
        self.diag_reg = diag_reg
        self.learning_rate = learning_rate
        self.temperature = temperature

    def fit(self, X, y):
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
        Y = np.eye(c)[y_idx] - 1.0 / c
        self._fit_kernels(X, Y)
        if isinstance(temp, str):
            self.temperature_ = _fit_temperature(self._heldout_outputs(Y), y_idx)
        else:
            self.temperature_ = float(temp)
        return self

    def _heldout_outputs(self, Y: np.ndarray) -> np.ndarray:
        if _check_t(self.t) is not None:
            F, _ = self._outputs(self.X_fit_.numpy())
            return F
        from ._linalg import factorize
        fac = factorize(self.k_train_train_[self.kernel], self.diag_reg, False, "k_train_train")
        n = fac.n
        A_inv = fac.solve(torch.eye(n, dtype=_F64, device=fac.matrix.device))
        alpha = A_inv @ torch.as_tensor(Y, dtype=_F64, device=A_inv.device)
        dinv = torch.diagonal(A_inv)
        if not bool((dinv > 0).all()):
            F, _ = self._outputs(self.X_fit_.numpy())
            return F
        return (torch.as_tensor(Y, dtype=_F64) - (alpha / dinv[:, None]).cpu()).numpy()

    def _raw(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted, validate_data
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        F, _ = self._outputs(X)
        return F

    def decision_function(self, X) -> np.ndarray:
        """Network outputs ``(m, c)``; for two classes ``(m,)`` = output 1 minus output 0."""
        _need_sklearn()
        F = self._raw(X)
        return F[:, 1] - F[:, 0] if F.shape[1] == 2 else F

    def predict(self, X) -> np.ndarray:
        """Class labels ``(m,)``: argmax of the outputs."""
        _need_sklearn()
        F = self._raw(X)
        return self.classes_[np.argmax(F, axis=1)]

    def predict_proba(self, X) -> np.ndarray:
        """``softmax(outputs / temperature_)``, shape ``(m, n_classes)``, columns = classes_."""
        _need_sklearn()
        F = self._raw(X)
        return _softmax(F / self.temperature_)

    def predict_log_proba(self, X) -> np.ndarray:
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

    def __init__(self, arch, get):
        self.arch = _resolve_arch(arch)
        self.get = _check_kind(get)

    def __call__(self, X, Y=None) -> np.ndarray:
        x1 = torch.tensor(np.asarray(X, dtype=np.float64))
        x1 = x1.reshape(len(x1), -1) if x1.ndim == 1 else x1
        x2 = None if Y is None else torch.tensor(np.asarray(Y, dtype=np.float64))
        if x2 is not None and x2.ndim == 1:
            x2 = x2.reshape(len(x2), -1)
        return _kernels(self.arch, x1, x2, (self.get,))[self.get].numpy()

    def __repr__(self) -> str:
        return f"kernel_callable({self.arch!r}, get={self.get!r})"


def kernel_callable(arch=None, get: str = "ntk"):
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

    def __init__(self, arch=None, get: str = "nngp"):
        _need_sklearn()
        self.arch = arch
        self.get = get

    def _fn(self):
        return _KernelCallable(self.arch, self.get)

    def __call__(self, X, Y=None, eval_gradient: bool = False):
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

    def diag(self, X) -> np.ndarray:
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
