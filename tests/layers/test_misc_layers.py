"""Dropout, Index and DotGeneral: kernels against independently derived references (the kernel of
the sliced input, the train-mode formula, A K A^T with A from a numpy dot_general written here)
and Monte Carlo from the finite networks."""
import numpy as np
import pytest
import torch

from ntkit import layers as nl
from ntkit.testing import KernelTestCase, mc_error_slope

D = torch.float64


def _imgs(n1=4, n2=3, shape=(2, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n1,) + shape, generator=g, dtype=D),
            torch.randn((n2,) + shape, generator=g, dtype=D))


# ---- Dropout ---------------------------------------------------------------------------------

def _no_drop_fc():
    return nl.serial(nl.Dense(64, 1.5, 0.1), nl.Relu(), nl.Dense(1, 1.2, 0.3))


class TestDropoutFC(KernelTestCase):
    """Train mode: one pass scales the batch diagonal of each unit's second moment by 1/rate."""
    rate = 0.7

    def build(self):
        return nl.serial(nl.Dense(64, 1.5, 0.1), nl.Relu(), nl.Dropout(self.rate),
                         nl.Dense(1, 1.2, 0.3))

    def reference(self, x1, x2):
        return tuple(getattr(_no_drop_fc().kernel(x1, x2), g) for g in ("nngp", "ntk"))

    def test_symmetric_matches_explicit(self):
        """kernel(x) is one pass (diagonal scaled); kernel(x, x) two independent passes."""
        x, _ = self.inputs()
        ks, kx, k0 = self.build().kernel(x), self.build().kernel(x, x), _no_drop_fc().kernel(x)
        b2 = 0.3 ** 2
        for g in ("nngp", "ntk"):
            a, b, c = getattr(ks, g), getattr(kx, g), getattr(k0, g)
            assert torch.equal(a, a.T)
            expect = c.clone()
            expect.diagonal().copy_((c.diagonal() - b2) / self.rate + b2)
            torch.testing.assert_close(a, expect, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12)

    def test_monte_carlo_converges(self):
        """NNGP through ntkit.monte_carlo_kernel (one forward pass of the batch); NTK by
        per-example gradients of ONE forward pass (masks shared by the example's forward and
        backward, independent across examples), written out here."""
        arch = self.build()
        x = torch.cat(self.inputs())
        slope, errs = mc_error_slope(arch, x, (16, 64, 256, 1024), get="nngp", n_samples=2,
                                     seeds=3)
        assert abs(slope + 0.5) < 0.2 and errs[-1] < 0.1, (slope, errs)
        exact = arch.kernel(x, get="ntk")
        errs = []
        for w in (16, 256):
            est = 0
            for s in range(6):
                net = arch.module(x.shape[1], width=w, seed=100 * s + w)
                out = net(x)[:, 0]
                params = [p for p in net.parameters()]
                rows = [torch.cat([g.flatten() for g in torch.autograd.grad(
                    out[i], params, retain_graph=True)]) for i in range(x.shape[0])]
                J = torch.stack(rows)
                est = est + J @ J.T / 6
            errs.append(float(torch.linalg.norm(est - exact) / torch.linalg.norm(exact)))
        assert errs[1] < 0.5 * errs[0] and errs[1] < 0.1, errs


def test_dropout_spatial_layouts_match_formula():
    """Per-pixel (Flatten) and pixel-pair (GlobalAvgPool) layouts: dropout adds
    (1/rate - 1) times the per-pixel diagonal terms, derived from the no-dropout kernels."""
    r, b2 = 0.6, 0.25 ** 2
    x, _ = _imgs()
    body = [nl.Conv(8, (2, 2), padding="SAME", W_std=1.3, b_std=0.2), nl.Relu()]
    head = [nl.Dense(1, 1.1, 0.25)]
    flat0 = nl.serial(*body, nl.Flatten(), *head).kernel(x)
    flat = nl.serial(*body, nl.Dropout(r), nl.Flatten(), *head).kernel(x)
    gap0 = nl.serial(*body, nl.GlobalAvgPool(), *head).kernel(x)
    gap = nl.serial(*body, nl.Dropout(r), nl.GlobalAvgPool(), *head).kernel(x)
    P = 4 * 5
    for g in ("nngp", "ntk"):
        f0, f1, g0, g1 = (getattr(k, g) for k in (flat0, flat, gap0, gap))
        exp_f = f0.clone()
        exp_f.diagonal().copy_((f0.diagonal() - b2) / r + b2)
        torch.testing.assert_close(f1, exp_f, rtol=1e-12, atol=1e-12)
        exp_g = g0.clone()
        exp_g.diagonal().add_((1 / r - 1) * (f0.diagonal() - b2) / P)
        torch.testing.assert_close(g1, exp_g, rtol=1e-12, atol=1e-12)
    # tiles and cross blocks agree with the full matrix in the pixel-pair layout too
    x1, x2 = _imgs(3, 2)
    arch = nl.serial(*body, nl.Dropout(r), nl.GlobalAvgPool(), *head)
    full = arch.kernel(torch.cat([x1, x2]))
    torch.testing.assert_close(arch.kernel(x1, x2).ntk, full.ntk[:3, 3:], rtol=1e-12, atol=0)
    torch.testing.assert_close(arch.kernel(torch.cat([x1, x2]), tile=2).ntk, full.ntk,
                               rtol=1e-12, atol=0)


