"""Side by side with neural-tangents (NT) 0.6.5: same cases, same inputs, same invocation.

For each of NT's anchor cases (``../shared/anchors/nt_bench.py``: a FC ReLU, b FC Erf,
c CNN+Flatten, d CNN+GAP, e empirical NTK of a 665k-parameter MLP, f
``gradient_descent_mse_ensemble``) and each dtype, this script

1. times ntkit's version in this process (same definitions: W_std=1.5, b_std=0.05, NTK
   parameterization, kernels computed in the case's dtype, ``dtype=`` like NT; same inputs:
   ``numpy.random.default_rng(0)`` drawn exactly as NT's harness draws them, NHWC images
   transposed to NCHW for us; an untimed warm-up, then up to ``--repeats`` timed calls,
   median);
2. right after, runs NT's harness on the same case and dtype as a subprocess
   (``NT_PYTHON nt_bench.py --cases X --dtypes Y``; skipped with a message when that python or
   script is missing);
3. prints both medians and ``ratio = nt_s / ntkit_s`` (> 1: ntkit faster), checks ntkit's
   kernels against the kernels NT saved (``--ref-dir``) for cases a and d, and appends one JSON
   line per (case, sub-case, dtype, competitor) to ``bench/results/vs_nt.jsonl`` with the load
   averages before/after, the CPU model and the thread count.

``--competitor`` repeats every case beside one busy competing process (a python busy loop, not
pinned) and records both runs (``competitor: false/true``); the issue's goal is that time
degrades at most in proportion to the cores taken (<= 2.2x with one busy competitor on 2 cores).

Threads: like ``import ntkit`` (:mod:`ntkit._threads`), the script sets
``OMP_WAIT_POLICY=PASSIVE`` before torch is imported unless a policy is already set;
``--omp-default`` keeps libgomp's spinning default for comparison (NT's subprocess always runs
with the environment as the user left it).

Rules (../shared/anchors/README.md): compare medians measured in the same run only; rerun when
the 1-minute load average before a measurement meant to be idle is above ~0.5.

Usage::

    python bench/bench_vs_nt.py                          # all cases, float32 and float64
    python bench/bench_vs_nt.py --cases f --dtypes float64 --repeats 3
    python bench/bench_vs_nt.py --cases a,c --competitor
    python bench/bench_vs_nt.py --quick --cases af       # tiny sizes (harness check)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--omp-default" not in sys.argv:
    # what `import ntkit` does first (ntkit._threads): OMP_WAIT_POLICY=PASSIVE before torch loads
    # libgomp, unless the user chose a policy. --omp-default keeps libgomp's spinning default.
    from ntkit import _threads
    _threads.configure()

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/ (run as a script: already)
from _nt_common import (DEFAULT_NT_PYTHON, load_record, machine_record,  # noqa: E402
                        nt_subprocess_env, time_call)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NT_BENCH = ROOT.parent / "shared" / "anchors" / "nt_bench.py"
RESULTS = ROOT / "bench" / "results" / "vs_nt.jsonl"

SEED, W_STD, B_STD = 0, 1.5, 0.05
SIZES = {  # NT's defaults (nt_bench.SIZES) and --quick shrinks (nt_bench.QUICK)
    "a": dict(n=4000, d=784, width=512), "b": dict(n=4000, d=784, width=512),
    "c": dict(n=200, hw=16, c=3, width=512), "d": dict(n=40, hw=16, c=3, width=512),
    "e": dict(n=500, d=784, width=512, out=1),
    "f": dict(n_train=2000, n_test=500, d=784, width=512, n_out=10, t_finite=10.0,
              diag_reg=1e-4),
}
QUICK = {"a": dict(n=200), "b": dict(n=200), "c": dict(n=20), "d": dict(n=8, hw=8),
         "e": dict(n=50), "f": dict(n_train=200, n_test=50)}


# ---------------------------------------------------------------------------------------------
# ntkit side
# ---------------------------------------------------------------------------------------------

def _fc(nl, width, act, depth=3):
    layers = []
    for _ in range(depth):
        layers += [nl.Dense(width, W_std=W_STD, b_std=B_STD), act()]
    return nl.serial(*layers, nl.Dense(1, W_std=W_STD, b_std=B_STD))


def _cnn(nl, width, top, depth=4):
    layers = []
    for _ in range(depth):
        layers += [nl.Conv(width, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD), nl.Relu()]
    return nl.serial(*layers, top(), nl.Dense(1, W_std=W_STD, b_std=B_STD))


def run_ours(case, dtype, quick, repeats, budget_s):
    """ntkit's version of one case: a list of records ``{name, time_s, ..., [kernels]}``."""
    from ntkit import layers as nl
    tdt = getattr(torch, dtype)
    npdt = np.float64 if dtype == "float64" else np.float32
    size = dict(SIZES[case], **(QUICK[case] if quick else {}))
    rng = np.random.default_rng(SEED)
    recs = []
    if case in "ab":
        x = torch.from_numpy(rng.standard_normal((size["n"], size["d"])).astype(npdt))
        arch = _fc(nl, size["width"], nl.Relu if case == "a" else nl.Erf)
        out, t = time_call(lambda: arch.kernel(x, None, ("nngp", "ntk"), dtype=tdt), repeats,
                            budget_s)
        name = f"{case}_fc_{'relu' if case == 'a' else 'erf'}_nngp_ntk"
        recs.append(dict(name=name, kernels=dict(nngp=out.nngp, ntk=out.ntk), **t))
    elif case in "cd":
        n, hw, c = size["n"], size["hw"], size["c"]
        x = rng.standard_normal((n, hw, hw, c)).astype(npdt)          # NT: NHWC
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # ours: NCHW
        arch = _cnn(nl, size["width"], nl.Flatten if case == "c" else nl.GlobalAvgPool)
        out, t = time_call(lambda: arch.kernel(x, None, ("nngp", "ntk"), dtype=tdt), repeats,
                            budget_s)
        name = "c_cnn_flatten_nngp_ntk" if case == "c" else "d_cnn_gap_nngp_ntk"
        recs.append(dict(name=name, kernels=dict(nngp=out.nngp, ntk=out.ntk), **t))
    elif case == "e":
        from ntkit.empirical import empirical_ntk
        x = torch.from_numpy(rng.standard_normal((size["n"], size["d"])).astype(npdt))
        layers = []
        for _ in range(2):
            layers += [nl.Dense(size["width"], W_std=W_STD, b_std=B_STD), nl.Relu()]
        arch = nl.serial(*layers, nl.Dense(size["out"], W_std=W_STD, b_std=B_STD))
        model = arch.module(in_shape=size["d"], seed=SEED, dtype=tdt)
        n_params = sum(p.numel() for p in model.parameters())
        out, t = time_call(lambda: empirical_ntk(model, x), repeats, budget_s)
        recs.append(dict(name="e_empirical_ntk", n_params=int(n_params), **t))
    elif case == "f":
        from ntkit import predict as P
        x_tr = torch.from_numpy(rng.standard_normal((size["n_train"], size["d"])).astype(npdt))
        x_te = torch.from_numpy(rng.standard_normal((size["n_test"], size["d"])).astype(npdt))
        y_tr = torch.from_numpy(rng.standard_normal((size["n_train"], size["n_out"]))
                                .astype(npdt))
        arch = _fc(nl, size["width"], nl.Relu)
        t_fin = size["t_finite"]
        for t_arg, label in ((None, "tNone"), (t_fin, f"t{t_fin:g}"), ("array", "tx10")):
            for cov in (False, True):
                t_val = torch.logspace(-1, 3, 10, dtype=tdt) if t_arg == "array" else t_arg

                def call(t_val=t_val, cov=cov):
                    # a fresh predictor each call, as NT's harness: kernels and factorization
                    # (run at once by time_call; the defaults bind this iteration's values)
                    pf = P.gradient_descent_mse_ensemble(arch, x_tr, y_tr,
                                                         diag_reg=size["diag_reg"], dtype=tdt)
                    return pf(t=t_val, x_test=x_te, get="ntk", compute_cov=cov)

                _, t = time_call(call, repeats, budget_s)
                recs.append(dict(name=f"f_gd_mse_ensemble_ntk_{label}_"
                                      f"{'mean_cov' if cov else 'mean'}", **t))
        _, t = time_call(lambda: (arch.kernel(x_tr, None, ("nngp", "ntk"), dtype=tdt),
                                  arch.kernel(x_te, x_tr, ("nngp", "ntk"), dtype=tdt),
                                  arch.kernel(x_te, None, "nngp", dtype=tdt)), repeats,
                         budget_s)
        recs.append(dict(name="f_component_kernels_only", **t))
    else:
        raise ValueError(case)
    return recs


