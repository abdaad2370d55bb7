"""Cost of the lazy-training diagnostics against their own lower bound, measured in one run.

The Hessian norm needs ``H`` Hessian-vector products (HVPs); one HVP by reverse-over-reverse
autograd costs about 2x a forward+backward pass (Pearlmutter), so the lower bound of
``hessian_norm`` is ``H * t_hvp``: we report ``t_hessian / (H * t_hvp)`` (Lanczos bookkeeping
overhead, 1.0 = none) and ``t_hvp / t_fwd_bwd`` (vs the theoretical ~2), and the Jacobian norm
(full empirical NTK + eigvalsh) relative to ``N`` backward passes (its Jacobian lower bound).
One JSON object per line. Usage: ``python bench/bench_diagnostics.py [--threads 1]``.
"""
import argparse
import json
import time

import torch

from ntkit import diagnostics as dg
from ntkit import layers as nl


def best_of(fn, reps=3):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def measure(arch, width, x, y, g, args):
    """One JSON record: the timings at one width (a function, so the closures below bind
    this width's network, gradients and counters)."""
    net = arch.module(args.dim, width=width, seed=0)
    params = list(net.parameters())
    P = sum(p.numel() for p in params)

    def fwd_bwd():
        net.zero_grad(set_to_none=True)
        (0.5 * ((net(x) - y) ** 2).mean()).backward()

    out = net(x).reshape(-1)
    z = torch.randn(out.numel(), generator=g, dtype=torch.float64)
    gr = torch.autograd.grad(net(x).reshape(-1), params, grad_outputs=z, create_graph=True)
    v = [torch.randn_like(p) for p in params]

    def hvp():
        torch.autograd.grad(gr, params, grad_outputs=v, retain_graph=True)

    count = {"hvp": 0}
    from ntkit.diagnostics import _norms   # where hessian_norm looks the function up
    orig = _norms._lanczos_top

    def counting(matvec, *a, **k):
        def mv(u):
            count["hvp"] += 1
            return matvec(u)
        return orig(mv, *a, **k)

    _norms._lanczos_top = counting
    try:
        t_hess = best_of(lambda: dg.hessian_norm(net, x), reps=2)
    finally:
        _norms._lanczos_top = orig
    if count["hvp"] == 0:
        raise RuntimeError("the Hessian-vector product counter saw no calls: "
                           "hessian_norm no longer uses ntkit.diagnostics._norms._lanczos_top")
    n_hvp = count["hvp"] // 2
    t_fb = best_of(fwd_bwd, 5)
    t_hvp = best_of(hvp, 5)
    t_jac = best_of(lambda: dg.jacobian_norm(net, x), reps=2)
    return {
        "width": width, "params": P, "n": args.n, "threads": args.threads,
        "t_fwd_bwd_s": t_fb, "t_hvp_s": t_hvp, "hvp_over_fwd_bwd": t_hvp / t_fb,
        "n_hvp": n_hvp, "t_hessian_norm_s": t_hess,
        "hessian_over_lower_bound": t_hess / (n_hvp * t_hvp),
        "t_jacobian_norm_s": t_jac,
        "jacobian_over_N_backward": t_jac / (args.n * t_fb)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--dim", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    arch = nl.serial(nl.Dense(64), nl.Elementwise(torch.tanh), nl.Dense(1))
    for width in (256, 1024, 4096, 16384):
        print(json.dumps(measure(arch, width, x, y, g, args)), flush=True)


if __name__ == "__main__":
    main()
