"""The tile plan is sized by the largest array inside the network, not by the inputs: a
ConvTranspose or an upsampling ImageResize makes every later pixel-pair array larger (16x for
2x upsampling of 2-D images), and tiles sized by the inputs overran both the caches and the
``memory_budget`` there."""
from __future__ import annotations

import torch

import ntkit.layers as nl
from ntkit.layers import _tiling
from ntkit.layers._tiling import max_pixels

F64 = torch.float64


def _upsampling():
    return nl.serial(nl.Conv(4, (3, 3), padding="SAME"), nl.Relu(),
                     nl.ConvTranspose(4, (3, 3), strides=(2, 2), padding="SAME"), nl.Relu(),
                     nl.GlobalAvgPool(), nl.Dense(1))


def test_max_pixels_follows_the_shapes_inside():
    assert max_pixels(_upsampling(), (3, 6, 6)) == 144              # 12 x 12 after the 2x
    branches = nl.serial(nl.FanOut(2), nl.parallel(nl.Conv(4, (3, 3), padding="SAME"),
                                                   nl.ImageResize((12, 12), "linear")))
    assert max_pixels(branches, (3, 6, 6)) == 144                   # in one branch
    down = nl.serial(nl.Conv(4, (3, 3), strides=(2, 2)), nl.Relu(), nl.Flatten(), nl.Dense(1))
    assert max_pixels(down, (3, 6, 6)) == 36                         # the inputs' own
    assert max_pixels(nl.serial(nl.Dense(3), nl.Relu()), (5,)) == 1  # fully connected


def test_the_working_set_is_planned_for_the_upsampled_arrays(monkeypatch):
    seen = []
    real = _tiling.per_entry_bytes

    def spy(pix, full, itemsize):
        seen.append((pix, full))
        return real(pix, full, itemsize)

    monkeypatch.setattr(_tiling, "per_entry_bytes", spy)
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    k = _upsampling().kernel(x, get="ntk")
    assert seen == [(144, True)]
    assert k.shape == (4, 4) and torch.isfinite(k).all()
