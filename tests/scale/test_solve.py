"""Solvers: preconditioned CG (in memory and streamed from a store) against the dense float64
solve on kernels with condition numbers up to 1e8; Cholesky -> eigh fallback; clear errors."""
import numpy as np
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.scale import solve
from ntkit.scale._store import TiledMatrix
from tests.scale._kernels import data

ARCH = nl.serial(nl.Dense(512, W_std=1.4, b_std=0.1), nl.Relu(), nl.Dense(1))


@pytest.fixture(scope="module")
def ntk_eig():
    x = torch.from_numpy(data(300, 8, seed=5))
    lam, Q = torch.linalg.eigh(ARCH.kernel(x, get="ntk"))
    return lam, Q


def _controlled(lam, Q, cond, kind):
    """A real NTK's eigenvectors with a spectrum of condition number exactly ``cond``:
    'pow' keeps the NTK's decay shape (lam ** p), 'geom' is log-uniform (hardest for CG)."""
    n = lam.shape[0]
    if kind == "geom":
        new = torch.logspace(-np.log10(cond), 0, n, dtype=torch.float64)
    else:
        l = lam.clamp_min(lam[-1] * 1e-12)
        new = (l / l[-1]) ** (np.log(cond) / np.log(float(l[-1] / l[0])))
    K = (Q * new) @ Q.T
    return 0.5 * (K + K.T), float(new[-1] / new[0])


@pytest.mark.parametrize("cond, kind, prec", [
    (1e4, "pow", "pivoted_cholesky"), (1e8, "pow", "pivoted_cholesky"),
    (1e8, "pow", "nystrom"), (1e8, "geom", "pivoted_cholesky"), (1e6, "geom", "nystrom"),
])
def test_cg_matches_dense_to_tolerance(ntk_eig, cond, kind, prec):
    K, kappa = _controlled(*ntk_eig, cond, kind)
    assert kappa == pytest.approx(cond, rel=1e-6)
    y = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 3)))
    dense = torch.linalg.solve(K, y)
    tol = 1e-8
    a, info = solve(K, y, method="cg", tol=tol, preconditioner=prec, progress=False,
                    return_info=True)
    assert info.method == "cg" and info.converged and info.rank > 0
    yn = torch.linalg.norm(y, dim=0)
    res = torch.linalg.norm(y - K @ a, dim=0) / yn               # independent residual
    assert (res <= tol).all() and torch.allclose(res, info.residual, rtol=1e-6, atol=1e-14)
    # fitted values agree with the dense solve's to the tolerance (dense: ~1e-16 * kappa)
    fit = torch.linalg.norm(K @ (a - dense), dim=0) / yn
    assert (fit <= tol + 1e-15 * kappa).all(), fit
    # and the coefficients to within the condition-number bound ||da||/||a|| <= kappa * tol
    err = torch.linalg.norm(a - dense, dim=0) / torch.linalg.norm(dense, dim=0)
    assert (err <= kappa * tol * 1.01).all(), err


def test_preconditioner_reduces_passes(ntk_eig):
    K, _ = _controlled(*ntk_eig, 1e6, "pow")
    y = torch.ones(300, dtype=torch.float64)
    its = {p: solve(K, y, method="cg", tol=1e-8, preconditioner=p, progress=False,
                    return_info=True, maxiter=3000)[1].iterations
           for p in ("pivoted_cholesky", "nystrom", None)}
    assert its["pivoted_cholesky"] * 4 < its[None] and its["nystrom"] * 4 < its[None], its


def test_cg_streams_store_one_pass_per_iteration(tmp_path, monkeypatch):
    x = data(90, 6, seed=6)
    h = ntkit.compute_kernel(ARCH, x, get="ntk", store=str(tmp_path / "k.zarr"), tile=16,
                             progress=False)
    K = h.load("ntk")
    y = torch.from_numpy(np.random.default_rng(1).normal(size=(90, 2)))
    passes = [0]
    orig = TiledMatrix.iter_tiles

    def counting(self, *a, **k):
        passes[0] += 1
        return orig(self, *a, **k)
    monkeypatch.setattr(TiledMatrix, "iter_tiles", counting)
    for prec in ("pivoted_cholesky", "nystrom"):
        passes[0] = 0
        a, info = solve(h, y, method="cg", diag_reg=1e-6, tol=1e-9, preconditioner=prec,
                        rank=20, progress=False, return_info=True)
        assert info.converged
        assert passes[0] == info.iterations + 1            # + one pass to build the preconditioner
        ridge = 1e-6 * float(torch.diagonal(K).mean())
        assert info.ridge == pytest.approx(ridge)
        dense = solve(K, y, method="cholesky", diag_reg=1e-6, progress=False)
        Kr = K + ridge * torch.eye(90, dtype=torch.float64)
        fit = torch.linalg.norm(Kr @ (a - dense), dim=0) / torch.linalg.norm(y, dim=0)
        assert (fit <= 1.01e-9).all()
    # multiple right-hand sides == one at a time
    a0 = solve(h, y[:, 0], method="cg", diag_reg=1e-6, tol=1e-9, progress=False)
    torch.testing.assert_close(a0, a[:, 0], rtol=1e-6, atol=1e-8)
    # auto picks the dense path when it fits, CG when it does not
    assert solve(h, y, progress=False, return_info=True)[1].method == "cholesky"
    assert solve(h, y, progress=False, diag_reg=1e-6, memory_budget=10_000,
                 return_info=True)[1].method == "cg"


