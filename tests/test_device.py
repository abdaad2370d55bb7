"""Device-agnostic code, tested without a GPU.

Everything ntkit computes for CUDA inputs must stay on their device: tensors it creates
carry ``device=`` (or come from ``*_like`` / ``new_*``), no per-tile ``.numpy()`` / ``.cpu()``
round trips, and the fused numba kernels (CPU only) are skipped for non-CPU tensors.

How this is checked on a CPU-only machine (:func:`on_device_only`): the inputs are real CPU
tensors while ``torch.set_default_device('meta')`` is in force, so any tensor created
without an explicit device lands on the ``meta`` device instead of the inputs' one; a
:class:`torch.overrides.TorchFunctionMode` records every torch call that returns a tensor on a
device other than the inputs' and every host copy (``Tensor.numpy`` / ``Tensor.cpu`` /
``Tensor.tolist``), with the ntkit source line that made it. The fused kernels' dispatch
predicate is shown the tensors as they would look on another device (``meta`` copies), so the
fused path runs exactly when it would run for CUDA inputs.

``bench/gpu_check.py`` compares CUDA against CPU results on a machine that has a GPU.
"""
from __future__ import annotations

import contextlib
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ntkit import _linalg
from ntkit import layers as nl
from ntkit.layers import _fused

_HOST_COPIES = {"numpy", "cpu", "tolist"}
_SRC = os.sep + os.path.join("src", "ntkit") + os.sep


def _site() -> str:
    """``file:line (function)`` of the innermost ntkit source frame on the stack (else the
    innermost frame)."""
    frames = traceback.extract_stack()[:-2]
    for fr in reversed(frames):
        if _SRC in fr.filename:
            return f"{fr.filename.split(_SRC)[-1]}:{fr.lineno} ({fr.name})"
    fr = frames[-1]
    return f"{os.path.basename(fr.filename)}:{fr.lineno} ({fr.name})"


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)


class DeviceAudit(TorchFunctionMode):
    """Records torch calls that leave ``device`` (``wrong``) or copy to the host (``host``),
    each as ``(function name, ntkit file:line (function))``. ``allow_host``: substrings of the
    sites whose host copies are part of the design (the on-disk store's reads and writes);
    ``allow_wrong``: the same for tensors deliberately made elsewhere."""

    def __init__(self, device: torch.device, allow_host=(), allow_wrong=()):
        super().__init__()
        self.device = torch.device(device)
        self.allow_host = tuple(allow_host)
        self.allow_wrong = tuple(allow_wrong)
        self.wrong: list = []
        self.host: list = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in _HOST_COPIES:
            site = _site()
            if not any(a in site for a in self.allow_host):
                self.host.append((name, site))
        out = func(*args, **kwargs)
        for t in _tensors(out):
            if t.device != self.device:
                site = _site()
                if not any(a in site for a in self.allow_wrong):
                    self.wrong.append((f"{name} -> {t.device}", site))
                break
        return out

    def problems(self) -> str:
        lines = [f"  {what} at {site}" for what, site in dict.fromkeys(self.wrong)]
        lines += [f"  host copy .{what}() at {site}" for what, site in dict.fromkeys(self.host)]
        return "\n".join(lines)


def _clear_caches():
    """Empty ntkit's per-process caches of device tensors (all are keyed by device, so on a
    GPU they would be filled for it: here they must be refilled under the audit)."""
    from ntkit import _linalg
    from ntkit.layers import _ops, attention
    _ops._HASH_W.clear()
    attention._pos_emb_cov_cached.cache_clear()
    attention._pos_emb_cov_on_cached.cache_clear()
    _linalg.clear_cache()


# The CPU-only fast paths and the predicates that choose them for given tensors: the audit
# asks each predicate about the tensors as they would be on another device.
_CPU_ONLY_DISPATCH = ((_fused, "usable"), (_linalg, "_scipy_ok"))


