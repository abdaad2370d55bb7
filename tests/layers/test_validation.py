"""Bad input gets a clear error naming the argument."""
import numpy as np
import pytest
import torch

from ntkit import layers as nl

ARCH = nl.serial(nl.Dense(8), nl.Relu(), nl.Dense(1))


def test_accepts_numpy_and_lists():
    x = np.random.default_rng(0).normal(size=(4, 3))
    k = ARCH.kernel(x, get="nngp")
    assert k.shape == (4, 4) and k.dtype == torch.float64
    assert ARCH.kernel(x.tolist(), get="ntk").shape == (4, 4)


@pytest.mark.parametrize("bad, match", [
    (torch.ones(3), "at least 2 dims"),
    (torch.tensor([[1.0, float("nan")]]), "NaN/Inf"),
    (torch.tensor([[1.0, float("inf")]]), "NaN/Inf"),
    ("abc", "numeric"),
    (np.array([["a", "b"]]), "numeric"),
    ({"a": 1}, "torch.Tensor or numpy"),
])
def test_bad_x1(bad, match):
    with pytest.raises((ValueError, TypeError), match=match) as e:
        ARCH.kernel(bad)
    assert "x1" in str(e.value)


def test_mismatched_feature_dims():
    with pytest.raises(ValueError, match="x2.*does not match"):
        ARCH.kernel(torch.ones(2, 3), torch.ones(2, 4))


def test_unknown_get_key():
    with pytest.raises(ValueError, match="`get` has unknown key 'ntkk'"):
        ARCH.kernel(torch.ones(2, 3), get="ntkk")
    with pytest.raises(ValueError, match="`get` is empty"):
        ARCH.kernel(torch.ones(2, 3), get=())


@pytest.mark.parametrize("kw, match", [
    (dict(out_dim=4, W_std=0.0), "W_std"), (dict(out_dim=4, W_std=-1.0), "W_std"),
    (dict(out_dim=4, b_std=-0.1), "b_std"), (dict(out_dim=0), "out_dim"),
    (dict(out_dim=4, parameterization="mup"), "parameterization"),
])
def test_bad_dense(kw, match):
    with pytest.raises(ValueError, match=match):
        nl.Dense(**kw)


def test_bad_structure():
    with pytest.raises(ValueError, match="Gaussian pre-activations"):
        nl.Relu().kernel(torch.ones(2, 3))
    with pytest.raises(ValueError, match="FanOut"):
        nl.serial(nl.Dense(4), nl.parallel(nl.Relu(), nl.Relu())).kernel(torch.ones(2, 3))
    with pytest.raises(ValueError, match="several branches"):
        nl.serial(nl.Dense(4), nl.FanOut(2)).kernel(torch.ones(2, 3))
    with pytest.raises(TypeError, match="ntkit layers"):
        nl.serial(nl.Dense(4), torch.nn.ReLU())
    with pytest.raises(TypeError, match="dtype"):
        ARCH.kernel(torch.ones(2, 3), dtype=torch.int64)


def test_memory_budget_plan_errors_say_what_fits():
    with pytest.raises(MemoryError, match="memory_budget"):
        ARCH.kernel(torch.ones(100, 3), memory_budget=1000)
    k = ARCH.kernel(torch.randn(300, 3), memory_budget=2_000_000)  # forces tiles
    assert k.nngp.shape == (300, 300)


def test_budget_tiling_matches_untiled():
    x = torch.randn(200, 5, dtype=torch.float64)
    a = ARCH.kernel(x)
    b = ARCH.kernel(x, memory_budget=1_200_000)
    torch.testing.assert_close(a.nngp, b.nngp, rtol=0, atol=1e-13)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=0, atol=1e-13)


def test_get_only_computes_what_is_asked():
    k = ARCH.kernel(torch.randn(3, 2), get=("nngp",))
    assert k.ntk is None and k.nngp.shape == (3, 3)
    k = ARCH.kernel(torch.randn(3, 2), get=("ntk",))
    assert k.nngp is None and k.ntk.shape == (3, 3)


def test_module_bad_args():
    with pytest.raises(ValueError, match="in_shape"):
        ARCH.module(in_shape=0)
    with pytest.raises(ValueError, match="width"):
        ARCH.module(in_shape=3, width=-2)
