"""ntkit.settings: the switches tests and benchmarks flip, instead of private module globals."""
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.layers import _fused
from ntkit.layers._tiling import TileLimitReached


def test_override_is_scoped_and_restored_on_error():
    assert ntkit.settings.tile_limit is None and ntkit.settings.empirical_method is None
    with ntkit.settings(empirical_method="A"):
        assert ntkit.settings.empirical_method == "A"
        with ntkit.settings(empirical_method="B", tile_limit=2):
            assert ntkit.settings.as_dict() == {"tile_limit": 2, "empirical_method": "B",
                                                "selection_budget": None, "fused": None}
        assert ntkit.settings.as_dict() == {"tile_limit": None, "empirical_method": "A",
                                            "selection_budget": None, "fused": None}
    with pytest.raises(RuntimeError):
        with ntkit.settings(tile_limit=3):
            raise RuntimeError
    assert ntkit.settings.tile_limit is None


def test_bad_switches_are_refused():
    with pytest.raises(TypeError, match="unknown switch"):
        with ntkit.settings(tile_limt=1):
            pass
    with pytest.raises(ValueError, match="empirical_method"):
        with ntkit.settings(empirical_method="C"):
            pass
    with pytest.raises(ValueError, match="tile_limit"):
        with ntkit.settings(tile_limit=0):
            pass
    with pytest.raises(AttributeError, match="with ntkit.settings"):
        ntkit.settings.tile_limit = 3
    with pytest.raises(AttributeError, match="no switch"):
        _ = ntkit.settings.nope


def test_tile_limit_stops_the_kernel_after_that_many_tiles(randn64):
    arch = nl.serial(nl.Dense(8), nl.Relu(), nl.Dense(1))
    x = randn64(12, 3)
    with ntkit.settings(tile_limit=2):
        with pytest.raises(TileLimitReached) as e:
            arch.kernel(x, get="ntk", tile=4)           # 3 x 3 blocks: 6 upper-triangle tiles
    assert (e.value.done, e.value.total) == (2, 6)
    assert arch.kernel(x, get="ntk", tile=4).shape == (12, 12)   # restored: runs to the end


def test_empirical_method_forces_the_structured_contraction(monkeypatch):
    from ntkit.empirical import _structured as st
    chosen = []
    orig = st.Plan.choose

    def choose(self, *a, **k):
        orig(self, *a, **k)
        chosen.extend(lay.method for lay in self.layers)
    monkeypatch.setattr(st.Plan, "choose", choose)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = ntkit.empirical_ntk(net, x, implementation="jacobian")
    for method in ("A", "B"):
        chosen.clear()
        with ntkit.settings(empirical_method=method):
            got = ntkit.empirical_ntk(net, x, implementation="structured")
        assert chosen and set(chosen) == {method}
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_selection_budget_sets_the_estimators_cost_budget():
    from ntkit import estimators as est
    assert ntkit.settings.selection_budget is None
    default = est._selection_plan(2000, 30, 2, 15, 3)
    with ntkit.settings(selection_budget=1.5):
        assert ntkit.settings.selection_budget == 1.5
        tight = est._selection_plan(2000, 30, 2, 15, 3)
    assert tight[0] < default[0]                     # less budget: a smaller screening
    assert est._selection_plan(2000, 30, 2, 15, 3) == default
    for bad, err in ((0, ValueError), (-1.0, ValueError), ("3", TypeError), (True, TypeError)):
        with pytest.raises(err, match="selection_budget"):
            with ntkit.settings(selection_budget=bad):
                pass


def _fused_calls(monkeypatch):
    """A list that grows by one per call into a fused numba kernel (``_fused._call``)."""
    calls = []
    orig = _fused._call

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)
    monkeypatch.setattr(_fused, "_call", counted)
    return calls


def test_fused_switch_overrides_the_environment_variable(monkeypatch):
    if not _fused._kernels():
        pytest.skip("numba not installed: the fused kernels cannot run")
    calls = _fused_calls(monkeypatch)
    arch = nl.serial(nl.Dense(8), nl.Relu(), nl.Dense(8), nl.Relu(), nl.Dense(1))
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    runs = {}
    for env, switch in (("1", False), ("0", True), ("0", None), ("1", None)):
        monkeypatch.setenv("NTKIT_FUSED", env)
        calls.clear()
        expected = switch if switch is not None else env == "1"
        with ntkit.settings(fused=switch):
            assert ntkit.settings.fused is switch
            assert _fused.enabled() is expected
            runs[env, switch] = arch.kernel(x, get="ntk")
        assert ntkit.settings.fused is None                      # restored
        assert bool(calls) is expected, (env, switch, len(calls))
    # both paths compute the same kernel
    torch.testing.assert_close(runs["0", True], runs["1", False], rtol=1e-12, atol=0)


def test_fused_true_without_numba_raises_and_none_falls_back(monkeypatch):
    monkeypatch.setattr(_fused, "_K", False)                 # as if numba were not installed
    monkeypatch.setenv("NTKIT_FUSED", "1")
    arch = nl.serial(nl.Dense(8), nl.Relu(), nl.Dense(1))
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _fused.enabled() is False                          # default: the torch path serves
    with ntkit.settings(fused=True):
        with pytest.raises(ImportError, match=r"fused=True.*numba"):
            arch.kernel(x, get="ntk")
    with ntkit.settings(fused=False):
        assert _fused.enabled() is False
        assert arch.kernel(x, get="ntk").shape == (4, 4)


def test_fused_switch_refuses_non_bools():
    for bad in (1, 0, "1", "yes", 1.0):
        with pytest.raises(TypeError, match=r"`fused` must be None.*True or False"):
            with ntkit.settings(fused=bad):
                pass
    assert ntkit.settings.fused is None