# ---------------------------------------------------------------------------------------------
# NT side and comparison
# ---------------------------------------------------------------------------------------------

def run_nt(args, case, dtype, ref_dir):
    """NT's harness on one (case, dtype): ``{name: record}`` or ``None`` (with a message)."""
    if not (os.path.exists(args.nt_python) and os.path.exists(args.nt_bench)):
        print(f"# NT skipped: {args.nt_python!r} or {args.nt_bench!r} not found (build it with "
              f"../shared/anchors/nt_env.sh, or pass --nt-python / --nt-bench)", flush=True)
        return None
    cmd = [args.nt_python, str(args.nt_bench), "--cases", case, "--dtypes", dtype,
           "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
           "--ref-dir", ref_dir] + (["--quick"] if args.quick else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                             env=nt_subprocess_env())     # NT runs with its own defaults
    except subprocess.TimeoutExpired:
        print(f"# NT timed out after {args.timeout_s}s on {case} {dtype}", flush=True)
        return None
    out = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if "name" in rec and rec.get("case") == case:
                out[rec["name"]] = rec
    if not out:
        tail = "\n".join((res.stderr or "").strip().splitlines()[-5:])
        print(f"# NT failed on {case} {dtype} (rc {res.returncode}):\n{tail}", flush=True)
        return None
    return out


