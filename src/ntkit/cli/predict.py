"""``ntkit predict``: kernel matrices (.npy/.npz) + training targets -> outputs at times ``t``.

Gradient flow (default) or discrete gradient descent (``--discrete``: ``t`` counts GD steps of
size ``--learning-rate``) on ``1/2 mean (f - y)^2``, with neural-tangents' conventions
(:mod:`ntkit.predict`). Writes an ``.npz`` with ``t``, ``fx_train`` ``(T, n, k)`` and, given
``--k-test-train``, ``fx_test`` ``(T, m, k)``; ``t = inf`` is the converged (kernel regression)
prediction. The file also holds ``created_by = 'ntkit predict'``: an existing ``--out`` is
replaced only if it carries that mark (or with ``--force``), and it is written to a temporary
file first, so a failed run leaves nothing behind. ``--discrete`` refuses a learning rate at or
above the stable limit ``2 N / lambda_max``, and non-finite outputs are never written.

Example::

    ntkit predict --k-train-train ntk_train.npy --y-train y.npy --k-test-train ntk_test.npy \\
        --t 0,10,100,inf --out predictions.npz
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Dict

from .._files import check_out_file, write_atomic
from ._io import load_matrix, parse_floats

__all__ = ["register", "run"]

_MARKER = "created_by"          # entry that marks an .npz as written by `ntkit predict`
_MARK = "ntkit predict"


def _ours(path: str) -> bool:
    """Whether ``path`` is an earlier output of this command (so it may be replaced)."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            return _MARKER in z.files and str(z[_MARKER]) == _MARK
    except Exception:
        return False


def _number(v: float, flag: str, minimum: float, strict: bool) -> float:
    if not (math.isfinite(v) and (v > minimum if strict else v >= minimum)):
        raise ValueError(f"{flag} must be a finite number {'>' if strict else '>='} {minimum:g}, "
                         f"got {v!r}")
    return v


