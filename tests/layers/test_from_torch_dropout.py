"""``from_torch`` of a network with ``nn.Dropout`` in train mode: ``nn.Dropout(p)`` (zero with
probability ``p``, scale the rest by ``1 / (1 - p)``) is ``ntkit.layers.Dropout(rate=1 - p)``
(``rate`` is the keep probability, as in neural-tangents).

Oracle: Monte Carlo of the torch module itself in train mode, over Gaussian weight draws with
PyTorch's default variances (``1 / (3 fan_in)``) and fresh dropout masks per forward pass: one
pass of the whole batch, as ``kernel(x)`` describes (the batch diagonal scaled by
``1 / (1 - p)``, off-diagonal entries unchanged).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntkit import layers as nl
from ntkit.layers import from_torch

DT = torch.float64


def _redraw(net, g):
    """Gaussian weights and biases with PyTorch's default variances, 1 / (3 fan_in)."""
    with torch.no_grad():
        for lin in net:
            if isinstance(lin, nn.Linear):
                sd = 1.0 / math.sqrt(3 * lin.in_features)
                lin.weight.normal_(0, sd, generator=g)
                lin.bias.normal_(0, sd, generator=g)


def test_train_mode_dropout_matches_the_torch_module():
    torch.manual_seed(0)
    p = 0.3
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    wide = nn.Sequential(nn.Linear(3, 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 256)
                         ).double().train()
    arch = from_torch(wide)
    assert nl.Dropout(1 - p) in arch.layers
    exact = arch.kernel(x)
    g = torch.Generator().manual_seed(2)
    nngp = torch.zeros(4, 4, dtype=DT)
    draws = 40
    for _ in range(draws):
        _redraw(wide, g)
        with torch.no_grad():
            y = wide(x)                         # one pass: fresh masks for every entry
        nngp += y @ y.T / y.shape[1] / draws
    scale = exact.nngp.abs().max()
    assert float((nngp - exact.nngp).abs().max() / scale) < 0.06
    # the oracle discriminates: eval mode (no dropout) and the keep/drop mix-up differ
    for wrong in (from_torch(wide.eval()).kernel(x, get="nngp"),
                  from_torch(nn.Sequential(*wide[:2], nn.Dropout(1 - p).train(), wide[3])
                             ).kernel(x, get="nngp")):
        assert float((wrong - exact.nngp).abs().max() / scale) > 0.2
    wide.train()
    # NTK (standard parameterization: the expected empirical NTK), one output, per-example
    # gradients of one forward pass of the batch
    one = nn.Sequential(nn.Linear(3, 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 1)
                        ).double().train()
    exact_ntk = from_torch(one).kernel(x, get="ntk")
    ntk = torch.zeros(4, 4, dtype=DT)
    for _ in range(draws):
        _redraw(one, g)
        out = one(x)[:, 0]
        params = list(one.parameters())
        jac = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            out[i], params, retain_graph=True)]) for i in range(4)])
        ntk += (jac @ jac.T).detach() / draws
    assert float((ntk - exact_ntk).abs().max() / exact_ntk.abs().max()) < 0.06


def test_dropout_conversion_and_refusals():
    lin = [nn.Linear(3, 8), nn.ReLU()]
    arch = from_torch(nn.Sequential(*lin, nn.Dropout(0.25), nn.Linear(8, 1)).train())
    assert [type(layer).__name__ for layer in arch.layers] == [
        "Dense", "ABRelu", "Dropout", "Dense"]
    assert arch.layers[2] == nl.Dropout(0.75, mode="train")
    # eval mode and p = 0: the identity, dropped
    for m in (nn.Dropout(0.25).eval(), nn.Dropout(0.0).train(), nn.Dropout2d(0.5).eval()):
        assert len(from_torch(nn.Sequential(*lin, m, nn.Linear(8, 1))).layers) == 3
    for m, what in ((nn.Dropout2d(0.5), "Dropout2d.*whole channels"),
                    (nn.Dropout1d(0.5), "Dropout1d.*whole channels"),
                    (nn.AlphaDropout(0.5), "AlphaDropout.*SELU"),
                    (nn.FeatureAlphaDropout(0.5), "FeatureAlphaDropout.*SELU"),
                    (nn.Dropout(1.0), "Dropout.*zeroes every unit")):
        with pytest.raises(ValueError, match=f"{what}.*(eval|p < 1)"):
            from_torch(nn.Sequential(*lin, m.train(), nn.Linear(8, 1)))
