"""Call-time arguments (``pattern=`` of ``Aggregate``, any name a layer declares in
``call_args``) through the entry points that tile, chunk or sample: ``monte_carlo_kernel``,
``empirical_ntk`` / ``empirical_nngp``, ``scale.compute_kernel`` and ``features``. Each must give
every finite network / tile / chunk the rows of the examples it processes.

References: the exact ``arch.kernel(..., pattern=...)`` and Gram matrices of per-example
gradients stacked by an explicit autograd loop."""
import math

import pytest
import torch
from torch import nn

from ntkit import empirical_nngp, empirical_ntk, monte_carlo_kernel
from ntkit import layers as nl
from ntkit.features import features
from ntkit.scale import compute_kernel

D = torch.float64
C, V = 3, 5


def _graphs(n, seed, dag=False):
    """``n`` graphs: node features (n, C, V) and weighted adjacencies (n, V, V) with self
    loops; ``dag``: arcs only i -> j for i < j (then A and A^T give clearly different kernels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, V, generator=g, dtype=D)
    arcs = (torch.rand(n, V, V, generator=g) < 0.5).to(D) * torch.randint(1, 3, (n, V, V),
                                                                          generator=g)
    if dag:
        arcs = torch.triu(arcs, 1)
    return x, arcs + torch.eye(V, dtype=D)


def gnn(k=1, w=16):
    return nl.serial(nl.Dense(w, W_std=1.5, b_std=0.1), nl.Relu(), nl.Aggregate(),
                     nl.Dense(w, W_std=1.2, b_std=0.2), nl.Relu(), nl.Aggregate(),
                     nl.GlobalAvgPool(), nl.Dense(k, W_std=1.1, b_std=0.1))


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _stacked_jacobian(net, x, **kw):
    """(n, k, P): per-example gradients of every output, one autograd pass per example and
    output (the definition, independent of ntkit.empirical)."""
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = net(x[i:i + 1], **{name: v[i:i + 1] for name, v in kw.items()}).reshape(-1)
        rows.append(torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[o], params,
                                                                   retain_graph=True)])
            for o in range(out.numel())]))
    return torch.stack(rows)


# ---- monte_carlo_kernel ------------------------------------------------------------------

def test_monte_carlo_slices_each_side():
    """The same networks (seeds) on x1 / x2: the cross estimate is exactly the off-diagonal
    block of the estimate on the concatenated graphs, so each side got its own patterns."""
    x1, a1 = _graphs(4, 0)
    x2, a2 = _graphs(3, 1)
    arch = gnn()
    kw = dict(width=32, n_samples=2, seed=0)
    cross = monte_carlo_kernel(arch, x1, x2, pattern=(a1, a2), **kw)
    both = monte_carlo_kernel(arch, torch.cat([x1, x2]), pattern=torch.cat([a1, a2]), **kw)
    for key in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(cross, key), getattr(both, key)[:4, 4:],
                                   rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(cross.cov2, both.nngp.diagonal()[4:], rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="pattern"):
        monte_carlo_kernel(arch, x1, width=8, n_samples=1, patern=a1)
    with pytest.raises(ValueError, match="pair"):
        monte_carlo_kernel(arch, x1, x2, width=8, n_samples=1, pattern=a1)


def test_monte_carlo_converges_to_the_kernel_with_the_pattern():
    """Finite networks fed the patterns converge to arch.kernel(..., pattern=...): relative
    error ~ width^-1/2 (about 5% here), far below the 30%+ gap to the kernel of the transposed
    (reversed) graphs."""
    x1, a1 = _graphs(4, 2, dag=True)
    x2, a2 = _graphs(3, 3, dag=True)
    arch = gnn()
    exact = arch.kernel(x1, x2, pattern=(a1, a2))
    wrong = arch.kernel(x1, x2, pattern=(a1.transpose(1, 2), a2.transpose(1, 2)))
    est = monte_carlo_kernel(arch, x1, x2, width=256, n_samples=4, seed=0, pattern=(a1, a2))
    for key in ("nngp", "ntk"):
        ex = getattr(exact, key)
        assert _rel(getattr(wrong, key), ex) > 0.3, key        # the test can tell them apart
        assert _rel(getattr(est, key), ex) < 0.15, (key, _rel(getattr(est, key), ex))


# ---- empirical_ntk / empirical_nngp -------------------------------------------------------

@pytest.mark.parametrize("impl", ["auto", "jacobian", "ntk_vp", "structured"])
def test_empirical_ntk_equals_stacked_gradients(impl):
    x1, a1 = _graphs(4, 4)
    x2, a2 = _graphs(3, 5)
    net = gnn(k=2).module((C, V), seed=1)
    j1, j2 = _stacked_jacobian(net, x1, pattern=a1), _stacked_jacobian(net, x2, pattern=a2)
    full = torch.einsum("ikp,jlp->ijkl", j1, j2)
    sym = torch.einsum("ikp,jlp->ijkl", j1, j1)
    got = empirical_ntk(net, x1, x2, output="full", implementation=impl, pattern=(a1, a2))
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)
    got = empirical_ntk(net, x1, implementation=impl, pattern=a1)
    torch.testing.assert_close(got, sym.diagonal(dim1=2, dim2=3).mean(-1), rtol=1e-10,
                               atol=1e-12)
    # a tiny budget: row blocks of one or two examples, each with its own patterns
    got = empirical_ntk(net, x1, x2, output="diagonal", implementation=impl,
                        memory_budget=4000, pattern=(a1, a2))
    torch.testing.assert_close(got, full.diagonal(dim1=2, dim2=3), rtol=1e-10, atol=1e-12)


def test_empirical_generic_module_keywords():
    """Any module: arrays are per-example (sliced with the rows), other values are passed
    unchanged; vmap-traceable models keep the vectorized Jacobian path."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2, dtype=D)

        def forward(self, x, scale, shift=0.0):
            return torch.tanh(self.lin(x * scale[:, None])) * 2 + shift

    torch.manual_seed(0)
    net = Scaled()
    x1, x2 = torch.randn(4, 3, dtype=D), torch.randn(3, 3, dtype=D)
    s1, s2 = torch.rand(4, dtype=D) + 0.5, torch.rand(3, dtype=D) + 0.5
    ref = torch.einsum("ikp,jlp->ijkl", _stacked_jacobian(net, x1, scale=s1),
                       _stacked_jacobian(net, x2, scale=s2))
    for impl in ("jacobian", "ntk_vp", "structured"):
        got = empirical_ntk(net, x1, x2, output="full", implementation=impl,
                            scale=(s1, s2), shift=1.5)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="leading axis"):
        empirical_ntk(net, x1, x2, scale=(s1, s1))
    with pytest.raises(ValueError, match="pair"):
        empirical_ntk(net, x1, x2, scale=s1)
    # the finite networks of ntkit.layers declare their names
    with pytest.raises(TypeError, match="'pattern'"):
        empirical_ntk(gnn().module((C, V), seed=0), _graphs(2, 0)[0], mask=s1[:2])