def check_kernels(case, dtype, kernels, ref_dir, quick):
    """Max relative difference (to max |K|) of our NNGP/NTK against NT's saved ones (a, d)."""
    name = (f"a_fc_relu_{dtype}" if case == "a" else f"d_cnn_gap_{dtype}") + \
        ("_quick" if quick else "")
    res = {}
    for g in ("nngp", "ntk"):
        path = os.path.join(ref_dir, f"{name}_{g}.npy")
        if not os.path.exists(path):
            return None
        ref = np.load(path).astype(np.float64)
        ours = kernels[g].double().numpy()
        res[f"max_rel_diff_{g}"] = float(f"{np.abs(ours - ref).max() / np.abs(ref).max():.3e}")
    return res


class Competitor:
    """One busy python process (a pure busy loop, not pinned) for the duration of a block."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="abcdef")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--quick", action="store_true", help="NT's tiny --quick sizes")
    ap.add_argument("--nt-python", default=DEFAULT_NT_PYTHON)
    ap.add_argument("--nt-bench", default=str(DEFAULT_NT_BENCH))
    ap.add_argument("--no-nt", action="store_true", help="time ntkit only")
    ap.add_argument("--ref-dir", default=None,
                    help="where NT saves the kernels of a/d (default: a temporary directory)")
    ap.add_argument("--competitor", action="store_true",
                    help="also run every case beside one busy competing process")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--omp-default", action="store_true",
                    help="do not set OMP_WAIT_POLICY=PASSIVE for ntkit (libgomp spins)")
    args = ap.parse_args()
    cases = [c for c in args.cases.replace(",", "") if c in "abcdef"]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    tmp = None
    ref_dir = args.ref_dir
    if ref_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ntkit_vs_nt_")
        ref_dir = tmp.name
    env = machine_record()
    print(json.dumps(dict(name="env", **env)), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for competitor in ((False, True) if args.competitor else (False,)):
        for case in cases:
            for dtype in dtypes:
                ctx = Competitor() if competitor else _Null()
                with ctx:
                    load0 = os.getloadavg()
                    ours = run_ours(case, dtype, args.quick, args.repeats, args.budget_s)
                    load1 = os.getloadavg()
                    nt = None if args.no_nt else run_nt(args, case, dtype, ref_dir)
                    load2 = os.getloadavg()
                for rec in ours:
                    kernels = rec.pop("kernels", None)
                    line = dict(case=case, dtype=dtype, name=rec["name"], competitor=competitor,
                                quick=args.quick, ntkit_s=rec["time_s"],
                                ntkit_times_s=rec["times_s"], ntkit_warmup_s=rec["warmup_s"],
                                nt_s=None, ratio=None, **load_record(load0, load1, load2),
                                **env)
                    if "n_params" in rec:
                        line["n_params"] = rec["n_params"]
                    if nt:
                        ref = nt.get(rec["name"])
                        if case == "e":   # compare with NT's structured and its best
                            ok = {k: v for k, v in nt.items() if "time_s" in v}
                            ref = ok.get("e_empirical_ntk_structured_derivatives")
                            if ok:
                                best = min(ok.values(), key=lambda v: v["time_s"])
                                line["nt_best_s"] = best["time_s"]
                                line["nt_best_impl"] = best.get("implementation")
                                line["ratio_vs_nt_best"] = round(best["time_s"]
                                                                 / rec["time_s"], 2)
                        if ref is not None and "time_s" in ref:
                            line["nt_s"] = ref["time_s"]
                            line["nt_times_s"] = ref.get("times_s")
                            line["nt_loadavg_1m_before"] = ref.get("loadavg_1m_before")
                            line["ratio"] = round(ref["time_s"] / rec["time_s"], 2)
                    if kernels is not None and nt:
                        chk = check_kernels(case, dtype, kernels, ref_dir, args.quick)
                        if chk:
                            line.update(chk)
                    print(f"{line['name']:<44} {dtype:<8} comp={int(competitor)} "
                          f"ntkit {line['ntkit_s']:>8.4f}s  NT "
                          f"{line['nt_s'] if line['nt_s'] is not None else float('nan'):>8.4f}s"
                          f"  ratio {line['ratio']}  load {line['load_before'][0]:.2f}"
                          + (f"  diff nngp {line.get('max_rel_diff_nngp')} ntk "
                             f"{line.get('max_rel_diff_ntk')}" if 'max_rel_diff_ntk' in line
                             else ""), flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(line) + "\n")
    if tmp is not None:
        tmp.cleanup()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
