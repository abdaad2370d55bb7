"""GlobalSelfAttention: exact kernels vs an independent loop reference, Monte Carlo from the finite
module, hand-derived special cases, transformer composition, and the unsupported regimes.

(Agreement with neural-tangents' stax.GlobalSelfAttention in float64 is checked outside the test
suite, which cannot import NT; see the issue-16 report.)
"""
import math

import numpy as np
import pytest
import torch

from ntkit import layers as nl
from ntkit.testing import KernelTestCase, mc_error_slope
from tests._helpers import randn64

A = nl.GlobalSelfAttention


def _res(*layers):
    return nl.serial(nl.FanOut(2), nl.parallel(nl.Identity(), nl.serial(*layers)), nl.FanInSum())


# ---------------------------------------------------------------------------------------------
# Independent reference: explicit loops over examples and positions (numpy), derived from the
# layer's definition (see the derivation in ntkit/layers/attention.py's docstring):
#   [Dense(w1, b1)] -> attention -> [Relu] -> GlobalAvgPool -> Dense(w2, b2)

def _softmax_rows(m):
    e = np.exp(m - m.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _relu_pair(v1, v2, c, t):
    """E[relu(u) relu(v)] and the NTK ``t E[relu'(u) relu'(v)]`` for
    (u, v) ~ N(0, [[v1, c], [c, v2]])."""
    s = math.sqrt(v1 * v2)
    rho = max(-1.0, min(1.0, c / s))
    th = math.acos(rho)
    return (s * (math.sin(th) + (math.pi - th) * rho) / (2 * math.pi),
            t * (math.pi - th) / (2 * math.pi))


def reference(x1, x2, *, w1, b1, qk, ov, bo, mech, linear=True, pe_std=None, val_pe=False,
              relu=False, w2=1.0, b2=0.0):
    X = torch.cat([x1, x2]).numpy()
    n, C, L = X.shape
    K = np.zeros((n, n, L, L))
    for i in range(n):
        for j in range(n):
            for p in range(L):
                for q in range(L):
                    K[i, j, p, q] = np.dot(X[i, :, p], X[j, :, q]) / C
    if w1 is None:                                # attention first: the inputs' NTK is 0
        T = np.zeros_like(K)
    else:                                         # first Dense: NTK = NNGP
        K = w1 ** 2 * K + b1 ** 2
        T = K.copy()
    R = np.zeros((L, L)) if pe_std is None else pe_std ** 2 * np.eye(L)   # SUM, R = identity
    N2, T2 = np.zeros_like(K), np.zeros_like(K)
    if linear:
        Aw = []
        for i in range(n):
            logits = qk * (K[i, i] + R)
            Aw.append(_softmax_rows(logits) if mech == "SOFTMAX" else logits)
        for i in range(n):
            for j in range(n):
                kv = K[i, j] + (R if val_pe else 0)
                tv = T[i, j] + (R if val_pe else 0)
                N2[i, j] = ov ** 2 * Aw[i] @ kv @ Aw[j].T + bo ** 2
                T2[i, j] = ov ** 2 * Aw[i] @ (tv + 2 * kv) @ Aw[j].T + bo ** 2
    else:  # 1/sqrt(d_k) identity: Gaussian logits with E[G_pq G'_rs] = qk^2 Ki(p, r) Ki(q, s)
        for i in range(n):
            for j in range(n):
                ki = K[i, j] + R
                kv = ki if val_pe else K[i, j]
                ti = T[i, j] + R
                tv = ti if val_pe else T[i, j]
                s_kk = sum(ki[q, s] * kv[q, s] for q in range(L) for s in range(L))
                s_kt = sum(ki[q, s] * tv[q, s] for q in range(L) for s in range(L))
                s_tk = sum(ti[q, s] * kv[q, s] for q in range(L) for s in range(L))
                std2 = (qk * ov) ** 2
                N2[i, j] = std2 * s_kk * ki + bo ** 2
                # value weights, output weights, queries, keys: 4 copies; plus inputs' NTK
                T2[i, j] = std2 * (4 * s_kk * ki + s_kt * ki + s_kk * ti + s_tk * ki) + bo ** 2
    if relu:
        N3, T3 = np.zeros_like(K), np.zeros_like(K)
        for i in range(n):
            for j in range(n):
                for p in range(L):
                    for q in range(L):
                        N3[i, j, p, q], T3[i, j, p, q] = _relu_pair(
                            N2[i, i, p, p], N2[j, j, q, q], N2[i, j, p, q], T2[i, j, p, q])
        N2, T2 = N3, T3
    m, mt = N2.mean((2, 3)), T2.mean((2, 3))
    nngp = w2 ** 2 * m + b2 ** 2
    ntk = nngp + w2 ** 2 * mt
    n1 = x1.shape[0]
    return torch.from_numpy(nngp[:n1, n1:]), torch.from_numpy(ntk[:n1, n1:])


class _SeqCase(KernelTestCase):
    widths = (16, 64, 256, 512)
    n_samples = 2
    seeds = 4

    def inputs(self):
        return randn64(3, 2, 4), randn64(2, 2, 4, seed=1)


class _UnboundedLogitsCase(_SeqCase):
    """With identity attention the key/query gradients add an ``O(1/width)`` NTK term (it
    vanishes in the limit) large enough at width 16 to steepen the NTK's error slope towards
    -1; the NNGP keeps the ``width^-1/2`` rate. A wrong kernel map gives a slope near 0."""

    def test_monte_carlo_converges(self):
        arch = self.build()
        x = torch.cat(self.inputs())
        slope, errs = mc_error_slope(arch, x, self.widths, get="nngp",
                                     n_samples=self.n_samples, seeds=self.seeds)
        assert abs(slope + 0.5) < self.slope_tol and errs[-1] < 0.15, (slope, errs)
        slope, errs = mc_error_slope(arch, x, self.widths, get="ntk",
                                     n_samples=self.n_samples, seeds=self.seeds)
        assert -1.2 < slope < -0.3 and errs[-1] < 0.15, (slope, errs)


class TestSoftmaxAttention(_SeqCase):
    kw = dict(w1=1.2, b1=0.1, qk=1.5, ov=1.1, bo=0.2, mech="SOFTMAX", relu=True)

    def build(self):
        k = self.kw
        return nl.serial(nl.Dense(8, k["w1"], k["b1"]),
                         A(8, 8, 8, 1, W_key_std=k["qk"], W_value_std=k["ov"], b_std=k["bo"]),
                         nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))

    def reference(self, x1, x2):
        return reference(x1, x2, **self.kw)


