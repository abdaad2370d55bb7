"""The CNTK table of Arora et al. (2019) on CIFAR-10, on this hardware: random CNTK features on
the full split, exact CNTKs on subsets, and the finite CNNs trained by SGD.

Rows (``--rows``, comma-separated; each architecture at every depth in ``--depths``):

* ``gap-features``: CNTK-GAP, ``depth x [Conv3x3 SAME + ReLU] + GlobalAvgPool + Dense`` NTK
  features (:func:`ntkit.features.features`; ``--method jacobian`` (default): the Jacobian of a
  random width-``--dim`` CNN sketched to ``--out-dim`` columns; ``--method rf``: random features,
  ``2 --dim`` columns) on ``--n-train`` training images (default: all 50,000) and the 10,000
  test images; primal ridge regression on one-hot targets, the ridge chosen on a held-out 10% of
  the training set, then refit on all of it.
* ``v-features``: CNTK-V (Flatten instead of GAP), features compressed to ``--v-out-dim``
  columns by an unbiased CountSketch.
* ``v-exact``: exact CNTK-V (``arch.kernel``, float32) on ``--exact-n`` training images (kernel
  regression, ridge on a held-out 20%), tested on ``--exact-test`` test images.
* ``gap-exact-small``: exact CNTK-GAP on ``--small-n`` images downsampled to 16x16, next to the
  feature version of the same network on the same images (``gap-features-small``).
* ``cnn-gap`` / ``cnn-v``: the finite networks of the same architectures (width ``--cnn-width``,
  NTK parameterization, no batch-norm or augmentation), SGD with momentum on cross-entropy for
  ``--cnn-epochs`` epochs on ``--cnn-n`` training images.

``--depths`` counts conv layers; Arora et al. count conv layers + 1 (their code's ``--depth``
help: "#conv layers + 1"), so a row of depth ``d`` is compared with their depth ``d + 1``.
``--fix`` leaves the first conv layer and the readout untrained in the feature rows (their
code's default, ``--fix yes``; ``features(..., frozen=(0, -1))``).

Each row prints (and appends to OUT.csv): accuracy, seconds, peak RSS, feature dimension,
training size, and the published number it corresponds to (Arora et al. 2019, full data).
Inputs: per-channel standardized with training statistics. The data are the shared JPEG-derived
copy (accuracy may differ from the original PNG data by about a point).

Usage::

    python bench/bench_cifar.py ../shared/data/cifar10/cifar10_jpeg_q75.npz cifar.csv
    python bench/bench_cifar.py DATA OUT.csv --quick        # minutes: small sizes, every row
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import time

import numpy as np
import torch

from ntkit import features as nf
from ntkit import layers as nl

PUBLISHED = {("CNTK-V", 3): 64.47, ("CNTK-V", 4): 65.52, ("CNTK-V", 6): 66.03,
             ("CNTK-V", 11): 65.90, ("CNTK-GAP", 3): 70.47, ("CNTK-GAP", 4): 75.93,
             ("CNTK-GAP", 6): 76.73, ("CNTK-GAP", 11): 77.43, ("CNN-V", 3): 59.97,
             ("CNN-V", 4): 60.20, ("CNN-V", 6): 64.11, ("CNN-GAP", 3): 63.81,
             ("CNN-GAP", 4): 80.93, ("CNN-GAP", 6): 83.75}


def arch(depth: int, top: str, width: int = 64):
    layers = []
    for _ in range(depth):
        layers += [nl.Conv(width, 3, padding="SAME", W_std=2 ** 0.5), nl.Relu()]
    return nl.serial(*layers, nl.GlobalAvgPool() if top == "gap" else nl.Flatten(),
                     nl.Dense(10))


def load(path: str, seed: int = 0):
    d = np.load(path)
    xtr, ytr, xte, yte = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    rng = np.random.default_rng(seed)          # the file is class-major: shuffle explicitly
    ptr, pte = rng.permutation(len(xtr)), rng.permutation(len(xte))
    xtr, ytr, xte, yte = xtr[ptr], ytr[ptr], xte[pte], yte[pte]
    def x(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255)
    xtr, xte = x(xtr), x(xte)
    mean, std = xtr.mean((0, 2, 3), keepdim=True), xtr.std((0, 2, 3), keepdim=True)
    return ((xtr - mean) / std, torch.from_numpy(ytr.astype(np.int64)),
            (xte - mean) / std, torch.from_numpy(yte.astype(np.int64)))


def zca_whiten(xtr, xte, eps):
    """ZCA whitening as in Shankar et al. (2020) and Lee et al. (2020): each image centred and
    scaled to unit mean square over its pixels, then ``W = U (L + eps mean(L))^-1/2 U^T`` from
    the training images' pixel covariance (3072 x 3072), the output rescaled to unit mean
    square. ``eps`` regularizes: large ``eps`` leaves the images nearly unchanged."""
    def flat(x):
        f = x.reshape(len(x), -1).double()
        f = f - f.mean(1, keepdim=True)
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) * f.shape[1] ** 0.5
    ftr, fte = flat(xtr), flat(xte)
    mu = ftr.mean(0)
    c = torch.zeros(ftr.shape[1], ftr.shape[1], dtype=torch.float64)
    for i in range(0, len(ftr), 10000):
        b = ftr[i:i + 10000] - mu
        c += b.T @ b
    lam, u = torch.linalg.eigh(c / len(ftr))
    w = (u * (lam.clamp_min(0) + eps * lam.clamp_min(0).mean()) ** -0.5) @ u.T
    out = [((f - mu) @ w).float().reshape(x.shape) for f, x in ((ftr, xtr), (fte, xte))]
    s = out[0].pow(2).mean().sqrt()
    return out[0] / s, out[1] / s


def onehot(y):
    return torch.nn.functional.one_hot(y, 10).double() - 0.1


def acc(pred, y):
    return float((pred.argmax(1).cpu() == y).double().mean()) * 100


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def save_features(path, phi, ytr, yte):
    """Write ``phi`` (train rows, then test rows) and the labels to a new ``.npz``; an existing
    file is never overwritten."""
    if os.path.exists(path):
        raise SystemExit(f"--save-features: {path} exists; choose a new file name")
    with open(path, "xb") as fh:                 # 'x': fails rather than replace a file
        np.savez(fh, phi=phi.numpy(), y_train=ytr.numpy(), y_test=yte.numpy())


def loaded_features(args, ytr, yte):
    """``--from-features``: the saved ``phi`` (as a tensor sharing numpy's memory), after
    checking that its labels are the run's; ``None`` without the option."""
    if not args.from_features:
        return None
    d = np.load(args.from_features)
    if not (np.array_equal(d["y_train"], ytr.numpy()) and np.array_equal(d["y_test"],
                                                                          yte.numpy())):
        raise SystemExit(f"--from-features: the labels in {args.from_features} differ from "
                         f"this run's (--seed / --n-train / --n-test must match the saving run)")
    # a tensor that owns its memory (from_numpy's storage cannot be freed before the wide
    # solver factors). NB: in this mode scipy's cho_factor segfaulted in OpenBLAS three times
    # (24,576 columns, with and without 6 GB free) while the same solve after computing the
    # features works; cause not found yet
    phi = torch.from_numpy(d["phi"]).clone()
    return phi


def flip_features(a, x, dim, out_dim, seed, chunk, method, block=4096, frozen=(),
                  readout="gaussian"):
    """``(phi(x) + phi(flip(x))) / sqrt(2)``, ``flip`` the horizontal mirror: inner products are
    ``K(x, x') + K(x, flip(x'))`` for a mirror-equivariant architecture (SAME padding), the
    kernel of the net averaged over horizontal flips -- what training on flipped copies tends
    to, at the cost of two feature passes and with no more rows."""
    from tqdm.auto import tqdm
    phi = None
    for i in tqdm(range(0, len(x), block), desc="flip-averaged features"):
        xb = x[i:i + block]
        fb = nf.features(a, xb, dim, get="ntk", seed=seed, out_dim=out_dim, chunk=chunk,
                         method=method, frozen=frozen, readout=readout)
        fb += nf.features(a, xb.flip(-1), dim, get="ntk", seed=seed, out_dim=out_dim,
                          chunk=chunk, method=method, frozen=frozen, readout=readout)
        if phi is None:
            phi = fb.new_empty((len(x), fb.shape[1]))
        phi[i:i + block] = fb.mul_(0.5 ** 0.5)
    return phi


def ensemble_features(a, x, dim, out_dim, seed, chunk, method, nets, flip=False,
                      frozen=(), readout="gaussian"):
    """Features of ``nets`` independent width-``dim`` networks (seeds ``seed .. seed+nets-1``),
    ``out_dim // nets`` columns each, concatenated and scaled by ``nets^-1/2``: inner products
    are the average of the nets' (sketched) kernels, whose finite-width fluctuations average
    out. Measured at 5,000 CIFAR rows (dual ridge, 2,000 test images, +-1.1 points): one net of
    width 128 or 181 and 2-8 nets of width 64 or 128 all give 53.0-54.2%, so at that size the
    finite width is not what limits (``bench/results/cifar_ablation.jsonl``)."""
    if nets == 1:
        if flip:
            return flip_features(a, x, dim, out_dim, seed, chunk, method, frozen=frozen,
                                 readout=readout)
        return nf.features(a, x, dim, get="ntk", seed=seed, out_dim=out_dim, progress=True,
                           chunk=chunk, method=method, frozen=frozen, readout=readout)
    if method != "jacobian" or out_dim is None or out_dim % nets:
        raise SystemExit(f"--nets {nets} needs --method jacobian and --out-dim divisible by it")
    per, phi = out_dim // nets, None
    for k in range(nets):
        fk = (flip_features(a, x, dim, per, seed + k, chunk, method, frozen=frozen,
                            readout=readout) if flip else
              nf.features(a, x, dim, get="ntk", seed=seed + k, out_dim=per, progress=True,
                          chunk=chunk, method=method, frozen=frozen, readout=readout))
        if phi is None:
            phi = fk.new_empty((len(x), out_dim))
        phi[:, k * per:(k + 1) * per] = fk.mul_(nets ** -0.5)
        del fk
    return phi


def features_row(a, xtr, ytr, xte, yte, dim, out_dim, seed, chunk, method="rf", save=None,
                 flip=False, nets=1, frozen=(), ridges=None, phi=None, readout="gaussian"):
    """Features of train+test (``flip``: averaged over horizontal flips), then primal ridge:
    the ridge is chosen on a held-out tenth of the training set (one eigendecomposition of its
    normal equations for every value) and the final model solves the full normal equations
    (sum of the two parts) by Cholesky."""
    t0 = time.time()
    if phi is None:                     # (given: features loaded by --from-features)
        phi = ensemble_features(a, torch.cat([xtr, xte]), dim, out_dim, seed, chunk, method,
                                nets, flip, frozen, readout)
    t_feat = time.time() - t0
    if save:
        save_features(save, phi, ytr, yte)
    ptr, pte = phi[:len(xtr)], phi[len(xtr):]
    nv = max(len(xtr) // 10, 1)
    y = onehot(ytr).double()
    if len(xtr) < phi.shape[1]:        # fewer rows than columns: the dual (n x n) solve
        grid = [10.0 ** (e / 2) for e in range(-14, 3)]
        fit = nf.ridge(ptr[nv:], y[nv:], grid, phi_val=ptr[:nv], y_val=y[:nv],
                       score="accuracy")
        rel = max(fit.scores, key=lambda r: (fit.scores[r], r))
        final = nf.ridge(ptr, y, rel)     # relative ridge: the same ridge per training row
        return dict(accuracy=acc(final.predict(pte), yte), seconds=time.time() - t0,
                    feature_seconds=t_feat, feature_dim=phi.shape[1], ridge_rel=rel,
                    val_accuracy=fit.scores[rel] * 100, method=method, flip=flip,
                    solver="dual", nets=nets, frozen=list(frozen))
    if phi.shape[1] > CHOLESKY_ABOVE:
        return cholesky_grid(phi, ptr, pte, y, ytr, yte, nv, t0, t_feat,
                             dict(method=method, flip=flip, nets=nets, frozen=list(frozen)),
                             **({} if ridges is None else dict(grid=tuple(ridges))))
    a_fit, b_fit, _, _ = nf.normal_equations(ptr[nv:], y[nv:])
    a_val, b_val, _, _ = nf.normal_equations(ptr[:nv], y[:nv])
    scale = float(torch.diagonal(a_fit).mean())
    lam, vec = torch.linalg.eigh(a_fit)          # reads the lower triangle: no symmetrized copy
    vb, pv = vec.T @ b_fit, ptr[:nv].double() @ vec
    scores = {}
    for r in [10.0 ** (e / 2) for e in range(-14, 3)]:
        scores[r] = acc(pv @ (vb / (lam.clamp_min(0) + r * scale)[:, None]), ytr[:nv])
    del lam, vec, pv
    rel = max(scores, key=lambda r: (scores[r], r))
    a_all, b_all = a_fit.add_(a_val), b_fit + b_val           # in place: one D x D copy less
    del a_val
    ridge_abs = rel * scale * len(xtr) / (len(xtr) - nv)   # same ridge per training example
    a_all.diagonal().add_(ridge_abs)
    w = torch.cholesky_solve(b_all, torch.linalg.cholesky(a_all))   # lower triangle only
    pred = torch.cat([pte[i:i + 8192].double() @ w for i in range(0, len(pte), 8192)])
    return dict(accuracy=acc(pred, yte), seconds=time.time() - t0, feature_seconds=t_feat,
                feature_dim=phi.shape[1], ridge_rel=rel, val_accuracy=scores[rel],
                method=method, flip=flip, nets=nets, frozen=list(frozen))


CHOLESKY_ABOVE = 16384     # wider features: a Cholesky per ridge value instead of one eigh


def cholesky_grid(phi, ptr, pte, y, ytr, yte, nv, t0, t_feat, info,
                  grid=(3e-5, 1e-4, 3e-4, 1e-3, 3e-3)):
    """Primal ridge for wide features (``D > 16384``), in about ``2 D^2`` float64 memory: the
    normal equations of the fit rows, one in-place Cholesky per ridge value on a copy (an
    eigendecomposition at this size would cost ~10x a factorization and two more ``D x D``
    matrices), the ridge with the best validation accuracy, then the validation rows added and
    one more factorization. Only the validation and test rows of ``phi`` are kept once the
    normal equations are formed."""
    a_fit, b_fit, _, _ = nf.normal_equations(ptr[nv:], y[nv:])
    pv, pt = ptr[:nv].clone(), pte.clone()
    del ptr, pte
    if phi.untyped_storage().resizable():  # free all rows now (the caller returns our result)
        phi.untyped_storage().resize_(0)
    # (not resizable once shared with numpy: --save-features / --from-features; kept then)
    scale = float(torch.diagonal(a_fit).mean())
    def solve(a, b):
        """``a^-1 b`` for symmetric positive definite ``a``, factored in place by
        :func:`cholesky_lower_` (scipy's OpenBLAS ``dpotrf`` segfaulted here at 24,576
        columns in session 14, after working in earlier runs)."""
        if not cholesky_lower_(a):
            raise SystemExit("the normal equations are not positive definite at this ridge; "
                             "pass larger --ridges")
        return cholesky_solve_lower(a, b)

    scores, work = {}, torch.empty_like(a_fit)
    for r in grid:
        work.copy_(a_fit).diagonal().add_(r * scale)
        w = solve(work, b_fit)
        scores[r] = acc(torch.cat([pv[i:i + 4096].double() @ w
                                   for i in range(0, nv, 4096)]), ytr[:nv])
        print(json.dumps({"ridge_rel": r, "val_accuracy": scores[r],
                          "seconds": round(time.time() - t0, 1)}), flush=True)
    del work
    rel = max(scores, key=lambda r: (scores[r], r))
    for i in range(0, nv, 4096):                  # + the validation rows: all training rows
        p = pv[i:i + 4096].double()
        a_fit.addmm_(p.T, p)
        b_fit.addmm_(p.T, y[i:min(i + 4096, nv)])
    a_fit.diagonal().add_(rel * scale * len(y) / (len(y) - nv))   # same ridge per row
    w = solve(a_fit, b_fit)
    pred = torch.cat([pt[i:i + 8192].double() @ w for i in range(0, len(pt), 8192)])
    return dict(accuracy=acc(pred, yte), seconds=time.time() - t0, feature_seconds=t_feat,
                feature_dim=w.shape[0], ridge_rel=rel, val_accuracy=scores[rel],
                solver="cholesky-grid", **info)


class ColumnBlocks:
    """Features of ``n`` rows in a new file under a new folder of ``work_dir`` (float32, stored
    as column blocks of ``width``: block ``b`` is an ``(n, width)`` C-ordered array, so a block
    is read in one sequential pass). The folder and file are created here (``mkdtemp``, then
    ``open(..., 'xb')``) and ``close()`` deletes only them."""

    def __init__(self, work_dir, n, dim, width=8192):
        import tempfile
        if dim % width:
            raise SystemExit(f"--out-dim {dim} must be a multiple of {width} for --solver gram")
        self.n, self.dim, self.width = n, dim, width
        self.folder = tempfile.mkdtemp(prefix="ntkit-cifar-gram-", dir=work_dir)
        self.path = os.path.join(self.folder, "features.f32")
        with open(self.path, "xb") as fh:                    # new file, never a user's
            fh.truncate(4 * n * dim)
        self.mm = np.memmap(self.path, np.float32, "r+", shape=(dim // width, n, width))

    def write(self, rows, c0, block):
        """``block`` (``len(rows)`` x ``k``) into columns ``c0 .. c0 + k`` of rows ``rows``."""
        block, j = block.numpy(), 0
        while j < block.shape[1]:
            b, off = divmod(c0 + j, self.width)
            k = min(self.width - off, block.shape[1] - j)
            self.mm[b, rows, off:off + k] = block[:, j:j + k]
            j += k

    def block(self, b, rows=slice(None)):
        """Rows ``rows`` of column block ``b`` as a tensor of its own (a copy: writing to it
        leaves the file alone)."""
        return torch.from_numpy(np.array(self.mm[b, rows], copy=True))

    def close(self):
        del self.mm
        os.remove(self.path)
        os.rmdir(self.folder)


def gram_features(a, x, dim, out_dim, seed, chunk, frozen, nets, work_dir, rows_per_call=4096,
                  width=8192, readout="gaussian", flip=False):
    """The features of ``x`` (``nets`` networks, ``out_dim / nets`` sketch columns each,
    scaled by ``nets^-1/2``) written to a :class:`ColumnBlocks` file, ``rows_per_call`` images
    at a time (the same seed gives the same network and sketch for every call). ``flip``:
    each row is ``(phi(x) + phi(flip(x))) / sqrt(2)`` (as :func:`flip_features`)."""
    from tqdm.auto import tqdm
    if out_dim % nets:
        raise SystemExit(f"--out-dim {out_dim} must be divisible by --nets {nets}")
    store, per = ColumnBlocks(work_dir, len(x), out_dim, width), out_dim // nets
    try:
        with tqdm(total=len(x) * nets, desc="features to disk" + (" (flip-averaged)" if flip
                                                                   else ""), unit="img") as bar:
            for k in range(nets):
                for i in range(0, len(x), rows_per_call):
                    xb = x[i:i + rows_per_call]
                    fb = nf.features(a, xb, dim, get="ntk", seed=seed + k, out_dim=per,
                                     chunk=chunk, method="jacobian", frozen=frozen,
                                     readout=readout)
                    if flip:
                        fb += nf.features(a, xb.flip(-1), dim, get="ntk", seed=seed + k,
                                          out_dim=per, chunk=chunk, method="jacobian",
                                          frozen=frozen, readout=readout)
                        fb.mul_(0.5 ** 0.5)
                    if fb.shape[1] != per:
                        raise SystemExit(f"--out-dim: the network has {fb.shape[1]} trained "
                                         f"parameters, fewer than {per} sketch columns")
                    store.write(slice(i, i + len(xb)), k * per, fb.mul_(nets ** -0.5))
                    bar.update(len(xb))
        store.mm.flush()
    except BaseException:
        store.close()
        raise
    return store


def lower_gram(store, n, row_block=8192):
    """``G = phi_c phi_c^T`` (float32) of the first ``n`` rows centered by their column means
    (``phi_c = phi - mean``), only the lower triangle filled (half the flops; the Cholesky
    below reads no other entry): one pass over the column blocks. Returns ``(G, means)``.
    Centering takes the constant direction out of the Gram (its largest eigenvalue, ~n times
    the mean entry), which float32 factorizations could not resolve beside small ridges."""
    from tqdm.auto import tqdm
    g = torch.zeros((n, n), dtype=torch.float32)
    means = []
    for b in tqdm(range(store.dim // store.width), desc="Gram (column blocks)"):
        blk = store.block(b, slice(0, n))
        mu = blk.double().mean(0).float()
        blk -= mu
        means.append(mu)
        for i in range(0, n, row_block):
            j = min(i + row_block, n)
            g[i:j, :j].addmm_(blk[i:j], blk[:j].T)
        del blk
    return g, means


def cholesky_lower_(g, block=8192):
    """In-place blocked Cholesky of the symmetric positive definite matrix whose lower
    triangle ``g`` (C-ordered ``n x n`` tensor) holds: afterwards its lower triangle is ``L``
    with ``L L^T = g``. Right-looking, one ``block``-wide panel at a time: a small Cholesky,
    a triangular solve, a rank-``block`` update of the trailing lower triangle (torch's own
    LAPACK/BLAS, never more than a panel of extra memory). Written because scipy's OpenBLAS
    ``spotrf`` segfaulted on a 45,000 x 45,000 block (in this bench, session 14) and torch's
    factorizations copy the whole matrix. Returns ``False`` if it is not positive definite."""
    n = g.shape[0]
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        low, info = torch.linalg.cholesky_ex(g[k0:k1, k0:k1])
        if int(info):
            return False
        g[k0:k1, k0:k1] = low
        if k1 == n:
            break
        panel = g[k1:, k0:k1]                           # X L^T = panel
        panel.copy_(torch.linalg.solve_triangular(low.T, panel, upper=True, left=False))
        for i0 in range(k1, n, block):                  # trailing lower triangle -= X X^T
            i1 = min(i0 + block, n)
            g[i0:i1, k1:i1].addmm_(panel[i0 - k1:i1 - k1], panel[:i1 - k1].T, alpha=-1)
    return True


def cholesky_solve_lower(g, y, block=8192):
    """``(L L^T)^-1 y`` for the factor left in ``g``'s lower triangle by
    :func:`cholesky_lower_`, by blocked forward and back substitution (no copy of ``g``)."""
    n = g.shape[0]
    z = y.clone()
    starts = list(range(0, n, block))
    for k0 in starts:
        k1 = min(k0 + block, n)
        z[k0:k1] = torch.linalg.solve_triangular(g[k0:k1, k0:k1], z[k0:k1], upper=False)
        if k1 < n:
            z[k1:].addmm_(g[k1:, k0:k1], z[k0:k1], alpha=-1)
    for k0 in reversed(starts):
        k1 = min(k0 + block, n)
        if k1 < n:
            z[k0:k1].addmm_(g[k1:, k0:k1].T, z[k1:], alpha=-1)
        z[k0:k1] = torch.linalg.solve_triangular(g[k0:k1, k0:k1].T, z[k0:k1], upper=True)
    return z


def gram_ridge(store, n, ytr, grid, log=True, block=8192):
    """Kernel ridge regression of one-hot ``ytr`` on the Gram of the first ``n`` rows of
    ``store`` (float32, lower triangle), with an unpenalized intercept (features centered by
    the training rows' means, targets by the fit rows'); predictions for the remaining rows.
    The ridge (relative to the mean diagonal) is chosen on the last tenth of the ``n`` rows:
    one in-place blocked float32 Cholesky (:func:`cholesky_lower_`) of a copy of the fit
    block per value, then one in place on the whole Gram with the same ridge per training
    row. The primal weights ``phi^T alpha`` come from a second pass over the file. Returns
    ``(pred, info)``."""
    t0 = time.time()
    nv = max(n // 10, 1)
    nfit = n - nv
    g, means = lower_gram(store, n)
    info = dict(gram_seconds=time.time() - t0)
    gn = g.numpy()
    y = onehot(ytr).double().numpy()
    y_fit_mean, y_mean = y[:nfit].mean(0), y.mean(0)
    y_fit, y = (y[:nfit] - y_fit_mean).astype(np.float32), (y - y_mean).astype(np.float32)
    scale = float(np.diagonal(gn)[:nfit].mean())
    scores, work = {}, torch.empty((nfit, nfit), dtype=torch.float32)
    y_fit_t, gv = torch.from_numpy(y_fit), g[nfit:, :nfit]
    for r in grid:
        work.copy_(g[:nfit, :nfit])
        work.diagonal().add_(r * scale)
        if not cholesky_lower_(work, block):
            scores[r] = -1.0                      # not positive definite in float32
            continue
        alpha = cholesky_solve_lower(work, y_fit_t, block)
        scores[r] = acc((gv @ alpha).double() + torch.from_numpy(y_fit_mean), ytr[nfit:])
        if log:
            print(json.dumps({"ridge_rel": r, "val_accuracy": scores[r],
                              "seconds": round(time.time() - t0, 1)}), flush=True)
    del work, gv
    rel = max(scores, key=lambda r: (scores[r], r))
    if scores[rel] < 0:
        raise SystemExit(f"--solver gram: no ridge in {list(grid)} left the float32 Gram "
                         f"positive definite; pass larger --ridges")
    g.diagonal().add_(rel * scale * n / nfit)                 # same ridge per training row
    if not cholesky_lower_(g, block):
        raise SystemExit(f"--solver gram: the float32 Gram with ridge {rel} (chosen on the "
                         f"fit rows) is not positive definite on all rows; pass larger --ridges")
    alpha = cholesky_solve_lower(g, torch.from_numpy(y), block).double()
    del gn, g
    pred = torch.from_numpy(y_mean).expand(store.n - n, -1).clone()
    for b in range(store.dim // store.width):     # w = phi_train^T alpha, block by block
        blk = store.block(b)
        blk -= means[b]
        pred += blk[n:].double() @ (blk[:n].double().T @ alpha)
        del blk
    return pred, dict(info, ridge_rel=rel, val_accuracy=scores[rel], scores=scores,
                      alpha=alpha)


def gram_row(a, xtr, ytr, xte, yte, dim, out_dim, seed, chunk, frozen, nets, work_dir,
             ridges=None, readout="gaussian", flip=False):
    """CNTK-GAP features of ``out_dim`` sketch columns -- beyond what the primal normal
    equations hold (``D^2`` float64) -- by kernel ridge on their exact ``n x n`` Gram
    (:func:`gram_ridge`): features on disk, Gram in float32 (4 n^2 bytes, plus 3.2 n^2 for
    the fit block's copy while the ridge is chosen)."""
    t0 = time.time()
    store = gram_features(a, torch.cat([xtr, xte]), dim, out_dim, seed, chunk, frozen, nets,
                          work_dir, readout=readout, flip=flip)
    try:
        t_feat = time.time() - t0
        pred, info = gram_ridge(store, len(xtr), ytr,
                                ridges or (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3))
        info.pop("alpha")
        return dict(accuracy=acc(pred, yte), seconds=time.time() - t0, feature_seconds=t_feat,
                    feature_dim=out_dim, solver="gram", nets=nets, frozen=list(frozen),
                    method="jacobian", readout=readout, flip=flip, **info)
    finally:
        store.close()


def exact_row(a, xtr, ytr, xte, yte):
    t0 = time.time()
    k = a.kernel(xtr, get="ntk", dtype=torch.float32, progress=True).double()
    kt = a.kernel(xte, xtr, get="ntk", dtype=torch.float32, progress=True).double()
    t_kernel = time.time() - t0
    nv = max(len(xtr) // 5, 1)
    kk, kv = k[nv:, nv:], k[:nv, nv:]
    scale = float(torch.diagonal(kk).mean())
    lam, vec = torch.linalg.eigh(kk)
    best, best_acc = None, -1.0
    yo = onehot(ytr[nv:])
    for r in [10.0 ** e for e in range(-6, 1)]:
        alpha = vec @ ((vec.T @ yo) / (lam + r * scale)[:, None])
        a_ = acc(kv @ alpha, ytr[:nv])
        if a_ > best_acc:
            best, best_acc = r, a_
    scale = float(torch.diagonal(k).mean())
    alpha = torch.linalg.solve(k + best * scale * torch.eye(len(k), dtype=k.dtype), onehot(ytr))
    return dict(accuracy=acc(kt @ alpha, yte), seconds=time.time() - t0,
                kernel_seconds=t_kernel, ridge_rel=best, val_accuracy=best_acc, feature_dim="")


def cnn_row(a, xtr, ytr, xte, yte, width, epochs, seed, lr):
    torch.manual_seed(seed)
    net = a.module(tuple(xtr.shape[1:]), width=width, seed=seed, dtype=torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(xtr) + 127) // 128))
    t0 = time.time()
    from tqdm.auto import tqdm
    for ep in tqdm(range(epochs), desc="cnn epochs"):
        perm = torch.randperm(len(xtr))
        for s in range(0, len(xtr), 128):
            idx = perm[s:s + 128]
            loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            if not torch.isfinite(loss):
                raise RuntimeError(f"SGD diverged at epoch {ep}; lower the learning rate")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = torch.cat([net(xte[s:s + 500]) for s in range(0, len(xte), 500)])
    return dict(accuracy=acc(pred, yte), seconds=time.time() - t0, feature_dim="",
                width=width, epochs=epochs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--rows", default="gap-features,v-features,v-exact,gap-exact-small,cnn-gap,"
                                      "cnn-v")
    p.add_argument("--depths", default="3,6")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--v-dim", type=int, default=None,
                   help="feature width for CNTK-V (default: --dim)")
    p.add_argument("--v-out-dim", type=int, default=4096)
    p.add_argument("--method", default="jacobian", choices=["rf", "jacobian"],
                   help="feature map for CNTK-GAP: the sketched Jacobian of a random width-"
                        "--dim CNN (rank up to --out-dim) or random features (rank 2 --dim)")
    p.add_argument("--out-dim", type=int, default=16384,
                   help="CNTK-GAP feature columns with --method jacobian")
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--exact-n", type=int, default=2000)
    p.add_argument("--exact-test", type=int, default=2000)
    p.add_argument("--small-n", type=int, default=400)
    p.add_argument("--small-dim", type=int, default=512,
                   help="feature width for the small-subset comparison with the exact kernel")
    p.add_argument("--small-out-dim", type=int, default=16384,
                   help="sketch columns of the small-subset features with --method jacobian")
    p.add_argument("--cnn-n", type=int, default=5000)
    p.add_argument("--cnn-width", type=int, default=64)
    p.add_argument("--cnn-epochs", type=int, default=10)
    p.add_argument("--cnn-lr", type=float, default=1.0,
                   help="SGD step on the NTK-parameterized weights (~ lr * W_std^2 / fan_in "
                        "in standard parameterization)")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--save-features", metavar="DIR", default=None,
                   help="also write the CNTK-GAP features and labels to DIR (a new .npz per "
                        "depth; existing files are never replaced), to try other solvers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nets", type=int, default=1,
                   help="CNTK-GAP features from this many independent width---dim networks "
                        "(--out-dim split between them; their kernels averaged)")
    p.add_argument("--flip", action="store_true",
                   help="feature rows: average the features over horizontal flips (kernel "
                        "K(x,x') + K(x,flip x'); two feature passes; not in the published table)")
    p.add_argument("--zca", type=float, default=None, metavar="EPS",
                   help="ZCA-whiten the images (regularization EPS times the mean eigenvalue, "
                        "e.g. 0.1; not in the published table)")
    p.add_argument("--fix", action="store_true",
                   help="feature rows (--method jacobian): leave the first conv layer and the "
                        "readout out of the NTK (untrained), as Arora et al.'s code does by "
                        "default (--fix yes)")
    p.add_argument("--readout", default="gaussian", choices=["gaussian", "sign"],
                   help="--method jacobian: the random network's readout weights, Gaussian or "
                        "their signs (a Rademacher readout: the same mean NTK, less variance; "
                        "features(..., readout='sign'))")
    p.add_argument("--ridges", default=None, metavar="R1,R2,...",
                   help="relative ridge values tried by the wide (> 16,384 columns) solver "
                        "(default 3e-5,1e-4,3e-4,1e-3,3e-3; one Cholesky factorization each)")
    p.add_argument("--from-features", metavar="NPZ", default=None,
                   help="gap-features row: solve on features saved by --save-features (train "
                        "rows then test rows, labels checked against the data) instead of "
                        "computing them; the other options must describe the same run")
    p.add_argument("--solver", default="primal", choices=["primal", "gram"],
                   help="gap-features row: primal ridge on the D x D normal equations (D up to "
                        "~24,576 here), or kernel ridge on the n x n Gram of the sketch "
                        "columns (features on disk under --work-dir; any --out-dim that is a "
                        "multiple of 8192; memory ~7.3 n^2 bytes)")
    p.add_argument("--work-dir", default=None,
                   help="--solver gram: folder for the temporary feature file (a new "
                        "subfolder is created and removed; default: the system temp folder)")
    p.add_argument("--quick", action="store_true", help="small sizes, every row (minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.exact_n, args.exact_test = 2000, 1000, 300, 300
        args.small_n, args.cnn_n, args.cnn_epochs, args.dim = 100, 1000, 2, 32
        args.small_dim = 64
    depths = [int(d) for d in args.depths.split(",")]
    rows = args.rows.split(",")
    if args.save_features:                   # refuse before hours of compute, not after
        if not os.path.isdir(args.save_features):
            raise SystemExit(f"--save-features: {args.save_features} is not a folder")
        for d in depths:
            fn = os.path.join(args.save_features,
                              f"gap_d{d}_w{args.dim}_D{args.out_dim}_{args.method}.npz")
            if os.path.exists(fn):
                raise SystemExit(f"--save-features: {fn} exists; choose another folder")
    xtr, ytr, xte, yte = load(args.data, args.seed)
    xtr, ytr = xtr[:args.n_train], ytr[:args.n_train]
    xte, yte = xte[:args.n_test], yte[:args.n_test]
    if args.zca is not None:
        xtr, xte = zca_whiten(xtr, xte, args.zca)
    load1 = os.getloadavg()[0]
    new = not os.path.exists(args.out)
    f = open(args.out, "a", newline="")
    cols = ["row", "method", "depth", "n_train", "n_test", "accuracy", "published", "seconds",
            "peak_rss_gb", "feature_dim", "detail"]
    w = csv.DictWriter(f, fieldnames=cols)
    if new:
        w.writeheader()
    else:                                   # append only to a results file of this bench
        with open(args.out, newline="") as g:
            head = next(csv.reader(g), None)
        if head != cols:
            f.close()
            raise SystemExit(f"{args.out} exists and is not a bench_cifar results file "
                             f"(header {head}); choose another OUT.csv")

    def emit(row, method, depth, ntr, nte, res):
        pub = PUBLISHED.get((method, depth + 1), "")    # Arora's depth: conv layers + 1
        out = dict(row=row, method=method, depth=depth, n_train=ntr, n_test=nte,
                   accuracy=round(res.pop("accuracy"), 2), published=pub,
                   seconds=round(res.pop("seconds"), 1), peak_rss_gb=round(peak_rss_gb(), 2),
                   feature_dim=res.pop("feature_dim", ""),
                   detail=json.dumps(dict(res, load_avg=load1, threads=torch.get_num_threads(),
                                          dim=args.dim, zca=args.zca)))
        w.writerow(out)
        f.flush()
        print(json.dumps(out), flush=True)

    if args.nets < 1:
        raise SystemExit(f"--nets must be >= 1, got {args.nets}")
    if args.fix and args.method != "jacobian":
        raise SystemExit("--fix needs --method jacobian (the 'rf' map has no untrained layers)")
    frozen = (0, -1) if args.fix else ()
    ridges = None if args.ridges is None else [float(r) for r in args.ridges.split(",")]
    if ridges is not None and (not ridges or min(ridges) <= 0):
        raise SystemExit(f"--ridges must be positive numbers, got {args.ridges!r}")
    tag = (("+flip" if args.flip else "") + ("+zca" if args.zca is not None else "")
           + ("+fix" if args.fix else ""))
    gtag = (tag + (f"+{args.nets}nets" if args.nets > 1 else "")
            + ("+sign" if args.readout == "sign" else ""))
    if args.solver == "gram" and (args.save_features or args.from_features
                                  or args.method != "jacobian"):
        raise SystemExit("--solver gram works with --method jacobian and without "
                         "--save-features, --from-features")
    for d in depths:
        if "gap-features" in rows and args.solver == "gram":
            emit("gap-features" + gtag + "+gram", "CNTK-GAP", d, len(xtr), len(xte),
                 gram_row(arch(d, "gap"), xtr, ytr, xte, yte, args.dim, args.out_dim,
                          args.seed, args.chunk, frozen, args.nets, args.work_dir, ridges,
                          args.readout, args.flip))
        elif "gap-features" in rows:
            emit("gap-features" + gtag, "CNTK-GAP", d, len(xtr), len(xte),
                 features_row(arch(d, "gap"), xtr, ytr, xte, yte, args.dim, args.out_dim,
                              args.seed, args.chunk, args.method,
                              args.save_features and os.path.join(
                                  args.save_features,
                                  f"gap_d{d}_w{args.dim}_D{args.out_dim}_{args.method}.npz"),
                              flip=args.flip, nets=args.nets, frozen=frozen,
                              ridges=ridges, phi=loaded_features(args, ytr, yte),
                              readout=args.readout))
        if "v-features" in rows:
            emit("v-features" + tag, "CNTK-V", d, len(xtr), len(xte),
                 features_row(arch(d, "flatten"), xtr, ytr, xte, yte, args.v_dim or args.dim,
                              args.v_out_dim, args.seed, args.chunk, args.method,
                              flip=args.flip, frozen=frozen))
        if "v-exact" in rows:
            n, m = args.exact_n, args.exact_test
            emit("v-exact", "CNTK-V", d, n, m,
                 exact_row(arch(d, "flatten"), xtr[:n], ytr[:n], xte[:m], yte[:m]))
        if "gap-exact-small" in rows:
            n, m = args.small_n, max(args.small_n // 2, 1)
            def down(t):
                return torch.nn.functional.avg_pool2d(t, 2)
            a = arch(d, "gap")
            emit("gap-exact-small(16x16)", "CNTK-GAP", d, n, m,
                 exact_row(a, down(xtr[:n]), ytr[:n], down(xte[:m]), yte[:m]))
            emit("gap-features-small(16x16)", "CNTK-GAP", d, n, m,
                 features_row(a, down(xtr[:n]), ytr[:n], down(xte[:m]), yte[:m],
                              args.small_dim, args.small_out_dim if args.method == "jacobian"
                              else None, args.seed, args.chunk, args.method))
        for top, name in (("gap", "cnn-gap"), ("flatten", "cnn-v")):
            if name in rows:
                n = args.cnn_n
                emit(name, "CNN-GAP" if top == "gap" else "CNN-V", d, n, len(xte),
                     cnn_row(arch(d, top), xtr[:n], ytr[:n], xte, yte, args.cnn_width,
                             args.cnn_epochs, args.seed, args.cnn_lr))
    f.close()


if __name__ == "__main__":
    sys.exit(main())
