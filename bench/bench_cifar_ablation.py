"""What moves the CNTK-GAP feature accuracy: one configuration per call on a CIFAR-10 subset,
dual kernel ridge on the feature Gram (exact for the features; seconds for n = 5,000).

Knobs: sketch columns (``--D``), several independent width-``--width`` networks concatenated
(``--nets``: their kernels averaged, less finite-width variance), ZCA whitening (``--zca EPS``)
and averaging the features over horizontal flips (``--flip``). Results are appended to OUT as
JSON lines (accuracy on ``--nt`` test images, ridge chosen on a held-out 20% of the ``--n``
training images, seconds, load average).

Usage::

    python bench/bench_cifar_ablation.py ../shared/data/cifar10/cifar10_jpeg_q75.npz \
        out.jsonl --flip --zca 0.1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cifar import acc, arch, flip_features, load, onehot, zca_whiten  # noqa: E402

from ntkit import features as nf  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--nt", type=int, default=2000)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--D", type=int, default=16384)
    p.add_argument("--nets", type=int, default=1)
    p.add_argument("--zca", type=float, default=None)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--chunk", type=int, default=128)
    a = p.parse_args(argv)
    if os.path.exists(a.out) and not a.out.endswith(".jsonl"):
        raise SystemExit(f"{a.out} exists and is not a .jsonl results file; choose another")
    xtr, ytr, xte, yte = load(a.data)
    xtr, ytr, xte, yte = xtr[:a.n], ytr[:a.n], xte[:a.nt], yte[:a.nt]
    if a.zca is not None:
        xtr, xte = zca_whiten(xtr, xte, a.zca)
    t0 = time.time()
    x, net = torch.cat([xtr, xte]), arch(a.depth, "gap")
    parts = []
    for s in range(a.nets):
        if a.flip:
            parts.append(flip_features(net, x, a.width, a.D // a.nets, s, a.chunk, "jacobian"))
        else:
            parts.append(nf.features(net, x, a.width, get="ntk", seed=s, out_dim=a.D // a.nets,
                                     method="jacobian", chunk=a.chunk))
    phi = torch.cat(parts, 1).double()
    t_feat = time.time() - t0
    k, kt = phi[:a.n] @ phi[:a.n].T, phi[a.n:] @ phi[:a.n].T
    del phi, parts
    nv = a.n // 5
    kk, kv = k[nv:, nv:], k[:nv, nv:]
    scale = float(kk.diagonal().mean())
    lam, vec = torch.linalg.eigh(kk)
    vy = vec.T @ onehot(ytr[nv:])
    val = {r: acc(kv @ (vec @ (vy / (lam.clamp_min(0) + r * scale)[:, None])), ytr[:nv])
           for r in [10.0 ** (e / 2) for e in range(-12, 2)]}
    r = max(val, key=lambda q: (val[q], q))
    scale = float(k.diagonal().mean())
    alpha = torch.linalg.solve(k + r * scale * torch.eye(len(k), dtype=k.dtype), onehot(ytr))
    res = dict(n=a.n, nt=a.nt, depth=a.depth, width=a.width, D=a.D, nets=a.nets, zca=a.zca,
               flip=a.flip, accuracy=round(acc(kt @ alpha, yte), 2), val_accuracy=val[r],
               ridge_rel=r, feature_seconds=round(t_feat, 1),
               seconds=round(time.time() - t0, 1), load_avg=os.getloadavg()[0])
    print(json.dumps(res), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    sys.exit(main())