def test_dropout_test_mode_and_rate_one_are_identity():
    x, _ = TestDropoutFC().inputs()
    k0 = _no_drop_fc().kernel(x)
    for layer in (nl.Dropout(0.3, "test"), nl.Dropout(1.0)):
        k = nl.serial(nl.Dense(64, 1.5, 0.1), nl.Relu(), layer, nl.Dense(1, 1.2, 0.3)).kernel(x)
        assert torch.equal(k.nngp, k0.nngp) and torch.equal(k.ntk, k0.ntk)


def test_dropout_module_and_validation():
    mod, _ = nl.Dropout(0.25).build((1000,), type("C", (), {"generator": torch.Generator()})(),
                                    False)
    x = torch.ones(40, 1000, dtype=D)
    y = mod(x)
    kept = (y != 0).to(D).mean()
    assert abs(float(kept) - 0.25) < 0.01 and torch.all((y == 0) | (y == 4.0))
    mod.eval()
    assert torch.equal(mod(x), x)
    tmod, _ = nl.Dropout(0.25, "test").build((3,), type("C", (), {"generator": None})(), False)
    assert torch.equal(tmod(x), x)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep probability"):
            nl.Dropout(bad)
    with pytest.raises(ValueError, match="mode"):
        nl.Dropout(0.5, "eval")
    with pytest.raises(TypeError):
        nl.Dropout("0.5")
    with pytest.raises(ValueError, match="Gaussian"):
        nl.serial(nl.Dense(4), nl.Dropout(0.5), nl.Relu()).kernel(torch.randn(3, 2))


def test_dropout_repeated_rows_are_distinct_examples():
    x, _ = TestDropoutFC().inputs()
    xx = torch.cat([x, x[:1]])
    k = TestDropoutFC().build().kernel(xx)
    k0 = _no_drop_fc().kernel(xx)
    torch.testing.assert_close(k.nngp[0, -1], k0.nngp[0, -1], rtol=1e-12, atol=0)


# ---- Index -----------------------------------------------------------------------------------

def _pointwise(head, filt=(1, 1)):
    """1x1 convolutions act per pixel, so slicing commutes with them."""
    return [nl.Conv(16, filt, W_std=1.4, b_std=0.2), nl.Relu(),
            nl.Conv(16, filt, W_std=1.2, b_std=0.1), nl.Erf()] + head


class TestIndexFlatten(KernelTestCase):
    widths = (16, 64, 256)
    seeds = 2

    def inputs(self):
        return _imgs(4, 3, (2, 4, 5))

    def build(self):
        return nl.serial(*_pointwise([nl.Index(nl.Slice[:, :, 1:4, ::-2]), nl.Flatten(),
                                      nl.Dense(1, 1.1, 0.2)]))

    def reference(self, x1, x2):
        ref = nl.serial(*_pointwise([nl.Flatten(), nl.Dense(1, 1.1, 0.2)]))
        cut = lambda x: x[:, :, 1:4].flip(-1)[..., ::2]  # noqa: E731
        k = ref.kernel(cut(x1), cut(x2))
        return k.nngp, k.ntk


class TestIndexPool(TestIndexFlatten):
    """Pixel-pair layout (GlobalAvgPool above) and an integer index that removes an axis."""

    def build(self):
        return nl.serial(*_pointwise([nl.Index(nl.Slice[..., 1, ::3]), nl.GlobalAvgPool(),
                                      nl.Dense(1, 1.1, 0.2)]))

    def reference(self, x1, x2):
        ref = nl.serial(*_pointwise([nl.GlobalAvgPool(), nl.Dense(1, 1.1, 0.2)], (1,)))
        k = ref.kernel(x1[:, :, 1, ::3], x2[:, :, 1, ::3])
        return k.nngp, k.ntk

    def test_monte_carlo_converges(self):  # covered by TestIndexFlatten
        pass


