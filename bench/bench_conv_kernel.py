"""Benchmark: convolutional NTK (CNTK) kernels, ms per kernel entry, JSON lines.

Cases (issue 3), NNGP + NTK of ``x`` against itself, float32 and float64:

* (a) ``flatten``: 4 x [Conv(3x3, SAME) + Relu] + Flatten + Dense on (200, 3, 16, 16)
  (per-pixel diagonal layout, ``n^2 * P`` numbers);
* (b) ``gap``: the same with GlobalAvgPool on (40, 3, 16, 16) (pixel-pair layout, ``n^2 P^2``);
* (c) ``big``: a 1000-image CNN-GAP kernel on 32x32 under ``memory_budget=4 GB`` with a progress
  bar, run for its first tiles only (real plan), total time extrapolated, peak RSS of that
  subprocess reported.

Every line compares, in the same run:

* ``baseline``: neural-tangents' algorithm written in plain torch: whole kernel at once (no
  tiles, no symmetry), the conv step run as a one-channel ``conv2d`` of the covariance with a
  diagonal (pixel-pair) or all-ones (per-pixel) 3x3 filter, the ReLU dual as NT writes it; timed
  on a subset of images (``baseline_n``) and reported per entry;
* ``lower_bound``: the arithmetic this kernel cannot avoid: per pixel pair (per pixel for
  Flatten) per layer, 12 adds (the separable 3x3 stencil, 6 adds, on NNGP and NTK) + 1 atan2 +
  1 sqrt + 5 mul, on the ``n (n + 1) / 2`` entries of the upper triangle, priced at throughputs
  measured now as separate torch passes: on 1M-element contiguous arrays
  (``fraction_of_lower_bound``; streaming from L3/DRAM, so an in-cache implementation can beat
  it: fractions > 1) and on 32K-element L2-resident arrays
  (``fraction_of_lower_bound_in_cache``, the stricter bound);
* ``nt_recorded``: neural-tangents' own ms/entry on our 2-core CPU (shared/reference);
* ``torch_path``: ntkit's own eager-torch implementation (``settings(fused=False)``: separable
  shifted-slice stencils and ~10-pass dual maps in cache-sized chunks), which the fused numba
  kernels replace when numba is installed (``fused`` says which one the main timing used).

Usage::

    python bench/bench_conv_kernel.py            # a, b (f32, f64) and c
    python bench/bench_conv_kernel.py --quick    # small sizes, no c
    python bench/bench_conv_kernel.py --sweep    # tile-size sweep used to set the caps
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import ntkit
from ntkit import layers as nl

NT_MS_PER_ENTRY = {("flatten", torch.float32): 0.018, ("flatten", torch.float64): 0.025,
                   ("gap", torch.float32): 78.0, ("gap", torch.float64): 11.2}
W_STD, B_STD, DEPTH = 2 ** 0.5, 0.05, 4


def arch(top: str, depth: int = DEPTH):
    layers = []
    for _ in range(depth):
        layers += [nl.Conv(64, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD), nl.Relu()]
    layers.append(nl.GlobalAvgPool() if top == "gap" else nl.Flatten())
    return nl.serial(*layers, nl.Dense(1, W_std=W_STD, b_std=B_STD))


def best_of(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# ---- baseline: NT's algorithm in torch ------------------------------------------------------
def baseline(x: torch.Tensor, top: str, depth: int = DEPTH):
    """Whole-matrix CNTK as neural-tangents computes it (conv step = one-channel conv2d)."""
    n, c, h, w = x.shape
    w2, b2 = W_STD ** 2, B_STD ** 2
    full = top == "gap"
    a = x.flatten(2)
    if full:
        nngp = torch.einsum("icp,jcq->ijpq", a, a).reshape(n, n, h, w, h, w) / c
    else:
        nngp = torch.einsum("icp,jcp->ijp", a, a).reshape(n, n, h, w) / c
    ntk = torch.zeros_like(nngp)
    eye = torch.eye(3, dtype=x.dtype).reshape(1, 1, 3, 3)
    ones = torch.ones(1, 1, 3, 3, dtype=x.dtype)

    def conv(t):
        if not full:
            return F.conv2d(t.reshape(-1, 1, h, w), ones, padding=1).reshape(t.shape) / 9
        # (i, j, h1, w1, h2, w2): diagonal 3x3 filter over (h1, h2), then over (w1, w2)
        t = t.permute(0, 1, 3, 5, 2, 4).reshape(-1, 1, h, h)
        t = F.conv2d(t, eye, padding=1).reshape(n, n, w, w, h, h)
        t = t.permute(0, 1, 4, 5, 2, 3).reshape(-1, 1, w, w)
        t = F.conv2d(t, eye, padding=1).reshape(n, n, h, h, w, w)
        return t.permute(0, 1, 2, 4, 3, 5).contiguous() / 9

    def variances(t):
        d = t.diagonal(dim1=0, dim2=1).movedim(-1, 0)  # (n, *S[, *S])
        if full:
            d = d.reshape(n, h * w, h * w).diagonal(dim1=1, dim2=2).reshape(n, h, w)
            return d[:, None, :, :, None, None], d[None, :, None, None, :, :]
        return d[:, None], d[None, :]

    for _ in range(depth):
        nngp = w2 * conv(nngp) + b2
        ntk = nngp + w2 * conv(ntk)
        v1, v2 = variances(nngp)
        root = torch.sqrt(torch.clamp(v1 * v2 - nngp ** 2, min=0))
        ang = torch.atan2(root, nngp)
        dot = 0.5 - ang / (2 * math.pi)
        nngp = root / (2 * math.pi) + dot * nngp
        ntk = ntk * dot
    dims = tuple(range(2, nngp.ndim))
    nngp = nngp.mean(dims)
    ntk = ntk.mean(dims)
    return w2 * nngp + b2, w2 * nngp + b2 + w2 * ntk


# ---- lower bound ----------------------------------------------------------------------------
def op_ns(dtype, repeats, n=1 << 20):
    """ns per element of add, mul, sqrt, atan2 on ``n``-element contiguous arrays, now."""
    a = torch.rand(n, dtype=dtype) + 0.5
    b = torch.rand(n, dtype=dtype) + 0.5
    o = torch.empty_like(a)
    res = {}
    for name, fn in (("add", lambda: torch.add(a, b, out=o)),
                     ("mul", lambda: torch.mul(a, b, out=o)),
                     ("sqrt", lambda: torch.sqrt(a, out=o)),
                     ("atan2", lambda: torch.atan2(a, b, out=o))):
        res[name] = best_of(fn, repeats)[0] / n * 1e9
    return res


def lower_bound_ms_per_entry(top, n, pix, ops, depth=DEPTH):
    per_pair = 12 * ops["add"] + ops["atan2"] + ops["sqrt"] + 5 * ops["mul"]
    units = pix * pix if top == "gap" else pix
    unique = n * (n + 1) / 2 / (n * n)
    return unique * units * depth * per_pair * 1e-6


# ---- cases ----------------------------------------------------------------------------------
def run_case(top, n, hw, dtype, repeats, base_n, ops, tile=None, ops_l2=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, hw, hw, generator=g, dtype=torch.float64).to(dtype)
    net = arch(top)
    net.kernel(x[:3], dtype=dtype)  # warm-up
    t, k = best_of(lambda: net.kernel(x, dtype=dtype, tile=tile), repeats)
    ms = t / (n * n) * 1e3
    from ntkit.layers import _fused
    fused = _fused.enabled()
    ms_torch = None
    if fused:
        with ntkit.settings(fused=False):
            ms_torch = best_of(lambda: net.kernel(x, dtype=dtype, tile=tile),
                               max(1, repeats - 1))[0] / (n * n) * 1e3
    xb = x[:base_n]
    tb, (bn, bk) = best_of(lambda: baseline(xb, top), max(1, repeats - 1))
    ms_base = tb / (base_n * base_n) * 1e3
    # accuracy: ntkit (this dtype) vs the float64 baseline on the subset
    rn, rk = baseline(xb.double(), top)
    err = max(float(((k.nngp[:base_n, :base_n].double() - rn).abs() / rn.abs()).max()),
              float(((k.ntk[:base_n, :base_n].double() - rk).abs() / rk.abs()).max()))
    lb = lower_bound_ms_per_entry(top, n, hw * hw, ops)
    nt = NT_MS_PER_ENTRY[(top, dtype)]
    return dict(
        bench=f"cntk_{top}", n=n, image=[3, hw, hw], dtype=str(dtype).split(".")[-1],
        tile=tile, fused=fused, seconds=round(t, 4), ms_per_entry=float(f"{ms:.4g}"),
        **({} if ms_torch is None else dict(
            torch_path_ms_per_entry=float(f"{ms_torch:.4g}"),
            speedup_vs_torch_path=round(ms_torch / ms, 2))),
        baseline_n=base_n, baseline_ms_per_entry=float(f"{ms_base:.4g}"),
        speedup_vs_baseline=round(ms_base / ms, 2),
        nt_recorded_ms_per_entry=nt, speedup_vs_nt_recorded=round(nt / ms, 2),
        lower_bound_ms_per_entry=float(f"{lb:.4g}"), fraction_of_lower_bound=round(lb / ms, 3),
        **({} if ops_l2 is None else dict(
            lower_bound_in_cache_ms_per_entry=float(
                f"{lower_bound_ms_per_entry(top, n, hw * hw, ops_l2):.4g}"),
            fraction_of_lower_bound_in_cache=round(
                lower_bound_ms_per_entry(top, n, hw * hw, ops_l2) / ms, 3))),
        max_rel_err_vs_f64_baseline=float(f"{err:.2e}"))


def run_big(n, hw, dtype, budget, tiles, progress=True):
    """Case (c) in this process: the real plan, stopped after ``tiles`` tiles."""
    import ntkit
    from ntkit.layers import _tiling
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, hw, hw, generator=g, dtype=torch.float64).to(dtype)
    net = arch("gap")
    t0 = time.perf_counter()
    try:
        with ntkit.settings(tile_limit=tiles):
            net.kernel(x, dtype=dtype, memory_budget=budget, progress=progress)
        done = total = None
        secs = time.perf_counter() - t0
    except _tiling.TileLimitReached as e:
        done, total, secs, b = e.done, e.total, e.seconds, e.tile
        times, pairs = e.times, e.pairs
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # extrapolate: diagonal tiles (i == j) at the measured diagonal-tile time, the others at
    # the mean measured off-diagonal time (tiles run row by row: (0,0), (0,1), (0,2), ...)
    run = pairs[:len(times)]
    t_diag = [t for t, (i, j) in zip(times, run) if i == j]
    t_off = [t for t, (i, j) in zip(times, run) if i != j] or t_diag
    n_diag = sum(1 for i, j in pairs if i == j)
    est = (sum(t_diag) / len(t_diag)) * n_diag + (sum(t_off) / len(t_off)) * (total - n_diag)
    return dict(bench="cntk_gap_big", n=n, image=[3, hw, hw], dtype=str(dtype).split(".")[-1],
                memory_budget_gb=budget / 2 ** 30, tile=b, tiles_run=done, tiles_total=total,
                seconds_run=round(secs, 2), extrapolated_total_hours=round(est / 3600, 2),
                extrapolated_ms_per_entry=float(f"{est / (n * n) * 1e3:.4g}"),
                peak_rss_gb=round(rss / 2 ** 30, 3), under_budget=bool(rss < budget))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat, skip (c)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="tile-size sweep for (a) and (b)")
    ap.add_argument("--case", default="a,b,c")
    ap.add_argument("--big-tiles", type=int, default=3, help="tiles of (c) to run (>= 2)")
    ap.add_argument("--big-inproc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--big-dtype", default="float64")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 is steadier on a loaded machine")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(dict(bench="setup", threads=torch.get_num_threads(),
                          load_avg=os.getloadavg(), cpus=os.cpu_count())), flush=True)
    if a.big_inproc:
        dt = getattr(torch, a.big_dtype)
        print(json.dumps(run_big(1000, 32, dt, 4 << 30, a.big_tiles)), flush=True)
        return
    cases = a.case.split(",")
    reps = 1 if a.quick else a.repeats
    sizes = {"flatten": (40 if a.quick else 200, 16), "gap": (8 if a.quick else 40, 16)}
    base_n = {"flatten": 40 if a.quick else 100, "gap": 4 if a.quick else 8}
    for dt in (torch.float32, torch.float64):
        ops = op_ns(dt, reps + 2)
        ops_l2 = op_ns(dt, 5 * reps + 10, 1 << 15)  # 256/128 KiB arrays: L2-resident
        for size, o in (("1M_elements", ops), ("32K_elements", ops_l2)):
            print(json.dumps(dict(bench="op_throughput_ns_per_element", size=size,
                                  dtype=str(dt).split(".")[-1],
                                  **{k: round(v, 3) for k, v in o.items()})), flush=True)
        for case, top in (("a", "flatten"), ("b", "gap")):
            if case not in cases:
                continue
            n, hw = sizes[top]
            if a.sweep:
                tiles = (4, 8, 16, 24, 32, 48, 64) if top == "flatten" else (1, 2, 3, 4, 6, 8)
                for t in tiles:
                    print(json.dumps(run_case(top, n, hw, dt, reps, min(base_n[top], 4), ops, t,
                                              ops_l2)), flush=True)
            print(json.dumps(run_case(top, n, hw, dt, reps, base_n[top], ops, None, ops_l2)),
                  flush=True)
    if "c" in cases and not a.quick and not a.sweep:
        for dt in ("float32", "float64"):
            cmd = [sys.executable, os.path.abspath(__file__), "--big-inproc",
                   "--threads", str(torch.get_num_threads()),
                   "--big-tiles", str(a.big_tiles), "--big-dtype", dt]
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if lines else json.dumps(dict(bench="cntk_gap_big",
                                                          error=r.stderr[-2000:])),
                  flush=True)
            sys.stderr.write(r.stderr[-600:])


if __name__ == "__main__":
    main()
