"""The seams' contracts (ntkit._typing), one validation module (ntkit._validation), one place
for system resources (ntkit._system), and Layer.walk()."""
import numpy as np
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit._system import available_cores, available_memory
from ntkit._typing import HasKernel, KernelFunction, as_kernel_fn
from ntkit._validation import as_array, check_model, check_momentum, parse_memory_budget


# ---- as_kernel_fn: one adapter for every kernel source ----------------------------------
def test_as_kernel_fn_accepts_architectures_objects_and_functions(randn64, small_fc_arch):
    from ntkit.estimators import ReluNTKFix
    x1, x2 = randn64(4, 3), randn64(3, 3, seed=1)
    exact = small_fc_arch.kernel(x1, x2)
    fn = as_kernel_fn(small_fc_arch)
    got = fn(x1, x2, ("nngp", "ntk"))
    assert set(got) == {"nngp", "ntk"}
    torch.testing.assert_close(got["ntk"], exact.ntk, rtol=0, atol=0)
    # a neural-tangents style kernel_fn returning a dict, with call-time kwargs passed on
    seen = {}

    def kernel_fn(a, b, get, scale=1.0):
        seen["get"] = get
        k = small_fc_arch.kernel(a, b)
        return {"nngp": scale * k.nngp, "ntk": scale * k.ntk}
    got = as_kernel_fn(kernel_fn, scale=2.0)(x1, x2, ("ntk",))
    assert seen["get"] == "ntk"                              # one key: passed as a string
    torch.testing.assert_close(got["ntk"], 2 * exact.ntk, rtol=0, atol=0)
    assert isinstance(small_fc_arch, HasKernel) and isinstance(kernel_fn, KernelFunction)
    # any object with .kernel (ReluNTKFix): a bare matrix answers a single key
    r = ReluNTKFix(2, 1)
    got = as_kernel_fn(r, "arch")(x1, x2, ("ntk",))["ntk"]
    torch.testing.assert_close(got, r.kernel(x1, x2, get="ntk"))


def test_as_kernel_fn_refuses_what_it_cannot_answer(randn64):
    x = randn64(3, 2)
    with pytest.raises(TypeError, match="`arch` must be an architecture"):
        as_kernel_fn(3, "arch")
    with pytest.raises(TypeError, match="single matrix"):
        as_kernel_fn(lambda a, b, get: a @ a.T)(x, None, ("nngp", "ntk"))
    with pytest.raises(ValueError, match="no 'ntk' kernel"):
        as_kernel_fn(lambda a, b, get: {"nngp": a @ a.T})(x, None, ("nngp", "ntk"))
    with pytest.raises(ValueError, match=r"kernel_fn\(\.\.\.\)\.ntk` contains NaN/Inf"):
        as_kernel_fn(lambda a, b, get: a @ a.T * float("nan"))(x, None, ("ntk",))


def test_estimators_use_the_adapter_for_any_kernel_source(randn64):
    pytest.importorskip("sklearn")
    from ntkit.estimators import kernel_callable

    class Scaled:                       # any object with .kernel(x1, x2, get) returning a dict
        def kernel(self, x1, x2=None, get=("nngp", "ntk")):
            x2 = x1 if x2 is None else x2
            return {"ntk": 3.0 * x1 @ x2.T, "nngp": x1 @ x2.T}

    x = randn64(5, 2)
    k = kernel_callable(Scaled(), get="ntk")(x.numpy())
    np.testing.assert_allclose(k, 3.0 * (x @ x.T).numpy(), rtol=1e-15)

    class Broken:
        def kernel(self, x1, x2=None, get=("nngp", "ntk")):
            return {"nngp": x1 @ x1.T}
    with pytest.raises(ValueError, match="no 'ntk' kernel"):
        kernel_callable(Broken(), get="ntk")(x.numpy())


# ---- scale: the adapter and the memory budget convention --------------------------------
def test_compute_kernel_takes_any_kernel_source_and_budget_strings(randn64):
    pytest.importorskip("zarr")
    from ntkit.estimators import ReluNTKFix
    x = randn64(6, 3)
    r = ReluNTKFix(2, 1)
    h = ntkit.compute_kernel(r, x, get="ntk", store=None, memory_budget="64MB", tile=4,
                             progress=False, executor=None)
    np.testing.assert_allclose(np.asarray(h["ntk"][:]), r.kernel(x, get="ntk").numpy(),
                               rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="memory_budget"):
        ntkit.compute_kernel(r, x, get="ntk", store=None, memory_budget="lots",
                             progress=False)


def test_scale_solve_takes_budget_strings(randn64):
    from ntkit.scale import solve
    a = randn64(6, 6)
    K = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    y = randn64(6, seed=2)
    alpha = solve(K.numpy(), y.numpy(), memory_budget="1MB", progress=False)
    torch.testing.assert_close(torch.as_tensor(np.asarray(alpha)), torch.linalg.solve(K, y))
    with pytest.raises(ValueError, match="memory_budget"):
        solve(K.numpy(), y.numpy(), memory_budget="-1GB", progress=False)


