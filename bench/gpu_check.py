"""GPU check: ntkit on CUDA tensors against the CPU, and the neural-tangents README headline.

Part 1, correctness (float64, relative error ``max |gpu - cpu| / max |cpu| <= 1e-10``), each
family computed from ``x.to(device)`` and from the CPU tensors:

* kernels, NNGP and NTK: FC (Dense + Relu/Erf + LayerNorm), CNN + AvgPool + Flatten, CNN +
  GlobalAvgPool, global self-attention, graph ``Aggregate``, tiled and in one tile;
* the empirical NTK of the finite network (``implementation`` jacobian / ntk_vp / structured);
* predictions: ``ntkit.predict.gradient_descent_mse_ensemble`` mean and covariance at finite
  and infinite time;
* random features (``ntkit.features.features``, methods ``rf`` and ``jacobian``);
* the store: ``ntkit.compute_kernel(arch, x_gpu, store=...)`` round trip, and
  ``ntkit.scale.solve`` (CG) on the GPU kernel.

Part 2, timing (float32, NNGP + NTK between two batches of ``n`` images, ms per kernel entry):
neural-tangents' README headline case, a 21-layer CNN (``[Conv 3x3 SAME + Relu] x 21``, the
width does not enter the kernel) on 3x32x32 inputs, read out by GlobalAvgPool (pixel-pair
layout) or Flatten (per-pixel layout). NT's README, on a V100: 2.70 ms/entry (GAP) and 0.0047
ms/entry (Flatten).

Without a CUDA device it prints ``no CUDA device`` and exits 0. ``--device cpu`` runs the same
checks CPU against CPU at tiny sizes (the "device" side then uses the pure-torch path a GPU
takes, ``ntkit.settings(fused=False)``, against the default CPU path), so the script itself can be
exercised anywhere.

Results are appended as JSON lines to ``OUT`` (which must end in ``.jsonl``); the exit status
is 1 when a check fails.

Usage::

    python bench/gpu_check.py bench/results/gpu_check.jsonl              # on a CUDA machine
    python bench/gpu_check.py /tmp/gpu_check.jsonl --device cpu          # smoke run anywhere
    python bench/gpu_check.py OUT.jsonl --n-gap 64 --n-flatten 2048      # bigger timings
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

import torch

import ntkit

TOL = 1e-10
NT_V100_MS = {"gap": 2.70, "flatten": 0.0047}   # neural-tangents README, 21-layer CNN, V100


def _rel(a, b) -> float:
    """``max |a - b| / max |b|`` (0 for two empty or all-zero tensors)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    return err / scale if scale > 0 else err


# the CPU reference runs the fused numba kernels where numba is installed, else the torch path
# (``ntkit.settings(fused=True)`` would refuse to run without numba)
_CPU_FUSED = True if importlib.util.find_spec("numba") is not None else None


class Checker:
    def __init__(self, device: torch.device, out, meta: dict):
        self.device, self.out, self.meta = device, out, meta
        self.failed = []

    def write(self, rec: dict) -> None:
        rec = {**self.meta, **rec}
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()

    def compare(self, name: str, fn, *, tol: float = TOL) -> None:
        """``fn(device) -> dict of tensors``; the device's results against the CPU's."""
        t0 = time.perf_counter()
        try:
            with ntkit.settings(fused=_CPU_FUSED):
                want = fn(torch.device("cpu"))
            # --device cpu: the pure-torch path a GPU takes; cuda: unused (fused is CPU-only)
            with ntkit.settings(fused=False if self.device.type == "cpu" else None):
                got = fn(self.device)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            errs = {k: _rel(got[k], want[k]) for k in want}
            bad_dev = sorted(k for k, v in got.items() if torch.is_tensor(v)
                             and v.device.type != self.device.type)
            worst = max(errs.values()) if errs else 0.0
            ok = worst <= tol and not bad_dev
            rec = dict(check=name, ok=ok, rel_err=worst, tol=tol, per_output=errs,
                       seconds=round(time.perf_counter() - t0, 3))
            if bad_dev:
                rec["not_on_device"] = bad_dev
        except Exception as e:  # report and go on: every family gets its line
            ok = False
            rec = dict(check=name, ok=False, error=f"{type(e).__name__}: {e}")
        if not ok:
            self.failed.append(name)
        self.write(rec)
        print(f"{'ok  ' if ok else 'FAIL'} {name:<34} "
              + (f"rel err {rec['rel_err']:.2e}" if "rel_err" in rec else rec.get("error", "")))