@contextlib.contextmanager
def on_device_only(monkeypatch, device="cpu", allow_host=(), allow_wrong=()):
    """Run the block as if its CPU inputs were on an accelerator (see the module docstring);
    fail naming every ntkit line that created a tensor elsewhere or copied to the host."""
    audit = DeviceAudit(torch.device(device), allow_host, allow_wrong)

    def elsewhere(real):
        def predicate(*ts):  # the CPU-only path's choice for the same tensors off the CPU
            audit.paused = True
            try:
                return real(*[None if t is None else torch.empty_like(t, device="meta")
                              for t in ts])
            finally:
                audit.paused = False
        return predicate

    for mod, name in _CPU_ONLY_DISPATCH:
        monkeypatch.setattr(mod, name, elsewhere(getattr(mod, name)))
    _clear_caches()  # so that what they hold is made again, under the audit
    error = None
    with torch.device("meta"), audit:
        try:
            yield audit
        except Exception as e:  # a mixed-device op raising: report where the stray was made
            error = e
    msg = audit.problems()
    if msg:
        pytest.fail(f"not device-agnostic:\n{msg}" + (f"\n(then: {error!r})" if error else ""))
    if error is not None:
        raise error


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _kernel_ok(monkeypatch, arch, x1, x2=None, allow_host=(), **kw):
    """The kernel (all tiles of 2 examples, and in one tile) is computed on the inputs' device
    and equals the plain CPU computation (``allow_host``: host syncs allowed by design)."""
    got = []
    for tile in (2, None):
        with on_device_only(monkeypatch, allow_host=allow_host):
            got.append(arch.kernel(x1, x2, get=("nngp", "ntk"), dtype=torch.float64, tile=tile,
                                   **kw))
    want = arch.kernel(x1, x2, get=("nngp", "ntk"), dtype=torch.float64, **kw)
    for k in got:
        for key in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(k, key), getattr(want, key), rtol=1e-12,
                                       atol=1e-12)


# ---- the audit itself can fail ---------------------------------------------------------------
def test_audit_catches_a_tensor_made_without_device(monkeypatch):
    x = _x(3)
    with pytest.raises(pytest.fail.Exception, match=r"zeros -> meta at test_device.py"):
        with on_device_only(monkeypatch):
            x + torch.zeros(3)
    with pytest.raises(pytest.fail.Exception, match=r"host copy .numpy\(\)"):
        with on_device_only(monkeypatch):
            x.numpy()
    with on_device_only(monkeypatch):      # the right way passes
        x + torch.zeros(3, device=x.device) + torch.zeros_like(x) + x.new_ones(3)


def test_cpu_only_paths_are_skipped_off_the_cpu():
    t = _x(4, 4)
    meta = torch.empty_like(t, device="meta")
    assert not _fused.usable(meta) and not _fused.usable(t, meta)
    assert _linalg._scipy_ok(meta) is None and _linalg._scipy_ok(t, meta) is None
    if _fused.enabled():
        assert _fused.usable(t)
    if _linalg._scipy_linalg() is not None:
        assert _linalg._scipy_ok(t) is not None


# ---- families --------------------------------------------------------------------------------
def test_fc_kernels_stay_on_device(monkeypatch):
    x1 = _x(5, 3)
    x1[3] = x1[1]                       # duplicate rows exercise the dedupe paths
    x2 = _x(4, 3, seed=1)
    arch = nl.serial(nl.Dense(8, W_std=1.5, b_std=0.1), nl.Relu(), nl.Dense(8), nl.Erf(),
                     nl.LayerNorm(), nl.Dense(1, b_std=0.2))
    _kernel_ok(monkeypatch, arch, x1)
    _kernel_ok(monkeypatch, arch, x1, x2)


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_conv_pool_kernels_stay_on_device(monkeypatch, readout):
    x1 = _x(3, 2, 4, 4)
    x2 = _x(2, 2, 4, 4, seed=1)
    head = nl.Flatten() if readout == "flatten" else nl.GlobalAvgPool()
    arch = nl.serial(nl.Conv(4, (3, 3), padding="SAME", b_std=0.1), nl.Relu(),
                     nl.AvgPool((2, 2), padding="SAME"), nl.Conv(4, (2, 2), padding="CIRCULAR"),
                     nl.Erf(), nl.LayerNorm(axis=(1, 2, 3)), head, nl.Dense(1))
    _kernel_ok(monkeypatch, arch, x1)
    _kernel_ok(monkeypatch, arch, x1, x2)


def _decay(d):
    return torch.exp(-d / 2)


