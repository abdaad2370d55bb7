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


# ---- issue 13 item 9: inputs that used to be accepted silently -------------------------------

def test_fully_connected_arch_on_images_is_refused():
    """Dense acts on the channel axis: on (n, C, H, W) an FC architecture produced an
    (n, n, H, W) array of per-pixel kernels. Refused, pointing at Flatten."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Flatten.*\(n1, n2\)|flatten\(1\)") as e:
        ARCH.kernel(x)
    assert "(3, 4, 4)" not in str(e.value) and "(2, 4, 4)" in str(e.value)
    flat = nl.serial(nl.Flatten(), ARCH).kernel(x)        # the suggested fixes agree
    torch.testing.assert_close(flat.ntk, ARCH.kernel(x.flatten(1)).ntk, rtol=1e-13, atol=0)
    conv = nl.serial(nl.Conv(4, 3, padding="SAME"), nl.Relu(), nl.Dense(1))  # per-pixel: kept
    assert conv.kernel(x, get="nngp").shape == (3, 3, 4, 4)


@pytest.mark.parametrize("n1, n2", [(0, None), (0, 4), (4, 0), (0, 0)])
def test_zero_rows_give_empty_kernels(n1, n2):
    x1 = torch.randn(n1, 3, dtype=torch.float64)
    x2 = None if n2 is None else torch.randn(n2, 3, dtype=torch.float64)
    k = ARCH.kernel(x1, x2)
    shape = (n1, n1 if n2 is None else n2)
    assert k.nngp.shape == shape and k.ntk.shape == shape
    assert ARCH.kernel(x1, x2, get="ntk").shape == shape
    img = nl.serial(nl.Conv(4, 3), nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))
    assert img.kernel(torch.zeros(0, 2, 5, 5), get="nngp").shape == (0, 0)
    with pytest.raises(ValueError, match="Flatten"):  # the architecture is still checked
        ARCH.kernel(torch.zeros(0, 2, 5, 5))


@pytest.mark.parametrize("shape", [(3, 0), (3, 0, 4, 4), (3, 2, 0, 4)])
def test_zero_features_are_refused(shape):
    arch = ARCH if len(shape) == 2 else nl.serial(nl.Conv(4, 1), nl.Relu(), nl.Flatten(),
                                                  nl.Dense(1))
    with pytest.raises(ValueError, match="x1.*no features"):
        arch.kernel(torch.zeros(shape))


@pytest.mark.parametrize("make, name", [
    (lambda: nl.LeakyRelu(float("nan")), "alpha"),
    (lambda: nl.LeakyRelu("0.1"), "alpha"),
    (lambda: nl.ABRelu(float("inf"), 1), "`a`"),
    (lambda: nl.ABRelu(0, float("-inf")), "`b`"),
    (lambda: nl.Erf(a=float("nan")), "`a`"),
    (lambda: nl.Sin(b="2"), "`b`"),
    (lambda: nl.Exp(b=float("inf")), "`b`"),
    (lambda: nl.Gaussian(a=True), "`a`"),
    (lambda: nl.Rbf(gamma=float("nan")), "gamma"),
    (lambda: nl.Dense(4, W_std="1"), "W_std"),
    (lambda: nl.Dense(4, W_std=True), "W_std"),
    (lambda: nl.Dense(4, W_std=1e200), "W_std"),
    (lambda: nl.Dense(4, b_std=float("nan")), "b_std"),
    (lambda: nl.Dense(4, b_std=1e160), "b_std"),
    (lambda: nl.Dense(4, W_std=1e-200), "W_std"),
    (lambda: nl.Conv(4, 3, W_std="2"), "W_std"),
    (lambda: nl.Conv(4, 3, b_std=1e300), "b_std"),
    (lambda: nl.Gelu(approximate="tanh"), "approximate"),
    (lambda: nl.ABRelu(1e-200, 0.0), "`a`"),
    (lambda: nl.Erf(b=1e170), "`b`"),
])
def test_bad_hyperparameters_fail_at_construction(make, name):
    with pytest.raises((TypeError, ValueError), match=name):
        make()


@pytest.mark.parametrize("budget", [float("nan"), -1, 0, 0.5, float("inf"), True, "lots",
                                    "2 parsecs", [10**9], "-1GB", "nanGB"])
def test_bad_memory_budget_names_the_argument(budget):
    with pytest.raises((TypeError, ValueError), match="memory_budget"):
        ARCH.kernel(torch.randn(3, 2), memory_budget=budget)


def test_memory_budget_accepts_units():
    from ntkit._validation import parse_memory_budget
    assert parse_memory_budget("2GB") == 2 * 10**9
    assert parse_memory_budget(" 512MB ") == 512 * 10**6
    assert parse_memory_budget("1.5GiB") == 3 * 2**29
    assert parse_memory_budget("1e9") == 10**9
    assert parse_memory_budget(4096) == parse_memory_budget("4KiB") == 4096
    assert parse_memory_budget("4kB") == 4000 and parse_memory_budget(2e9) == 2 * 10**9
    assert parse_memory_budget(np.int64(10)) == 10 and parse_memory_budget(None) is None
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(ARCH.kernel(x, memory_budget="512MB").ntk, ARCH.kernel(x).ntk,
                               rtol=0, atol=0)
    with pytest.raises(MemoryError, match="memory_budget"):
        ARCH.kernel(torch.ones(100, 3), memory_budget="1kB")


def test_bad_tile():
    for tile in (0, 2.5, "3", True):
        with pytest.raises(ValueError, match="tile"):
            ARCH.kernel(torch.randn(4, 2), tile=tile)