def test_cholesky_falls_back_to_eigh_on_singular_kernel():
    g = np.random.default_rng(2)
    X = g.normal(size=(40, 5))
    K = X @ X.T                                                   # rank 5
    y = g.normal(size=(40, 2))
    a, info = solve(K, y, method="cholesky", progress=False, return_info=True)
    assert info.method == "eigh"
    np.testing.assert_allclose(a.numpy(), np.linalg.pinv(K, rcond=1e-10) @ y, rtol=1e-6,
                               atol=1e-8)
    # the same through a store (lean in-place Cholesky fails -> Factorization's eigh)
    from tests.scale._kernels import two_kernels
    h = ntkit.compute_kernel(two_kernels, X, get="lin", store=None, tile=16, progress=False)
    a3, info3 = solve(h, y, key="lin", method="cholesky", progress=False, return_info=True)
    assert info3.method == "eigh"
    np.testing.assert_allclose(a3.numpy(), a.numpy(), rtol=1e-6, atol=1e-8)
    a4, info4 = solve(h, y, key="lin", method="cholesky", diag_reg=0.1, progress=False,
                      return_info=True)
    ridge = 0.1 * np.trace(K) / 40
    assert info4.method == "cholesky" and info4.ridge == pytest.approx(ridge)
    np.testing.assert_allclose(a4.numpy(), np.linalg.solve(K + ridge * np.eye(40), y), rtol=1e-9)
    a2, info2 = solve(K + np.eye(40), y, method="cholesky", progress=False, return_info=True)
    assert info2.method == "cholesky"
    np.testing.assert_allclose(a2.numpy(), np.linalg.solve(K + np.eye(40), y), rtol=1e-10)


def test_solve_errors_and_warnings(tmp_path):
    K = torch.eye(5, dtype=torch.float64) * 2
    y = torch.ones(5, dtype=torch.float64)
    for kw, needle in [(dict(method="lu"), "method"), (dict(preconditioner="ilu"),
                       "preconditioner"), (dict(tol=2.0), "tol"), (dict(diag_reg=-1),
                       "diag_reg"), (dict(method="cg", maxiter=0), "maxiter")]:
        with pytest.raises(ValueError, match=needle):
            solve(K, y, progress=False, **kw)
    with pytest.raises(ValueError, match="`y`"):
        solve(K, torch.ones(4), progress=False)
    with pytest.raises(ValueError, match="square"):
        solve(torch.ones(3, 4), torch.ones(3), progress=False)
    x1, x2 = data(6, 2), data(4, 2, seed=1)
    rect = ntkit.compute_kernel(ARCH, x1, x2, get="ntk", store=None, progress=False)
    with pytest.raises(ValueError, match="symmetric train-train"):
        solve(rect, torch.ones(6), progress=False)
    h = ntkit.compute_kernel(ARCH, x1, get="ntk", store=str(tmp_path / "k.zarr"), tile=2,
                             progress=False)
    h._done_arr[0, 1] = 0
    with pytest.raises(RuntimeError, match="incomplete"):
        solve(ntkit.scale.open_store(str(tmp_path / "k.zarr")), torch.ones(6), progress=False)
    Kbad = torch.from_numpy(np.diag(np.logspace(0, -12, 50)))
    with pytest.raises(ValueError, match="maxiter.*on_nonconvergence='warn'"):
        solve(Kbad, torch.ones(50, dtype=torch.float64), method="cg", maxiter=3,
              preconditioner=None, progress=False)
    with pytest.warns(RuntimeWarning, match="maxiter"):
        a, info = solve(Kbad, torch.ones(50, dtype=torch.float64), method="cg", maxiter=3,
                        preconditioner=None, progress=False, on_nonconvergence="warn",
                        return_info=True)
    assert not info.converged and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="on_nonconvergence"):
        solve(K, y, progress=False, on_nonconvergence="ignore")