def test_attention_kernels_stay_on_device(monkeypatch):
    x1 = _x(3, 2, 5)
    x2 = _x(2, 2, 5, seed=1)
    for emb in (dict(pos_emb_type="CONCAT", n_chan_pos_emb=2, pos_emb_decay_fn=_decay),
                dict(pos_emb_type="SUM", linear_scaling=False, attention_mechanism="IDENTITY")):
        arch = nl.serial(nl.Conv(4, (1,)), nl.GlobalSelfAttention(4, 4, 4, 2, **emb),
                         nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))
        _kernel_ok(monkeypatch, arch, x1)
        _kernel_ok(monkeypatch, arch, x1, x2)


def test_graph_kernels_stay_on_device(monkeypatch):
    x = _x(3, 2, 4)
    a = (_x(3, 4, 4, seed=2) > 0).double() + torch.eye(4, dtype=torch.float64)
    arch = nl.serial(nl.Dense(4), nl.Relu(), nl.Aggregate(), nl.Dense(4), nl.Relu(),
                     nl.GlobalSumPool(), nl.Dense(1))
    _kernel_ok(monkeypatch, arch, x, pattern=a)


def test_sparse_graph_and_masked_kernels_stay_on_device(monkeypatch):
    x = _x(3, 2, 4)
    arcs = torch.tensor([[[0, 1], [1, 2], [2, 3], [-1, -1]]] * 3)      # (n, E, 2), one padding arc
    arch = nl.serial(nl.Dense(4), nl.Relu(), nl.Aggregate(implementation="SPARSE"),
                     nl.GlobalSumPool(), nl.Dense(1))
    _kernel_ok(monkeypatch, arch, x, pattern=arcs)
    xm = _x(3, 2, 5)
    xm[0, :, 3:] = -1e9                                             # padded positions
    arch = nl.serial(nl.Conv(4, (2,), padding="SAME"), nl.Relu(),
                     nl.GlobalSelfAttention(4, 4, 4, 1), nl.GlobalAvgPool(), nl.Dense(1))
    _kernel_ok(monkeypatch, arch, xm, mask_constant=-1e9)


@pytest.mark.parametrize("layer", [
    nl.ImageResize((2, 6), "linear"), nl.ImageResize((2, 6), "nearest"),
    nl.ConvTranspose(3, (2, 2), 2, "SAME", b_std=0.1), nl.ConvLocal(3, (2, 2), b_std=0.1),
    nl.DotGeneral(rhs=torch.tensor([1.0, -1.0, 0.5]),
                  dimension_numbers=(((3,), (0,)), ((), ()))),
    nl.SumPool((2, 2), padding="SAME"), nl.Sin(), nl.Gelu(), nl.LeakyRelu(0.1), nl.Abs(),
    nl.Sign(), nl.Gaussian(), nl.Gabor(), nl.RectifiedMonomial(2), nl.Polynomial([0.1, 1.0, 0.5]),
    nl.Elementwise(torch.tanh, deg=8),
    nl.Elementwise(torch.tanh),
], ids=["resize_linear", "resize_nearest", "conv_transpose", "conv_local", "dot_general",
        "sum_pool", "sin", "gelu", "leaky_relu", "abs", "sign", "gaussian", "gabor",
        "rect_monomial", "polynomial", "elementwise_deg", "elementwise_auto"])
def test_other_layers_stay_on_device(monkeypatch, layer):
    x1 = _x(3, 2, 3, 3)
    x2 = _x(2, 2, 3, 3, seed=1)
    arch = nl.serial(nl.Conv(3, (2, 2), padding="SAME"), nl.Relu(), nl.Conv(3, (1, 1)), layer,
                     nl.Flatten(), nl.Dense(1))
    # adaptive Elementwise quadrature: the variance buckets present (a few ints) are read on
    # the host to pick each bucket's rule (planned once per bucket, on the host, and cached)
    allow = ("(_by_bucket)",) if isinstance(layer, nl.Elementwise) and layer.deg is None else ()
    _kernel_ok(monkeypatch, arch, x1, allow_host=allow)
    _kernel_ok(monkeypatch, arch, x1, x2, allow_host=allow)


