"""Benchmark of ntkit.empirical_ntk against torch.func Jacobian contraction (same run).

Prints one JSON object per line:
* ``case=gemm``: measured GEMM peak (the bound every kernel below is compared with);
* ``case=mlp665k``: 784-512-512-1 ReLU MLP (665,089 params), x (500, 784), float32 and float64:
  ntkit 'auto' (-> structured) vs the torch.func tutorial's Jacobian contraction
  (``vmap(jacrev)`` + einsum), and vs neural-tangents' structured derivatives as measured on
  this CPU (reference README: 0.056 s f32 / 0.097 s f64; not re-run here, JAX is not installed);
* ``case=cnn``: 3 x [Conv 3x3 SAME, 64 channels, ReLU] + Flatten + Linear(10) on 32x32x3 inputs,
  'trace' and 'full', ntkit 'auto' vs the same torch.func baseline.
Every ntkit row carries the cost model's flop count, the achieved GFLOP/s and its fraction of
the measured GEMM peak, and the max relative difference to the baseline kernel.

Usage: ``python bench/bench_empirical.py [--quick]`` (``--quick``: smaller n, one repeat).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ntkit.empirical import empirical_ntk
from ntkit.empirical._ntk import _costs, _prepare
from ntkit.empirical._structured import make_plan

NT_REPORTED = {torch.float32: 0.056, torch.float64: 0.097}  # s, reference README, same CPU


def best_time(fn, repeats):
    out = fn()  # warm-up (and the result)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def gemm_peak(dtype, n=1536, repeats=3):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t, _ = best_time(lambda: a @ b, repeats)
    return 2.0 * n ** 3 / t / 1e9


def torch_func_jacobian_contraction(model, x1, x2, output):
    """The PyTorch NTK tutorial's method: per-example Jacobians by vmap(jacrev), then einsum."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0).reshape(-1)

    j1 = [j.flatten(2) for j in vmap(jacrev(f_single), (None, 0))(params, x1).values()]
    j2 = [j.flatten(2) for j in vmap(jacrev(f_single), (None, 0))(params, x2).values()]
    if output == "full":
        return sum(torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(j1, j2))
    return sum(torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(j1, j2)) / j1[0].shape[1]


def model_flops(model, x, output):
    setup, xx, _ = _prepare(model, x, None, None, None)
    plan = make_plan(setup, xx)
    n = x.shape[0]
    costs = _costs(setup, plan, n, n, True, output)
    return plan.cost(n, n, True, setup.k, output), costs


def run_case(case, model, x, output, dtype, repeats, baseline_n, peak):
    model = model.to(dtype)
    x = x.to(dtype)
    n = x.shape[0]
    t_ntk, k_ntk = best_time(lambda: empirical_ntk(model, x, output=output), repeats)
    flops, costs = model_flops(model, x, output)
    chosen = min(costs, key=costs.get)
    # baseline on the first `baseline_n` rows; with baseline_n < n (--quick) its time is scaled
    # by n / baseline_n: a lower bound (its Jacobians cost ~n, its contraction ~n^2), so the
    # reported speedup is conservative
    xb = x[:baseline_n]
    t_base, k_base = best_time(lambda: torch_func_jacobian_contraction(model, xb, xb, output),
                               max(1, repeats // 2))
    scale = n / baseline_n
    k_sub = k_ntk[:baseline_n, :baseline_n]
    rel = ((k_sub - k_base).abs().max() / k_base.abs().max()).item()
    row = {
        "bench": "empirical_ntk", "case": case, "dtype": str(dtype).replace("torch.", ""),
        "n": n, "output": output, "params": sum(p.numel() for p in model.parameters()),
        "ntkit_impl": "auto->" + chosen, "ntkit_s": round(t_ntk, 5),
        "baseline": "torch.func vmap(jacrev)+einsum", "baseline_n": baseline_n,
        "baseline_s": round(t_base * scale, 4),
        "baseline_scaling": "linear lower bound" if baseline_n < n else "none (measured)",
        "speedup_vs_baseline": round(t_base * scale / t_ntk, 1),
        "max_rel_diff_vs_baseline": float(f"{rel:.2e}"),
        "model_gflop": round(flops / 1e9, 3),
        "achieved_gflops": round(flops / t_ntk / 1e9, 1),
        "gemm_peak_gflops": round(peak, 1),
        "fraction_of_gemm_bound": round(flops / t_ntk / 1e9 / peak, 3),
    }
    if case == "mlp665k":
        nt = NT_REPORTED[dtype]
        row["nt_structured_reported_s"] = nt
        row["speedup_vs_nt_reported"] = round(nt / t_ntk, 2)
    print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = ap.parse_args()
    repeats = 1 if args.quick else 5
    torch.manual_seed(0)
    peaks = {}
    for dtype in (torch.float32, torch.float64):
        peaks[dtype] = gemm_peak(dtype, 1024 if args.quick else 1536)
        print(json.dumps({"bench": "empirical_ntk", "case": "gemm",
                          "dtype": str(dtype).replace("torch.", ""),
                          "threads": torch.get_num_threads(),
                          "gemm_peak_gflops": round(peaks[dtype], 1)}), flush=True)

    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 1))
    n = 500
    x = torch.randn(n, 784)
    base_n = 100 if args.quick else 500
    for dtype in (torch.float32, torch.float64):
        run_case("mlp665k", mlp, x, "trace", dtype, repeats, base_n, peaks[dtype])

    cnn = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64 * 32 * 32, 10))
    n_cnn = 8 if args.quick else 32
    xc = torch.randn(n_cnn, 3, 32, 32)
    for output in ("trace", "full"):
        run_case("cnn", cnn, xc, output, torch.float32, max(1, repeats // 2), n_cnn,
                 peaks[torch.float32])


if __name__ == "__main__":
    main()