def _initial(arr, shape, flag: str):
    """``--fx-train-0``/``--fx-test-0`` as a float64 array broadcast to ``shape`` (n, k)."""
    import numpy as np
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == shape[0]:
        arr = arr[:, None]
    try:
        return np.ascontiguousarray(np.broadcast_to(arr, shape))
    except ValueError:
        raise ValueError(f"{flag} must be ({shape[0]},) or {shape} (one row per example, one "
                         f"column per output), got {arr.shape}") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from .. import predict
    from .._linalg import factorize
    # everything the user typed is checked before any file is read or any work is done
    lr = _number(args.learning_rate, "--learning-rate", 0.0, strict=True)
    diag_reg = _number(args.diag_reg, "--diag-reg", 0.0, strict=False)
    times = parse_floats(args.t, "--t")
    if any(t < 0 or math.isnan(t) for t in times):
        raise ValueError(f"--t must be >= 0 (or inf), got {args.t}")
    if args.discrete and any(math.isfinite(t) and t != round(t) for t in times):
        raise ValueError(f"--t counts gradient-descent steps with --discrete: whole numbers "
                         f"(or inf), got {args.t}")
    if args.fx_test_0 is not None and args.k_test_train is None:
        raise ValueError("--fx-test-0 needs --k-test-train (the test outputs are predicted "
                         "from the test-train kernel)")
    out = check_out_file(args.out, "--out", (".npz",), force=args.force, ours=_ours)

    k_dd = np.asarray(load_matrix(args.k_train_train, "--k-train-train", args.key,
                                  key_flag="--key"), dtype=np.float64)
    y = np.asarray(load_matrix(args.y_train, "--y-train", "y"), dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if k_dd.ndim != 2 or k_dd.shape[0] != k_dd.shape[1]:
        raise ValueError(f"--k-train-train must be a square (n, n) matrix, got {k_dd.shape}")
    n = k_dd.shape[0]
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"--y-train must be (n,) or (n, k) with n = {n} (the size of "
                         f"--k-train-train), got {y.shape}")
    k_td = None
    if args.k_test_train:
        k_td = np.asarray(load_matrix(args.k_test_train, "--k-test-train", args.key,
                                      key_flag="--key"), dtype=np.float64)
        if k_td.ndim != 2 or k_td.shape[1] != n:
            raise ValueError(f"--k-test-train must be (m, {n}) (test rows, train columns), got "
                             f"{k_td.shape}")
    f0 = np.zeros_like(y) if args.fx_train_0 is None else _initial(
        load_matrix(args.fx_train_0, "--fx-train-0", "f"), y.shape, "--fx-train-0")
    g0 = None
    if k_td is not None:
        g0 = np.zeros((k_td.shape[0], y.shape[1])) if args.fx_test_0 is None else _initial(
            load_matrix(args.fx_test_0, "--fx-test-0", "f"), (k_td.shape[0], y.shape[1]),
            "--fx-test-0")

    k_t, y_t = torch.from_numpy(k_dd), torch.from_numpy(y)
    fn: Callable[..., Any]    # a StepsPredictFn or a TimePredictFn: called positionally below
    if args.discrete:
        if max(times) > 0:
            # the predictor reuses this (cached) factorization: a mode with eigenvalue lam
            # evolves as (1 - lr lam / N)^steps, stable iff lr < 2 N / lam_max
            evals, _ = factorize(k_t, diag_reg, False, "k_train_train").eigh()
            top = float(evals[-1])
            if top > 0 and lr >= 2.0 * y.size / top:
                raise ValueError(
                    f"--learning-rate {args.learning_rate:g} is above the stable limit "
                    f"{2.0 * y.size / top:.6g} of gradient descent on this kernel (2 N / "
                    f"lambda_max, N = {y.size} outputs): the steps diverge; use a learning rate "
                    f"below the limit")
        fn = predict.gradient_descent_mse_discrete(k_t, y_t, learning_rate=lr, diag_reg=diag_reg)
    else:
        fn = predict.gradient_descent_mse(k_t, y_t, learning_rate=lr, diag_reg=diag_reg)
    kt = None if k_td is None else torch.from_numpy(k_td)
    f0_t = torch.from_numpy(f0)
    g0_t = None if g0 is None else torch.from_numpy(g0)
    tr, te = [], []
    progress = None
    if not args.no_progress and len(times) > 1:
        try:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(times), desc="predict", leave=False)
        except ImportError:  # pragma: no cover
            progress = None
    try:
        for t in times:
            res = fn(None if math.isinf(t) else t, f0_t, g0_t, kt)
            a, b = (res if kt is not None else (res, None))
            tr.append(a.numpy())
            if b is not None:
                te.append(b.numpy())
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
    result = {"t": np.array(times), "fx_train": np.stack(tr)}
    if te:
        result["fx_test"] = np.stack(te)
    for name, arr in result.items():
        if name != "t" and not np.isfinite(arr).all():
            bad = [t for t, a in zip(times, arr) if not np.isfinite(a).all()]
            raise ValueError(f"the predicted {name} is not finite at --t {bad[0]:g} (the "
                             f"dynamics diverge or overflow); lower --learning-rate or the "
                             f"times; nothing was written")
    payload: Dict[str, Any] = {**result, _MARKER: np.array(_MARK)}
    write_atomic(out, "--out", lambda f: np.savez(f, **payload))
    mode = "GD steps" if args.discrete else "gradient flow"
    print(f"ntkit predict: {mode}, n={n}, k={y.shape[1]}, "
          f"{'m=' + str(k_td.shape[0]) + ', ' if k_td is not None else ''}t={times}")
    for t, a in zip(times, tr):
        loss = 0.5 * float(((a - y) ** 2).mean())
        print(f"  t={t:<10g} train loss {loss:.4e}")
    print(f"wrote {out} (arrays: {', '.join(result)})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="outputs of a network trained by GD, from its NTK (.npy files)",
        description="Closed-form outputs of an infinitely wide network trained on MSE by "
        "gradient flow (or discrete GD steps), from kernel matrices saved as .npy/.npz (e.g. by "
        "`ntkit kernel`). Writes t, fx_train (T, n, k) and fx_test (T, m, k) to an .npz.")
    p.add_argument("--k-train-train", required=True, metavar="NPY",
                   help="(n, n) train-train NTK (.npy, or .npz with entry --key)")
    p.add_argument("--y-train", required=True, metavar="NPY", help="(n,) or (n, k) targets")
    p.add_argument("--k-test-train", metavar="NPY", help="(m, n) test-train NTK (optional)")
    p.add_argument("--fx-train-0", metavar="NPY", help="initial train outputs (default 0)")
    p.add_argument("--fx-test-0", metavar="NPY", help="initial test outputs (default 0)")
    p.add_argument("--t", default="0,1,10,100,1000,inf",
                   help="comma-separated times (learning-rate units) or, with --discrete, GD "
                   "step counts; 'inf' = converged (default 0,1,10,100,1000,inf)")
    p.add_argument("--learning-rate", type=float, default=1.0,
                   help="time unit / GD step size (default 1)")
    p.add_argument("--discrete", action="store_true",
                   help="exact discrete GD steps instead of gradient flow")
    p.add_argument("--diag-reg", type=float, default=0.0,
                   help="ridge relative to the mean kernel diagonal (default 0)")
    p.add_argument("--key", default="ntk", help="entry to read from .npz kernel files "
                   "(default ntk)")
    p.add_argument("--out", default="predictions.npz", help="output file, must end in .npz "
                   "(default predictions.npz); an existing file is replaced only if an earlier "
                   "`ntkit predict` wrote it")
    p.add_argument("--force", action="store_true", help="replace an existing --out file that "
                   "ntkit did not write")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