def test_empirical_nngp_reads_the_patterns():
    x1, a1 = _graphs(4, 6)
    x2, a2 = _graphs(3, 7)
    arch = gnn(w=24)
    net = arch.module((C, V), seed=2)
    body = nl.serial(*arch.layers[:-1]).module((C, V), seed=2)     # same draws up to the readout
    h1, h2 = body(x1, pattern=a1), body(x2, pattern=a2)
    got = empirical_nngp(net, x1, x2, pattern=(a1, a2))
    torch.testing.assert_close(got, h1 @ h2.T / h1.shape[1], rtol=1e-12, atol=1e-14)


# ---- scale.compute_kernel ----------------------------------------------------------------

def test_compute_kernel_tiles_get_their_rows():
    x1, a1 = _graphs(7, 8)
    x2, a2 = _graphs(5, 9)
    arch = gnn()
    exact = arch.kernel(x1, pattern=a1)
    h = compute_kernel(arch, x1, store=None, tile=2, progress=False, pattern=a1)
    for key in ("nngp", "ntk"):
        torch.testing.assert_close(h.load(key), getattr(exact, key), rtol=1e-12, atol=1e-13)
    cross = arch.kernel(x1, x2, pattern=(a1, a2))
    h = compute_kernel(arch, x1, x2, get="ntk", store=None, tile=3, progress=False,
                       pattern=(a1, a2))
    torch.testing.assert_close(h.load("ntk"), cross.ntk, rtol=1e-12, atol=1e-13)
    with pytest.raises(TypeError, match="only ntkit.layers architectures"):
        compute_kernel(lambda a, b: a.flatten(1) @ b.flatten(1).T, x1, store=None,
                       progress=False, pattern=a1)


def test_store_refuses_another_pattern(tmp_path):
    x, a = _graphs(5, 10)
    arch = gnn()
    path = str(tmp_path / "k.zarr")
    first = compute_kernel(arch, x, get="ntk", store=path, tile=2, progress=False,
                           pattern=a).load("ntk")
    # the same values (float32 storage: the same numbers) resume
    again = compute_kernel(arch, x, get="ntk", store=path, tile=2, progress=False,
                           pattern=a.float())
    torch.testing.assert_close(again.load("ntk"), first, rtol=0, atol=0)
    for other in ({"pattern": a.transpose(1, 2)}, {}):
        with pytest.raises(ValueError, match="call_args"):
            compute_kernel(arch, x, get="ntk", store=path, tile=2, progress=False, **other)
    # and a store written without call args is not resumed with them
    plain = nl.serial(nl.Dense(8), nl.Relu(), nl.Aggregate(), nl.GlobalAvgPool(), nl.Dense(1))
    p2 = str(tmp_path / "eye.zarr")
    eye = torch.eye(V, dtype=D).expand(5, V, V)
    compute_kernel(plain, x, get="ntk", store=p2, tile=2, progress=False, pattern=eye)
    with pytest.raises(ValueError, match="call_args"):
        compute_kernel(plain, x, get="ntk", store=p2, tile=2, progress=False, pattern=a)


# ---- features ----------------------------------------------------------------------------

def test_features_jacobian_gram_is_the_empirical_ntk():
    x, a = _graphs(7, 11)
    arch = gnn()
    phi = features(arch, x, dim=12, method="jacobian", dtype=D, chunk=3, seed=4, pattern=a)
    net = arch.module((C, V), width=12, seed=4)           # the network the map differentiates
    torch.testing.assert_close(phi @ phi.T, empirical_ntk(net, x, pattern=a), rtol=1e-10,
                               atol=1e-12)
    assert math.isclose(float((phi - arch.features(x, 12, method="jacobian", dtype=D, chunk=2,
                                                   seed=4, pattern=a)).abs().max()), 0,
                        abs_tol=1e-12)
    # method='rf' has an Aggregate rule with the chunk's rows of the call-time pattern
    assert features(arch, x, dim=12, pattern=a, chunk=3).shape[0] == 7
    with pytest.raises(TypeError, match="'pattern'"):
        features(arch, x, dim=12, method="jacobian", mask=a)