# ---- beyond the kernels ----------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vp", "structured"])
def test_empirical_ntk_stays_on_device(monkeypatch, implementation):
    from ntkit import empirical_ntk
    arch = nl.serial(nl.Conv(3, (2, 2), padding="SAME", b_std=0.1), nl.Relu(), nl.Flatten(),
                     nl.Dense(4, b_std=0.1), nl.Erf(), nl.Dense(2))
    with on_device_only(monkeypatch):   # parameters drawn where the module's generator is
        net = arch.module((2, 3, 3), seed=0, dtype=torch.float64)
        att = nl.serial(nl.GlobalSelfAttention(2, 2, 2, 1, pos_emb_type="SUM",
                                                pos_emb_decay_fn=_decay),
                        nl.ConvTranspose(2, (2,), b_std=0.1), nl.ConvLocal(2, (2,), b_std=0.1),
                        nl.Dropout(0.5), nl.Flatten(), nl.Dense(1)).module((2, 4), seed=0)
    assert all(p.device.type == "cpu" for p in [*net.parameters(), *att.parameters()])
    x1, x2 = _x(3, 2, 3, 3), _x(2, 2, 3, 3, seed=1)
    # (empirical/_common.py sizes the dtype with a throw-away torch.empty((), dtype): harmless)
    with on_device_only(monkeypatch, allow_wrong=("_common.py:170 (itemsize)",)):
        got = [empirical_ntk(net, x1, x2, implementation=implementation),
               empirical_ntk(net, x1, implementation=implementation, output="full")]
    want = [empirical_ntk(net, x1, x2, implementation="jacobian"),
            empirical_ntk(net, x1, implementation="jacobian", output="full")]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_predictions_stay_on_device(monkeypatch):
    from ntkit import predict
    arch = nl.serial(nl.Dense(8, b_std=0.1), nl.Relu(), nl.Dense(1))
    x_tr, x_te = _x(6, 3), _x(3, 3, seed=1)
    y = _x(6, 2, seed=2)
    t = torch.tensor([0.5, 5.0], dtype=torch.float64)
    k_tt = arch.kernel(x_tr, get=("nngp", "ntk"), dtype=torch.float64)
    k_te = arch.kernel(x_te, x_tr, get=("nngp", "ntk"), dtype=torch.float64)
    k_ee = arch.kernel(x_te, get="nngp", dtype=torch.float64)
    f_tr, f_te = torch.zeros_like(y), torch.zeros(3, 2, dtype=torch.float64)

    def run():
        pf = predict.gradient_descent_mse_ensemble(arch, x_tr, y, diag_reg=1e-3)
        ens = pf(t=t, x_test=x_te, get="ntk", compute_cov=True)
        ens_inf = pf(x_test=x_te, get=("nngp", "ntk"), compute_cov=True)
        gd = predict.gradient_descent_mse(k_tt.ntk, y, diag_reg=1e-3)(t, f_tr, f_te, k_te.ntk)
        gp = predict.gp_inference(k_tt, y, diag_reg=1e-3)(("nngp", "ntk"), k_te, k_ee)
        return ens, ens_inf, gd, gp

    with on_device_only(monkeypatch, allow_host=("(_times)",)):  # the few times: host-side
        got = run()
    want = run()
    torch.testing.assert_close(got[0].mean, want[0].mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0].covariance, want[0].covariance, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1].ntk.covariance, want[1].ntk.covariance, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(got[2][1], want[2][1], rtol=1e-12, atol=1e-12)
    for key in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got[3], key).covariance,
                                   getattr(want[3], key).covariance, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["rf", "jacobian"])
def test_features_stay_on_device(monkeypatch, method):
    from ntkit import features
    arch = nl.serial(nl.Conv(3, (2, 2), padding="SAME"), nl.Relu(), nl.GlobalAvgPool(),
                     nl.Dense(1))
    x = _x(4, 2, 3, 3)
    with on_device_only(monkeypatch):
        got = features.features(arch, x, dim=16, get=("nngp", "ntk"), method=method,
                                out_dim=32 if method == "jacobian" else None,
                                dtype=torch.float64, seed=3)
    want = features.features(arch, x, dim=16, get=("nngp", "ntk"), method=method,
                             out_dim=32 if method == "jacobian" else None,
                             dtype=torch.float64, seed=3)
    for key in ("nngp", "ntk"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)