# ---- part 1: correctness ---------------------------------------------------------------------
def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def correctness(ck: Checker, tiny: bool) -> None:
    from ntkit import layers as nl

    n = 4 if tiny else 16
    side = 4 if tiny else 8

    def kern(arch, x1, x2=None, tile=None, **kw):
        def fn(dev):
            k = arch.kernel(x1.to(dev), None if x2 is None else x2.to(dev),
                            get=("nngp", "ntk"), dtype=torch.float64, tile=tile,
                            **{a: v.to(dev) for a, v in kw.items()})
            return {"nngp": k.nngp, "ntk": k.ntk}
        return fn

    def conv_body(depth=2):
        out = []
        for _ in range(depth):
            out += [nl.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), nl.Relu()]
        return out

    fc = nl.serial(nl.Dense(8, W_std=1.5, b_std=0.1), nl.Relu(), nl.Dense(8), nl.Erf(),
                   nl.LayerNorm(), nl.Dense(1, b_std=0.1))
    xf1, xf2 = _x(n, 5), _x(n - 1, 5, seed=1)
    ck.compare("kernel fc", kern(fc, xf1, xf2))
    ck.compare("kernel fc symmetric tiled", kern(fc, xf1, tile=2))
    flat = nl.serial(*conv_body(), nl.AvgPool((2, 2), padding="SAME"), *conv_body(1),
                     nl.Flatten(), nl.Dense(1))
    xc1, xc2 = _x(n, 3, side, side), _x(n - 1, 3, side, side, seed=1)
    ck.compare("kernel cnn flatten", kern(flat, xc1, xc2))
    gap = nl.serial(*conv_body(), nl.LayerNorm(axis=(1, 2, 3)), *conv_body(1),
                    nl.GlobalAvgPool(), nl.Dense(1))
    ck.compare("kernel cnn gap", kern(gap, xc1, xc2))
    ck.compare("kernel cnn gap symmetric tiled", kern(gap, xc1, tile=2))
    att = nl.serial(nl.Conv(8, (1,)), nl.GlobalSelfAttention(8, 8, 8, 2, pos_emb_type="CONCAT",
                                                             n_chan_pos_emb=4),
                    nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))
    xs1, xs2 = _x(n, 3, 6), _x(n - 1, 3, 6, seed=1)
    ck.compare("kernel attention", kern(att, xs1, xs2))
    graph = nl.serial(nl.Dense(8), nl.Relu(), nl.Aggregate(), nl.Dense(8), nl.Relu(),
                      nl.GlobalSumPool(), nl.Dense(1))
    xg = _x(n, 3, 5)
    pattern = (_x(n, 5, 5, seed=2) > 0).double() + torch.eye(5, dtype=torch.float64)
    ck.compare("kernel graph aggregate", kern(graph, xg, pattern=pattern))

    # empirical NTK of the finite CNN (parameters copied to the device)
    from ntkit import empirical_ntk
    net = flat.module((3, side, side), width=16, seed=0, dtype=torch.float64)
    for impl in ("jacobian", "ntk_vp", "structured"):
        def emp(dev, impl=impl):
            m = copy.deepcopy(net).to(dev)
            return {"ntk": empirical_ntk(m, xc1.to(dev), xc2.to(dev), implementation=impl),
                    "full": empirical_ntk(m, xc1.to(dev), implementation=impl, output="full")}
        ck.compare(f"empirical ntk {impl}", emp)

    # predictions
    from ntkit import predict
    y = _x(n, 2, seed=3)

    def pred(dev):
        pf = predict.gradient_descent_mse_ensemble(fc, xf1.to(dev), y.to(dev), diag_reg=1e-4)
        t = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
        g = pf(t=t.to(dev), x_test=xf2.to(dev), get="ntk", compute_cov=True)
        g_inf = pf(x_test=xf2.to(dev), get="nngp", compute_cov=True)
        return {"mean": g.mean, "cov": g.covariance, "mean_inf": g_inf.mean,
                "cov_inf": g_inf.covariance}
    ck.compare("predict ensemble mean/cov", pred)

    # random features (the weights are drawn on the CPU: the same map on every device)
    from ntkit import features as nf
    for method in ("rf", "jacobian"):
        def feat(dev, method=method):
            out = nf.features(gap, xc1.to(dev), dim=32, get=("nngp", "ntk"), method=method,
                              out_dim=64 if method == "jacobian" else None,
                              dtype=torch.float64, seed=1)
            return dict(out)
        ck.compare(f"features {method}", feat)

    # the store: tiles computed on the device, written to disk, read back; CG on the device
    from ntkit import compute_kernel, scale

    def store(dev):
        with tempfile.TemporaryDirectory(prefix="ntkit-gpu-check-") as tmp:
            h = compute_kernel(fc, xf1.to(dev), get=("nngp", "ntk"),
                               store=os.path.join(tmp, "k.zarr"), tile=3, progress=False)
            k = h.load("ntk")
            nngp = h.load("nngp")
        kd = k.to(dev)
        alpha = scale.solve(kd, y.to(dev), method="cg", diag_reg=1e-3, tol=1e-12,
                            progress=False)
        return {"ntk": k, "nngp": nngp, "cg_alpha": alpha}
    ck.compare("store round trip + cg", store, tol=1e-9)