class TestIdentityAttention(_UnboundedLogitsCase):
    """Attention first (exact input covariances: the Monte Carlo error is the layer's own)."""
    kw = dict(w1=None, b1=None, qk=0.6, ov=1.2, bo=0.1, mech="IDENTITY", relu=True)

    def build(self):
        k = self.kw
        return nl.serial(A(8, 8, 8, 2, attention_mechanism="identity", W_query_std=k["qk"],
                           W_out_std=k["ov"], b_std=k["bo"]),
                         nl.Relu(), nl.GlobalAvgPool(), nl.Dense(1))

    def reference(self, x1, x2):
        return reference(x1, x2, **self.kw)


@pytest.mark.parametrize("mech, val_pe", [("IDENTITY", True), ("SOFTMAX", False),
                                          ("SOFTMAX", True)])
def test_sum_embeddings_match_reference(mech, val_pe):
    kw = dict(w1=1.0, b1=0.1, qk=0.6, ov=1.2, bo=0.0, mech=mech, pe_std=0.8, val_pe=val_pe)
    arch = nl.serial(nl.Dense(8, kw["w1"], kw["b1"]),
                     A(8, 8, 8, 2, attention_mechanism=mech, W_query_std=kw["qk"],
                       W_out_std=kw["ov"], pos_emb_type="SUM", W_pos_emb_std=kw["pe_std"],
                       val_pos_emb=val_pe),
                     nl.GlobalAvgPool(), nl.Dense(1))
    x1, x2 = randn64(3, 2, 4), randn64(2, 2, 4, seed=1)
    k, ref = arch.kernel(x1, x2), reference(x1, x2, **kw)
    torch.testing.assert_close(k.nngp, ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k.ntk, ref[1], rtol=1e-10, atol=1e-10)


class TestSqrtScalingIdentity(_UnboundedLogitsCase):
    """``linear_scaling=False``: Gaussian logits; ``width`` sets the number of heads."""
    widths = (8, 32, 128, 512)
    seeds = 2
    kw = dict(w1=1.0, b1=0.1, qk=0.5, ov=1.0, bo=0.1, mech="IDENTITY", linear=False,
              pe_std=0.7)

    def build(self):
        k = self.kw
        return nl.serial(nl.Dense(8, k["w1"], k["b1"]),
                         A(8, 4, 4, 8, linear_scaling=False, attention_mechanism="IDENTITY",
                           W_key_std=k["qk"], b_std=k["bo"], pos_emb_type="SUM",
                           W_pos_emb_std=k["pe_std"]),
                         nl.GlobalAvgPool(), nl.Dense(1))

    def reference(self, x1, x2):
        return reference(x1, x2, **self.kw)


