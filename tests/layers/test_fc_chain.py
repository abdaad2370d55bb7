"""Fused fully-connected runs (ntkit.layers._fc_chain, ntkit.layers._fused.fc_chain): a run of
Dense and arc-cosine / ExpNormalized / Gabor layers in one pass per tile must give the kernel of the
layers' own maps (the torch path, ``settings(fused=False)``, itself checked against closed
forms, Monte Carlo and neural-tangents elsewhere) to float64 roundoff, keep exact symmetry and
the exact batch diagonal, and leave everything it does not cover to the layers."""
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.layers import _fused
from tests._helpers import randn64

pytestmark = pytest.mark.skipif(not _fused.enabled(), reason="numba not installed")

D = nl.Dense
ARCHS = {
    "relu_ntk": lambda: nl.serial(D(64, 1.5, 0.1), nl.Relu(), D(64, 1.4, 0.05), nl.Relu(),
                                  D(1, 1.2, 0.1)),
    "leaky_abs_standard": lambda: nl.serial(
        D(64, 1.5, 0.1, parameterization="standard"), nl.LeakyRelu(0.1),
        D(32, 1.3, parameterization="standard"), nl.Abs(),
        D(3, 0.9, 0.3, parameterization="standard")),
    "expnorm_no_bias": lambda: nl.serial(D(64, 1.5), nl.ExpNormalized(2.0, -1.0), D(64),
                                         nl.ExpNormalized(0.5, 0.3), D(2, 1.1)),
    "gabor": lambda: nl.serial(D(64, 1.5, 0.1), nl.Gabor(), D(64, 1.3, 0.05), nl.Gabor(),
                               D(2, 1.1, 0.1)),
    "gabor_between_others": lambda: nl.serial(D(64, 1.5), nl.Relu(), D(64, 2.0, 0.2), nl.Gabor(),
                                              D(64, 1.2), nl.ExpNormalized(1.5, -0.5),
                                              D(1, 1.3)),
    "ends_on_activation": lambda: nl.serial(D(64, 1.5, 0.1), nl.Relu(), D(64, 1.2, 0.2),
                                            nl.ABRelu(-0.3, 0.8)),
    "identities_inside": lambda: nl.serial(D(64, 1.5, 0.1), nl.Identity(), nl.Relu(),
                                           nl.Dropout(0.4, "test"), D(8, 1.3, 0.1)),
}


def _spy(monkeypatch):
    calls = []
    real = _fused.fc_chain

    def spy(*a, **kw):
        calls.append(len(a[3]))  # the number of stages
        return real(*a, **kw)
    monkeypatch.setattr(_fused, "fc_chain", spy)
    return calls


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chain_equals_the_layers_own_maps(monkeypatch, name, dtype):
    arch = ARCHS[name]()
    x1 = randn64(13, 7)
    x2 = randn64(9, 7, seed=1)
    x1[4] = x2[2]                  # duplicates across and within the batches
    x1[6] = x1[1]
    calls = _spy(monkeypatch)
    for scale in (1.0, 1e-3, 1e3):
        for pair in ((x1 * scale, x2 * scale), (x1 * scale, None)):
            for get in (("nngp", "ntk"), ("nngp",)):
                with ntkit.settings(fused=False):
                    ref = arch.kernel(*pair, get=get, dtype=dtype)
                    truth = arch.kernel(*pair, get=get, dtype=torch.float64)
                assert not calls
                got = arch.kernel(*pair, get=get, dtype=dtype)
                assert calls, "the fused FC run was not used"
                calls.clear()
                for key in get:
                    g, r, t = (getattr(k, key) for k in (got, ref, truth))
                    if dtype == torch.float64:
                        assert _rel(g, r) < 1e-13, (key, scale)
                    else:  # float32: no further from the float64 kernel than the layers' own
                        err_ref = _rel(r.double(), t)
                        assert _rel(g.double(), t) < 3 * err_ref + 1e-6, (key, scale, err_ref)
                if pair[1] is None:
                    for key in get:
                        t = getattr(got, key)
                        assert torch.equal(t, t.T)
                    if dtype == torch.float64:  # the exact batch diagonal: the same vector maps
                        assert torch.equal(got.nngp.diagonal(), ref.nngp.diagonal())
                        if "ntk" in get:
                            assert _rel(got.ntk.diagonal(), ref.ntk.diagonal()) < 1e-15


