"""CG solves that scale out (issue 14, item 5): ``ntkit.scale.solve(store, y, method='cg')``
with its products ``K @ V`` in this process (streamed tile by tile from the store) and on a
local Dask cluster of 1 and 2 single-threaded workers (``executor=``: each worker holds a
contiguous range of the kernel's rows in memory, read once from the store).

The kernel: FC ReLU NTK (3 Dense layers, width-independent closed form) of ``--n`` Gaussian
inputs of dimension 784, float64, in an on-disk store under a temporary folder (deleted at the
end: the folder is created here). Targets: 10 columns. Every run does the same fixed number of
CG passes (``--iters``; ``tol`` tiny, ``on_nonconvergence='warn'``), so seconds per pass compare
directly. Also measured: one GEMM ``K[rows] @ V`` on a ``(n/2) x n`` in-memory block, the
per-product floor of a worker (memory-bound: each float64 entry is read once, 2 flops).

Prints a table and appends one JSON line per setup to ``bench/results/cg_scale.jsonl`` with
the load averages.

Usage::

    python bench/bench_cg_scale.py                    # n = 16000, 20 passes
    python bench/bench_cg_scale.py --n 4000 --iters 5 # quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nt_common import machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cg_scale.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--k", type=int, default=10, help="right-hand sides")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import distributed
    import ntkit
    from ntkit import layers as nl
    from ntkit.scale import local_cluster, solve

    n, k = args.n, args.k
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(n, 784)))
    y = torch.from_numpy(g.normal(size=(n, k)))
    arch = nl.serial(nl.Dense(512, W_std=1.4, b_std=0.1), nl.Relu(),
                     nl.Dense(512, W_std=1.4, b_std=0.1), nl.Relu(), nl.Dense(1))
    tmp = tempfile.mkdtemp(prefix="ntkit-cg-bench-")   # ours: removed at the end
    rows = []
    try:
        t = time.perf_counter()
        h = ntkit.compute_kernel(arch, x, get="ntk", store=os.path.join(tmp, "k.zarr"),
                                 progress=False)
        t_kernel = time.perf_counter() - t
        stored = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        print(f"n={n}: kernel store {stored / 1e9:.2f} GB (upper tiles, compressed) in "
              f"{t_kernel:.1f} s, tile {h.tile}")
        kw = dict(method="cg", diag_reg=1e-4, tol=1e-14, maxiter=args.iters, rank=100,
                  preconditioner="pivoted_cholesky", on_nonconvergence="warn", progress=False,
                  return_info=True)
        import warnings

        def run(label, executor=None, workers=0):
            load0 = os.getloadavg()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                a, info = solve(h, y, executor=executor, **kw)
            total = time.perf_counter() - t0
            rec = dict(bench="cg_scale", setup=label, workers=workers, n=n, k=k,
                       passes=info.iterations, total_s=round(total, 3),
                       residual=float(info.residual.max()), load_before=list(load0),
                       load_after=list(os.getloadavg()))
            rows.append((rec, a))
            print(f"{label:28s} {info.iterations:4d} passes  {total:8.2f} s  "
                  f"residual {float(info.residual.max()):.2e}")
            return rec

        from ntkit.scale._dist import DaskRowsOp

        def per_product(matmul, reps=5):
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                matmul(y)
                ts.append(time.perf_counter() - t0)
            return round(float(np.median(ts)), 4)

        rec = run("in-process (streamed)")
        rec["product_s"] = per_product(h["ntk"].matmul, 3)
        for w in [int(v) for v in args.workers.split(",")]:
            t0 = time.perf_counter()
            with local_cluster(w) as cluster, distributed.Client(cluster) as client:
                t_start = time.perf_counter() - t0
                rec = run(f"dask, {w} worker(s)", client, w)
                rec["cluster_start_s"] = round(t_start, 2)
                t0 = time.perf_counter()
                op = DaskRowsOp(h["ntk"], client)
                op.matmul(y)
                rec["rows_load_s"] = round(time.perf_counter() - t0, 2)
                rec["product_s"] = per_product(op.matmul)
                op.close()
        for rec, _ in rows:
            print(f"{rec['setup']:28s} K @ V ({n} x {n} x {k}): {rec['product_s'] * 1e3:8.1f} ms"
                  + (f"  (rows read once: {rec['rows_load_s']:.1f} s)" if "rows_load_s" in rec
                     else ""))
        # per-product floor: one worker's GEMM on half the rows, in memory
        K = h["ntk"][0:n // 2, :].numpy()
        V = np.ascontiguousarray(y.numpy())
        torch.set_num_threads(1)
        Kt, Vt = torch.from_numpy(K), torch.from_numpy(V)
        Kt @ Vt
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            Kt @ Vt
            ts.append(time.perf_counter() - t0)
        gemm = float(np.median(ts))
        gbs = K.nbytes / gemm / 1e9
        print(f"one worker's GEMM on {n // 2} x {n} rows (1 thread): {gemm * 1e3:.1f} ms = "
              f"{gbs:.1f} GB/s of kernel read")
        base = rows[0][1]
        for rec, a in rows:
            rec["max_rel_diff_vs_in_process"] = float(
                (a - base).abs().max() / base.abs().max())
        with open(args.out, "a") as f:
            for rec, _ in rows:
                rec.update(gemm_half_rows_s=round(gemm, 4), gemm_gbs=round(gbs, 2),
                           kernel_s=round(t_kernel, 2), store_bytes=stored,
                           **machine_record())
                f.write(json.dumps(rec) + "\n")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
