"""The tile memo of self-covariance maps (:class:`ntkit.layers._ops.SelfMemo`): in a tiled
evaluation every layer maps each block's self-covariance once, not once per tile.

A layer that hands on a fresh self-covariance tensor for every tile (not the memo's own) makes
every later layer miss: the attention bench case recomputed its attention and ReLU self-maps in
all 43 tiles (issue 16). The architecture below passes through each kind of layer that once
broke the chain (Dense, LayerNorm over channels and over all axes, attention, FanInSum /
FanInConcat / FanInProd), and the counts are exact: ``n_blocks`` misses per layer, the rest
hits. The values must not depend on the memo (the same numbers with it off).
"""
from __future__ import annotations

import collections

import pytest
import torch

import ntkit.layers as nl
from ntkit.layers import _ops

F64 = torch.float64


def _arch():
    body = nl.serial(nl.Conv(6, (3,), padding="SAME", b_std=0.1), nl.Dense(6, b_std=0.2),
                     nl.Relu(), nl.Dense(6), nl.LayerNorm(), nl.Erf())
    res = nl.serial(nl.FanOut(2), nl.parallel(nl.Conv(6, (3,), padding="SAME"), nl.Identity()),
                    nl.FanInSum())
    cat = nl.serial(nl.FanOut(2), nl.parallel(nl.Dense(6), nl.Conv(6, (3,), padding="SAME")),
                    nl.FanInConcat())
    prod = nl.serial(nl.FanOut(2), nl.parallel(nl.Dense(6), nl.Dense(6, W_std=1.2)), nl.FanInProd(),
                     nl.Dense(6))
    attn = nl.GlobalSelfAttention(6, 4, 4, n_heads=2)
    return nl.serial(body, res, nl.Dense(6), nl.Relu(), cat, nl.LayerNorm(axis=(1, 2)), prod,
                     nl.Relu(), attn, nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))


def _tag(key):
    tag = key[0] if isinstance(key, tuple) else key
    return tag if isinstance(tag, str) else type(tag).__name__


def _counting(monkeypatch):
    counts = collections.Counter()
    real = _ops.SelfMemo.lookup

    def lookup(self, key, cov, fn, keep_input=True):
        hits = self.hits
        out = real(self, key, cov, fn, keep_input)
        counts[(_tag(key), "hit" if self.hits > hits else "miss")] += 1
        return out

    monkeypatch.setattr(_ops.SelfMemo, "lookup", lookup)
    return counts


@pytest.mark.parametrize("cross", [True, False])
def test_each_block_is_mapped_once_per_layer(monkeypatch, cross):
    arch = _arch()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(6, 3, 5, generator=g, dtype=F64)
    x2 = torch.randn(4, 3, 5, generator=g, dtype=F64) if cross else None
    counts = _counting(monkeypatch)
    k = arch.kernel(x1, x2, tile=2)
    # tiles of 2 examples: cross, 3 x 2 tiles, each maps its row and its column block; x1
    # alone, the 6 tiles (i <= j) of 3 blocks, the 3 diagonal ones map one block only
    blocks, per_layer = (5, 12) if cross else (3, 9)
    tags = {t for t, _ in counts}
    assert {"input", "conv", "dense", "act", "layernorm", "faninsum", "faninconcat",
            "faninprod", "attention", "gpool"} <= tags, tags
    for tag in sorted(tags):
        misses, hits = counts[(tag, "miss")], counts[(tag, "hit")]
        n_layers, rest = divmod(misses + hits, per_layer)
        assert rest == 0 and n_layers >= 1, (tag, misses, hits)
        assert misses == n_layers * blocks, (tag, misses, hits)   # once per block and layer

    # the memo changes no number: the same kernel with every lookup recomputed
    monkeypatch.setattr(_ops.SelfMemo, "lookup",
                        lambda self, key, cov, fn, keep_input=True: fn(cov))
    k_off = arch.kernel(x1, x2, tile=2)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(k, name), getattr(k_off, name), rtol=0, atol=0)