# ---------------------------------------------------------------------------------------------
# Hand-derived special cases

def test_softmax_on_constant_sequences_is_two_dense_layers():
    """Equal logits give uniform attention, so on constant sequences the layer is values then
    output projection: Dense(W_value_std) -> Dense(W_out_std, b_std) on the channel vector
    (NTK ``OV^2 (T + 2 K) + b^2``)."""
    v1, v2 = randn64(3, 4), randn64(2, 4, seed=1)
    seq = lambda v: v[:, :, None].expand(-1, -1, 5).contiguous()  # noqa: E731
    att = nl.serial(nl.Dense(8, 1.3, 0.2), nl.Relu(),
                    A(8, 8, 8, 2, W_value_std=1.4, W_out_std=0.8, b_std=0.3, W_key_std=2.0),
                    nl.Erf(), nl.GlobalAvgPool(), nl.Dense(1, 1.1))
    fc = nl.serial(nl.Dense(8, 1.3, 0.2), nl.Relu(), nl.Dense(8, 1.4), nl.Dense(8, 0.8, 0.3),
                   nl.Erf(), nl.Dense(1, 1.1))
    k, kf = att.kernel(seq(v1), seq(v2)), fc.kernel(v1, v2)
    torch.testing.assert_close(k.nngp, kf.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, kf.ntk, rtol=1e-12, atol=1e-12)


def test_identity_attention_single_example_by_hand():
    """One example, two positions, attention first: K = x^T x / C (2 x 2), logits ``qk K``,
    output covariance ``ov^2 (qk K) K (qk K)^T = ov^2 qk^2 K^3``; its NTK twice that (values
    and output weights; the input's NTK is zero)."""
    x = randn64(1, 3, 2)
    qk, ov = 0.7, 1.3
    arch = nl.serial(A(4, 4, 4, 1, attention_mechanism="IDENTITY", W_key_std=qk, W_out_std=ov),
                     nl.GlobalSumPool(), nl.Dense(1))
    km = x[0].T @ x[0] / 3
    cov = ov ** 2 * qk ** 2 * torch.linalg.matrix_power(km, 3)
    k = arch.kernel(x)
    torch.testing.assert_close(k.nngp[0, 0], cov.sum(), rtol=1e-13, atol=0)
    torch.testing.assert_close(k.ntk[0, 0], k.nngp[0, 0] + 2 * cov.sum(), rtol=1e-13, atol=0)


def test_2d_positions_equal_flattened_sequence_without_embeddings():
    x1, x2 = randn64(3, 2, 3, 4), randn64(2, 2, 3, 4, seed=1)
    body = lambda: (A(8, 8, 8, 2, b_std=0.1), nl.Relu(),  # noqa: E731
                    A(8, 8, 8, 1, attention_mechanism="ABS"), nl.GlobalAvgPool(), nl.Dense(1))
    k2 = nl.serial(nl.Dense(8, 1.1), *body()).kernel(x1, x2)
    k1 = nl.serial(nl.Dense(8, 1.1), *body()).kernel(x1.flatten(2), x2.flatten(2))
    torch.testing.assert_close(k2.nngp, k1.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k2.ntk, k1.ntk, rtol=1e-12, atol=1e-12)


def test_permutation_invariance_and_decaying_embeddings_break_it():
    x1, x2 = randn64(3, 2, 6), randn64(2, 2, 6, seed=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])

    def arch(**kw):
        return nl.serial(nl.Dense(8), A(8, 8, 8, 1, pos_emb_type="CONCAT", **kw), nl.Relu(),
                         nl.GlobalAvgPool(), nl.Dense(1))

    a = arch()  # one-hot (identity-covariance) embeddings: positions stay exchangeable
    torch.testing.assert_close(a.kernel(x1, x2, get="ntk"),
                               a.kernel(x1[..., perm], x2[..., perm], get="ntk"),
                               rtol=1e-12, atol=1e-12)
    d = arch(pos_emb_decay_fn=lambda t: torch.exp(-t / 2))
    assert not torch.allclose(d.kernel(x1, x2, get="ntk"),
                              d.kernel(x1[..., perm], x2[..., perm], get="ntk"), rtol=1e-4)


