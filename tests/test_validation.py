"""ntkit._validation: the shared input checks."""
import math

import numpy as np
import pytest
import torch

from ntkit._validation import all_finite, as_tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("pos", [0, 7, -1])
def test_all_finite_finds_any_bad_entry(dtype, bad, pos):
    x = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(x)
    x.view(-1)[pos] = bad
    assert not all_finite(x)
    assert all_finite(x) == bool(torch.isfinite(x).all())


def test_all_finite_other_kinds():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.arange(5))                       # integers are always finite
    assert all_finite(torch.tensor([True, False]))
    assert all_finite(torch.tensor(3.0))                     # 0-d
    z = torch.tensor([1 + 2j, 3 - 1j])
    assert all_finite(z)
    assert not all_finite(torch.tensor([1 + 2j, complex(0, float("inf"))]))
    assert not all_finite(torch.tensor([1 + 2j, complex(float("nan"), 0)]))
    w = torch.ones(3, requires_grad=True)
    assert all_finite(w * 2)
    # extremes that are finite stay finite
    big = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    assert all_finite(big)


def test_as_tensor_rejects_non_finite_and_overflow():
    x = np.ones((4, 3))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"`x1` contains 1 NaN/Inf"):
        as_tensor(x, "x1")
    y = np.ones((4, 3))
    y[0, 0] = 1e300                                          # finite in float64 only
    with pytest.raises(ValueError, match=r"beyond the range of torch.float32"):
        as_tensor(y, "x2", torch.float32)
    t = torch.ones(4, 3, dtype=torch.float32)
    assert as_tensor(t, "x", torch.float32) is t             # no copy, no second check needed


def test_extremes_are_remembered_only_inside_one_call(monkeypatch):
    """``kernel()`` checks its inputs and then scales them for the input Gram matrix: inside
    ``remembering_extremes`` the second look at an unmodified tensor reads no data; a write
    (torch's version counter) or leaving the block forgets it, so a caller's changes between
    calls -- also through NumPy views, which torch does not count -- are always seen."""
    import ntkit._validation as V
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or real(t))
    x = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    with V.remembering_extremes():
        assert V.extremes(x) == (-3.0, 2.0) and len(reads) == 1
        assert V.extremes(x) == (-3.0, 2.0) and len(reads) == 1      # remembered
        x[0, 0] = 7.0                                                  # version bump
        assert V.extremes(x) == (-3.0, 7.0) and len(reads) == 2
        assert V.extremes(x.clone()) == (-3.0, 7.0) and len(reads) == 3
    x.numpy()[1, 1] = float("nan")                                     # invisible to torch
    assert math.isnan(V.extremes(x)[0] + V.extremes(x)[1]) and len(reads) == 5
    assert not V.all_finite(x)
    from ntkit import layers as nl
    with pytest.raises(ValueError, match="NaN/Inf"):
        nl.serial(nl.Dense(4), nl.Relu(), nl.Dense(1)).kernel(x)
