"""``ntkit.empirical_ntk(net, x1, x2, mask_constant=c)`` on finite networks built by
``arch.module`` (padded sequences and graphs, NaN padding included, with the call-time graph
``pattern``).

Oracles: (1) masking is exact, so the empirical NTK of the padded inputs equals that of the
same network (same seed, so the same parameters) on the unpadded, shorter inputs, to roundoff;
(2) its mean over seeds approaches the infinite-width ``arch.kernel(..., mask_constant=c)``.
"""

import pytest
import torch

import ntkit
from ntkit import layers as nl

from tests._helpers import padded_graphs, padded_sequences

D = torch.float64
C, L, LP = 2, 4, 6
IMPLS = ["jacobian", "ntk_vp", "structured"]
WIDE = (8, 256, 4)     # widths compared, seeds averaged


def _attn():
    return nl.serial(nl.Dense(8, 1.2, 0.1),
                     nl.GlobalSelfAttention(8, 8, 8, 2, W_key_std=1.3, b_std=0.1),
                     nl.Relu(), nl.Dense(8, 1.0, 0.1), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))


def _gnn():
    return nl.serial(nl.Dense(8, 1.2, 0.1), nl.Relu(), nl.Aggregate(), nl.Dense(8, 1.0, 0.1),
                     nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))


def _sequences(pad, n=3, seed=0):
    """``(x (n, C, L), xp (n, C, LP))``: each sequence scattered over LP positions, the rest
    padding (every channel equal to ``pad``)."""
    return padded_sequences(n, C, L, LP, pad, seed)


def _same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pad", [float("nan"), -1e9])
def test_masked_attention_equals_unpadded(pad, impl):
    x, xp = _sequences(pad)
    arch = _attn()
    net, net_u = (arch.module((C, n), width=16, seed=1, dtype=D) for n in (LP, L))
    _same_params(net, net_u)
    k = ntkit.empirical_ntk(net, xp, mask_constant=pad, implementation=impl)
    assert _rel(k, ntkit.empirical_ntk(net_u, x, implementation=impl)) < 1e-10
    k12 = ntkit.empirical_ntk(net, xp[:2], xp[1:], mask_constant=pad, implementation=impl,
                              output="full")
    assert _rel(k12, ntkit.empirical_ntk(net_u, x[:2], x[1:], implementation=impl,
                                         output="full")) < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_graph_with_pattern_equals_unpadded(impl):
    x, a, xp, ap = padded_graphs()
    nan_xp = torch.where(xp == -1e9, torch.full_like(xp, float("nan")), xp)
    arch = _gnn()
    net, net_u = (arch.module((3, v), width=16, seed=2, dtype=D) for v in (xp.shape[2],
                                                                           x.shape[2]))
    _same_params(net, net_u)
    ref = ntkit.empirical_ntk(net_u, x, pattern=a, implementation=impl)
    for pad, xs in ((-1e9, xp), (float("nan"), nan_xp)):
        k = ntkit.empirical_ntk(net, xs, mask_constant=pad, pattern=ap, implementation=impl)
        assert _rel(k, ref) < 1e-10, pad
    k12 = ntkit.empirical_ntk(net, xp[:2], xp[2:], mask_constant=-1e9,
                              pattern=(ap[:2], ap[2:]), implementation=impl)
    assert _rel(k12, ntkit.empirical_ntk(net_u, x[:2], x[2:], pattern=(a[:2], a[2:]),
                                         implementation=impl)) < 1e-10


def test_masked_empirical_ntk_approaches_the_masked_kernel():
    """Loose: the mean over seeds of the finite-width NTKs nears arch.kernel(mask_constant)."""
    nan = float("nan")
    _, xp = _sequences(nan)
    x, _, gp, ap = padded_graphs()
    cases = [(_attn(), xp, {}), (_gnn(), gp, {"pattern": ap})]
    for arch, xs, kw in cases:
        exact = arch.kernel(xs, get="ntk", mask_constant=nan if arch is cases[0][0] else -1e9,
                            **kw)
        errs = {}
        for width in (WIDE[0], WIDE[1]):
            ks = [ntkit.empirical_ntk(arch.module(tuple(xs.shape[1:]), width=width, seed=s,
                                                  dtype=D), xs,
                                      mask_constant=nan if arch is cases[0][0] else -1e9, **kw)
                  for s in range(WIDE[2])]
            errs[width] = float((sum(ks) / WIDE[2] - exact).norm() / exact.norm())
        assert errs[WIDE[1]] < 0.15 and errs[WIDE[1]] < errs[WIDE[0]], errs


def test_masking_refusals():
    x, xp = _sequences(float("nan"))
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * LP, 3)).to(D)
    with pytest.raises(TypeError, match="mask_constant.*arch.module"):
        ntkit.empirical_ntk(plain, xp, mask_constant=float("nan"))
    net = _attn().module((C, LP), width=8, seed=0, dtype=D)
    with pytest.raises(ValueError, match="NaN"):        # NaN padding without mask_constant
        ntkit.empirical_ntk(net, xp)
    # a cast that would change which entries are padding is refused, not silently re-masked:
    # a data entry 0.1 + 1e-12 is not padding in float64 but would be in float32
    x64 = torch.where(torch.isnan(xp), torch.full_like(xp, 0.1), xp)
    x64[0, :, :] = torch.where(torch.isnan(xp[0]), x64[0], torch.full_like(x64[0], 0.1 + 1e-12))
    with pytest.raises(ValueError, match="mask_constant"):
        ntkit.empirical_ntk(net, x64, mask_constant=0.1, dtype=torch.float32)
    assert ntkit.empirical_ntk(net, x64, mask_constant=0.1).shape == (3, 3)   # fine in float64
    with pytest.raises(TypeError, match="mask_constant"):
        ntkit.empirical_ntk(net, xp, mask_constant="nan")
