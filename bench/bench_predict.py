"""Benchmark: infinite-ensemble predictions (mean + covariance) at 10 times, 2000 train / 500 test
/ 10 outputs, float64 — ``ntkit.predict.gradient_descent_mse_ensemble`` against a baseline.

Prints JSON lines. In the same run, on the same kernels (a 3-hidden-layer ReLU MLP's exact
NNGP/NTK, computed once and not timed in the comparison), it measures:

* ``ntkit``: one ensemble, cold (factorization cache cleared, so the eigendecomposition is timed);
* ``baseline``: neural-tangents' algorithm transcribed to numpy (``eigh`` of the regularized
  kernel on each call, then their einsum contractions with ``optimize='optimal'``) — what NT runs,
  on this machine, now. Neural-tangents itself (~4-8 s on our CPU, shared/reference) cannot be
  imported with current JAX.

Scenarios: ``one_call`` (``t`` = 10 times in one call, ``get='ntk'``), ``one_call_both``
(``get=('nngp','ntk')``), ``ten_calls`` (one call per time: the baseline redoes ``eigh`` each
call, ntkit's cache does it once). ``max_rel_diff_*`` checks both give the same numbers.

Cost model (n train, m test, T times): one ``eigh(n)`` (measured alone, ``eigh_s``) is
unavoidable; the output-bound GEMM work is ``2 m n^2`` (test kernel into the eigenbasis) plus
``2 T m^2 n`` (T covariances from rank-n factors). ``lower_bound_s = eigh_s + that / GEMM rate``
(GEMM rate measured now); ``fraction_of_lower_bound = lower_bound_s / ntkit_s``.

Usage: ``python bench/bench_predict.py [--n 2000] [--m 500] [--k 10] [--times 10] [--repeats 2]``
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ntkit import _linalg
from ntkit import layers as nl
from ntkit import predict as P


def nt_baseline(k, y, x_test_kernels, ts, get, lr=1.0, diag_reg=0.0):
    """neural-tangents 0.6.5 gradient_descent_mse_ensemble (finite t, test set, compute_cov),
    transcribed to numpy: eigh per call, einsum(optimize='optimal')."""
    nngp_dd, ntk_dd = k["nngp"], k["ntk"]
    k_td, nngp_tt = x_test_kernels
    out = {}
    t = np.asarray(ts, dtype=np.float64).reshape(-1, 1) * lr
    size = y.size
    for g in get:
        kdd = {"nngp": nngp_dd, "ntk": ntk_dd}[g]
        A = kdd + diag_reg * np.trace(kdd) / kdd.shape[0] * np.eye(kdd.shape[0])
        evals, evecs = np.linalg.eigh(A)
        evals = evals[None]

        def expm1(ev, tt):
            return np.expm1(-np.maximum(ev, 0.0) * tt / size)

        def inv_expm1(ev, tt):
            return expm1(ev, tt) / np.abs(ev)

        ktd_g = k_td[g]
        neg = -inv_expm1(evals, t)
        mean = np.einsum("lj,ji,ti,ki,k...->tl...", ktd_g, evecs, neg, evecs, y,
                         optimize="optimal")
        if g == "nngp":
            cov = nngp_tt[None] - np.einsum("mj,ji,ti,ki,lk->tml", ktd_g, evecs,
                                            -inv_expm1(evals, 2 * t), evecs, ktd_g,
                                            optimize="optimal")
        else:
            term_1 = np.einsum("mi,ti,ki,lk->tml", evecs, neg, evecs, ktd_g, optimize="optimal")
            term_2 = np.einsum("mj,ji,ti,ki,lk->tml", ktd_g, evecs, neg, evecs, k_td["nngp"],
                               optimize="optimal")
            term_2 += np.moveaxis(term_2, 1, 2)
            cov = np.einsum("tji,jk,tkl->til", term_1, nngp_dd, term_1, optimize="optimal")
            cov += -term_2 + nngp_tt[None]
        out[g] = (mean, cov)
    return out


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--m", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--times", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n, m, k, T = args.n, args.m, args.k, args.times

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + m, args.d, generator=g, dtype=torch.float64)
    y = torch.randn(n, k, generator=g, dtype=torch.float64)
    arch = nl.serial(*[l for _ in range(3) for l in (nl.Dense(512, W_std=2 ** 0.5, b_std=0.1),
                                                     nl.Relu())],
                     nl.Dense(1, W_std=2 ** 0.5, b_std=0.1))
    t_kernel, kall = timed(lambda: arch.kernel(x, get=("nngp", "ntk")))
    K = {gg: getattr(kall, gg) for gg in ("nngp", "ntk")}
    x_train, x_test = x[:n], x[n:]

    def kernel_fn(x1, x2, get):
        """Lookup of the precomputed joint kernels (same arrays for ntkit and the baseline)."""
        keys = (get,) if isinstance(get, str) else tuple(get)
        if x1 is x_train and x2 is None:
            sl = (slice(0, n), slice(0, n))
        elif x1 is x_test and x2 is x_train:
            sl = (slice(n, n + m), slice(0, n))
        elif x1 is x_test and x2 is None:
            sl = (slice(n, n + m), slice(n, n + m))
        else:
            raise ValueError("unexpected kernel request")
        res = {gg: K[gg][sl] for gg in keys}
        return res[keys[0]] if isinstance(get, str) else res

    ts = torch.logspace(-1, 4, T, dtype=torch.float64)
    npk = {gg: K[gg][:n, :n].numpy().copy() for gg in K}
    np_td = ({gg: K[gg][n:, :n].numpy().copy() for gg in K}, K["nngp"][n:, n:].numpy().copy())
    y_np = y.numpy()

    # machine rates, measured now
    a = torch.randn(n, n, dtype=torch.float64)
    spd = a @ a.T / n + torch.eye(n, dtype=torch.float64)
    gemm_s = min(timed(lambda: a @ a)[0] for _ in range(3))
    gemm_rate = 2 * n ** 3 / gemm_s
    eigh_s = min(timed(lambda: torch.linalg.eigh(spd))[0] for _ in range(2))
    print(json.dumps({"bench": "predict_ensemble", "what": "setup", "n_train": n, "n_test": m,
                      "outputs": k, "times": T, "kernel_s": round(t_kernel, 3),
                      "gemm_gflops": round(gemm_rate / 1e9, 1), "eigh_s": round(eigh_s, 3),
                      "threads": torch.get_num_threads()}), flush=True)

    def ours_cold(get):
        _linalg.clear_cache()
        ens = P.gradient_descent_mse_ensemble(kernel_fn, x_train, y)
        return ens(t=ts, x_test=x_test, get=get, compute_cov=True)

    def ours_ten_calls():
        _linalg.clear_cache()
        ens = P.gradient_descent_mse_ensemble(kernel_fn, x_train, y)
        return [ens(t=float(t), x_test=x_test, get="ntk", compute_cov=True) for t in ts]

    def base_ten_calls():
        return [nt_baseline(npk, y_np, np_td, [float(t)], ("ntk",))["ntk"] for t in ts]

    for scen in ("one_call", "one_call_both", "ten_calls"):
        get = ("ntk",) if scen != "one_call_both" else ("nngp", "ntk")
        t_ours, t_base = [], []
        for _ in range(args.repeats):
            if scen == "ten_calls":
                s1, ro = timed(ours_ten_calls)
                s2, rb = timed(base_ten_calls)
                ours = {"ntk": (torch.stack([r.mean for r in ro]),
                                torch.stack([r.covariance for r in ro]))}
                base = {"ntk": (np.concatenate([r[0] for r in rb]),
                                np.concatenate([r[1] for r in rb]))}
            else:
                # timed() calls the lambda at once; get=get binds this scenario's keys
                s1, ro = timed(lambda get=get: ours_cold(get))
                s2, base = timed(lambda get=get: nt_baseline(npk, y_np, np_td, ts.numpy(),
                                                             get))
                ours = {gg: (getattr(ro, gg).mean, getattr(ro, gg).covariance) for gg in get}
            t_ours.append(s1)
            t_base.append(s2)
        dm = max(float(np.linalg.norm(ours[gg][0].numpy() - base[gg][0]) /
                       np.linalg.norm(base[gg][0])) for gg in get)
        dc = max(float(np.linalg.norm(ours[gg][1].numpy() - base[gg][1]) /
                       np.linalg.norm(base[gg][1])) for gg in get)
        n_eigh = len(get)
        bound_flops = n_eigh * (2 * m * n * n + 2 * T * m * m * n)
        lower = n_eigh * eigh_s + bound_flops / gemm_rate
        ours_s, base_s = min(t_ours), min(t_base)
        print(json.dumps({
            "bench": "predict_ensemble", "scenario": scen, "get": list(get),
            "ntkit_s": round(ours_s, 3), "baseline_s": round(base_s, 3),
            "speedup_vs_baseline": round(base_s / ours_s, 2),
            "lower_bound_s": round(lower, 3),
            "fraction_of_lower_bound": round(lower / ours_s, 2),
            "max_rel_diff_mean": float(f"{dm:.2e}"), "max_rel_diff_cov": float(f"{dc:.2e}"),
        }), flush=True)


if __name__ == "__main__":
    main()
