"""Tests for ntkit.data: UCI collection layout, IDX(.gz), CIFAR-style .npz.

Synthetic files written in the documented formats are the oracle (exact round trips, and each
kind of corruption gives a clear error); the shared copies of the real data, when present, are
checked against the facts stated in their READMEs.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from ntkit import data

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
UCI = os.path.abspath(os.path.join(SHARED, "uci"))
FMNIST = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------------------------------
# UCI layout
# ---------------------------------------------------------------------------------------

def _write_uci(root, name, X, y, c, tr, va, folds):
    folder = root / name
    folder.mkdir(parents=True)
    n, d = X.shape
    (folder / f"{name}.txt").write_text(
        f"n_entradas= {d}\nn_clases= {c}\nn_arquivos= 1\nfich1= {name}_R.dat\n"
        f"n_patrons1= {n}\nn_patrons_entrena= {len(tr)}\nn_patrons_valida= {len(va)}\n"
        f"n_conxuntos= 1\n")
    lines = ["\t" + "\t".join(f"f{j + 1}" for j in range(d)) + "\tclase"]
    for i in range(n):
        lines.append("\t".join([str(i + 1)] + [f"{v:.6g}" for v in X[i]] + [str(y[i])]))
    (folder / f"{name}_R.dat").write_text("\n".join(lines) + "\n")
    (folder / "conxuntos.dat").write_text(
        " ".join(map(str, tr)) + " \n" + " ".join(map(str, va)) + " \n")
    (folder / "conxuntos_kfold.dat").write_text(
        "".join(" ".join(map(str, a)) + " \n" + " ".join(map(str, b)) + " \n" for a, b in folds))
    return folder


def _synthetic(tmp_path, name="toy", n=11, d=3, c=3, seed=0):
    rng = np.random.default_rng(seed)
    X = np.round(rng.standard_normal((n, d)), 5)
    y = np.arange(n) % c
    perm = rng.permutation(n)
    tr, va = perm[: (n + 1) // 2], perm[(n + 1) // 2:]
    folds = []
    for _ in range(4):
        p = rng.permutation(n)
        folds.append((p[n // 4:], p[: n // 4]))
    _write_uci(tmp_path, name, X, y, c, tr, va, folds)
    return X, y, tr, va, folds


def test_load_uci_round_trip(tmp_path):
    X, y, tr, va, folds = _synthetic(tmp_path)
    _synthetic(tmp_path, name="other", n=6, c=2, seed=1)
    (tmp_path / "not_a_dataset").mkdir()
    assert data.list_uci(tmp_path) == ["other", "toy"]
    ds = data.load_uci(tmp_path, "toy")
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.X.dtype == np.float64 and ds.y.dtype == np.int64
    assert (ds.n, ds.d, ds.n_classes) == (11, 3, 3)
    np.testing.assert_array_equal(ds.train_idx, tr)
    np.testing.assert_array_equal(ds.val_idx, va)
    assert len(ds.folds) == 4
    for (a, b), (a2, b2) in zip(ds.folds, folds):
        np.testing.assert_array_equal(a, a2)
        np.testing.assert_array_equal(b, b2)
    assert ds.meta["fich1="] == "toy_R.dat"


@pytest.mark.parametrize("corrupt, match", [
    ("index", "out of range"),
    ("label", "labels must be integers"),
    ("rows", "expected 11 rows"),
    ("kfold_lines", "expected 8 lines"),
    ("meta", "missing"),
])
def test_load_uci_corruptions_give_clear_errors(tmp_path, corrupt, match):
    _synthetic(tmp_path)
    f = tmp_path / "toy"
    if corrupt == "index":
        (f / "conxuntos.dat").write_text("0 1 2 99 \n3 4 \n")
    elif corrupt == "label":
        lines = (f / "toy_R.dat").read_text().splitlines()
        lines[1] = lines[1].rsplit("\t", 1)[0] + "\t7"
        (f / "toy_R.dat").write_text("\n".join(lines) + "\n")
    elif corrupt == "rows":
        lines = (f / "toy_R.dat").read_text().splitlines()
        (f / "toy_R.dat").write_text("\n".join(lines[:-1]) + "\n")
    elif corrupt == "kfold_lines":
        lines = (f / "conxuntos_kfold.dat").read_text().splitlines()
        (f / "conxuntos_kfold.dat").write_text("\n".join(lines[:6]) + "\n")
    elif corrupt == "meta":
        (f / "toy.txt").write_text("n_clases= 3\n")
    with pytest.raises(ValueError, match=match):
        data.load_uci(tmp_path, "toy")


def test_load_uci_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        data.load_uci(tmp_path / "nope", "x")
    with pytest.raises(ValueError, match="list_uci"):
        data.load_uci(tmp_path, "x")
    with pytest.raises(TypeError, match="root"):
        data.list_uci(3)


@pytest.mark.skipif(not os.path.isdir(UCI), reason="shared UCI collection not present")
def test_shared_uci_collection_matches_its_readme():
    names = data.list_uci(UCI)
    assert len(names) == 60
    for name in names:
        ds = data.load_uci(UCI, name)
        n = ds.n
        # standardised columns (mean 0, sample std 1), ~6 significant digits in the files
        np.testing.assert_allclose(ds.X.mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(ds.X.std(0, ddof=1), 1.0, atol=1e-3)
        assert set(np.unique(ds.y)) == set(range(ds.n_classes))
        assert len(ds.train_idx) == (n + 1) // 2 and len(ds.val_idx) == n // 2
        assert np.array_equal(np.sort(np.concatenate([ds.train_idx, ds.val_idx])), np.arange(n))
        for a, b in ds.folds:
            assert len(b) in (n // 4, (n + 3) // 4)
            assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(n))


# ---------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------

def _idx_bytes(arr, code):
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype, code", [(np.uint8, 0x08), (np.int32, 0x0C), (np.float64, 0x0E)])
def test_idx_round_trip(tmp_path, compress, dtype, code):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((5, 4, 3)) * 50).astype(dtype)
    raw = _idx_bytes(arr, code)
    p = tmp_path / ("a.idx.gz" if compress else "a.idx")
    p.write_bytes(gzip.compress(raw) if compress else raw)
    out = data.load_idx(p)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype(dtype) and out.flags.writeable


def test_idx_errors(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = _idx_bytes(arr, 0x08)
    (tmp_path / "trunc").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.load_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="magic"):
        data.load_idx(tmp_path / "magic")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_idx(tmp_path / "none")


def test_idx_dataset_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 3)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x, 8)))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(y, 8))
    (xtr, ytr), (xte, yte) = data.load_idx_dataset(tmp_path)
    assert xtr.shape == (6, 28, 28) and ytr.shape == (6,) and xte.shape == (3, 28, 28)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        data.load_idx_dataset(tmp_path)


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_if_installed():
    (xtr, ytr), (xte, yte) = data.load_idx_dataset(FMNIST)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert np.bincount(ytr).tolist() == [6000] * 10


# ---------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------

def test_npz_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    arrs = dict(x_train=rng.integers(0, 255, (4, 32, 32, 3)).astype(np.uint8),
                y_train=np.arange(4, dtype=np.uint8), x_test=np.zeros((2, 32, 32, 3), np.uint8),
                y_test=np.arange(2, dtype=np.uint8))
    np.savez_compressed(tmp_path / "c.npz", **arrs)
    (xtr, ytr), (xte, yte) = data.load_npz_dataset(tmp_path / "c.npz")
    np.testing.assert_array_equal(xtr, arrs["x_train"])
    np.testing.assert_array_equal(yte, arrs["y_test"])
    np.savez(tmp_path / "bad.npz", x_train=arrs["x_train"], y_train=arrs["y_train"])
    with pytest.raises(ValueError, match="missing arrays"):
        data.load_npz_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "mis.npz", x_train=arrs["x_train"], y_train=arrs["y_train"][:3],
             x_test=arrs["x_test"], y_test=arrs["y_test"])
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        data.load_npz_dataset(tmp_path / "mis.npz")


# ---- CIFAR-10 official formats ----------------------------------------------------------

def _cifar_batches(rng, n):
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)     # channel planes, as stored
    y = rng.integers(0, 10, n).astype(np.uint8)
    return x, y


def _write_cifar(folder, fmt, rng):
    import pickle
    import os
    os.makedirs(folder)
    want = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = _cifar_batches(rng, 3 + i)
        want[name] = (x, y)
        if fmt == "bin":
            rec = np.concatenate([y[:, None], x.reshape(len(y), -1)], 1)
            rec.astype(np.uint8).tofile(os.path.join(folder, name + ".bin"))
        else:
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({b"data": x.reshape(len(y), -1), b"labels": [int(v) for v in y],
                             b"batch_label": b"x"}, f)
    return want


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_load_cifar10_official_formats(tmp_path, fmt):
    from ntkit.data import load_cifar10
    want = _write_cifar(tmp_path / "c", fmt, np.random.default_rng(0))
    (xtr, ytr), (xte, yte) = load_cifar10(tmp_path / "c")
    tr = [want[f"data_batch_{k}"] for k in range(1, 6)]
    np.testing.assert_array_equal(xtr, np.concatenate([x for x, _ in tr]).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ytr, np.concatenate([y for _, y in tr]))
    np.testing.assert_array_equal(xte, want["test_batch"][0].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(yte, want["test_batch"][1])
    assert xtr.shape[1:] == (32, 32, 3) and xtr.dtype == np.uint8


def test_load_cifar10_refuses_bad_files(tmp_path):
    import os
    import pickle
    from ntkit.data import load_cifar10
    _write_cifar(tmp_path / "b", "bin", np.random.default_rng(1))
    with open(tmp_path / "b" / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 5)                                    # truncated record
    with pytest.raises(ValueError, match="whole number"):
        load_cifar10(tmp_path / "b")
    _write_cifar(tmp_path / "p", "py", np.random.default_rng(2))
    with open(tmp_path / "p" / "test_batch", "wb") as f:         # a pickle that would run code
        pickle.dump(os.getcwd, f)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_cifar10(tmp_path / "p")
    with pytest.raises(ValueError, match="data_batch"):
        load_cifar10(tmp_path)