def test_finite_module_shapes_and_widths():
    layer = A(6, 5, 7, 3, b_std=0.1, pos_emb_type="CONCAT", val_pos_emb=True)
    net = nl.serial(layer, nl.Dense(2)).module((4, 5), seed=0)
    att = net[0]
    assert att.w_key.shape == (3, 8, 5) and att.w_value.shape == (3, 8, 7)
    assert att.w_out.shape == (6, 21) and att.pos_emb.shape == (4, 5) and att.w_query is None
    assert net(randn64(2, 4, 5)).shape == (2, 2, 5)
    wide = nl.serial(layer, nl.Dense(2)).module((4, 5), width=16, seed=0)[0]
    assert (wide.d_key, wide.d_val, wide.n_heads, wide.n_out) == (16, 16, 3, 16)
    sq = A(6, 5, 7, 3, linear_scaling=False, attention_mechanism="IDENTITY")
    wide = nl.serial(sq, nl.Dense(2)).module((4, 5), width=16, seed=0)[0]
    assert (wide.d_key, wide.d_val, wide.n_heads) == (5, 7, 16) and wide.w_query is not None
    assert layer.out_shape((4, 5)) == (6, 5)


# ---------------------------------------------------------------------------------------------
# Transformer block: attention + residual + LayerNorm + position-wise MLP

def _transformer(width=16):
    block = nl.serial(
        _res(A(width, width, width, 2, b_std=0.1, pos_emb_type="CONCAT",
               pos_emb_decay_fn=lambda t: torch.exp(-t / 3))), nl.LayerNorm(),
        _res(nl.Dense(width, 1.4, 0.1), nl.Relu(), nl.Dense(width, 1.0, 0.1)), nl.LayerNorm())
    return nl.serial(nl.Dense(width, 1.0, 0.1), block, block, nl.GlobalAvgPool(), nl.Dense(1))


class TestTransformerBlock(_SeqCase):
    widths = (16, 64, 256)
    seeds = 3

    def build(self):
        return _transformer()


def test_transformer_kernel_is_psd_and_module_runs():
    arch = _transformer()
    x = randn64(6, 3, 5)
    k = arch.kernel(x)
    for t in (k.nngp, k.ntk):
        assert torch.equal(t, t.T)
        ev = torch.linalg.eigvalsh(t)
        assert float(ev.min()) > -1e-10 * float(ev.max()), ev
    net = arch.module((3, 5), width=32, seed=0)
    assert net(x).shape == (6, 1)


# ---------------------------------------------------------------------------------------------
# Unsupported regimes and argument errors

