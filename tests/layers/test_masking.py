"""``mask_constant``: neural-tangents' masking of padded positions (sequences, images, graphs).

Oracles: the kernel of padded inputs equals the kernel of the unpadded ones (block averages of
a per-position kernel, the unmasked kernel of equal-length sequences, unpadded graphs); the
finite network on padded inputs equals it on unpadded inputs; Monte Carlo over finite networks
run with ``mask_constant``. (Agreement with neural-tangents 0.6.5 is checked outside the test
suite: NT is not a test dependency.)
"""
from __future__ import annotations

import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.layers._masking import centre_mask
from tests._helpers import padded_graphs

DT = torch.float64
PAD = -1e9


def _pad(xs, length, where, c=PAD):
    """Sequences ``(C, l_i)`` placed at positions ``where[i]`` of a ``(n, C, length)`` batch
    filled with ``c``."""
    out = torch.full((len(xs), xs[0].shape[0], length), c, dtype=DT)
    for i, (x, pos) in enumerate(zip(xs, where)):
        out[i, :, pos] = x
    return out


def _seqs(lens, chans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(chans, n, generator=g, dtype=DT) for n in lens]


def _scatter(lens, length, seed=1):
    """Random sorted positions (the padding interleaved, not only at the end)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(length, generator=g)[:n].sort().values for n in lens]


BODY = (nl.Dense(8, 1.3, 0.2), nl.Relu(), nl.Dense(8, 1.1, 0.1), nl.LayerNorm(), nl.Erf(),
        nl.Dense(8, 1.2), nl.Gelu())
HEAD = nl.Dense(1, 1.0, 0.1)


def _block_mean(k, lens):
    off = [0] + torch.cumsum(torch.tensor(lens), 0).tolist()
    n = len(lens)
    return torch.stack([torch.stack([k[off[i]:off[i + 1], off[j]:off[j + 1]].mean()
                                     for j in range(n)]) for i in range(n)])


@pytest.mark.parametrize("const", [PAD, float("nan")])
def test_per_position_net_gap_equals_unpadded(const):
    """Per-position layers then GlobalAvgPool: the kernel of padded sequences is the mean of
    the per-position kernel over the unpadded positions, for any padding layout, tiled or
    not, cross or symmetric."""
    lens, length = [6, 4, 1, 5, 3], 7
    xs = _seqs(lens)
    x = _pad(xs, length, _scatter(lens, length), const)
    arch = nl.serial(*BODY, nl.GlobalAvgPool(), HEAD)
    pos = torch.cat([s.T for s in xs])                      # every real position, (sum l, C)
    kp = nl.serial(*BODY, HEAD).kernel(pos, get=("nngp", "ntk"))
    want = {g: _block_mean(getattr(kp, g), lens) for g in ("nngp", "ntk")}
    k = arch.kernel(x, get=("nngp", "ntk"), mask_constant=const)
    for g in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(k, g), want[g], rtol=1e-12, atol=1e-14)
    tiled = arch.kernel(x, get="ntk", mask_constant=const, tile=2)
    torch.testing.assert_close(tiled, want["ntk"], rtol=1e-12, atol=1e-14)
    cross = arch.kernel(x[:2], x[1:], get="ntk", mask_constant=const, tile=1)
    torch.testing.assert_close(cross, want["ntk"][:2, 1:], rtol=1e-12, atol=1e-14)
    # numpy inputs give the same kernel
    np_k = arch.kernel(x.numpy(), get="ntk", mask_constant=const)
    torch.testing.assert_close(np_k, k.ntk, rtol=0, atol=0)


def test_fused_and_torch_paths_agree():
    """Masked Conv + ReLU runs the fused kernels when numba is there; the torch path gives
    the same numbers."""
    lens, length = [6, 3, 5], 6
    x = _pad(_seqs(lens), length, [torch.arange(n) for n in lens])
    arch = nl.serial(nl.Conv(8, 3, padding="SAME", b_std=0.1), nl.Relu(),
                     nl.Conv(8, 3, padding="SAME"), nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))
    a = arch.kernel(x, get="ntk", mask_constant=PAD)
    with ntkit.settings(fused=False):
        b = arch.kernel(x, get="ntk", mask_constant=PAD)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


ATTN = nl.serial(nl.Dense(8, 1.2, 0.1), nl.GlobalSelfAttention(8, 8, 8, 2, W_key_std=1.3,
                                                               b_std=0.1),
                 nl.Relu(), nl.Dense(8, 1.0, 0.1), nl.LayerNorm(), nl.GlobalAvgPool(),
                 nl.Dense(1, 1.0, 0.1))


@pytest.mark.parametrize("mech", ["SOFTMAX", "RELU"])
def test_attention_gap_equals_unpadded(mech):
    """Attention without positional embeddings then GlobalAvgPool: padded sequences (padding
    anywhere) have the kernel of the unpadded ones (pairs of equal length, where the unmasked
    kernel is defined)."""
    arch = nl.serial(nl.Dense(8, 1.2, 0.1),
                     nl.GlobalSelfAttention(8, 8, 8, 2, W_key_std=1.3, b_std=0.1,
                                            attention_mechanism=mech),
                     nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))
    lens, length = [4, 2, 4, 2, 4], 6
    xs = _seqs(lens, seed=3)
    x = _pad(xs, length, _scatter(lens, length, seed=4))
    k = arch.kernel(x, get=("nngp", "ntk"), mask_constant=PAD)
    for n in (4, 2):
        idx = [i for i, m in enumerate(lens) if m == n]
        ref = arch.kernel(torch.stack([xs[i] for i in idx]), get=("nngp", "ntk"))
        for g in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(k, g)[idx][:, idx], getattr(ref, g),
                                       rtol=1e-12, atol=1e-14)


def _graphs(seed=5):
    # padded copies: the real nodes at random places, random arcs to and from the padding
    return padded_graphs(4, 4, 7, PAD, seed)


GNN = nl.serial(nl.Dense(8, 1.2, 0.1), nl.Relu(), nl.Aggregate(), nl.Dense(8, 1.0, 0.1),
                nl.Relu(), nl.Aggregate(), nl.GlobalAvgPool(), nl.Dense(1, 1.0, 0.1))


def test_aggregate_padded_nodes_equal_unpadded():
    """Graphs padded with masked nodes (connected to the real ones or not) have the kernel of
    the unpadded graphs."""
    x, a, xp, ap = _graphs()
    k = GNN.kernel(xp, get=("nngp", "ntk"), mask_constant=PAD, pattern=ap)
    ref = GNN.kernel(x, get=("nngp", "ntk"), pattern=a)
    for g in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(k, g), getattr(ref, g), rtol=1e-12, atol=1e-14)
    cross = GNN.kernel(xp[:2], xp[2:], get="ntk", mask_constant=PAD, pattern=(ap[:2], ap[2:]))
    torch.testing.assert_close(cross, ref.ntk[:2, 2:], rtol=1e-12, atol=1e-14)


def test_finite_network_on_padded_equals_unpadded():
    """The finite network run with mask_constant gives, on each padded example, exactly its
    output on the unpadded example (same parameters: nothing depends on the length)."""
    lens, length = [5, 2, 4], 6
    xs = _seqs(lens, seed=6)
    x = _pad(xs, length, _scatter(lens, length, seed=7))
    net = ATTN.module((3, length), width=16, seed=0)
    y = net(x, mask_constant=PAD)
    assert isinstance(y, torch.Tensor) and y.shape == (3, 1)
    for i, s in enumerate(xs):  # the same seed draws the same parameters for any length
        short = ATTN.module((3, s.shape[1]), width=16, seed=0)
        torch.testing.assert_close(y[i], short(s[None])[0], rtol=1e-12, atol=1e-13)
    _, a, xp, ap = _graphs()
    xg = torch.stack([xp[i][:, (xp[i] != PAD).all(0)] for i in range(4)])
    ag = torch.stack([ap[i][(xp[i] != PAD).all(0)][:, (xp[i] != PAD).all(0)]
                      for i in range(4)])
    gnet = GNN.module((3, 7), width=16, seed=1)
    torch.testing.assert_close(gnet(xp, mask_constant=PAD, pattern=ap),
                               GNN.module((3, 4), width=16, seed=1)(xg, pattern=ag),
                               rtol=1e-12, atol=1e-13)
    # an unmasked call is unchanged, and the output of a spatial network is zero where masked
    conv = nl.serial(nl.Conv(4, 3, padding="SAME", b_std=0.5), nl.Relu()).module((3, length),
                                                                                seed=2)
    out = conv(x, mask_constant=PAD)
    masked = (x == PAD).all(1)
    assert bool((out.permute(0, 2, 1)[masked] == 0).all())
    assert bool((out.permute(0, 2, 1)[~masked] != 0).any())


def _mc(arch_nngp, arch_ntk, x, width, seeds):
    """Monte Carlo NNGP (wide readout, mean over its units) and NTK (autograd) of the finite
    networks run with mask_constant."""
    nngp = ntk = 0.0
    for s in range(seeds):
        with torch.no_grad():
            y = arch_nngp.module(tuple(x.shape[1:]), width=width, seed=s)(x, mask_constant=PAD)
        nngp = nngp + y @ y.T / y.shape[1]
        net = arch_ntk.module(tuple(x.shape[1:]), width=width, seed=s)
        params = [p for p in net.parameters() if p.requires_grad]
        out = net(x, mask_constant=PAD)[:, 0]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            out[i], params, retain_graph=True)]) for i in range(x.shape[0])])
        ntk = ntk + (jac @ jac.T).detach()
    return nngp / seeds, ntk / seeds


def test_monte_carlo_matches_masked_kernel():
    """Finite networks with mask_constant converge to the masked kernel (attention, LayerNorm
    over the sequence, pooling), not to the kernel of the zero-padded inputs."""
    lens, length = [6, 3, 5, 2], 6
    x = _pad(_seqs(lens, seed=8), length, _scatter(lens, length, seed=9))
    body = (nl.Dense(8, 1.2, 0.1), nl.GlobalSelfAttention(8, 8, 8, 1, W_key_std=1.5),
            nl.LayerNorm(axis=(1, 2)), nl.Relu(), nl.AvgPool(2, 1, padding="SAME"),
            nl.GlobalAvgPool())
    arch = nl.serial(*body, nl.Dense(1, 1.0, 0.1))
    exact = arch.kernel(x, get=("nngp", "ntk"), mask_constant=PAD)
    nngp, ntk = _mc(nl.serial(*body, nl.Dense(256, 1.0, 0.1)), arch, x, width=384, seeds=4)
    for est, ref in ((nngp, exact.nngp), (ntk, exact.ntk)):
        err = float((est - ref).abs().max() / ref.abs().max())
        assert err < 0.08, err
    # the oracle discriminates: zero padding without masks is a different kernel
    plain = arch.kernel(torch.where(x == PAD, torch.zeros((), dtype=DT), x), get="ntk")
    assert float((plain - exact.ntk).abs().max() / exact.ntk.abs().max()) > 0.2


def test_centre_mask_follows_windows():
    """Conv/pool output masks: the centre input of each window (NT's ``_pool_mask``)."""
    m = torch.tensor([[False, False, True, True, True, False, True]])
    # VALID, window 3, stride 1: centre of output o is input o + 1
    assert torch.equal(centre_mask(m, (3,), (1,), ((0, 0),), False, (5,)), m[:, 1:6])
    # SAME stride 2, window 3 (pads (1, 1)): centres 0, 2, 4, 6
    assert torch.equal(centre_mask(m, (3,), (2,), ((1, 1),), False, (4,)), m[:, ::2])
    # explicit padding putting a centre into the zero padding: not masked
    assert torch.equal(centre_mask(m, (1,), (1,), ((1, 0),), False, (8,)),
                       torch.cat([torch.zeros(1, 1, dtype=torch.bool), m], 1))
    arch = nl.serial(nl.Conv(4, 3, strides=2, padding="SAME"), nl.Relu(), nl.Flatten(),
                     nl.Dense(1))
    x = _pad(_seqs([7, 2]), 7, [torch.arange(7), torch.tensor([0, 1])])
    net = arch.module((3, 7), seed=0).eval()
    inner = torch.nn.Sequential(*list(net)[:2])
    inner.__dict__["_ntkit_mask_info"] = net._ntkit_mask_info
    from ntkit.layers._masking import mask_post_hook, mask_pre_hook
    inner.register_forward_pre_hook(mask_pre_hook, with_kwargs=True)
    inner.register_forward_hook(mask_post_hook, with_kwargs=True)
    h = inner(x, mask_constant=PAD)                     # (2, 4, 4): positions 0, 2, 4, 6
    assert bool((h[1, :, 1:] == 0).all()) and bool((h[1, :, :1] != 0).any())


@pytest.mark.parametrize("layer", [
    nl.Dropout(0.9, mode="train"), nl.ConvTranspose(4, 3), nl.Index(nl.Slice[:, :, :2]),
    nl.ImageResize((3,), "linear"),
])
def test_layers_without_mask_support_refuse(layer):
    arch = nl.serial(nl.Conv(4, 3, padding="SAME"), nl.Relu(), layer, nl.Flatten(), nl.Dense(1))
    x = _pad(_seqs([5, 2]), 5, [torch.arange(5), torch.arange(2)])
    name = type(layer).__name__
    with pytest.raises(ValueError, match=f"{name} does not support `mask_constant`"):
        arch.kernel(x, mask_constant=PAD)
    net = arch.module((3, 5), seed=0)
    with pytest.raises(ValueError, match=f"{name} does not support `mask_constant`"):
        net(x, mask_constant=PAD)


def test_other_refusals():
    x = _pad(_seqs([5, 2]), 5, [torch.arange(5), torch.arange(2)])
    prod = nl.serial(nl.Dense(4), nl.FanOut(2), nl.parallel(nl.Dense(4), nl.Dense(4)),
                     nl.FanInProd(), nl.GlobalAvgPool(), nl.Dense(1))
    with pytest.raises(ValueError, match="FanInProd does not support `mask_constant`"):
        prod.kernel(x, mask_constant=PAD)
    # concatenating branches whose masks moved differently
    cat = nl.serial(nl.Dense(4), nl.FanOut(2),
                    nl.parallel(nl.Identity(), nl.Conv(4, 3, padding=((2, 0),))),
                    nl.FanInConcat(),
                    nl.GlobalAvgPool(), nl.Dense(1))
    y = _pad(_seqs([5, 3]), 5, [torch.arange(5), torch.tensor([0, 2, 4])])
    with pytest.raises(ValueError, match="FanInConcat with mask_constant"):
        cat.kernel(y, mask_constant=PAD)
    with pytest.raises(ValueError, match="FanInConcat with mask_constant"):
        cat.module((3, 5), seed=0)(y, mask_constant=PAD)
    # a position where only some channels equal the constant, before any Dense/Conv
    z = x.clone()
    z[0, 0, 1] = PAD
    relu_first = nl.serial(nl.Relu(), nl.Dense(4), nl.GlobalAvgPool(), nl.Dense(1))
    with pytest.raises(ValueError, match="only supported when the architecture starts"):
        relu_first.kernel(z, mask_constant=PAD)
    with pytest.raises(ValueError, match="only supported when the architecture starts"):
        relu_first.module((3, 5), seed=0)(z, mask_constant=PAD)
    # ... but a Dense first collapses the channels (NT): the entry is zeroed
    dense_first = nl.serial(nl.Dense(4), nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))
    zz = z.clone()
    zz[0, 0, 1] = 0.0
    torch.testing.assert_close(dense_first.kernel(z, get="ntk", mask_constant=PAD),
                               dense_first.kernel(zz, get="ntk", mask_constant=PAD))
    with pytest.raises(TypeError, match="mask_constant"):
        dense_first.kernel(x, mask_constant="pad")
    with pytest.raises(TypeError, match="mask_constant"):
        dense_first.module((3, 5))(x, mask_constant=True)
