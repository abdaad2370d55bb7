"""Aggregate (graph) layer: kernel against an independent closed form, Monte Carlo from the
finite network, DENSE vs SPARSE patterns, tiling with per-example patterns, and the call-time
argument plumbing (``arch.kernel(..., pattern=...)``, ``net(x, pattern=p)``)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import ntkit
from ntkit import layers as nl
from ntkit.layers._base import CallArgsModule

D = torch.float64
N1, N2, C, V = 4, 3, 3, 5


def _data(seed=0, n1=N1, n2=N2, v=V):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, C, v, generator=g, dtype=D)
    x2 = torch.randn(n2, C, v, generator=g, dtype=D)
    # weighted adjacency: random arcs (weights 1 or 2) plus self loops of varying weight
    a1, a2 = ((torch.rand(n, v, v, generator=g) < 0.4).to(D)
              * torch.randint(1, 3, (n, v, v), generator=g) for n in (n1, n2))
    a1 = a1 + torch.eye(v, dtype=D)
    a2 = a2 + 2 * torch.eye(v, dtype=D)
    return x1, x2, a1, a2


def _to_sparse(a: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Integer arcs (n, E, 2) from an integer-weighted dense adjacency: weight w -> w repeated
    arcs; rows padded with (-1, -1) (and one padding arc (3, -1): negative head)."""
    n = a.shape[0]
    lists = []
    for b in range(n):
        nz = a[b].nonzero()
        w = a[b][nz[:, 0], nz[:, 1]].round().long()
        lists.append(nz.repeat_interleave(w, 0))
    e = max(len(l) for l in lists) + pad
    out = torch.full((n, e, 2), -1, dtype=torch.long)
    for b, l in enumerate(lists):
        out[b, :len(l)] = l
        out[b, -1] = torch.tensor([3, -1])
    # shuffle the arcs (order must not matter)
    g = torch.Generator().manual_seed(1)
    return out[:, torch.randperm(e, generator=g)]


def gnn(w=64, agg=None, readout="sum"):
    agg = nl.Aggregate() if agg is None else agg
    pool = nl.GlobalSumPool() if readout == "sum" else nl.GlobalAvgPool()
    return nl.serial(nl.Dense(w, W_std=1.5, b_std=0.1), nl.Relu(), agg,
                     nl.Dense(w, W_std=1.2, b_std=0.2), nl.Relu(), agg, pool,
                     nl.Dense(1, W_std=1.1, b_std=0.1))


# ---- independent reference ------------------------------------------------------------------

def _relu_maps(c, v1, v2):
    """Arc-cosine kernel of degree 1 and its derivative kernel, entrywise (numpy)."""
    s = np.sqrt(v1 * v2)
    rho = np.clip(c / s, -1, 1)
    th = np.arccos(rho)
    return s * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi), (np.pi - th) / (2 * np.pi)


def reference(x1, x2, a1, a2, w1, b1, w2, b2):
    """Dense(W1, b1) -> Relu -> Aggregate -> GlobalSumPool -> Dense(W2, b2), NTK
    parameterization, written out per pair of graphs: the node-pair NNGP ``K`` after the ReLU,
    aggregated as ``A1^T K A2`` (a linear map of the node features y = x A), summed over nodes."""
    x1, x2, a1, a2 = (t.numpy() for t in (x1, x2, a1, a2))
    c = x1.shape[1]
    nngp = np.zeros((len(x1), len(x2)))
    ntk = np.zeros_like(nngp)
    for i in range(len(x1)):
        for j in range(len(x2)):
            # pre-activation covariances of nodes p (graph i) and q (graph j)
            k0 = w1 ** 2 * x1[i].T @ x2[j] / c + b1 ** 2              # (V, V)
            v1 = w1 ** 2 * (x1[i] ** 2).sum(0) / c + b1 ** 2          # (V,)
            v2 = w1 ** 2 * (x2[j] ** 2).sum(0) / c + b1 ** 2
            k1, d1 = _relu_maps(k0, v1[:, None], v2[None, :])
            t1 = k0 * d1                                                # NTK after the ReLU
            agg_k = sum(a1[i][p, r] * k1[p, q] * a2[j][q, s]
                        for p in range(k1.shape[0]) for q in range(k1.shape[1])
                        for r in range(k1.shape[0]) for s in range(k1.shape[1]))
            agg_t = np.einsum("pr,pq,qs->", a1[i], t1, a2[j])
            nngp[i, j] = w2 ** 2 * agg_k + b2 ** 2
            ntk[i, j] = nngp[i, j] + w2 ** 2 * agg_t
    return torch.from_numpy(nngp), torch.from_numpy(ntk)


