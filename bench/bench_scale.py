"""Kernel regression at scale: FC ReLU NTK on CIFAR-10 through ntkit.scale (tiled Zarr stores).

Prints JSON lines (one per phase):

* ``data``: sizes; ``kernel_train`` / ``kernel_test``: wall time, tiles, store size, s/entry;
* ``solve``: method (auto: dense Cholesky if it fits), time; ``predict``: test accuracy (argmax
  of K_td alpha); ``solve_cg``: preconditioned CG streaming the store, capped at
  ``--cg-maxiter`` passes: residual, s/pass, accuracy and agreement with the dense predictions;
* ``tile_cost``: single-threaded time of one full tile (the unit the estimates scale);
* ``executors`` (subset of ``--ratio-n`` examples): the in-memory ``arch.kernel`` baseline, the
  tiled in-process run and a 2-worker Dask ``LocalCluster``, as time ratios, plus a bitwise
  comparison of the two tiled results;
* ``estimate``: kernel cost for 60,000 and 1,000,000 training examples (+ ``--n-test`` test) on N
  workers, from the measured tile cost; CG time per pass from the measured pass rate;
* ``memory``: peak RSS (``getrusage``) of this process and of its children.

Example (small)::

    python bench/bench_scale.py --n-train 2000 --n-test 1000 --ratio-n 1500
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import torch

import ntkit
from ntkit import layers as nl
from ntkit.scale import solve
from ntkit.scale._compute import compute_tile

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10",
                    "cifar10_jpeg_q75.npz")


def emit(**kw):
    print(json.dumps(kw), flush=True)


def arch_fc(depth: int):
    hidden = []
    for _ in range(depth):
        hidden += [nl.Dense(512, W_std=2 ** 0.5, b_std=0.1), nl.Relu()]
    return nl.serial(*hidden, nl.Dense(10, W_std=1.0, b_std=0.1))


def load(n_train: int, n_test: int, path: str):
    z = np.load(path)
    g = np.random.default_rng(0)
    tr = g.permutation(50000)[:n_train]
    te = g.permutation(10000)[:n_test]
    xtr = z["x_train"][tr].reshape(n_train, -1).astype(np.float64) / 255
    xte = z["x_test"][te].reshape(n_test, -1).astype(np.float64) / 255
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    return (xtr - mu) / sd, z["y_train"][tr].astype(int), (xte - mu) / sd, \
        z["y_test"][te].astype(int)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def rss_gib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--depth", type=int, default=3, help="hidden ReLU layers (default 3)")
    ap.add_argument("--tile", type=int, default=None)
    ap.add_argument("--diag-reg", type=float, default=1e-4)
    ap.add_argument("--method", default="auto", choices=("auto", "cholesky", "cg"))
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--cg-maxiter", type=int, default=150,
                    help="also solve by CG streaming the store, at most this many passes (0: no)")
    ap.add_argument("--ratio-n", type=int, default=3000,
                    help="examples of the in-process vs 2-worker cluster comparison (0: skip)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where stores go (default: a temp dir, removed)")
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args()
    arch = arch_fc(args.depth)
    root = args.dir or tempfile.mkdtemp(prefix="bench_scale_")
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = load(args.n_train, args.n_test, args.data)
    emit(phase="data", n_train=len(xtr), n_test=len(xte), dim=xtr.shape[1],
         arch=repr(arch), torch_threads=torch.get_num_threads(), load_s=time.perf_counter() - t0)
    try:
        # ---- single-tile cost (the unit of the estimates) -----------------------------
        b = min(1024, len(xtr))
        compute_tile(arch, ("ntk",), xtr[:64], xtr[64:128], False, "float64", True)   # warm-up
        t = time.perf_counter()
        compute_tile(arch, ("ntk",), xtr[:b], xtr[-b:], False, "float64", True)
        tile_s = time.perf_counter() - t
        per_entry = tile_s / (b * b)
        emit(phase="tile_cost", tile=b, seconds=tile_s, ns_per_entry_one_thread=per_entry * 1e9)

        # ---- kernels ---------------------------------------------------------------------
        t = time.perf_counter()
        h = ntkit.compute_kernel(arch, xtr, get="ntk", store=os.path.join(root, "ktr.zarr"),
                                 tile=args.tile, progress=False, overwrite=True)
        ktr_s = time.perf_counter() - t
        st = h.status()
        n = len(xtr)
        emit(phase="kernel_train", seconds=ktr_s, tile=st.tile, tiles=st.total,
             store_gib=du(os.path.join(root, "ktr.zarr")) / 2**30,
             ns_per_entry_wall=ktr_s / (n * (n + 1) / 2) * 1e9, rss_gib=rss_gib())
        t = time.perf_counter()
        kt = ntkit.compute_kernel(arch, xte, xtr, get="ntk", store=os.path.join(root, "kte.zarr"),
                                  tile=st.tile, progress=False, overwrite=True)
        kte_s = time.perf_counter() - t
        emit(phase="kernel_test", seconds=kte_s, tiles=kt.status().total,
             store_gib=du(os.path.join(root, "kte.zarr")) / 2**30,
             ns_per_entry_wall=kte_s / (len(xte) * n) * 1e9, rss_gib=rss_gib())

        # ---- solve + predict ---------------------------------------------------------------
        y = np.eye(10)[ytr] - 0.1
        t = time.perf_counter()
        alpha, info = solve(h, y, method=args.method, diag_reg=args.diag_reg, tol=args.tol,
                            progress=False, return_info=True)
        solve_s = time.perf_counter() - t
        emit(phase="solve", method=info.method, seconds=solve_s, passes=info.iterations,
             residual=None if info.residual is None else float(info.residual.max()),
             converged=info.converged, ridge=info.ridge, rss_gib=rss_gib())
        t = time.perf_counter()
        pred = kt["ntk"].matmul(alpha)
        pass_s = time.perf_counter() - t
        acc = float((pred.argmax(1).numpy() == yte).mean())
        if args.cg_maxiter and info.method != "cg":
            # CG streaming the store (as for a kernel that does not fit), capped at cg-maxiter
            import warnings
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                a_cg, icg = solve(h, y, method="cg", diag_reg=args.diag_reg, tol=args.tol,
                                  maxiter=args.cg_maxiter, progress=False, return_info=True)
            cg_s = time.perf_counter() - t
            p_cg = kt["ntk"].matmul(a_cg)
            emit(phase="solve_cg", seconds=cg_s, passes=icg.iterations,
                 seconds_per_pass=cg_s / max(icg.iterations, 1),
                 residual=float(icg.residual.max()), converged=icg.converged,
                 test_accuracy=float((p_cg.argmax(1).numpy() == yte).mean()),
                 rel_diff_predictions_vs_dense=float((p_cg - pred).norm() / pred.norm()),
                 rss_gib=rss_gib())
        # one streaming pass over the train store (what each CG iteration costs)
        t = time.perf_counter()
        h["ntk"].matmul(np.zeros((n, 10)))
        train_pass_s = time.perf_counter() - t
        emit(phase="predict", test_accuracy=acc, predict_pass_s=pass_s,
             train_pass_s=train_pass_s, rss_gib=rss_gib())

        # ---- executors: baseline in-memory vs tiled in-process vs 2-worker cluster --------
        if args.ratio_n:
            m = min(args.ratio_n, n)
            xs = xtr[:m]
            tile = max(128, (m // 4) // 128 * 128)
            t = time.perf_counter()
            base = arch.kernel(xs, get="ntk")
            base_s = time.perf_counter() - t
            t = time.perf_counter()
            a = ntkit.compute_kernel(arch, xs, get="ntk", store=None, tile=tile, progress=False)
            inproc_s = time.perf_counter() - t
            from distributed import Client
            from ntkit.scale import local_cluster
            with local_cluster(args.workers) as cl, Client(cl) as client:
                client.run(compute_tile, arch, ("ntk",), xs[:2], None, True, "float64",
                           True)                                  # every worker warm (imports)
                t = time.perf_counter()
                d = ntkit.compute_kernel(arch, xs, get="ntk", store=None, tile=tile,
                                         executor=client, progress=False)
                dask_s = time.perf_counter() - t
            same = bool(torch.equal(a.load("ntk"), d.load("ntk")))
            err = float((a.load("ntk") - base).abs().max() / base.abs().max())
            emit(phase="executors", n=m, tile=tile, baseline_arch_kernel_s=base_s,
                 tiled_inprocess_s=inproc_s, dask_2workers_s=dask_s,
                 ratio_tiled_vs_baseline=inproc_s / base_s,
                 ratio_dask_vs_inprocess=dask_s / inproc_s, bitwise_identical=same,
                 max_rel_diff_vs_baseline=err, rss_children_gib=rss_gib(resource.RUSAGE_CHILDREN))

        # ---- estimates -----------------------------------------------------------------------
        bytes_per_s = (n * (n + 1) / 2) * 8 / train_pass_s
        for N in (60000, 1000000):
            entries = N * (N + 1) / 2 + len(xte) * N
            for w in (1, 2, 8, 64, 512):
                emit(phase="estimate", n_train=N, n_test=len(xte), workers=w,
                     kernel_hours=entries * per_entry / w / 3600,
                     store_tib=entries * 8 / 2**40,
                     cg_pass_minutes_one_reader=N * (N + 1) / 2 * 8 / bytes_per_s / 60,
                     dense_cholesky_ram_gib=N * N * 8 / 2**30)
        emit(phase="memory", peak_rss_gib=rss_gib(),
             peak_rss_children_gib=rss_gib(resource.RUSAGE_CHILDREN),
             total_s=time.perf_counter() - t0)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