@pytest.mark.parametrize("mech", ["SOFTMAX", "ABS", "RELU"])
def test_sqrt_scaling_without_closed_form_raises_but_module_exists(mech):
    arch = nl.serial(nl.Dense(4), A(4, 4, 4, 1, linear_scaling=False, attention_mechanism=mech),
                     nl.GlobalAvgPool(), nl.Dense(1))
    with pytest.raises(ValueError, match=r"linear_scaling=True.*attention_mechanism='IDENTITY'"):
        arch.kernel(randn64(2, 3, 4))
    assert arch.module((3, 4), seed=0)(randn64(2, 3, 4)).shape == (2, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(parameterization="standard"), "parameterization"),
    (dict(parameterization="foo"), "parameterization"),
    (dict(attention_mechanism="tanh"), "attention_mechanism"),
    (dict(pos_emb_type="ROPE"), "pos_emb_type"),
    (dict(W_key_std=0.0), "W_key_std"),
    (dict(pos_emb_p_norm=0), "pos_emb_p_norm"),
    (dict(n_chan_pos_emb=0), "n_chan_pos_emb"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A(4, 4, 4, 1, **kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="linear_scaling"):
        A(4, 4, 4, 1, linear_scaling=1)
    with pytest.raises(TypeError, match="pos_emb_decay_fn"):
        A(4, 4, 4, 1, pos_emb_decay_fn=3.0)
    with pytest.raises(ValueError, match="n_heads"):
        A(4, 4, 4, 0)


def test_shape_errors():
    x = randn64(2, 3, 4)
    with pytest.raises(ValueError, match=r"n_chan_pos_emb.*CONCAT"):
        nl.serial(A(4, 4, 4, 1, pos_emb_type="SUM", n_chan_pos_emb=5), nl.GlobalAvgPool()
                  ).kernel(x)
    with pytest.raises(ValueError, match=r"spatial"):
        nl.serial(nl.Dense(4), A(4, 4, 4, 1), nl.Dense(1)).kernel(randn64(2, 3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        nl.serial(A(4, 4, 4, 1, pos_emb_type="SUM", pos_emb_decay_fn=lambda t: -t),
                  nl.GlobalAvgPool()).kernel(x)
    with pytest.raises(TypeError, match="pos_emb_decay_fn"):
        nl.serial(A(4, 4, 4, 1, pos_emb_type="SUM", pos_emb_decay_fn=lambda t: math.exp(t)),
                  nl.GlobalAvgPool()).kernel(x)
    with pytest.raises(ValueError, match=r"width=None.*n_chan_pos_emb=None"):
        nl.serial(nl.Dense(4), A(4, 4, 4, 1, pos_emb_type="CONCAT", n_chan_pos_emb=2),
                  nl.GlobalAvgPool(), nl.Dense(1)).module((3, 4), width=8)


@pytest.mark.parametrize("mech, pe, b_std, n_dense, self_", [
    ("SOFTMAX", "NONE", 0.2, 1, False), ("IDENTITY", "SUM", None, 2, False),
    ("RELU", "NONE", 0.3, 0, True), ("ABS", "SUM", 0.1, 1, True)])
def test_feature_shortcut_equals_the_pixel_pair_map(mech, pe, b_std, n_dense, self_,
                                                     monkeypatch):
    """Attention after Dense layers on the inputs works on the inputs' features
    (``Kernel.gram``, ``_weigh_features``); the result equals the general ``A M A^T`` map
    (the shortcut switched off) to rounding, NNGP and NTK, for cross and symmetric kernels,
    and the shortcut is really taken."""
    from ntkit.kernel import Kernel
    from ntkit.layers import attention as att
    kw = dict(attention_mechanism=mech, pos_emb_type=pe, b_std=b_std, W_key_std=1.2,
              W_query_std=0.8, W_value_std=1.1, W_out_std=0.9)
    if pe != "NONE":
        kw["W_pos_emb_std"] = 0.6
    arch = nl.serial(*[nl.Dense(8, W_std=1.3, b_std=0.2) for _ in range(n_dense)],
                     nl.GlobalSelfAttention(8, 8, 8, 2, **kw), nl.Relu(), nl.GlobalAvgPool(),
                     nl.Dense(1))
    x1, x2 = randn64(5, 3, 7, seed=1), None if self_ else randn64(4, 3, 7, seed=2)
    calls = [0]
    orig = att._weigh_features

    def counting(*a, **k):
        calls[0] += 1
        return orig(*a, **k)
    monkeypatch.setattr(att, "_weigh_features", counting)
    fast = arch.kernel(x1, x2, get=("nngp", "ntk"))
    assert calls[0] > 0
    monkeypatch.setattr(Kernel, "valid_gram", lambda self: None)
    slow = arch.kernel(x1, x2, get=("nngp", "ntk"))
    for a, b in ((fast.nngp, slow.nngp), (fast.ntk, slow.ntk)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_feature_shortcut_is_dropped_by_other_layers_and_in_place_changes():
    """Only the input kernel and Dense hand the features on; any other layer's output, and a
    tensor changed in place after the record was made, no longer counts as described."""
    from ntkit.layers._ops import input_kernel
    x = randn64(4, 3, 5, seed=3)
    k = input_kernel(x, randn64(3, 3, 5, seed=4), True, True)
    assert k.valid_gram() is not None
    k2 = nl.Dense(4, W_std=1.2, b_std=0.1).kernel_map(k)
    assert k2.valid_gram() is not None and k2.valid_gram().ntk_ab is not None
    assert nl.Relu().kernel_map(k2).gram is None                     # replace() drops it
    assert k2.replace(cov1=k2.cov1).gram is None
    import dataclasses
    twin = k2.nngp.clone()                        # equal values and version, another tensor
    while twin._version < k2.nngp._version:
        twin.add_(0.0)
    assert twin._version == k2.nngp._version
    other = dataclasses.replace(k2, nngp=twin)
    assert other.gram is not None and other.valid_gram() is None
    k2.nngp.mul_(1.0)                                                 # in place: version bump
    assert k2.valid_gram() is None
    assert nl.Dense(4, parameterization="standard").kernel_map(k).gram is None
