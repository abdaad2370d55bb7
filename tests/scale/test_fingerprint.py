"""Store fingerprints hash what determines the numbers (code, constants, closure values,
parameters), not a repr: a store computed for tanh is never returned for sin."""
import functools
import threading

import numpy as np
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.scale._fingerprint import UnfingerprintableError, fingerprint
from tests.scale import _kernels
from tests.scale._kernels import data

SCALE = 1.0


def scaled_linear(xa, xb):
    return SCALE * (xa @ xb.T)


def make_scaled(a):
    return lambda xa, xb: a * (xa @ xb.T)


def _resume(fn_or_arch, x, path, **kw):
    return ntkit.compute_kernel(fn_or_arch, x, store=str(path), tile=3, progress=False, **kw)


def test_elementwise_lambdas_tanh_vs_sin_refused(tmp_path):
    x = data(7, 2)
    tanh = nl.serial(nl.Dense(4), nl.Elementwise(lambda u: torch.tanh(u), deg=8), nl.Dense(1))
    sin = nl.serial(nl.Dense(4), nl.Elementwise(lambda u: torch.sin(u), deg=8), nl.Dense(1))
    assert repr(tanh) == repr(sin)                            # what used to be fingerprinted
    p = tmp_path / "k.zarr"
    h = _resume(tanh, x, p, get="nngp")
    with pytest.raises(ValueError, match="function: stored"):
        _resume(sin, x, p, get="nngp")
    # builtins by qualified name
    p2 = tmp_path / "b.zarr"
    _resume(nl.serial(nl.Dense(4), nl.Elementwise(torch.tanh, deg=8)), x, p2, get="nngp")
    with pytest.raises(ValueError, match="function: stored"):
        _resume(nl.serial(nl.Dense(4), nl.Elementwise(torch.sin, deg=8)), x, p2, get="nngp")
    # the same computation, written again, resumes (nothing recomputed, same numbers)
    again = nl.serial(nl.Dense(4), nl.Elementwise(lambda u: torch.tanh(u), deg=8), nl.Dense(1))
    assert torch.equal(_resume(again, x, p, get="nngp").load("nngp"), h.load("nngp"))


def test_closures_and_globals_refused_when_different(tmp_path, monkeypatch):
    x = data(8, 3)
    p = tmp_path / "c.zarr"
    h = _resume(make_scaled(2.0), x, p)
    torch.testing.assert_close(h.load("kernel"), 2.0 * torch.from_numpy(x @ x.T))
    with pytest.raises(ValueError, match="function: stored"):
        _resume(make_scaled(3.0), x, p)
    assert _resume(make_scaled(2.0), x, p).status().complete      # same closure value
    # a module-level constant the function reads is part of it
    p2 = tmp_path / "g.zarr"
    _resume(scaled_linear, x, p2)
    monkeypatch.setitem(scaled_linear.__globals__, "SCALE", 5.0)
    with pytest.raises(ValueError, match="function: stored"):
        _resume(scaled_linear, x, p2)
    # a closed-over tensor by value
    w1, w2 = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    w2[1] = 1.0 + 2 ** -40
    def f(w):
        return lambda a, b: (a * w) @ b.T

    assert fingerprint(f(w1)) != fingerprint(f(w2))
    assert fingerprint(f(w1)) == fingerprint(f(w1.clone()))


def test_fingerprint_distinguishes_what_changes_the_numbers():
    lin = torch.nn.Linear(3, 2)
    lin2 = torch.nn.Linear(3, 2)
    objs = [torch.tanh, torch.sin, np.sin, np.cos, torch.nn.functional.gelu,
            lambda u: torch.tanh(u), lambda u: torch.sin(u), lambda u: torch.tanh(u) * 2.0,
            lambda u: (lambda v: v * 2.0)(u), lambda u: (lambda v: v * 3.0)(u),
            functools.partial(torch.clamp, min=0.0), functools.partial(torch.clamp, min=1.0),
            lin, lin2, make_scaled(1.0), make_scaled(1), "abc".upper,
            nl.Elementwise(torch.tanh), nl.Elementwise(torch.tanh, deg=64),
            nl.serial(nl.Dense(3), nl.Relu()), nl.serial(nl.Dense(3, W_std=1.1), nl.Relu())]
    fps = [fingerprint(o) for o in objs]
    assert len(set(fps)) == len(fps)
    # deterministic, and equal for equal content (a re-created lambda, a copied module)
    assert fingerprint(lambda u: torch.tanh(u)) == fps[5]
    lin3 = torch.nn.Linear(3, 2)
    lin3.load_state_dict(lin.state_dict())
    assert fingerprint(lin3) == fingerprint(lin)


def test_unfingerprintable_function_needs_a_name_or_overwrite(tmp_path):
    lock = threading.Lock()

    def with_lock(a, b):
        with lock:
            return a @ b.T
    with pytest.raises(UnfingerprintableError):
        fingerprint(with_lock)
    x = data(5, 2)
    p = tmp_path / "u.zarr"
    with pytest.raises(ValueError, match="module-level function.*overwrite=True"):
        _resume(with_lock, x, p)
    assert not p.exists()                                     # refused before touching disk
    h = _resume(with_lock, x, p, overwrite=True)              # explicit: recompute
    assert h.status().complete
    with pytest.raises(ValueError, match="overwrite=True"):   # ... and it cannot be resumed
        _resume(with_lock, x, p)
    assert ntkit.compute_kernel(with_lock, x, store=None, progress=False).status().complete


def test_dtype_change_reported_as_dtype_not_data(tmp_path):
    x = data(6, 2)
    p = tmp_path / "d.zarr"
    _resume(_kernels.slow_rbf, x, p)
    with pytest.raises(ValueError) as e:
        _resume(_kernels.slow_rbf, x, p, dtype=torch.float32)
    msg = str(e.value)
    assert "dtype: stored 'float64', now 'float32'" in msg
    assert "x1:" not in msg and "function:" not in msg
    # float32 inputs that equal the float64 ones are the same data
    x32 = x.astype(np.float32)
    p2 = tmp_path / "e.zarr"
    _resume(_kernels.slow_rbf, x32.astype(np.float64), p2)
    assert _resume(_kernels.slow_rbf, x32, p2).status().complete
