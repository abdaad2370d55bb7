"""Benchmark: exact NNGP+NTK of a 3-hidden-layer ReLU MLP on x (4000, 784) against itself.

Prints JSON lines. In the same run it measures
* ``ntkit``: ``arch.kernel(x, dtype=...)`` (tiled, upper triangle, exact diagonal);
* ``baseline``: neural-tangents' algorithm written in plain torch (whole-matrix elementwise maps,
  no symmetry, no tiling) — the same arithmetic NT runs, on this machine, now;
* ``lower_bound``: the unavoidable work measured on this machine: the GEMM of the upper
  triangle (half of ``x @ x.T``) plus one ``atan2`` per upper-triangle entry per layer;
* ``torch_path``: ntkit with ``ntkit.settings(fused=False)`` (the ReLU dual map as chunked
  torch passes instead of the fused numba pass; ``fused`` says which one ``seconds`` used).
Ratios (``speedup_vs_baseline``, ``fraction_of_lower_bound``) are what to compare across
machines; neural-tangents' own time on our 2-core CPU (1.33 s f32 / 2.15 s f64, from
shared/reference) is printed as ``speedup_vs_nt_recorded`` for context.

Usage: ``python bench/bench_fc_kernel.py [--n 4000] [--repeats 3]``
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

import ntkit
from ntkit import layers as nl

NT_RECORDED = {torch.float32: 1.33, torch.float64: 2.15}


def arch(depth=3):
    layers = []
    for _ in range(depth):
        layers += [nl.Dense(512, W_std=2 ** 0.5, b_std=0.1), nl.Relu()]
    return nl.serial(*layers, nl.Dense(1, W_std=2 ** 0.5, b_std=0.1))


def baseline(x, depth=3, W2=2.0, b2=0.01):
    """NT's FC ReLU recursion (ABRelu kernel_fn), whole matrices, in torch."""
    d = x.shape[1]
    nngp = x @ x.T / d
    cov = (x * x).sum(1) / d
    ntk = torch.zeros_like(nngp)
    for _ in range(depth):
        nngp = W2 * nngp + b2
        cov = W2 * cov + b2
        ntk = nngp + W2 * ntk
        prod = cov[:, None] * cov[None, :]
        root = torch.sqrt(torch.clamp(prod - nngp ** 2, min=0))
        ang = torch.atan2(root, nngp)
        dot = 0.5 - ang / (2 * math.pi)
        nngp = root / (2 * math.pi) + dot * nngp
        ntk = ntk * dot
        cov = cov / 2
    nngp = W2 * nngp + b2
    ntk = nngp + W2 * ntk
    return nngp, ntk


def best_of(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(a.n, a.d, generator=g, dtype=torch.float64)
    net = arch()
    for dt in (torch.float32, torch.float64):
        x = x64.to(dt)
        net.kernel(x[:64], dtype=dt)  # warm-up
        # the lambdas below run inside best_of, in this iteration; x=x binds them explicitly
        t_ours, k = best_of(lambda x=x, dt=dt: net.kernel(x, dtype=dt), a.repeats)
        from ntkit.layers import _fused
        fused = _fused.enabled()
        extra = {}
        if fused:
            with ntkit.settings(fused=False):
                t_torch, _ = best_of(lambda x=x, dt=dt: net.kernel(x, dtype=dt), a.repeats)
            extra = dict(torch_path_seconds=round(t_torch, 4),
                         speedup_vs_torch_path=round(t_torch / t_ours, 2))
        t_base, (bn, bk) = best_of(lambda x=x: baseline(x), a.repeats)
        t_gemm, _ = best_of(lambda x=x: x @ x.T, a.repeats)
        sq = torch.rand(a.n * a.n // 2, dtype=dt) + 0.1
        t_atan, _ = best_of(lambda sq=sq: torch.atan2(sq, sq), a.repeats)
        lower = t_gemm / 2 + 3 * t_atan
        flops = a.n * a.n * a.d  # upper triangle of the GEMM, 2 flops per MAC
        ref_n, ref_k = baseline(x64)
        err = max(float(((k.nngp.double() - ref_n).abs() / ref_n.abs().max()).max()),
                  float(((k.ntk.double() - ref_k).abs() / ref_k.abs().max()).max()))
        d64 = torch.diagonal(ref_n)
        diag_err = float(((torch.diagonal(k.nngp).double() - d64).abs() / d64).max())
        base_diag_err = float(((torch.diagonal(bn).double() - d64).abs() / d64).max())
        print(json.dumps(dict(
            bench="fc_relu_3layer_nngp_ntk", n=a.n, d=a.d, dtype=str(dt).split(".")[-1],
            fused=fused, seconds=round(t_ours, 4), **extra, baseline_seconds=round(t_base, 4),
            speedup_vs_baseline=round(t_base / t_ours, 2),
            speedup_vs_nt_recorded=round(NT_RECORDED[dt] / t_ours, 2),
            lower_bound_seconds=round(lower, 4),
            fraction_of_lower_bound=round(lower / t_ours, 3),
            gemm_gflops=round(flops / t_ours / 1e9, 1),
            max_rel_err_vs_f64_baseline=float(f"{err:.2e}"),
            max_rel_diag_err_vs_f64=float(f"{diag_err:.2e}"),
            baseline_diag_rel_err=float(f"{base_diag_err:.2e}"),
        )), flush=True)


if __name__ == "__main__":
    main()
