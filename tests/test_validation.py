"""ntkit._validation: the shared input checks."""
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