def test_runs_stop_at_other_layers(monkeypatch):
    """Erf has no fused map: the run before it and the run after it are fused, Erf runs its own
    map between them."""
    arch = nl.serial(D(32, 1.5, 0.1), nl.Relu(), D(32, 1.3, 0.1), nl.Erf(), D(32, 1.2, 0.1),
                     nl.serial(nl.Relu(), D(4, 1.1, 0.1)))
    x1, x2 = randn64(11, 5), randn64(7, 5, seed=3)
    calls = _spy(monkeypatch)
    with ntkit.settings(fused=False):
        ref = arch.kernel(x1, x2)
    got = arch.kernel(x1, x2)
    # serial() flattens: [Dense, Relu, Dense], Erf, [Dense, Relu, Dense], for the one tile
    # (an untiled FC kernel needs no 1 x 1 probe)
    assert calls == [3, 3]
    assert _rel(got.nngp, ref.nngp) < 1e-13 and _rel(got.ntk, ref.ntk) < 1e-13


def test_not_used_where_it_does_not_apply(monkeypatch):
    calls = _spy(monkeypatch)
    arch = ARCHS["relu_ntk"]()
    x = randn64(6, 5)
    with ntkit.settings(fused=False):
        arch.kernel(x)
    nl.serial(D(8, 1.5), nl.Erf(), D(1)).kernel(x)          # no fused stage
    nl.serial(D(8, 1.5), nl.Relu()).kernel(x, get="nngp", tile=2)  # (a run of two is enough)
    assert calls == [2] * 7  # a 1 x 1 probe and the 6 tiles of 3 x 3 blocks on and above the
    #                          diagonal
    calls.clear()
    seq = randn64(4, 3, 6)                                   # masked sequences: the layers
    seq[:, :, 4:] = -1e9
    nl.serial(D(8, 1.5, 0.1), nl.Relu(), D(8), nl.GlobalAvgPool()).kernel(seq, mask_constant=-1e9)
    assert not calls


def test_errors_are_the_layers_own():
    x = randn64(4, 3)
    with pytest.raises(ValueError, match="needs Gaussian pre-activations"):
        nl.serial(nl.Relu(), D(4)).kernel(x)                 # activation on raw inputs
    with pytest.raises(ValueError, match="needs Gaussian pre-activations"):
        nl.serial(D(4), nl.Relu(), nl.Relu(), D(1)).kernel(x)
    with pytest.raises(ValueError, match="not representable in float32"):
        nl.serial(D(4), nl.ABRelu(0.0, 1e-36), D(1)).kernel(x, dtype=torch.float32)


@pytest.mark.parametrize("act", [nl.Relu(), nl.ExpNormalized(1.0, -1.0), nl.Gabor()])
@pytest.mark.parametrize("sym", [False, True])
def test_overflow_inside_a_run_still_raises(monkeypatch, act, sym):
    """The run flags the rows it wrote non-finite entries to and only then lets the final
    check skip its pass over the tile: a float32 kernel that overflows inside a fused run
    must still raise (with the mark set unconditionally it came back full of inf). A finite
    result is marked, and any later in-place write drops the mark."""
    calls = _spy(monkeypatch)
    arch = nl.serial(D(16, 1e15, 0.1), act, D(16, 1e15), nl.Relu(), D(1, 1e15))
    x1, x2 = randn64(9, 5).float(), None if sym else randn64(6, 5, seed=2).float()
    with pytest.raises(ValueError, match="overflows float32"):
        arch.kernel(x1, x2, dtype=torch.float32)
    assert calls
    ok = nl.serial(D(16, 1.5, 0.1), act, D(1, 1.2)).kernel(x1, x2, dtype=torch.float32)
    assert torch.isfinite(ok.nngp).all() and torch.isfinite(ok.ntk).all()


def test_finite_mark_follows_writes():
    from ntkit.layers._numeric import known_finite, mark_finite
    t = torch.ones(4, 3)
    assert not known_finite(t)
    mark_finite(t)
    assert known_finite(t)
    t[1:, 0].fill_(float("inf"))          # a write through a view bumps the shared version
    assert not known_finite(t)
    u = mark_finite(torch.ones(2))
    u.add_(1.0)
    assert not known_finite(u)
