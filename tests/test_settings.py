"""ntkit.settings: the switches tests and benchmarks flip, instead of private module globals."""
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.layers._tiling import TileLimitReached


def test_override_is_scoped_and_restored_on_error():
    assert ntkit.settings.tile_limit is None and ntkit.settings.empirical_method is None
    with ntkit.settings(empirical_method="A"):
        assert ntkit.settings.empirical_method == "A"
        with ntkit.settings(empirical_method="B", tile_limit=2):
            assert ntkit.settings.as_dict() == {"tile_limit": 2, "empirical_method": "B",
                                                "selection_budget": None}
        assert ntkit.settings.as_dict() == {"tile_limit": None, "empirical_method": "A",
                                            "selection_budget": None}
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
