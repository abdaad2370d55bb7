"""The CIFAR bench's out-of-core kernel ridge (``bench/bench_cifar.py --solver gram``) against
a float64 kernel ridge computed directly, and its temporary file handling."""
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bc():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_cifar
    finally:
        sys.path.remove(str(BENCH))
    return bench_cifar


def _data(n, m, d, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n + m, d, generator=g) + 3.0     # a large mean, as kernels have
    teacher = torch.randn(d, classes, generator=g)
    y = (phi @ teacher + 2.0 * torch.randn(n + m, classes, generator=g)).argmax(1)
    return phi, y


def test_column_blocks_round_trip_and_cleanup(bc, tmp_path):
    keep = tmp_path / "user_file.txt"
    keep.write_text("not ntkit's")
    phi, _ = _data(30, 0, 48)
    store = bc.ColumnBlocks(str(tmp_path), 30, 48, width=16)
    # rows in two calls, columns starting inside a block (what --nets > 1 writes)
    store.write(slice(0, 30), 0, phi[:, :24].clone())
    store.write(slice(0, 11), 24, phi[:11, 24:].clone())
    store.write(slice(11, 30), 24, phi[11:, 24:].clone())
    back = torch.cat([store.block(b) for b in range(3)], 1)
    assert torch.equal(back, phi)
    folder = store.folder
    assert Path(folder).parent == tmp_path
    store.close()
    assert not os.path.exists(folder)
    assert keep.read_text() == "not ntkit's"          # nothing of the user's touched
    with pytest.raises(SystemExit, match="multiple of 16"):
        bc.ColumnBlocks(str(tmp_path), 30, 40, width=16)