def test_one_budget_convention_everywhere(randn64, small_fc_arch):
    x = randn64(4, 3)
    exact = small_fc_arch.kernel(x, get="ntk")
    torch.testing.assert_close(small_fc_arch.kernel(x, get="ntk", memory_budget="2GB"), exact)
    net = small_fc_arch.module(3, seed=0)
    e1 = ntkit.empirical_ntk(net, x, memory_budget="2GB")
    torch.testing.assert_close(e1, ntkit.empirical_ntk(net, x, memory_budget=2 * 10**9))
    for bad in ("2XB", 0, -5, float("nan"), True):
        with pytest.raises((TypeError, ValueError), match="memory_budget"):
            small_fc_arch.kernel(x, memory_budget=bad)
        with pytest.raises((TypeError, ValueError), match="memory_budget"):
            ntkit.empirical_ntk(net, x, memory_budget=bad)
    assert parse_memory_budget("2GB") == 2 * 10**9 and parse_memory_budget("1GiB") == 2**30


def test_cli_memory_budget_takes_the_library_sizes():
    from ntkit.cli.kernel import memory_budget_flag
    assert memory_budget_flag("2GB") == 2 * 10**9 == parse_memory_budget("2GB")
    assert memory_budget_flag("512MiB") == 512 * 2**20
    assert memory_budget_flag("4096B") == 4096                   # an explicit unit is taken
    assert memory_budget_flag("1e9") == 10**9                    # a bare number is bytes
    assert memory_budget_flag(str(2**20)) == 2**20
    for small in ("1.5", "4", "1048575"):                        # bare, below 1 MiB: no unit
        with pytest.raises(ValueError, match=f"--memory-budget {small} would be {small} bytes; "
                           f"write a unit, e.g. --memory-budget {small}GB"):
            memory_budget_flag(small)
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="--memory-budget must be a positive size"):
            memory_budget_flag(bad)
    with pytest.raises(ValueError, match="512MB or 2GiB"):
        memory_budget_flag("2 parsecs")


# ---- one validation module, one system module ------------------------------------------
def test_shared_validators():
    assert as_array([[1, 2]], "k").dtype == torch.float64
    with pytest.raises(ValueError, match="`k` contains NaN/Inf"):
        as_array([float("inf")], "k")
    with pytest.raises(TypeError, match="`k` must be a torch.Tensor"):
        as_array("abc", "k")
    net = torch.nn.Linear(2, 1)
    assert check_model(net) is net
    with pytest.raises(TypeError, match="`f` must be a torch.nn.Module"):
        check_model(lambda x: x, "f")
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        check_model(net, trainable=True)
    assert check_momentum(0.9) == 0.9 and check_momentum(0) == 0.0
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            check_momentum(bad)
    with pytest.raises(TypeError, match="momentum"):
        check_momentum("0.5")


def test_system_resources(monkeypatch):
    import os
    assert available_memory() > 0
    assert available_cores() == len(os.sched_getaffinity(0))
    from ntkit.layers import _base
    assert _base.available_memory is available_memory     # the old import path still works


# ---- Layer.walk ------------------------------------------------------------------------
def test_walk_visits_every_layer_depth_first():
    inner = nl.serial(nl.Dense(4), nl.Erf())
    arch = nl.serial(nl.Dense(8), nl.FanOut(2), nl.parallel(inner, nl.Identity()),
                     nl.FanInSum(), nl.Dense(1))
    names = [type(l).__name__ for l in arch.walk()]
    assert names == ["Serial", "Dense", "FanOut", "Parallel", "Serial", "Dense", "Erf",
                     "Identity", "FanInSum", "Dense"]
    assert arch.children()[2].children() == (inner, nl.Identity())
    assert list(nl.Relu().walk()) == [nl.Relu()] and nl.Relu().children() == ()


def test_walk_users_see_nested_layers(randn64):
    from ntkit.diagnostics import arch_parameterization
    from ntkit.layers._tiling import _is_fully_connected, _per_pass_noise
    std = nl.Dense(4, parameterization="standard")
    deep = nl.serial(nl.Dense(4), nl.FanOut(2), nl.parallel(nl.serial(std), nl.Dense(4)),
                     nl.FanInSum())
    assert arch_parameterization(deep) == "mixed"
    assert arch_parameterization(nl.serial(nl.serial(std), std)) == "standard"
    with pytest.raises(NotImplementedError, match="parameterization='standard'"):
        deep.features(randn64(3, 2), 16, method="jacobian")
    assert _is_fully_connected(deep)
    assert not _is_fully_connected(nl.serial(nl.serial(nl.Conv(2, (3, 3)))))
    assert not _per_pass_noise(deep)
