"""Cost of the built-in model selection of NTKClassifier (issue 19): default fit vs one fit.

For each UCI data set, the time of ``NTKClassifier().fit`` (chooses among 30 kernels x 15
ridges by exact leave-one-out: screening on ``selection_rows`` rows, then exact LOO on all rows
for the best ``full_n_kernels``) over the time of a single fixed fit at the largest depth
considered, ``NTKClassifier(arch=ReluNTKFix(4, 1), diag_reg=1e-3).fit`` (kernel + solve + the
LOO temperature), both on the first training fold, best of ``--repeats`` runs, one thread::

    python bench/bench_selection_cost.py DATA_DIR [--datasets a,b] [--repeats 3] [--threads 1]

Prints one JSON line per data set and a summary line (max / median ratio).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

DEFAULT_SETS = "pima,statlog-german-credit,contrac,cardiotocography-10clases,titanic,bank"


def _best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("--datasets", default=DEFAULT_SETS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from ntkit.data import load_uci
    from ntkit.estimators import NTKClassifier, ReluNTKFix
    ratios = []
    for name in args.datasets.split(","):
        ds = load_uci(args.data_dir, name)
        a, _ = ds.folds[0]
        X, y = ds.X[a], ds.y[a]
        # _best_time calls the lambdas at once; X=X, y=y binds this data set explicitly
        t_sel = _best_time(lambda X=X, y=y: NTKClassifier().fit(X, y), args.repeats)
        t_one = _best_time(lambda X=X, y=y: NTKClassifier(arch=ReluNTKFix(4, 1),
                                                          diag_reg=1e-3).fit(X, y),
                           args.repeats)
        clf = NTKClassifier().fit(X, y)
        ratios.append(t_sel / t_one)
        print(json.dumps(dict(dataset=name, n_train=len(a), d=ds.d, c=ds.n_classes,
                              default_fit_s=round(t_sel, 4), single_fit_s=round(t_one, 4),
                              ratio=round(t_sel / t_one, 2),
                              selection_rows=clf.selection_size_,
                              full_n_kernels=len(clf.loo_scores_.get("refined", {})
                                                 .get("mse", [])) // 15,
                              chosen=repr(clf.best_params_))), flush=True)
    print(json.dumps(dict(bench="selection_cost", max_ratio=round(max(ratios), 2),
                          median_ratio=round(float(np.median(ratios)), 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
