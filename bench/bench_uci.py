"""UCI benchmark of Arora et al. (2020): NTK-SVM vs random forest vs Gaussian-kernel SVM.

One command, any folder in the Fernández-Delgado layout (see ntkit.data.load_uci)::

    python bench/bench_uci.py DATA_DIR OUT.csv [--jobs 2] [--max-n 5000] [--datasets a,b,...]

Protocol (the reference code, GitHub LeoYu/neural-tangent-kernel-UCI, UCI.py/NTK.py/tools.py):

* data sets with ``n_patrons1 <= max_n`` (5000) and no separate test file; X = the given
  (already standardised) features, no further preprocessing;
* NTK: bias-free FC ReLU NTK from ``S = X X^T`` (no 1/d), depth (hidden ReLU layers) h = 0..4
  ("depth 1..5"), first ``fix`` = 0..h layers frozen: 15 kernels, all from ONE recursion pass
  (``ntkit._uci_ntk.iter_ntk_fix``); ``SVC(kernel='precomputed', C)`` on the UN-normalised
  kernel, C in {1e-2, ..., 1e4};
* selection: every configuration trained on line 1 of ``conxuntos.dat``, scored on line 2; the
  first strictly best in loop order (h, fix, C ascending) wins;
* reported accuracy: the selected configuration retrained on each of the 4 training sets of
  ``conxuntos_kfold.dat`` and scored on the matching test sets; the mean of the 4;
* ONE deviation, for run time: libsvm is stopped after ``--max-iter`` SMO iterations (default
  1e6; ``-1`` = no cap = the reference exactly). Only large-C fits of big, noisy data sets hit
  it (an uncapped linear-kernel SVC with C = 1e4 on waveform takes ~2-4 min); the CSV counts the
  capped fits per method and whether a reported (final) fit was capped;
* baselines under the same protocol (same splits, same selection rule, same retraining):
  Gaussian-kernel SVM ``exp(-gamma |x-x'|^2)``, gamma = 2^k / d for k = -7..7 (15 kernels, like the
  15 NTKs) x the same 7 C values = 105 configurations, the NTK's budget; random forest
  (scikit-learn, 500 trees like the R randomForest default used by Fernández-Delgado et al.),
  mtry (max_features) in {d^0, d^.25, d^.5, d^.75, d} rounded (5 configurations; RF is far less
  sensitive to its hyper-parameters and each fit costs ~100x an SVC fit on a precomputed kernel).

* ``default``: ``ntkit.NTKClassifier()`` with no argument (no tuning by the user: it chooses
  depth, fixed layers, bias and ridge itself by exact leave-one-out on each training set), fitted
  on each of the 4 training sets and scored on the matching test sets -- the validation split
  is not used. ``default_seconds`` = total time of the 4 fits + predictions.

``--reuse OLD.csv`` copies the columns of methods not run now from an earlier CSV (same data
sets), e.g. ``--methods default --reuse bench/results/uci.csv`` adds the default estimator to
the published-protocol table without recomputing the baselines.

Output: one JSON line per data set (stdout), the per-data-set CSV, then a summary JSON line and
a markdown table: average accuracy, Friedman rank (mean rank per data set among the compared
methods, 1 = best, ties averaged), P90/P95 (% of data sets where the method reaches >= 90/95 % of
the best compared accuracy on that data set), PMA (mean % of the maximum accuracy), plus a kernel
timing line comparing the one-pass 15-kernel recursion with the reference's per-fix recursion.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

C_LIST = [10.0 ** i for i in range(-2, 5)]
MAX_H = 4                                          # hidden layers 0..4 = depths 1..5
GAMMA_EXPS = list(range(-7, 8))                    # gamma = 2^k / d
RF_POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)            # mtry = round(d^p)
METHODS = ("ntk", "svm_rbf", "rf", "default")


MAX_ITER = [-1]           # libsvm SMO iteration cap per binary sub-problem (-1: none); set by CLI
CAPPED = {"n": 0}         # fits stopped by the cap, in this process


def _svm_acc(K_tr, K_te, y_tr, y_te, C):
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import SVC
    clf = SVC(kernel="precomputed", C=C, cache_size=2000, max_iter=MAX_ITER[0])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(K_tr, y_tr)
    if any(issubclass(x.category, ConvergenceWarning) for x in w):
        CAPPED["n"] += 1
    return float(np.mean(clf.predict(K_te) == y_te))


def _select_and_test(kernels, ds, configs_of):
    """Generic protocol: kernels yields (key, K full n x n); returns val acc, key, C, test acc."""
    tr, va = ds.train_idx, ds.val_idx
    y = ds.y
    best = (-1.0, None, None)
    K_best = None
    n_cfg = 0
    for key, K in kernels:
        K_tr = K[np.ix_(tr, tr)]
        K_va = K[np.ix_(va, tr)]
        for C in configs_of:
            acc = _svm_acc(K_tr, K_va, y[tr], y[va], C)
            n_cfg += 1
            if acc > best[0]:
                if best[1] != key:
                    K_best = np.array(K, copy=True)
                best = (acc, key, C)
    val_acc, key, C = best
    before = CAPPED["n"]
    accs = [_svm_acc(K_best[np.ix_(a, a)], K_best[np.ix_(b, a)], y[a], y[b], C)
            for a, b in ds.folds]
    return val_acc, key, C, float(np.mean(accs)), n_cfg, CAPPED["n"] - before


def run_ntk(ds):
    from ntkit._uci_ntk import iter_ntk_fix

    def kernels():
        for h, f, K in iter_ntk_fix(ds.X, max_depth=MAX_H, copy=False):
            yield (h, f), K.numpy()
    val, (h, f), C, acc, n_cfg, capped = _select_and_test(kernels(), ds, C_LIST)
    return dict(val_acc=val, acc=acc, params=f"depth={h + 1};fix={f};C={C:g}", n_configs=n_cfg,
                final_capped=capped)


def run_svm_rbf(ds):
    X = ds.X
    sq = (X * X).sum(1)
    D = np.maximum(sq[:, None] + sq[None, :] - 2.0 * X @ X.T, 0.0)
    d = X.shape[1]

    def kernels():
        for k in GAMMA_EXPS:
            yield k, np.exp(-(2.0 ** k / d) * D)
    val, k, C, acc, n_cfg, capped = _select_and_test(kernels(), ds, C_LIST)
    return dict(val_acc=val, acc=acc, params=f"gamma=2^{k}/d;C={C:g}", n_configs=n_cfg,
                final_capped=capped)


def run_rf(ds, seed=0):
    from sklearn.ensemble import RandomForestClassifier
    d = ds.X.shape[1]
    mtrys = sorted({min(d, max(1, int(round(d ** p)))) for p in RF_POWERS})
    X, y, tr, va = ds.X, ds.y, ds.train_idx, ds.val_idx

    def fit_acc(m, a, b):
        clf = RandomForestClassifier(n_estimators=500, max_features=m, random_state=seed,
                                     n_jobs=1)
        clf.fit(X[a], y[a])
        return float(np.mean(clf.predict(X[b]) == y[b]))
    best = (-1.0, None)
    for m in mtrys:
        acc = fit_acc(m, tr, va)
        if acc > best[0]:
            best = (acc, m)
    accs = [fit_acc(best[1], a, b) for a, b in ds.folds]
    return dict(val_acc=best[0], acc=float(np.mean(accs)), params=f"mtry={best[1]}",
                n_configs=len(mtrys))


def run_default(ds):
    """NTKClassifier() as a user would call it: no hyper-parameters, no validation split."""
    from ntkit.estimators import NTKClassifier
    accs, chosen = [], []
    for a, b in ds.folds:
        clf = NTKClassifier().fit(ds.X[a], ds.y[a])
        accs.append(float(np.mean(clf.predict(ds.X[b]) == ds.y[b])))
        p = clf.best_params_
        chosen.append(f"{p['arch']!r}/r={p['diag_reg']:g}/m={clf.selection_size_}")
    return dict(val_acc=float("nan"), acc=float(np.mean(accs)), params="|".join(chosen),
                n_configs=len(clf.loo_scores_["mse"]) if clf.loo_scores_ else 1)


RUNNERS = {"ntk": run_ntk, "svm_rbf": run_svm_rbf, "rf": run_rf, "default": run_default}


def run_dataset(root, name, methods, threads, max_iter=-1):
    import torch
    torch.set_num_threads(threads)
    MAX_ITER[0] = max_iter
    from ntkit.data import load_uci
    import ntkit.estimators  # noqa: F401  (imports outside the timed region)
    import scipy.linalg  # noqa: F401
    import sklearn.svm  # noqa: F401
    ds = load_uci(root, name)
    row = dict(dataset=name, n=ds.n, d=ds.d, c=ds.n_classes)
    for m in methods:
        t0 = time.perf_counter()
        c0 = CAPPED["n"]
        r = RUNNERS[m](ds)
        row[f"{m}_acc"] = 100.0 * r["acc"]
        row[f"{m}_val_acc"] = 100.0 * r["val_acc"]
        row[f"{m}_params"] = r["params"]
        row[f"{m}_configs"] = r["n_configs"]
        # SVM fits stopped by --max-iter (all, and among the 4 final ones)
        if m not in ("rf", "default"):
            row[f"{m}_capped_fits"] = CAPPED["n"] - c0
            row[f"{m}_final_capped"] = r["final_capped"]
        row[f"{m}_seconds"] = round(time.perf_counter() - t0, 3)
    return row


# =========================================================================================
# summary statistics
# =========================================================================================

def summarize(rows, methods):
    A = np.array([[r[f"{m}_acc"] for m in methods] for r in rows])      # (datasets, methods)
    best = A.max(1, keepdims=True)
    # Friedman rank: 1 = best, ties get the average rank
    ranks = np.zeros_like(A)
    for i, a in enumerate(A):
        order = (-a).argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(1, len(a) + 1)
        for v in np.unique(a):
            tie = a == v
            r[tie] = r[tie].mean()
        ranks[i] = r
    safe = np.where(best > 0, best, 1.0)
    ratio = np.where(best > 0, A / safe, 1.0)
    out = {}
    for j, m in enumerate(methods):
        out[m] = dict(avg_acc=float(A[:, j].mean()), std_acc=float(A[:, j].std(ddof=1))
                      if len(A) > 1 else 0.0,
                      friedman_rank=float(ranks[:, j].mean()),
                      p90=float(100.0 * np.mean(ratio[:, j] >= 0.90)),
                      p95=float(100.0 * np.mean(ratio[:, j] >= 0.95)),
                      pma=float(100.0 * ratio[:, j].mean()),
                      seconds=float(sum(r[f"{m}_seconds"] for r in rows)))
    tests = {}
    try:
        from scipy import stats
        if len(methods) >= 3 and len(A) >= 2:
            st, p = stats.friedmanchisquare(*[A[:, j] for j in range(len(methods))])
            tests["friedman_p"] = float(p)
        if "ntk" in methods:
            j0 = methods.index("ntk")
            for j, m in enumerate(methods):
                if j != j0 and np.any(A[:, j0] != A[:, j]):
                    p = stats.wilcoxon(A[:, j0], A[:, j]).pvalue
                    tests[f"wilcoxon_p_ntk_vs_{m}"] = float(p)
    except Exception:  # scipy optional
        pass
    return out, tests


NAMES = {"ntk": "NTK-SVM (ntkit, depth 1-5, fix)", "svm_rbf": "Gaussian-kernel SVM",
         "rf": "Random forest (500 trees)",
         "default": "NTKClassifier() default (self-selected by LOO)"}


def markdown(summary, methods, n_sets):
    lines = [f"| classifier ({n_sets} data sets) | avg. acc. (%) | Friedman rank | P90 (%) | "
             f"P95 (%) | PMA (%) |", "|---|---:|---:|---:|---:|---:|"]
    for m in sorted(methods, key=lambda m: summary[m]["friedman_rank"]):
        s = summary[m]
        lines.append(f"| {NAMES.get(m, m)} | {s['avg_acc']:.2f} ± {s['std_acc']:.1f} | "
                     f"{s['friedman_rank']:.2f} | {s['p90']:.1f} | {s['p95']:.1f} | "
                     f"{s['pma']:.2f} |")
    return "\n".join(lines)


def _reference_kernel_value_batch(X, d_max):
    """The paper's NTK.kernel_value_batch (numpy, one recursion per fix level), for timing."""
    K = np.zeros((d_max, d_max, X.shape[0], X.shape[0]))
    for fix_dep in range(d_max):
        S = np.matmul(X, X.T)
        H = np.zeros_like(S)
        for dep in range(d_max):
            if fix_dep <= dep:
                H += S
            K[dep][fix_dep] = H
            L = np.diag(S)
            P = np.clip(np.sqrt(np.outer(L, L)), a_min=1e-9, a_max=None)
            Sn = np.clip(S / P, a_min=-1, a_max=1)
            S = (Sn * (math.pi - np.arccos(Sn)) + np.sqrt(1.0 - Sn * Sn)) * P / 2.0 / math.pi
            H = H * (math.pi - np.arccos(Sn)) / 2.0 / math.pi
    return K