def test_store_and_solve_stay_on_device(monkeypatch):
    """compute_kernel computes each tile on the inputs' device (the store itself is host memory:
    its reads and writes are the host copies by design); solve works where K is."""
    from ntkit import scale
    arch = nl.serial(nl.Dense(8, b_std=0.1), nl.Relu(), nl.Dense(1))
    x = _x(7, 3)
    y = _x(7, 2, seed=1)
    xm = _x(4, 2, 5)
    xm[1, :, 3:] = -1e9                                             # padded positions
    host_io = ("scale/_compute.py", "scale/_store.py", "scale/_fingerprint.py")
    with on_device_only(monkeypatch, allow_host=host_io):
        h = scale.compute_kernel(arch, x, get="ntk", store=None, tile=3, progress=False,
                                 executor=None)
        k = h.load("ntk")
        a_cg = scale.solve(k, y, method="cg", diag_reg=1e-3, tol=1e-10, progress=False,
                           preconditioner="nystrom", rank=3)
        a_pc = scale.solve(k, y, method="cg", diag_reg=1e-3, tol=1e-10, progress=False, rank=3)
        cnn = nl.serial(nl.Conv(3, (2,), padding="SAME"), nl.Relu(), nl.GlobalAvgPool(),
                        nl.Dense(1))
        km = scale.compute_kernel(cnn, xm, get="ntk", store=None, tile=3, progress=False,
                                  mask_constant=-1e9).load("ntk")
    torch.testing.assert_close(km, cnn.kernel(xm, get="ntk", dtype=torch.float64,
                                              mask_constant=-1e9), rtol=1e-12, atol=1e-12)
    want = arch.kernel(x, get="ntk", dtype=torch.float64)
    torch.testing.assert_close(k, want, rtol=1e-12, atol=1e-12)
    a = scale.solve(want, y, method="cholesky", diag_reg=1e-3, progress=False)
    torch.testing.assert_close(a_cg, a, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a_pc, a, rtol=1e-7, atol=1e-9)


# ---- memory budget and device plumbing --------------------------------------------------------
def test_available_memory_reads_the_device(monkeypatch):
    from ntkit import _system
    calls = []

    def fake_mem_get_info(device=None):
        calls.append(device)
        return 123 << 20, 456 << 20

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_mem_get_info)
    assert _system.available_memory(torch.device("cuda", 1)) == 123 << 20
    assert _system.available_memory("cuda") == 123 << 20
    assert calls == [torch.device("cuda", 1), torch.device("cuda")]
    ram = _system.available_memory()
    assert ram > 0 and _system.available_memory(_x(2)) == _system.available_memory("cpu") > 0
    assert not calls[2:]                                    # the CPU never asks CUDA


def test_default_budgets_come_from_the_inputs_device(monkeypatch):
    """Tiles live on the inputs' device, so the default budget is that device's memory."""
    from ntkit.layers import _tiling
    from ntkit.scale import _compute, _solve
    seen = []
    real = _tiling.available_memory

    def spy(device=None):
        seen.append(None if device is None else torch.device(device).type)
        return real(device)

    for module in (_tiling, _compute, _solve):
        monkeypatch.setattr(module, "available_memory", spy)
    arch = nl.serial(nl.Dense(4), nl.Relu(), nl.Dense(1))
    x = _x(3, 2)
    arch.kernel(x, get="ntk")
    _solve.solve(arch.kernel(x, get="ntk", dtype=torch.float64), _x(3, seed=1), progress=False)
    _compute.compute_kernel(arch, x, get="ntk", store=None, progress=False)
    assert len(seen) >= 3 and set(seen) == {"cpu"}      # every default asked with the device


def test_inputs_on_two_devices_are_refused():
    from ntkit.scale._compute import _input_device
    arch = nl.serial(nl.Dense(4), nl.Relu(), nl.Dense(1))
    x, elsewhere = _x(3, 2), torch.empty(2, 2, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="x1.* is on cpu but .x2. on meta"):
        arch.kernel(x, elsewhere)
    with pytest.raises(ValueError, match="different devices"):
        _input_device(x, elsewhere)
    assert _input_device(x, None) is None and _input_device(x.numpy(), None) is None
    assert _input_device(elsewhere, None) == "meta"