def test_blocked_cholesky_in_place(bc):
    """The panel-by-panel factorization and solves against torch's dense ones (float64),
    with a block that does not divide n; the upper triangle is never read."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(203, 230, generator=g, dtype=torch.float64)
    k = a @ a.T + 0.1 * torch.eye(203, dtype=torch.float64)
    y = torch.randn(203, 3, generator=g, dtype=torch.float64)
    work = torch.tril(k) + torch.triu(torch.full_like(k, float("nan")), 1)  # junk above
    assert bc.cholesky_lower_(work, block=48)
    torch.testing.assert_close(torch.tril(work), torch.linalg.cholesky(k), rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(bc.cholesky_solve_lower(work, y, block=48),
                               torch.linalg.solve(k, y), rtol=1e-8, atol=1e-10)
    bad = torch.tril(k.clone())
    bad[150, 150] = -1.0
    assert not bc.cholesky_lower_(bad, block=48)


def test_gram_ridge_is_float64_kernel_ridge(bc, tmp_path):
    n, m, d = 300, 80, 64
    phi, y = _data(n, m, d)
    store = bc.ColumnBlocks(str(tmp_path), n + m, d, width=16)
    store.write(slice(0, n + m), 0, phi.clone())
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    try:
        pred, info = bc.gram_ridge(store, n, y[:n], grid, log=False, block=64)
        # the solve reads the file and never writes it (it centers copies)
        assert torch.equal(torch.cat([store.block(b) for b in range(d // 16)], 1), phi)
    finally:
        store.close()
    # the same estimator in float64, written out: features centered by the training rows'
    # means, targets by the fit rows' (an unpenalized intercept), ridge relative to the fit
    # block's mean diagonal, chosen on the last tenth of the training rows, refit on all rows
    p = phi.double()
    p = p - p[:n].mean(0)
    k = p[:n] @ p[:n].T
    nv = n // 10
    nfit = n - nv
    scale = float(k.diagonal()[:nfit].mean())
    yy = torch.nn.functional.one_hot(y[:n], 10).double() - 0.1     # bench targets
    scores = {}
    for r in grid:
        mu = yy[:nfit].mean(0)
        a = torch.linalg.solve(k[:nfit, :nfit] + r * scale * torch.eye(nfit, dtype=p.dtype),
                               yy[:nfit] - mu)
        scores[r] = float(((k[nfit:, :nfit] @ a + mu).argmax(1) == y[nfit:n]).double().mean()
                          ) * 100
    assert info["scores"] == pytest.approx(scores)
    rel = max(scores, key=lambda r: (scores[r], r))
    assert info["ridge_rel"] == rel
    alpha = torch.linalg.solve(k + rel * scale * n / nfit * torch.eye(n, dtype=p.dtype),
                               yy - yy.mean(0))
    ref = p[n:] @ (p[:n].T @ alpha) + yy.mean(0)
    assert torch.allclose(info["alpha"], alpha, rtol=1e-3, atol=1e-4 * float(alpha.abs().max()))
    assert torch.allclose(pred, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_primal_cholesky_grid_is_float64_ridge(bc):
    """The wide primal solver (normal equations, a Cholesky per ridge value) against the same
    ridge written out with torch.linalg.solve: validation scores, chosen ridge, test accuracy."""
    n, m, d = 400, 150, 40
    phi, y = _data(n, m, d, seed=2)
    ytr, yte = y[:n], y[n:]
    yy = bc.onehot(ytr).double()
    nv, grid = n // 10, (1e-3, 1e-2, 1e-1, 1.0)
    res = bc.cholesky_grid(phi.clone(), phi[:n], phi[n:], yy, ytr, yte, nv, 0.0, 0.0, {},
                           grid=grid)
    p = phi.double()
    fit, val = p[nv:n], p[:nv]
    a = fit.T @ fit
    scale = float(a.diagonal().mean())
    eye = torch.eye(d, dtype=p.dtype)
    scores = {r: float(((val @ torch.linalg.solve(a + r * scale * eye, fit.T @ yy[nv:]))
                        .argmax(1) == ytr[:nv]).double().mean()) * 100 for r in grid}
    rel = max(scores, key=lambda r: (scores[r], r))
    w = torch.linalg.solve(p[:n].T @ p[:n] + rel * scale * n / (n - nv) * eye, p[:n].T @ yy)
    assert res["ridge_rel"] == rel
    assert res["val_accuracy"] == pytest.approx(scores[rel])
    assert res["accuracy"] == pytest.approx(
        float(((p[n:] @ w).argmax(1) == yte).double().mean()) * 100)


def test_gram_features_flip_and_nets(bc, tmp_path):
    """What ``--solver gram`` writes to its file: per network ``k`` (seed ``seed + k``) the
    sketched Jacobian features of the images, plus those of their horizontal mirrors with
    ``flip``, times ``(2 nets)^-1/2``; row blocks of any size give the same rows."""
    from ntkit import features as nf
    a = bc.arch(2, "gap", width=8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, 6, 6, generator=g)
    kw = dict(get="ntk", out_dim=32, chunk=4, method="jacobian", frozen=(0, -1),
              readout="sign")
    store = bc.gram_features(a, x, 8, 64, 5, 4, (0, -1), 2, str(tmp_path), rows_per_call=3,
                             width=16, readout="sign", flip=True)
    try:
        got = torch.cat([store.block(b) for b in range(4)], 1)
    finally:
        store.close()
    want = torch.cat([(nf.features(a, x, 8, seed=s, **kw)
                       + nf.features(a, x.flip(-1), 8, seed=s, **kw)) * 0.5
                      for s in (5, 6)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the flip-averaged Gram is K(x, x') + K(x, flip x') of the features' kernel
    phi = nf.features(a, x, 8, seed=5, **kw).double()
    phif = nf.features(a, x.flip(-1), 8, seed=5, **kw).double()
    g2 = got[:, :32].double() @ got[:, :32].double().T * 2
    torch.testing.assert_close(g2, (phi @ phi.T + phi @ phif.T + phif @ phi.T + phif @ phif.T)
                               / 2, rtol=1e-4, atol=1e-4)