def kernel_timing(X, n_max=2000):
    """One-pass 15-kernel recursion vs the reference code's numpy per-fix recursion (same run).

    Lower bound: the recursion needs one arccos per entry and hidden layer (MAX_H of them);
    torch.arccos throughput is measured here, so ``frac_of_arccos_bound`` = bound / time.
    """
    import torch
    from ntkit._uci_ntk import iter_ntk_fix
    X = X[:n_max]
    n = X.shape[0]
    Xt = torch.from_numpy(np.ascontiguousarray(X))
    best = {}
    for _rep in range(3):
        t0 = time.perf_counter()
        for _ in iter_ntk_fix(Xt, max_depth=MAX_H, copy=False):
            pass
        best["one"] = min(best.get("one", 1e9), time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = _reference_kernel_value_batch(X, MAX_H + 1)
    t_ref = time.perf_counter() - t0
    err = 0.0
    for h, f, K in iter_ntk_fix(Xt, max_depth=MAX_H, copy=False):
        err = max(err, float(np.abs(K.numpy() - ref[h][f]).max() / np.abs(ref[h][f]).max()))
    del ref
    m = max(n, 1000)                      # large enough for a stable throughput figure
    M = torch.rand(m, m, dtype=torch.float64) * 2 - 1
    torch.arccos(M)                       # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        torch.arccos(M)
    rate = 3 * m * m / (time.perf_counter() - t0)
    bound = MAX_H * n * n / rate
    return dict(bench="uci_kernel_timing", n=n, d=X.shape[1], kernels=15,
                one_pass_s=round(best["one"], 4), reference_numpy_per_fix_s=round(t_ref, 4),
                speedup_vs_reference=round(t_ref / best["one"], 2),
                max_rel_diff_vs_reference=err, arccos_gelem_per_s=round(rate / 1e9, 3),
                frac_of_arccos_bound=round(bound / best["one"], 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", help="folder in the UCI collection layout")
    ap.add_argument("out_csv", help="per-data-set results CSV to write")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes (default 2)")
    ap.add_argument("--max-n", type=int, default=5000, help="skip data sets with more rows")
    ap.add_argument("--datasets", default="", help="comma-separated subset of names")
    ap.add_argument("--methods", default=",".join(METHODS), help="subset of ntk,svm_rbf,rf")
    ap.add_argument("--max-iter", type=int, default=1_000_000,
                    help="cap on libsvm SMO iterations per fit (default 1e6, ~1 s at n=2500; "
                         "-1: no cap = the reference code exactly; then large-C fits on big "
                         "noisy data sets take minutes EACH, hours in total)")
    ap.add_argument("--no-kernel-timing", action="store_true")
    ap.add_argument("--reuse", default="", help="earlier CSV whose columns fill in the methods "
                    "not run now (same data sets)")
    args = ap.parse_args(argv)

    from ntkit.data import list_uci, _read_meta
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in RUNNERS:
            ap.error(f"unknown method {m!r}; choose from {METHODS}")
    names = list_uci(args.data_dir)
    if args.datasets:
        want = args.datasets.split(",")
        missing = sorted(set(want) - set(names))
        if missing:
            ap.error(f"data sets not found under {args.data_dir}: {missing}")
        names = [n for n in names if n in want]
    sizes = {}
    skipped = []
    for n in names:
        meta = _read_meta(os.path.join(args.data_dir, n, n + ".txt"))
        tot = int(meta["n_patrons1="]) + int(meta.get("n_patrons2=", "0") or 0)
        if tot > args.max_n or int(meta.get("n_patrons2=", "0") or 0) > 0:
            skipped.append(n)
        else:
            sizes[n] = tot
    if skipped:
        print(json.dumps(dict(skipped=skipped, reason="n > max_n or separate test file")),
              flush=True)
    todo = sorted(sizes, key=lambda k: -sizes[k])          # largest first: better balance
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    t_start = time.perf_counter()
    rows = []
    if jobs == 1:
        for n in todo:
            rows.append(run_dataset(args.data_dir, n, methods, threads, args.max_iter))
            print(json.dumps(rows[-1]), flush=True)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            futs = {ex.submit(run_dataset, args.data_dir, n, methods, threads, args.max_iter): n
                    for n in todo}
            for fut in as_completed(futs):
                rows.append(fut.result())
                print(json.dumps(rows[-1]), flush=True)
    wall = time.perf_counter() - t_start
    ran = methods
    rows.sort(key=lambda r: r["dataset"])
    if args.reuse:
        with open(args.reuse, newline="") as fh:
            old = {r["dataset"]: r for r in csv.DictReader(fh)}
        for r in rows:
            if r["dataset"] not in old:
                ap.error(f"--reuse: data set {r['dataset']} is not in {args.reuse}")
            for k, v in old[r["dataset"]].items():
                if k not in r:
                    for conv in (int, float, str):
                        try:
                            r[k] = conv(v)
                            break
                        except ValueError:
                            pass
        prev = [m for m in ("ntk", "svm_rbf", "rf", "default")
                if m not in methods and f"{m}_acc" in rows[0]]
        methods = prev + methods
    ran = [m for m in args.methods.split(",") if m]
    if not rows:
        print(json.dumps(dict(error="no data sets to run")))
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out_csv)), exist_ok=True)
    with open(args.out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary, tests = summarize(rows, methods)
    rec = dict(bench="uci_summary", n_datasets=len(rows), wall_seconds=round(wall, 1),
               jobs=jobs, max_iter=args.max_iter, methods=summary, tests=tests)
    for m in methods:
        if m in ("ntk", "svm_rbf"):
            rec[f"{m}_capped_fits"] = int(sum(r[f"{m}_capped_fits"] for r in rows))
            rec[f"{m}_datasets_with_capped_final_fit"] = int(sum(r[f"{m}_final_capped"] > 0
                                                                 for r in rows))
    if "ntk" in methods and "rf" in methods:
        rec["ntk_minus_rf_avg_acc"] = round(summary["ntk"]["avg_acc"] - summary["rf"]["avg_acc"], 3)
    if "default" in methods and "rf" in methods:
        rec["default_minus_rf_avg_acc"] = round(summary["default"]["avg_acc"]
                                                - summary["rf"]["avg_acc"], 3)
        A = np.array([[r["default_acc"], r["rf_acc"]] for r in rows])
        rec["default_vs_rf_wins_ties_losses"] = [int((A[:, 0] > A[:, 1]).sum()),
                                                 int((A[:, 0] == A[:, 1]).sum()),
                                                 int((A[:, 0] < A[:, 1]).sum())]
        s2, _ = summarize(rows, ["default", "rf"])
        rec["friedman_rank_default_vs_rf"] = {m: s2[m]["friedman_rank"] for m in s2}
    print(json.dumps(rec), flush=True)
    if not args.no_kernel_timing and "ntk" in ran:
        from ntkit.data import load_uci
        big = max(sizes, key=lambda k: sizes[k])
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(kernel_timing(load_uci(args.data_dir, big).X)), flush=True)
    print()
    print(markdown(summary, methods, len(rows)))
    print(f"\nwall time {wall / 60:.1f} min with {jobs} worker process(es); per-data-set results "
          f"in {args.out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