def test_reference_closed_form():
    x1, x2, a1, a2 = _data(v=4)
    arch = nl.serial(nl.Dense(8, W_std=1.5, b_std=0.3), nl.Relu(), nl.Aggregate(),
                     nl.GlobalSumPool(), nl.Dense(1, W_std=0.9, b_std=0.2))
    ref = reference(x1, x2, a1, a2, 1.5, 0.3, 0.9, 0.2)
    k = arch.kernel(x1, x2, pattern=(a1, a2))
    torch.testing.assert_close(k.nngp, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, ref[1], rtol=1e-12, atol=1e-12)
    # the aggregation is not a no-op here
    plain = nl.serial(nl.Dense(8, W_std=1.5, b_std=0.3), nl.Relu(), nl.GlobalSumPool(),
                      nl.Dense(1, W_std=0.9, b_std=0.2)).kernel(x1, x2)
    assert float((plain.ntk - ref[1]).abs().max()) > 1.0


def test_identity_pattern_is_no_aggregate():
    x1, x2, _, _ = _data()
    eye1 = torch.eye(V, dtype=D).expand(N1, V, V)
    eye2 = torch.eye(V, dtype=D).expand(N2, V, V)
    k = gnn().kernel(x1, x2, pattern=(eye1, eye2))
    plain = gnn(agg=nl.Identity()).kernel(x1, x2)
    torch.testing.assert_close(k.nngp, plain.nngp, rtol=1e-13, atol=0)
    torch.testing.assert_close(k.ntk, plain.ntk, rtol=1e-13, atol=0)
    sp = torch.arange(V).repeat(2, 1).T.expand(N1, V, 2)        # arcs i -> i
    ks = gnn(agg=nl.Aggregate(implementation="SPARSE")).kernel(x1, pattern=sp)
    torch.testing.assert_close(ks.ntk, gnn(agg=nl.Identity()).kernel(x1).ntk,
                               rtol=1e-13, atol=0)


# ---- dense vs sparse --------------------------------------------------------------------------

@pytest.mark.parametrize("readout", ["sum", "avg"])
def test_dense_equals_sparse(readout):
    x1, x2, a1, a2 = _data()
    s1, s2 = _to_sparse(a1), _to_sparse(a2)
    dense = gnn(readout=readout).kernel(x1, x2, pattern=(a1, a2))
    sparse = gnn(agg=nl.Aggregate(implementation="SPARSE"), readout=readout).kernel(
        x1, x2, pattern=(s1, s2))
    torch.testing.assert_close(sparse.nngp, dense.nngp, rtol=1e-12, atol=0)
    torch.testing.assert_close(sparse.ntk, dense.ntk, rtol=1e-12, atol=0)
    # finite networks: same parameters (same seed), the two pattern formats give one function
    net_d = gnn(readout=readout).module((C, V), width=16, seed=3)
    net_s = gnn(agg=nl.Aggregate(implementation="SPARSE"), readout=readout).module(
        (C, V), width=16, seed=3)
    torch.testing.assert_close(net_s(x1, pattern=s1), net_d(x1, pattern=a1), rtol=1e-12, atol=0)