# ---- part 2: timing --------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timing(ck: Checker, args) -> None:
    from ntkit import layers as nl

    dev = ck.device
    depth, side = args.depth, args.side
    for readout, n in (("gap", args.n_gap), ("flatten", args.n_flatten)):
        body = []
        for _ in range(depth):
            body += [nl.Conv(1, (3, 3), padding="SAME", W_std=2 ** 0.5, b_std=0.05), nl.Relu()]
        head = nl.GlobalAvgPool() if readout == "gap" else nl.Flatten()
        arch = nl.serial(*body, head, nl.Dense(1, W_std=2 ** 0.5, b_std=0.05))
        g = torch.Generator().manual_seed(0)
        x1 = torch.randn(n, 3, side, side, generator=g).to(dev)
        x2 = torch.randn(n, 3, side, side, generator=g).to(dev)
        kw = dict(get=("nngp", "ntk"), dtype=torch.float32)
        try:
            arch.kernel(x1[:2], x2[:2], **kw)                       # warm-up
            _sync(dev)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                k = arch.kernel(x1, x2, **kw)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            best = min(times)
            ms = 1e3 * best / (n * n)
            finite = bool(torch.isfinite(k.ntk).all())
            headline = depth == 21 and side == 32
            rec = dict(case=f"cnn{depth}_{readout}", n1=n, n2=n, image=[3, side, side],
                       dtype="float32", get=["nngp", "ntk"], seconds=best,
                       ms_per_entry=ms, finite=finite,
                       nt_v100_ms_per_entry=NT_V100_MS[readout],
                       speedup_vs_nt_v100=(NT_V100_MS[readout] / ms
                                           if ms > 0 and headline else None),
                       headline_case=headline)
            print(f"time cnn{depth}_{readout:<8} n={n:<5} {ms:.4g} ms/entry "
                  f"(NT on a V100: {NT_V100_MS[readout]} ms/entry"
                  + ("" if rec["headline_case"] else "; not the headline size") + ")")
        except Exception as e:
            rec = dict(case=f"cnn{depth}_{readout}", error=f"{type(e).__name__}: {e}")
            print(f"FAIL timing {readout}: {rec['error']}")
            ck.failed.append(f"timing {readout}")
        ck.write(rec)


# ---- main --------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON-lines file to append the results to (must end in .jsonl)")
    p.add_argument("--device", default="cuda",
                   help="'cuda' (default; 'cuda:1' ...) or 'cpu' for a CPU-vs-CPU smoke run")
    p.add_argument("--skip-timing", action="store_true", help="correctness checks only")
    p.add_argument("--n-gap", type=int, default=None, help="images per batch, GAP timing")
    p.add_argument("--n-flatten", type=int, default=None, help="images per batch, Flatten")
    p.add_argument("--depth", type=int, default=None, help="conv layers (default 21)")
    p.add_argument("--side", type=int, default=None, help="image side (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (the best is kept)")
    args = p.parse_args(argv)

    out = args.out
    if not out.endswith(".jsonl"):
        print(f"gpu_check: the output {out!r} must be a .jsonl file (results are appended to "
              f"it; other files are never written)", file=sys.stderr)
        return 2
    if os.path.isdir(out):
        print(f"gpu_check: the output {out!r} is a directory; give a .jsonl file path",
              file=sys.stderr)
        return 2
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        print(f"gpu_check: --device {args.device!r} is not a device: {e}", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check. "
              "Run it on a machine with a GPU, or with --device cpu to exercise the script.")
        return 0
    if dev.type not in ("cuda", "cpu"):
        print(f"gpu_check: --device must be cuda[:i] or cpu, got {args.device!r}",
              file=sys.stderr)
        return 2
    tiny = dev.type == "cpu"
    args.depth = args.depth or (3 if tiny else 21)
    args.side = args.side or (8 if tiny else 32)
    args.n_gap = args.n_gap or (3 if tiny else 32)
    args.n_flatten = args.n_flatten or (16 if tiny else 1024)

    meta = dict(bench="gpu_check", time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                device=str(dev), device_name=(torch.cuda.get_device_name(dev)
                                              if dev.type == "cuda" else platform.processor()
                                              or platform.machine()),
                torch=torch.__version__, ntkit=getattr(ntkit, "__version__", "?"),
                host=platform.node(), load=os.getloadavg()[0] if hasattr(os, "getloadavg")
                else None)
    print(f"gpu_check on {meta['device']} ({meta['device_name']}), torch {torch.__version__}"
          + (" [CPU smoke run: tiny sizes, pure-torch path vs default]" if tiny else ""))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        ck = Checker(dev, f, meta)
        correctness(ck, tiny)
        if not args.skip_timing:
            timing(ck, args)
    if ck.failed:
        print(f"gpu_check: {len(ck.failed)} check(s) failed: {', '.join(ck.failed)}")
        return 1
    print(f"gpu_check: all checks passed; results appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