@pytest.mark.parametrize("prec", ["pivoted_cholesky", "nystrom", None])
def test_cg_on_singular_store_is_an_error_naming_diag_reg(tmp_path, prec):
    """A rank-5 kernel and targets outside its range: (K + 0 I) alpha = y has no solution.
    CG used to return ||alpha|| ~ 1e20 with a warning; now it is an error naming the ridge, and
    with the ridge it converges to the dense solution."""
    from tests.scale._kernels import two_kernels
    g = np.random.default_rng(2)
    X = g.normal(size=(40, 5))
    y = g.normal(size=(40, 2))
    h = ntkit.compute_kernel(two_kernels, X, get="lin", store=str(tmp_path / "s.zarr"), tile=16,
                             progress=False)
    with pytest.raises(ValueError, match=r"did not converge.*diag_reg=1e-6"):
        solve(h, y, key="lin", method="cg", preconditioner=prec, progress=False)
    with pytest.warns(RuntimeWarning, match="diag_reg"):
        a, info = solve(h, y, key="lin", method="cg", preconditioner=prec, progress=False,
                        return_info=True, on_nonconvergence="warn")
    assert not info.converged and torch.isfinite(a).all()
    assert (info.residual > 1e-6).all()                       # reported honestly
    K = X @ X.T
    ridge = 1e-3 * np.trace(K) / 40
    a, info = solve(h, y, key="lin", method="cg", preconditioner=prec, diag_reg=1e-3,
                    tol=1e-9, progress=False, return_info=True)
    assert info.converged
    ref = np.linalg.solve(K + ridge * np.eye(40), y)
    res = np.linalg.norm((K + ridge * np.eye(40)) @ a.numpy() - y, axis=0) / \
        np.linalg.norm(y, axis=0)
    assert (res <= 1e-9 * 1.01).all()
    np.testing.assert_allclose(a.numpy(), ref, rtol=1e-3)
    with pytest.raises(ValueError, match="`key` 'ntk' is not in kernel store"):
        solve(h, y, key="ntk", progress=False)


def test_cg_on_dask_workers_matches_in_process(tmp_path):
    """executor=: each of 2 workers holds a row range of the stored kernel; the solution is the
    in-process CG's (same preconditioner) to the tolerance (the products round differently:
    row-range GEMMs against tile by tile), for an on-disk store (workers read their rows) and
    an in-memory one (rows sent to them)."""
    distributed = pytest.importorskip("distributed")
    from ntkit.scale._dist import _split_rows
    assert _split_rows(90, 16, 2) == [(0, 48), (48, 90)]
    assert _split_rows(90, 16, 10) == [(16 * k, min(16 * k + 16, 90)) for k in range(6)]
    x = data(90, 6, seed=7)
    disk = ntkit.compute_kernel(ARCH, x, get="ntk", store=str(tmp_path / "k.zarr"), tile=32,
                                progress=False)
    mem = ntkit.compute_kernel(ARCH, x, get="ntk", store=None, tile=32, progress=False)
    K = disk.load("ntk")
    y = torch.from_numpy(np.random.default_rng(2).normal(size=(90, 3)))
    yn = torch.linalg.norm(y, dim=0)
    kw = dict(method="cg", diag_reg=1e-6, tol=1e-10, rank=40, progress=False, return_info=True)
    with ntkit.scale.local_cluster(2) as cluster, distributed.Client(cluster) as client:
        for h, prec in ((disk, "pivoted_cholesky"), (mem, "nystrom")):
            a, info = solve(h, y, executor=client, **dict(kw, preconditioner=prec))
            r, ri = solve(h, y, **dict(kw, preconditioner=prec))
            assert info.converged and info.method == "cg" and info.ridge == ri.ridge
            Kr = K + ri.ridge * torch.eye(90, dtype=torch.float64)
            assert (torch.linalg.norm(y - Kr @ a, dim=0) / yn <= 1e-10).all()
            assert (torch.linalg.norm(Kr @ (a - r), dim=0) / yn <= 2e-10).all()
            assert abs(info.iterations - ri.iterations) <= 2 + ri.iterations // 5
        assert solve(disk, y[:, 0], executor=client, diag_reg=1e-3, tol=1e-4, progress=False,
                     return_info=True)[1].method == "cg"          # 'auto' picks CG
        with pytest.raises(ValueError, match="method='cholesky'"):
            solve(disk, y, executor=client, method="cholesky", progress=False)
        with pytest.raises(ValueError, match="in-memory tensor"):
            solve(K, y, executor=client, method="cg", progress=False)
    with pytest.raises(TypeError, match="executor"):
        solve(disk, y, executor=object(), method="cg", progress=False)
