"""neural-tangents side of ``bench_layers_vs_nt.py`` (run by NT's python; ntkit never imports it).

A worker: ``NT_PYTHON bench/_nt_layers.py --dtype float64`` reads one JSON request per line on
stdin, ``{"case", "spec", "inputs", "out", "repeats", "budget_s", "self", "call"}``, and answers
one JSON line on stdout per request: ``{"case", "time_s", "times_s", "warmup_s", ...}`` or
``{"case", "error"}``. The NT architecture is built from the same layer spec as ntkit's,
written channels first (ntkit's layout) and translated here to NT's channels-last layout:

* inputs ``(N, C, *S)`` -> ``(N, *S, C)``; Aggregate patterns ``(N, *G, *G)`` are unchanged;
* ``Index``: the ntkit index ``[n, c, s1, s2, ...]`` -> NT's ``[n, s1, s2, ..., c]``;
* ``DotGeneral``: input (lhs) axes ``a >= 2`` -> ``a - 1`` (the constant's axes unchanged);
* ``ImageResize``: ``shape=(H', W')`` -> ``(-1, H', W', -1)``;
* ``LayerNorm``: ``axis`` over the non-batch axes ``(1, 2, 3)`` is the same set in both layouts.

The kernel function is ``jax.jit(kernel_fn, static_argnames=('get', 'mask_constant'))``; one
untimed warm-up call (compilation), then up to ``repeats`` timed calls (``block_until_ready``),
median. Kernels of the warm-up call are saved to ``out`` (``.npz``, ``nngp``/``ntk``) for the
agreement check. Interleaved timing: ``"keep": true`` (with ``"repeats": 0``) keeps the case's
jitted call after its warm-up; ``{"case", "again": true}`` then times one more call of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse_dtype():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("float32", "float64"), required=True)
    return ap.parse_args()


ARGS = _parse_dtype()
if ARGS.dtype == "float64":
    os.environ["JAX_ENABLE_X64"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", ARGS.dtype == "float64")
from neural_tangents import stax  # noqa: E402

warnings.filterwarnings("ignore")


def _idx(entries):
    """ntkit channels-first index entries -> NT channels-last index tuple."""
    def one(e):
        if isinstance(e, list):
            return slice(*e)
        return e
    items = [one(e) for e in entries]
    items = [items[0]] + items[2:] + [items[1]]
    return tuple(items)


def _shift(axes):
    return tuple(a - 1 if a >= 2 else a for a in axes)


def _layer(name, kw):
    kw = dict(kw)
    if name == "Index":
        return stax.Index(_idx(kw["idx"]))
    if name == "DotGeneral":
        (lc, rc), (lb, rb) = kw.pop("dimension_numbers")
        if kw.get("lhs") is not None:      # input is the rhs: its axes shift
            dn = ((tuple(lc), _shift(rc)), (tuple(lb), _shift(rb)))
            return stax.DotGeneral(lhs=jnp.asarray(np.asarray(kw["lhs"])), dimension_numbers=dn)
        dn = ((_shift(lc), tuple(rc)), (_shift(lb), tuple(rb)))
        return stax.DotGeneral(rhs=jnp.asarray(np.asarray(kw["rhs"])), dimension_numbers=dn)
    if name == "ImageResize":
        kw["shape"] = (-1,) + tuple(kw["shape"]) + (-1,)
        return stax.ImageResize(**kw)
    if name == "LayerNorm" and "axis" in kw:
        kw["axis"] = tuple(kw["axis"]) if isinstance(kw["axis"], list) else kw["axis"]
    for k in ("filter_shape", "strides", "window_shape"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return getattr(stax, name)(**kw)


def _last(x):
    """(N, C, *S) -> (N, *S, C)."""
    return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


_KEPT = {}   # case -> the jitted call of the last request that asked to keep it


def run(req):
    if req.get("again"):   # one more timed call of a kept case (interleaved timing)
        once = _KEPT[req["case"]]
        t0 = time.perf_counter()
        once()
        t = time.perf_counter() - t0
        return dict(case=req["case"], time_s=round(t, 4), min_s=round(t, 4),
                    times_s=[round(t, 4)], warmup_s=0.0, jax=jax.__version__,
                    x64=bool(jax.config.jax_enable_x64))
    _KEPT.clear()
    _, _, kernel_fn = stax.serial(*[_layer(n, kw) for n, kw in req["spec"]])
    data = np.load(req["inputs"])
    dt = np.float64 if ARGS.dtype == "float64" else np.float32
    x1 = jnp.asarray(_last(data["x1"]).astype(dt))
    x2 = None if req["self"] else jnp.asarray(_last(data["x2"]).astype(dt))
    call = dict(req.get("call") or {})
    if "p1" in data.files:
        p1 = jnp.asarray(data["p1"].astype(dt))
        p2 = p1 if req["self"] else jnp.asarray(data["p2"].astype(dt))
        call["pattern"] = (p1, p2)
    kfn = jax.jit(kernel_fn, static_argnames=("get", "mask_constant"))

    def once():
        k = kfn(x1, x2, get=("nngp", "ntk"), **call)
        k.nngp.block_until_ready()
        k.ntk.block_until_ready()
        return k

    t0 = time.perf_counter()
    k = once()
    warm = time.perf_counter() - t0
    np.savez(req["out"], nngp=np.asarray(k.nngp), ntk=np.asarray(k.ntk))
    del k
    times = []
    while len(times) < req["repeats"]:
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
        if sum(times) > req["budget_s"]:
            break
    if req.get("keep"):
        _KEPT[req["case"]] = once
    s = sorted(times) or [float("nan")]
    return dict(case=req["case"], time_s=round(s[len(s) // 2], 4), min_s=round(s[0], 4),
                times_s=[round(t, 4) for t in times], warmup_s=round(warm, 4),
                jax=jax.__version__, x64=bool(jax.config.jax_enable_x64))


def main():
    print(json.dumps(dict(ready=True, jax=jax.__version__)), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        try:
            res = run(req)
        except Exception as e:  # report, keep serving the next case
            res = dict(case=req.get("case"), error=f"{type(e).__name__}: {str(e)[:500]}")
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