def test_index_to_fully_connected():
    x1, x2 = _imgs()
    arch = nl.serial(*_pointwise([nl.Index(nl.Slice[:, :, -1, 2]), nl.Dense(1, 1.1, 0.2)]))
    ref = nl.serial(nl.Dense(16, 1.4, 0.2), nl.Relu(), nl.Dense(16, 1.2, 0.1), nl.Erf(),
                    nl.Dense(1, 1.1, 0.2)).kernel(x1[:, :, -1, 2], x2[:, :, -1, 2])
    k = arch.kernel(x1, x2)
    torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-12, atol=1e-12)
    net = arch.module((2, 4, 5), seed=0)
    assert net(x1).shape == (4, 1)


@pytest.mark.parametrize("idx,err", [
    (nl.Slice[0], "batch axis"), (nl.Slice[:, 1:], "channel axis"),
    (nl.Slice[:, :, 9], "out of range"), (nl.Slice[:, :, 3:1], "selects nothing"),
    (nl.Slice[:, :, :, :, :], "more entries"), (nl.Slice[..., 1, ...], "at most one"),
    (nl.Slice[:, :, [0, 1]], "advanced"), (nl.Slice[:, :, None], "advanced"),
])
def test_index_errors(idx, err):
    with pytest.raises((ValueError, TypeError, IndexError), match=err):
        nl.serial(nl.Conv(4, (1, 1)), nl.Index(idx), nl.Flatten()).kernel(torch.randn(2, 2, 4, 5))


# ---- DotGeneral --------------------------------------------------------------------------

def np_dot_general(x, const, dn, const_is_lhs):
    """lax.dot_general semantics written with numpy, then N, C moved to the front."""
    (lc, rc), (lb, rb) = dn
    lhs, rhs = (const, x) if const_is_lhs else (x, const)
    L = "abcdefghij"
    R = "klmnopqrst"
    ll, rl = list(L[:lhs.ndim]), list(R[:rhs.ndim])
    for a, b in zip(lc + lb, rc + rb):
        rl[b] = ll[a]
    out = [ll[a] for a in lb] + [ll[i] for i in range(lhs.ndim) if i not in lc + lb] + \
        [rl[i] for i in range(rhs.ndim) if i not in rc + rb]
    y = np.einsum(f"{''.join(ll)},{''.join(rl)}->{''.join(out)}", lhs, rhs)
    n_pos = out.index((ll if not const_is_lhs else rl)[0])
    c_pos = out.index((ll if not const_is_lhs else rl)[1])
    return np.moveaxis(y, (n_pos, c_pos), (0, 1))


DOT_CASES = {
    "rhs_contract_H": dict(rhs=np.array([1.0, -1.0, 0.5, 2.0]),
                           dimension_numbers=(((2,), (0,)), ((), ()))),
    "lhs_contract_W": dict(lhs=np.array([[0.0, 1.0, 0.0, 0.5, 1.0], [1.0, 0.0, -1.0, 0.0, 0.2]]),
                           dimension_numbers=(((1,), (3,)), ((), ()))),
    "rhs_batch_W": dict(rhs=np.array([0.3, -1.2, 0.7, 2.0, -0.5]),
                        dimension_numbers=(((), ()), ((3,), (0,)))),
    "rhs_new_axis": dict(rhs=np.array([[1.0, 2.0], [0.5, -1.0], [0.0, 1.0], [3.0, 1.0]]),
                         dimension_numbers=(((2,), (0,)), ((), ()))),
    "scalar": dict(rhs=2.5),
}


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("case", list(DOT_CASES))
def test_dot_general_is_A_K_At(case, readout):
    """Reference: pointwise (1x1) convolutions make the pixel-pair kernel the FC kernel of the
    per-pixel vectors; the constant map A (from numpy) gives K' = A K A^T, then the readout."""
    kw = DOT_CASES[case]
    x1, x2 = _imgs(3, 2, (2, 4, 5))
    head = [nl.Flatten() if readout == "flatten" else nl.GlobalAvgPool(), nl.Dense(1, 1.0)]
    arch = nl.serial(*_pointwise([nl.DotGeneral(**kw)] + head))
    k = arch.kernel(x1, x2)
    fc = nl.serial(nl.Dense(16, 1.4, 0.2), nl.Relu(), nl.Dense(16, 1.2, 0.1), nl.Erf())
    pix = lambda x: x.flatten(2).transpose(1, 2).reshape(-1, 2)  # noqa: E731  (n*P, C)
    kp = fc.kernel(pix(x1), pix(x2))
    P = 20
    const = np.asarray(kw.get("rhs", kw.get("lhs")), dtype=np.float64)
    basis = np.eye(P).reshape(P, 1, 1, 4, 5)     # (P examples, C=1, H, W)
    A = np.stack([np_dot_general(b, const, kw.get("dimension_numbers", (((), ()), ((), ()))),
                                 "lhs" in kw)[0, 0].ravel() for b in basis], 1)  # (P', P)
    for g, add in (("nngp", None), ("ntk", "nngp")):
        base = getattr(kp, g).numpy().reshape(3, P, 2, P)
        kk = np.einsum("ap,ipjq,bq->ijab", A, base, A)
        if readout == "flatten":
            val = np.einsum("ijaa->ij", kk) / A.shape[0]
        else:
            val = kk.mean(axis=(2, 3))
        if add:  # readout NTK = its NNGP + W_std^2 * (propagated NTK)
            val = val + k.nngp.numpy()
        np.testing.assert_allclose(getattr(k, g).numpy(), val, rtol=1e-11, atol=1e-12)