def test_two_node_axes_dense_sparse_and_partial_axis():
    """(N, C, V, H) inputs: aggregating both node axes (K = 2) or axis 2 only."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, C, 3, 2, generator=g, dtype=D)
    a = (torch.rand(3, 3, 2, 3, 2, generator=g) < 0.4).to(D)
    arcs = []
    for b in range(3):
        nz = a[b].nonzero()                                     # (E, 4): tail (v, h), head (v, h)
        arcs.append(torch.stack([nz[:, :2], nz[:, 2:]], -1))     # (E, 2, 2)
    e = max(len(t) for t in arcs) + 1
    sp = torch.full((3, e, 2, 2), -1, dtype=torch.long)
    for b, t in enumerate(arcs):
        sp[b, :len(t)] = t

    def arch(agg):
        return nl.serial(nl.Dense(8, b_std=0.1), nl.Erf(), agg, nl.Dense(8), nl.Relu(),
                         nl.Flatten(), nl.Dense(1))
    kd = arch(nl.Aggregate()).kernel(x, pattern=a)
    ks = arch(nl.Aggregate(aggregate_axis=(2, 3), implementation="SPARSE")).kernel(x, pattern=sp)
    torch.testing.assert_close(ks.ntk, kd.ntk, rtol=1e-12, atol=0)
    # aggregate_axis=-2 (the V axis): A acts on V, the H positions are processed independently
    b = (torch.rand(3, 3, 3, generator=g) < 0.5).to(D)
    k2 = arch(nl.Aggregate(aggregate_axis=-2)).kernel(x, pattern=b)
    big = torch.einsum("nvw,hk->nvhwk", b, torch.eye(2, dtype=D))   # same map on (V, H) pairs
    torch.testing.assert_close(k2.ntk, arch(nl.Aggregate()).kernel(x, pattern=big).ntk,
                               rtol=1e-12, atol=0)
    net = arch(nl.Aggregate(aggregate_axis=2)).module((C, 3, 2), width=8, seed=0)
    h = torch.randn(3, 4, 3, 2, dtype=D)
    agg_mod = net.net[2]
    from ntkit.layers._base import using_call_args
    with using_call_args({"pattern": (b, None)}):
        out = agg_mod(h)
    torch.testing.assert_close(out, torch.einsum("ncvh,nvw->ncwh", h, b))


# ---- the finite network and Monte Carlo -------------------------------------------------------

def test_module_forward_is_x_times_a():
    x1, _, a1, _ = _data()
    net = nl.Aggregate().module((C, V))
    assert isinstance(net, CallArgsModule)
    torch.testing.assert_close(net(x1, pattern=a1), torch.einsum("nci,nij->ncj", x1, a1))
    # numpy patterns work too; a non-graph architecture keeps its plain module
    torch.testing.assert_close(net(x1, pattern=a1.numpy()), net(x1, pattern=a1))
    assert isinstance(nl.serial(nl.Dense(4), nl.Relu()).module(3), nn.Sequential)


def _mc(width, seeds, x, a):
    """Monte Carlo NNGP (readout integrated out exactly) and NTK (per-example gradients)
    of ``gnn(width)`` on graphs ``(x, a)``."""
    arch = gnn(width)
    body = nl.serial(*arch.layers[:-1])
    last = arch.layers[-1]
    nngp = ntk = 0.0
    for s in seeds:
        h = body.module((C, V), seed=s)(x, pattern=a)                    # (n, width)
        nngp = nngp + last.W_std ** 2 * h @ h.T / h.shape[1] + last.b_std ** 2
        net = arch.module((C, V), seed=s)
        out = net(x, pattern=a)[:, 0]
        params = [p for p in net.parameters()]
        rows = []
        for i in range(x.shape[0]):
            g = torch.autograd.grad(out[i], params, retain_graph=True)
            rows.append(torch.cat([t.flatten() for t in g]))
        j = torch.stack(rows)
        ntk = ntk + j @ j.T
    return nngp.detach() / len(seeds), ntk / len(seeds)


def test_monte_carlo_converges():
    """Error of single finite networks (RMS over 10 seeds) shrinks like width^-1/2 (the slope
    stays near 0 when the kernel map is wrong: checked with A^T and A swapped). Directed
    acyclic graphs: A and A^T give kernels 56% apart."""
    x1, x2, _, _ = _data()
    x = torch.cat([x1, x2])
    g = torch.Generator().manual_seed(7)
    a = 2 * torch.triu((torch.rand(len(x), V, V, generator=g) < 0.6).to(D), 1)
    a = a + torch.eye(V, dtype=D)
    exact = gnn().kernel(x, pattern=a)
    widths, seeds = (16, 45, 128, 362), range(10)
    errs = {"nngp": [], "ntk": []}
    for w in widths:
        sq = {"nngp": 0.0, "ntk": 0.0}
        for s in seeds:
            for key, est in zip(("nngp", "ntk"), _mc(w, [s], x, a)):
                ex = getattr(exact, key)
                sq[key] += float(torch.linalg.norm(est - ex) / torch.linalg.norm(ex)) ** 2
        for key in sq:
            errs[key].append(math.sqrt(sq[key] / len(seeds)))
    for key, e in errs.items():
        slope = np.polyfit(np.log(widths), np.log(e), 1)[0]
        assert abs(slope + 0.5) < 0.2, (key, slope, e)
        assert e[-1] < 0.25, (key, e)


# ---- tiling, symmetry, dtype ------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["DENSE", "SPARSE"])
def test_tiles_blocks_and_symmetry(impl):
    x1, x2, a1, a2 = _data()
    if impl == "SPARSE":
        a1, a2 = _to_sparse(a1), _to_sparse(a2)
    arch = gnn(agg=nl.Aggregate(implementation=impl))
    if impl == "SPARSE":  # pad the arc lists to one length
        e = max(a1.shape[1], a2.shape[1])
        a1, a2 = (torch.cat([t, torch.full((t.shape[0], e - t.shape[1], 2), -1)], 1)
                  for t in (a1, a2))
    x, a = torch.cat([x1, x2]), torch.cat([a1, a2])
    full = arch.kernel(x, pattern=a)
    for key in ("nngp", "ntk"):
        t = getattr(full, key)
        assert torch.equal(t, t.T)
    cross = arch.kernel(x1, x2, pattern=(a1, a2))
    torch.testing.assert_close(cross.ntk, full.ntk[:N1, N1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(cross.nngp, full.nngp[:N1, N1:], rtol=1e-12, atol=0)
    for tile in (1, 2, 3):
        tiled = arch.kernel(x, pattern=a, tile=tile)
        torch.testing.assert_close(tiled.ntk, full.ntk, rtol=1e-12, atol=0)
        tc = arch.kernel(x1, x2, pattern=(a1, a2), tile=tile)
        torch.testing.assert_close(tc.nngp, cross.nngp, rtol=1e-12, atol=0)
    explicit = arch.kernel(x, x, pattern=(a, a))
    torch.testing.assert_close(explicit.ntk, full.ntk, rtol=1e-12, atol=1e-12)
    # neural-tangents' spelling for x2=None: pattern=(p, None) or (p, p)
    for pat in ((a, None), (a, a.clone())):
        torch.testing.assert_close(arch.kernel(x, pattern=pat).ntk, full.ntk, rtol=0, atol=0)
    k32 = arch.kernel(x.float(), dtype=torch.float32, pattern=a)
    torch.testing.assert_close(k32.ntk.double(), full.ntk, rtol=1e-4, atol=1e-4)


def test_equal_features_different_graphs_stay_different():
    """Identical node features with different graphs: the rows must differ (the kernel's
    duplicate-example dedupe would otherwise copy one graph's row onto the other)."""
    x1, _, a1, _ = _data()
    x = torch.cat([x1[:1], x1[:1]])
    a = torch.stack([a1[0], a1[1]])
    k = gnn().kernel(x, pattern=a)
    single = gnn().kernel(x[1:], pattern=a[1:])
    torch.testing.assert_close(k.ntk[1, 1], single.ntk[0, 0], rtol=1e-13, atol=0)
    assert not torch.isclose(k.ntk[0, 0], k.ntk[1, 1])


def test_fused_kernels_agree():
    x1, x2, a1, a2 = _data()
    fused = gnn().kernel(x1, x2, pattern=(a1, a2))
    with ntkit.settings(fused=False):
        plain = gnn().kernel(x1, x2, pattern=(a1, a2))
    torch.testing.assert_close(fused.ntk, plain.ntk, rtol=1e-12, atol=0)


def test_empty_batches():
    x1, x2, a1, a2 = _data()
    k = gnn().kernel(x1[:0], x2, pattern=(a1[:0], a2))
    assert k.ntk.shape == (0, N2)
    assert gnn().kernel(x1, x2[:0], pattern=(a1, a2[:0]), get="ntk").shape == (N1, 0)


# ---- errors ---------------------------------------------------------------------------------

def test_errors_name_the_argument():
    x1, x2, a1, a2 = _data()
    arch = gnn()
    with pytest.raises(ValueError, match="pattern"):
        arch.kernel(x1)                                   # missing
    with pytest.raises(ValueError, match=r"pattern\[0\]"):
        arch.kernel(x1, x2, pattern=(a1[:, :3], a2))      # wrong node count
    with pytest.raises(ValueError, match=r"pattern\[1\].*leading axis"):
        arch.kernel(x1, x2, pattern=(a1, a1))             # wrong batch
    with pytest.raises(ValueError, match="pair"):
        arch.kernel(x1, x2, pattern=a1)                   # x2 given, one pattern
    with pytest.raises(ValueError, match=r"pattern\[1\]"):
        arch.kernel(x1, pattern=(a1, a1 + 1))             # x2 None, two different patterns
    with pytest.raises(TypeError, match="patern"):
        arch.kernel(x1, patern=a1)                        # a typo is not ignored
    with pytest.raises(TypeError, match="unexpected keyword argument 'pattern'"):
        nl.serial(nl.Dense(1)).kernel(torch.randn(2, 3), pattern=a1[:2])
    with pytest.raises(ValueError, match="SPARSE"):
        arch.kernel(x1, pattern=_to_sparse(a1))           # arcs given to DENSE
    net = arch.module((C, V), width=8, seed=0)
    with pytest.raises(ValueError, match=r"net\(x, pattern=p\)"):
        net(x1)
    with pytest.raises(ValueError, match="leading axis"):
        net(x1, pattern=a1[:2])
    with pytest.raises(TypeError, match="patern"):
        net(x1, patern=a1)


def test_sparse_pattern_errors():
    x1, _, a1, _ = _data()
    arch = gnn(agg=nl.Aggregate(implementation="SPARSE"))
    sp = _to_sparse(a1)
    with pytest.raises(TypeError, match="integer"):
        arch.kernel(x1, pattern=sp.double())
    bad = sp.clone()
    bad[0, 0] = torch.tensor([-1, 2])                     # negative tail, valid head
    with pytest.raises(ValueError, match="negative tail"):
        arch.kernel(x1, pattern=bad)
    bad = sp.clone()
    bad[1, 0] = torch.tensor([0, V])                      # beyond the last vertex
    with pytest.raises(ValueError, match="out of range"):
        arch.kernel(x1, pattern=bad)
    with pytest.raises(ValueError, match=r"\(batch, n_edges, 1, 2\)"):
        arch.kernel(x1, pattern=sp[..., :1])


def test_constructor_errors():
    with pytest.raises(ValueError, match="channel_axis"):
        nl.Aggregate(channel_axis=-1)
    with pytest.raises(ValueError, match="batch_axis"):
        nl.Aggregate(batch_axis=1)
    with pytest.raises(ValueError, match="implementation"):
        nl.Aggregate(implementation="COO")
    with pytest.raises(ValueError, match="to_dense"):
        nl.Aggregate(implementation="SPARSE", to_dense=lambda p: p)
    with pytest.raises(ValueError, match="aggregate_axis"):
        nl.Aggregate(aggregate_axis=1).kernel(torch.randn(2, 3, 4), pattern=torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="graph inputs"):
        nl.serial(nl.Dense(4), nl.Aggregate()).kernel(torch.randn(2, 3),
                                                      pattern=torch.ones(2, 1, 1))


def test_to_dense_applied_per_tile():
    """to_dense receives each tile's rows of the (here: edge-weight-list) pattern."""
    x1, x2, a1, a2 = _data()
    seen = []

    def to_dense(p):                                      # p: (n, V*V) flattened weights
        seen.append(p.shape[0])
        return p.reshape(p.shape[0], V, V)
    arch = gnn(agg=nl.Aggregate(to_dense=to_dense))
    k = arch.kernel(x1, x2, pattern=(a1.flatten(1), a2.flatten(1)), tile=2)
    ref = gnn().kernel(x1, x2, pattern=(a1, a2))
    torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-12, atol=0)
    assert max(seen) <= 2
