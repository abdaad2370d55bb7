"""``ntkit demo``: the main job on an embedded data set (scikit-learn's bundled 8x8 digits).

Computes the exact NNGP and NTK of a default ReLU MLP, does kernel regression on one-hot targets
and prints a table of test accuracy, kernel time and data size.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List

import numpy as np
import torch

__all__ = ["load_digits_split", "default_arch", "kernel_regression_table", "register"]


def load_digits_split(n_train: int = 1200, seed: int = 0):
    """Digits (1797 x 64, 10 classes): pixels centered, each row scaled to mean square 1.

    Returns ``x_train, y_train, x_test, y_test`` (float64 tensors, integer labels).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the demo needs scikit-learn: pip install 'ntkit[all]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16.0
    x = x - x.mean(0)
    x = x / x.norm(dim=1, keepdim=True) * np.sqrt(x.shape[1])   # each row: mean square 1
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if not 10 <= n_train < len(x):
        raise ValueError(f"`n_train` must be between 10 and {len(x) - 1}, got {n_train}")
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def default_arch(depth: int = 3, width: int = 512):
    """ReLU MLP with ``depth`` hidden layers, ``W_std^2 = 2``, small bias, 10 outputs."""
    from . import layers as nl
    hidden = []
    for _ in range(depth):
        hidden += [nl.Dense(width, W_std=2 ** 0.5, b_std=0.1), nl.Relu()]
    return nl.serial(*hidden, nl.Dense(10, W_std=1.0, b_std=0.1))


def _krr_predict(k_tt: torch.Tensor, k_st: torch.Tensor, y: torch.Tensor, reg: float):
    """Kernel regression ``k_st (k_tt + reg * mean(diag) I)^-1 y`` in float64."""
    n = k_tt.shape[0]
    a = k_tt + reg * torch.diagonal(k_tt).mean() * torch.eye(n, dtype=k_tt.dtype)
    chol = torch.linalg.cholesky(a)
    return k_st @ torch.cholesky_solve(y, chol)


def kernel_regression_table(n_train: int = 1200, depth: int = 3, reg: float = 1e-4,
                            progress: bool = True) -> List[Dict]:
    """Rows of {kernel, test_accuracy, kernel_seconds, n_train, n_test, dim}."""
    x_tr, y_tr, x_te, y_te = load_digits_split(n_train)
    arch = default_arch(depth)
    y = torch.nn.functional.one_hot(y_tr, 10).double() - 0.1
    x_all = torch.cat([x_tr, x_te])
    t0 = time.perf_counter()
    k = arch.kernel(x_all, get=("nngp", "ntk"), progress=progress, tile=512)
    secs = time.perf_counter() - t0
    n = len(x_tr)
    rows = []
    for name in ("nngp", "ntk"):
        kk = getattr(k, name)
        pred = _krr_predict(kk[:n, :n], kk[n:, :n], y, reg)
        acc = float((pred.argmax(1) == y_te).double().mean())
        rows.append(dict(kernel=name.upper(), test_accuracy=acc, kernel_seconds=secs,
                         n_train=n, n_test=len(x_te), dim=x_tr.shape[1]))
    return rows


def _print_table(rows: List[Dict]) -> None:
    print(f"{'kernel':<8}{'test acc':>10}{'kernel s':>10}{'n_train':>9}{'n_test':>8}{'dim':>5}")
    for r in rows:
        print(f"{r['kernel']:<8}{r['test_accuracy']:>10.4f}{r['kernel_seconds']:>10.2f}"
              f"{r['n_train']:>9d}{r['n_test']:>8d}{r['dim']:>5d}")


def run(args: argparse.Namespace) -> int:
    print(f"ntkit demo: exact NNGP/NTK kernel regression on digits "
          f"(ReLU MLP, {args.depth} hidden layers, {args.n_train} training images)")
    rows = kernel_regression_table(args.n_train, args.depth, progress=not args.no_progress)
    _print_table(rows)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="main job: kernels vs networks on the embedded digits data",
                       description="Exact NNGP/NTK kernel regression on scikit-learn's bundled "
                       "digits, with a table of accuracy, kernel time and data size.")
    p.add_argument("--n-train", type=int, default=1200, help="training examples (default 1200)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