def test_dot_general_module_matches_numpy():
    x, _ = _imgs(2, 1, (3, 4, 5))
    for kw in DOT_CASES.values():
        layer = nl.DotGeneral(**kw)
        mod, shape = layer.build((3, 4, 5), type("C", (), {"dtype": D})(), False)
        const = np.asarray(kw.get("rhs", kw.get("lhs")), dtype=np.float64)
        ref = np_dot_general(x.numpy(), const, kw.get("dimension_numbers", (((), ()), ((), ()))),
                             "lhs" in kw)
        np.testing.assert_allclose(mod(x).numpy(), ref, rtol=1e-13, atol=1e-13)
        assert tuple(ref.shape[1:]) == shape == layer.out_shape((3, 4, 5))


class TestDotGeneralMonteCarlo(KernelTestCase):
    widths = (16, 64, 256)
    seeds = 2

    def inputs(self):
        return _imgs(3, 2, (2, 3, 4))

    def build(self):
        return nl.serial(nl.Conv(8, (2, 2), padding="SAME", W_std=1.3, b_std=0.2), nl.Relu(),
                         nl.DotGeneral(rhs=torch.tensor([1.0, -1.0, 0.5]),
                                       dimension_numbers=(((2,), (0,)), ((), ()))),
                         nl.Conv(8, (2,), W_std=1.2), nl.Relu(), nl.GlobalAvgPool(),
                         nl.Dense(1))


@pytest.mark.parametrize("kw,err", [
    (dict(lhs=1.0, rhs=2.0), "at most one"),
    (dict(rhs=[1.0, 2.0], dimension_numbers=(((1,), (0,)), ((), ()))), "channel"),
    (dict(rhs=[1.0, 2.0], dimension_numbers=(((0,), (0,)), ((), ()))), "batch"),
    (dict(rhs=[1.0, 2.0, 3.0], dimension_numbers=(((2,), (0,)), ((), ()))), "size"),
    (dict(rhs=[1.0, float("nan")]), "non-finite"),
    (dict(rhs=1.0, channel_axis=-1), "channel_axis"),
    (dict(rhs=1.0, batch_axis=1), "batch_axis"),
    (dict(rhs=[1.0], dimension_numbers=((2,), (0,))), "dimension_numbers"),
])
def test_dot_general_errors(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        nl.serial(nl.Conv(4, (1, 1)), nl.DotGeneral(**kw), nl.Flatten()).kernel(
            torch.randn(2, 2, 4, 5))


def test_index_order_matters():
    """A non-symmetric linear map after Index sees the pixel order (Flatten/pooling do not)."""
    x1, x2 = _imgs()
    dg = nl.DotGeneral(rhs=torch.tensor([1.0, 0.0, 0.3]),
                       dimension_numbers=(((3,), (0,)), ((), ())))
    head = [dg, nl.GlobalAvgPool(), nl.Dense(1, 1.1, 0.2)]
    arch = nl.serial(*_pointwise([nl.Index(nl.Slice[:, :, 1:4, ::-2])] + head))
    ref = nl.serial(*_pointwise(head))
    cut = lambda x: x[:, :, 1:4].flip(-1)[..., ::2]  # noqa: E731
    k, kr = arch.kernel(x1, x2), ref.kernel(cut(x1), cut(x2))
    torch.testing.assert_close(k.nngp, kr.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, kr.ntk, rtol=1e-12, atol=1e-12)
    mod, _ = nl.Index(nl.Slice[:, :, 1:4, ::-2]).build((2, 4, 5), None, False)
    assert torch.equal(mod(x1), cut(x1))
