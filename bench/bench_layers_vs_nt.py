"""Each new layer family's kernel map against neural-tangents (NT) 0.6.5: same case, same inputs,
same invocation (issue 16, "Performance: each new layer's kernel map costs no more than NT's").

For every case (a small architecture around one layer: Dense/Conv before it, the layer, an
activation and a pooling/readout after it) and each dtype, this script

1. times ntkit's ``arch.kernel(x1, x2, get=('nngp', 'ntk'), dtype=...)`` in this process (one
   untimed warm-up, then the median of ``--repeats`` timed calls);
2. times NT's ``jax.jit(kernel_fn)`` on the same case and the same inputs in a worker
   subprocess (``--nt-python`` running ``bench/_nt_layers.py``; one worker per dtype, kept
   alive across cases so that JAX's import is paid once; NT is channels last, the worker
   transposes; ``JAX_ENABLE_X64=1`` for float64; compilation is the untimed warm-up;
   ``block_until_ready``). The timed calls alternate, one ntkit call then one NT call
   (``--no-interleave``: all of ntkit's, then all of NT's): this VM's speed drifts by 2-3x
   over seconds to minutes, and sub-0.1 s calls timed in two separate blocks measured that
   drift as often as the code. ``ratio`` is NT's median over ntkit's; ``ratio_paired`` the
   median of the per-pair ratios;
3. checks that the two kernels agree: ``rel_err = max(|K_ntkit - K_NT|) / max(|K_NT|)`` over
   NNGP and NTK (float64 must agree to ~1e-9; a larger value means the case definitions
   differ, and is flagged ``MISMATCH``);
4. prints a table (case, dtype, ntkit s, NT s, ratio = NT s / ntkit s (> 1: ntkit faster),
   rel err) and appends one JSON line per (case, dtype) to
   ``bench/results/layers_vs_nt.jsonl`` with the load averages before/after each side, the
   torch thread count and the CPU model.

Cases (``--cases`` takes a comma-separated list of names or prefixes; default all):

  attn_softmax_none, attn_softmax_sum, attn_identity_none, attn_identity_sum
      Dense -> GlobalSelfAttention(mechanism, pos_emb_type) -> Relu -> GlobalAvgPool -> Dense
  aggregate_dense    Dense -> Relu -> Aggregate -> Dense -> Relu -> Aggregate -> GAP -> Dense
                     (dense adjacency pattern per example, ``pattern=(p1, p2)``)
  convtranspose_same_s2  Conv -> Relu -> ConvTranspose(SAME, stride 2) -> Relu -> GAP -> Dense
  convlocal          ConvLocal(SAME) -> Relu -> ConvLocal(SAME) -> Relu -> GAP -> Dense
  imageresize_linear Conv -> Relu -> ImageResize(1.5x, linear) -> Conv -> Relu -> GAP -> Dense
  dropout_train, dropout_train_self
                     FC Dense -> Relu -> Dropout(0.8, 'train') -> Dense -> Relu -> Dense: the
                     train-mode kernel (``'test'`` is the identity); ``_self``: ``x2=None``
                     (the batch diagonal is scaled)
  index_slice        Conv -> Relu -> Index(Slice[:, :, 1:-1, ::2]) -> Conv -> Relu -> GAP -> Dense
  dotgeneral         Conv -> Relu -> Conv -> DotGeneral(rhs=w, contract H) -> Relu -> GAP -> Dense
  gabor, expnormalized   FC Dense -> act -> Dense -> act -> Dense
  layernorm_chw      Conv -> LayerNorm(axis=(1, 2, 3)) -> Relu -> Conv -> Relu -> GAP -> Dense
  mask_attn_gap      sequences padded with ``mask_constant``: Dense -> GlobalSelfAttention ->
                     Relu -> GlobalAvgPool -> Dense, ``kernel(..., mask_constant=c)``

Threads: like ``import ntkit`` (:mod:`ntkit._threads`), ``OMP_WAIT_POLICY=PASSIVE`` is set
before torch is imported unless a policy is already set (NT's worker gets the environment as
the user left it). XLA uses its own thread pool (all cores).

Rules: compare medians measured in the same run only; record the load (``load_before`` etc.);
rerun on an idle machine for numbers meant to be final.

Usage::

    python bench/bench_layers_vs_nt.py                     # all cases, float32 and float64
    python bench/bench_layers_vs_nt.py --quick             # tiny sizes (harness check)
    python bench/bench_layers_vs_nt.py --cases attn,gabor --dtypes float64 --repeats 3
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

from ntkit import _threads

_threads.configure()   # what `import ntkit` does first: OMP_WAIT_POLICY=PASSIVE unless set

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/ (run as a script: already)
from _nt_common import (DEFAULT_NT_PYTHON, load_record, machine_record,  # noqa: E402
                        nt_subprocess_env, time_call)

ROOT = Path(__file__).resolve().parent.parent
NT_WORKER = Path(__file__).resolve().parent / "_nt_layers.py"
RESULTS = ROOT / "bench" / "results" / "layers_vs_nt.jsonl"
SEED = 0
MASK_C = -1e9            # mask_constant of the masking case (exact in float32 and float64)
MISMATCH_TOL = {"float64": 1e-9, "float32": 1e-3}


# ---------------------------------------------------------------------------------------------
# Cases: one layer spec (channels first, ntkit's names and arguments), shared by both sides.
# ``shape``: per-example input shape (C, *S) or (d,); ``n``: (n1, n2); ``quick``: overrides.
# ---------------------------------------------------------------------------------------------

def _dense(w=64, W=1.3, b=0.1):
    return ("Dense", dict(out_dim=w, W_std=W, b_std=b))


def _conv(w=16, f=(3, 3), W=1.4, b=0.1, pad="SAME", name="Conv"):
    return (name, dict(out_chan=w, filter_shape=list(f), padding=pad, W_std=W, b_std=b))


_HEAD = [("Relu", {}), ("GlobalAvgPool", {}), ("Dense", dict(out_dim=1, W_std=1.0, b_std=0.1))]


def _attn(mech, pe):
    kw = dict(n_chan_out=64, n_chan_key=64, n_chan_val=64, n_heads=4, W_key_std=1.3,
              W_query_std=0.9, W_value_std=1.2, W_out_std=1.1, b_std=0.1,
              attention_mechanism=mech, pos_emb_type=pe)
    if pe != "NONE":
        kw["W_pos_emb_std"] = 0.7
    return [_dense(), ("GlobalSelfAttention", kw)] + _HEAD


def _fc_act(act):
    return [_dense(512, 1.5, 0.05), act, _dense(512, 1.5, 0.05), act, _dense(1, 1.5, 0.05)]


CASES = {
    "attn_softmax_none": dict(spec=_attn("SOFTMAX", "NONE"), shape=(8, 24), n=(96, 80),
                              quick=dict(n=(6, 5), shape=(3, 5))),
    "attn_softmax_sum": dict(spec=_attn("SOFTMAX", "SUM"), shape=(8, 24), n=(96, 80),
                             quick=dict(n=(6, 5), shape=(3, 5))),
    "attn_identity_none": dict(spec=_attn("IDENTITY", "NONE"), shape=(8, 24), n=(96, 80),
                               quick=dict(n=(6, 5), shape=(3, 5))),
    "attn_identity_sum": dict(spec=_attn("IDENTITY", "SUM"), shape=(8, 24), n=(96, 80),
                              quick=dict(n=(6, 5), shape=(3, 5))),
    "aggregate_dense": dict(
        spec=[_dense(64, 1.5, 0.1), ("Relu", {}), ("Aggregate", {}), _dense(64, 1.2, 0.05),
              ("Relu", {}), ("Aggregate", {})] + _HEAD[1:],
        shape=(8, 24), n=(96, 80), pattern=True, quick=dict(n=(6, 5), shape=(3, 7))),
    "convtranspose_same_s2": dict(
        spec=[_conv(), ("Relu", {}),
              ("ConvTranspose", dict(out_chan=16, filter_shape=[3, 3], strides=[2, 2],
                                     padding="SAME", W_std=1.3, b_std=0.2))] + _HEAD,
        shape=(3, 6, 6), n=(24, 20), quick=dict(n=(4, 3), shape=(2, 4, 4))),
    "convlocal": dict(
        spec=[_conv(name="ConvLocal", b=0.2), ("Relu", {}), _conv(name="ConvLocal", W=1.3)]
        + _HEAD, shape=(3, 8, 8), n=(48, 40), quick=dict(n=(4, 3), shape=(2, 5, 5))),
    "imageresize_linear": dict(
        spec=[_conv(), ("Relu", {}), ("ImageResize", dict(shape=[12, 12], method="linear")),
              _conv(W=1.2)] + _HEAD,
        shape=(3, 8, 8), n=(24, 20), quick=dict(n=(4, 3), shape=(2, 4, 4))),
    "dropout_train": dict(
        spec=[_dense(512, 1.5, 0.05), ("Relu", {}), ("Dropout", dict(rate=0.8, mode="train")),
              _dense(512, 1.5, 0.05), ("Relu", {}), _dense(1, 1.5, 0.05)],
        shape=(256,), n=(1500, 1200), quick=dict(n=(20, 15), shape=(8,))),
    "dropout_train_self": dict(
        spec=[_dense(512, 1.5, 0.05), ("Relu", {}), ("Dropout", dict(rate=0.8, mode="train")),
              _dense(512, 1.5, 0.05), ("Relu", {}), _dense(1, 1.5, 0.05)],
        shape=(256,), n=(1500, None), self=True, quick=dict(n=(20, None), shape=(8,))),
    "index_slice": dict(
        spec=[_conv(), ("Relu", {}),
              ("Index", dict(idx=[[None], [None], [1, -1], [None, None, 2]])),
              _conv(W=1.2)] + _HEAD,
        shape=(3, 10, 10), n=(24, 20), quick=dict(n=(4, 3), shape=(2, 5, 5))),
    "dotgeneral": dict(
        spec=[_conv(), ("Relu", {}), _conv(W=1.2),
              ("DotGeneral", dict(rhs="w_h", dimension_numbers=[[[2], [0]], [[], []]]))]
        + _HEAD, shape=(3, 8, 8), n=(24, 20), quick=dict(n=(4, 3), shape=(2, 4, 4))),
    "gabor": dict(spec=_fc_act(("Gabor", {})), shape=(256,), n=(1500, 1200),
                  quick=dict(n=(20, 15), shape=(8,))),
    "expnormalized": dict(spec=_fc_act(("ExpNormalized", dict(gamma=2.0, shift=-1.0))),
                          shape=(256,), n=(1500, 1200), quick=dict(n=(20, 15), shape=(8,))),
    "layernorm_chw": dict(
        spec=[_conv(), ("LayerNorm", dict(axis=[1, 2, 3])), ("Relu", {}), _conv(W=1.2)] + _HEAD,
        shape=(3, 8, 8), n=(24, 20), quick=dict(n=(4, 3), shape=(2, 4, 4))),
    "mask_attn_gap": dict(spec=_attn("SOFTMAX", "NONE"), shape=(8, 24), n=(96, 80),
                          mask=True, quick=dict(n=(6, 5), shape=(3, 6))),
}


def case_geometry(name, quick):
    c = CASES[name]
    q = c.get("quick", {}) if quick else {}
    return q.get("n", c["n"]), tuple(q.get("shape", c["shape"]))


def make_inputs(name, quick, path):
    """Draw the case's inputs (channels first) and save them to ``path`` (``.npz``, float64)."""
    c = CASES[name]
    (n1, n2), shape = case_geometry(name, quick)
    rng = np.random.default_rng(SEED)
    x1 = rng.standard_normal((n1,) + shape)
    x2 = rng.standard_normal((n2 or 1,) + shape)
    data = dict(x1=x1, x2=x2)
    if c.get("pattern"):
        v = shape[1]

        def adj(n):
            a = (rng.random((n, v, v)) < 0.3).astype(np.float64)
            return a + np.eye(v)
        data.update(p1=adj(n1), p2=adj(n2 or 1))
    if c.get("mask"):
        for x in (x1, x2):          # trailing padding: each example keeps L/3 .. L positions
            L = x.shape[-1]
            for i in range(x.shape[0]):
                keep = int(rng.integers(max(1, L // 3), L + 1))
                x[i, :, keep:] = MASK_C
    np.savez(path, **data)
    return data


def resolve_spec(spec, shape):
    """Fill data-dependent arguments (the DotGeneral constant) into a JSON-able spec."""
    out = []
    for name, kw in spec:
        kw = dict(kw)
        if name == "DotGeneral" and kw.get("rhs") == "w_h":
            h = shape[1]
            kw["rhs"] = list(np.linspace(-1.0, 1.5, h) / np.sqrt(h))
        out.append([name, kw])
    return out


def build_ntkit(spec):
    from ntkit import layers as nl
    layers = []
    for name, kw in spec:
        kw = dict(kw)
        if name == "Index":
            idx = tuple(slice(*e) if isinstance(e, list) else e for e in kw["idx"])
            layers.append(nl.Index(idx))
            continue
        if name == "DotGeneral":
            for side in ("lhs", "rhs"):
                if kw.get(side) is not None:
                    kw[side] = torch.tensor(np.asarray(kw[side]), dtype=torch.float64)
            dn = kw.pop("dimension_numbers")
            kw["dimension_numbers"] = tuple(tuple(tuple(a) for a in pair) for pair in dn)
        for k in ("filter_shape", "strides", "window_shape", "shape", "axis"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        layers.append(getattr(nl, name)(**kw))
    return nl.serial(*layers)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def run_ntkit(name, spec, data, dtype, repeats, budget_s):
    c = CASES[name]
    tdt = getattr(torch, dtype)
    arch = build_ntkit(spec)
    x1 = torch.from_numpy(data["x1"]).to(tdt)
    x2 = None if c.get("self") else torch.from_numpy(data["x2"]).to(tdt)
    kw = {}
    if c.get("pattern"):
        p1 = torch.from_numpy(data["p1"]).to(tdt)
        kw["pattern"] = p1 if c.get("self") else (p1, torch.from_numpy(data["p2"]).to(tdt))
    if c.get("mask"):
        kw["mask_constant"] = MASK_C
    def one():
        return arch.kernel(x1, x2, get=("nngp", "ntk"), dtype=tdt, **kw)
    out, t = time_call(one, repeats, budget_s)
    return dict(nngp=out.nngp.double().numpy(), ntk=out.ntk.double().numpy()), t, one


def interleave(one, worker, name, repeats, budget_s, t_ours, res):
    """``repeats`` rounds of one timed ntkit call then one timed NT call (the worker's kept
    case); stops early once ntkit's timed calls pass ``budget_s``. Returns the two timing
    records with the medians and per-call times of the rounds."""
    ours, theirs = [], []
    while len(ours) < repeats:
        t0 = time.perf_counter()
        one()
        ours.append(time.perf_counter() - t0)
        r = worker.run(dict(case=name, again=True))
        if "error" in r:
            print(f"# NT failed on {name}: {r['error']}", flush=True)
            return t_ours, None
        theirs.append(r["times_s"][0])
        if sum(ours) > budget_s:
            break

    def rec(times, warm):
        s = sorted(times)
        return dict(time_s=round(s[len(s) // 2], 4), min_s=round(s[0], 4),
                    times_s=[round(t, 4) for t in times], warmup_s=warm)
    return rec(ours, t_ours["warmup_s"]), dict(res, **rec(theirs, res["warmup_s"]))


class NTWorker:
    """One ``_nt_layers.py`` process for one dtype; requests/answers as JSON lines."""

    def __init__(self, python, dtype, tmp):
        env = nt_subprocess_env()                   # NT runs with its own defaults
        self.err = open(os.path.join(tmp, f"nt_{dtype}.stderr"), "w")
        self.err_path = self.err.name
        self.p = subprocess.Popen([python, str(NT_WORKER), "--dtype", dtype], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, bufsize=1)
        hello = self._read()
        if not hello or not hello.get("ready"):
            raise RuntimeError(f"NT worker did not start: {self._tail()}")
        self.jax = hello.get("jax")

    def _read(self):
        while True:
            line = self.p.stdout.readline()
            if not line:
                return None
            if line.startswith("{"):
                return json.loads(line)

    def _tail(self):
        self.err.flush()
        try:
            with open(self.err_path) as f:
                return "\n".join(f.read().strip().splitlines()[-5:])
        except OSError:
            return ""

    def run(self, req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        res = self._read()
        if res is None:
            return dict(error=f"NT worker died: {self._tail()}")
        return res

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()
            self.p.wait()
        self.err.close()


def rel_err(ours, ref, offdiag=False):
    """``max|a - b| / max|b|`` per kernel; ``offdiag``: over the off-diagonal entries only."""
    out = {}
    for g in ("nngp", "ntk"):
        a, b = ours[g], np.asarray(ref[g], dtype=np.float64)
        if a.shape != b.shape:
            out[g] = float("inf")
            continue
        d = np.abs(a - b)
        if offdiag:
            d = d[~np.eye(d.shape[0], d.shape[1], dtype=bool)]
        out[g] = float(d.max() / max(np.abs(b).max(), 1e-300))
    return out


def select_cases(arg):
    if not arg:
        return list(CASES)
    picked = []
    for tok in (t.strip() for t in arg.split(",") if t.strip()):
        hits = [c for c in CASES if c == tok] or [c for c in CASES if c.startswith(tok)]
        if not hits:
            raise SystemExit(f"--cases: unknown case {tok!r}; known: {', '.join(CASES)}")
        picked += [h for h in hits if h not in picked]
    return picked


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="", help="comma-separated names or prefixes (default all)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=20.0,
                    help="stop timing a side after this many seconds of timed calls")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (harness check)")
    ap.add_argument("--nt-python", default=DEFAULT_NT_PYTHON)
    ap.add_argument("--no-nt", action="store_true", help="time ntkit only")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time all of ntkit's calls, then all of NT's (default: alternate)")
    ap.add_argument("--out", default=str(RESULTS), help="JSON-lines file to append to")
    args = ap.parse_args()
    cases = select_cases(args.cases)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "float64"):
            raise SystemExit(f"--dtypes: {d!r} is not float32 or float64")
    use_nt = not args.no_nt
    if use_nt and not os.path.exists(args.nt_python):
        print(f"# NT skipped: {args.nt_python!r} not found (pass --nt-python, or build "
              f"neural-tangents 0.6.5 there)", flush=True)
        use_nt = False
    env = machine_record(argv=" ".join(sys.argv[1:]))
    print(json.dumps(dict(name="env", **env)), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ntkit_layers_vs_nt_") as tmp:
        for dtype in dtypes:
            worker = None
            if use_nt:
                try:
                    worker = NTWorker(args.nt_python, dtype, tmp)
                except Exception as e:
                    print(f"# NT skipped for {dtype}: {e}", flush=True)
            try:
                for name in cases:
                    c = CASES[name]
                    inp = os.path.join(tmp, f"{name}_in.npz")
                    data = make_inputs(name, args.quick, inp)
                    spec = resolve_spec(c["spec"], case_geometry(name, args.quick)[1])
                    load0 = os.getloadavg()
                    inter = worker is not None and not args.no_interleave
                    ours, t_ours, one = run_ntkit(name, spec, data, dtype,
                                                  0 if inter else args.repeats, args.budget_s)
                    load1 = os.getloadavg()
                    res, err, err_off = None, None, None
                    if worker is not None:
                        out_npz = os.path.join(tmp, f"{name}_{dtype}_nt.npz")
                        res = worker.run(dict(case=name, spec=spec, inputs=inp, out=out_npz,
                                              repeats=0 if inter else args.repeats,
                                              budget_s=args.budget_s, keep=inter,
                                              self=bool(c.get("self")),
                                              call=dict(mask_constant=MASK_C)
                                              if c.get("mask") else {}))
                        if "error" in res:
                            print(f"# NT failed on {name} {dtype}: {res['error']}", flush=True)
                            res = None
                        elif inter:
                            t_ours, res = interleave(one, worker, name, args.repeats,
                                                     args.budget_s, t_ours, res)
                            load1 = os.getloadavg()
                        if res is not None:
                            ref = np.load(out_npz)
                            err = rel_err(ours, ref)
                            if c.get("self"):    # x2=None: diagonal (correlation 1) apart
                                err_off = rel_err(ours, ref, offdiag=True)
                    load2 = os.getloadavg()
                    (n1, n2), shape = case_geometry(name, args.quick)
                    line = dict(case=name, dtype=dtype, quick=args.quick, n1=n1,
                                n2=None if c.get("self") else n2, in_shape=list(shape),
                                ntkit_s=t_ours["time_s"], ntkit_times_s=t_ours["times_s"],
                                ntkit_warmup_s=t_ours["warmup_s"], nt_s=None, ratio=None,
                                rel_err_nngp=None, rel_err_ntk=None,
                                **load_record(load0, load1, load2), **env)
                    if res is not None:
                        line.update(nt_s=res["time_s"], nt_times_s=res["times_s"],
                                    nt_warmup_s=res["warmup_s"], jax=res.get("jax"),
                                    ratio=round(res["time_s"] / t_ours["time_s"], 3),
                                    interleaved=inter)
                        if inter:
                            pr = sorted(b / a for a, b in zip(t_ours["times_s"],
                                                              res["times_s"]))
                            line.update(ratio_paired=round(pr[len(pr) // 2], 3))
                    if err is not None:
                        line.update(rel_err_nngp=float(f"{err['nngp']:.3e}"),
                                    rel_err_ntk=float(f"{err['ntk']:.3e}"),
                                    agree=max(err.values()) <= MISMATCH_TOL[dtype])
                    if err_off is not None:
                        line.update(rel_err_offdiag_nngp=float(f"{err_off['nngp']:.3e}"),
                                    rel_err_offdiag_ntk=float(f"{err_off['ntk']:.3e}"))
                    rows.append(line)
                    e = max(err.values()) if err else float("nan")
                    flag = "" if not err or e <= MISMATCH_TOL[dtype] else "  MISMATCH"
                    nt_s = line["nt_s"] if line["nt_s"] is not None else float("nan")
                    print(f"{name:<24} {dtype:<8} ntkit {line['ntkit_s']:>8.4f}s  NT "
                          f"{nt_s:>8.4f}s  ratio {line['ratio']}  rel_err {e:.1e}  load "
                          f"{load0[0]:.2f}->{load2[0]:.2f}{flag}"
                          + (f"  (off-diagonal {max(err_off.values()):.1e})" if err_off
                             else ""), flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(line) + "\n")
            finally:
                if worker is not None:
                    worker.close()
    print()
    print(f"{'case':<24} {'dtype':<8} {'ntkit s':>9} {'NT s':>9} {'NT/ntkit':>9} {'rel err':>9}"
          f" {'load1m':>7}")
    for r in rows:
        e = max(v for v in (r["rel_err_nngp"], r["rel_err_ntk"]) if v is not None) \
            if r["rel_err_ntk"] is not None else float("nan")
        print(f"{r['case']:<24} {r['dtype']:<8} {r['ntkit_s']:>9.4f} "
              f"{r['nt_s'] if r['nt_s'] is not None else float('nan'):>9.4f} "
              f"{r['ratio'] if r['ratio'] is not None else float('nan'):>9.2f} {e:>9.1e} "
              f"{r['load_before'][0]:>7.2f}")
    slower = [r for r in rows if r["ratio"] is not None and r["ratio"] < 1]
    if slower:
        print("slower than NT: " + ", ".join(f"{r['case']} {r['dtype']} ({r['ratio']})"
                                             for r in slower))


if __name__ == "__main__":
    main()
