"""Loaders for standard small-benchmark file formats (no network access, paths are arguments).

* :func:`load_uci` / :func:`list_uci`: the pre-processed UCI collection of Fernández-Delgado et al.
  (JMLR 2014) -- one folder per data set with ``<name>.txt`` (metadata), ``<name>_R.dat`` (data),
  ``conxuntos.dat`` (train/validation indices) and ``conxuntos_kfold.dat`` (4 train/test splits),
  the layout used by Arora et al. (2020) for the NTK-SVM study.
* :func:`load_idx`: IDX files (MNIST, Fashion-MNIST), plain or gzip-compressed, and
  :func:`load_idx_dataset` for the usual ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  quadruple.
* :func:`load_npz_dataset`: a CIFAR-10-style ``.npz`` with ``x_train, y_train, x_test, y_test``.
* :func:`load_cifar10`: the official CIFAR-10 distributions, binary (``cifar-10-batches-bin``)
  or python (``cifar-10-batches-py``; unpickled with only numpy's array types allowed).

Why: benchmarks and examples should run unchanged on any copy of these formats, so the package
never hard-codes a location; every function takes the path. All checks raise ``ValueError`` with
the file name and what is wrong (truncated file, index out of range, ...).

Example::

    >>> from ntkit import data
    >>> names = data.list_uci("/path/to/uci")
    >>> ds = data.load_uci("/path/to/uci", names[0])
    >>> ds.X.shape, ds.y.shape, ds.n_classes, ds.train_idx.shape, len(ds.folds)
    >>> (x_tr, y_tr), (x_te, y_te) = data.load_idx_dataset("/usr/share/datasets/fashion-mnist")
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from typing import Any, Dict, List, Tuple, Union

import numpy as np

__all__ = ["UCIDataset", "list_uci", "load_uci", "load_idx", "load_idx_dataset",
           "load_npz_dataset", "load_cifar10"]

#: a filesystem path: ``str`` or ``os.PathLike`` (``pathlib.Path``)
PathLike = Union[str, "os.PathLike[str]"]


# =========================================================================================
# UCI collection (Fernández-Delgado et al. 2014 layout)
# =========================================================================================

@dataclasses.dataclass(frozen=True)
class UCIDataset:
    """One data set of the UCI collection.

    Attributes:
      name: folder name.
      X: ``(n, d)`` float64 features (already standardised by the collection's authors).
      y: ``(n,)`` int64 labels in ``0 .. n_classes-1``.
      n_classes: number of classes ``c`` from the metadata.
      train_idx, val_idx: 0-based indices of the fixed train/validation split (``conxuntos.dat``).
      folds: four ``(train_idx, test_idx)`` pairs (``conxuntos_kfold.dat``).
      meta: the raw metadata ``{key: value}`` (keys keep their trailing ``=``).
    """
    name: str
    X: np.ndarray
    y: np.ndarray
    n_classes: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    folds: Tuple[Tuple[np.ndarray, np.ndarray], ...]
    meta: Dict[str, str]

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def d(self) -> int:
        return int(self.X.shape[1])


def _check_dir(root: PathLike, what: str = "root") -> str:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"`{what}` must be a path (str or os.PathLike), got {type(root).__name__}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"`{what}`={root!r} is not a directory")
    return root


def list_uci(root: PathLike) -> List[str]:
    """Sorted names of the data sets under ``root`` (folders holding ``<name>/<name>.txt``)."""
    root = _check_dir(root)
    return sorted(n for n in os.listdir(root)
                  if os.path.isfile(os.path.join(root, n, n + ".txt")))


def _read_meta(path: str) -> Dict[str, str]:
    meta: Dict[str, str] = {}
    with open(path) as fh:
        for ln, line in enumerate(fh, 1):
            tok = line.split()
            if not tok:
                continue
            if len(tok) != 2:
                raise ValueError(f"{path}:{ln}: expected 'key= value', got {line.strip()!r}")
            meta[tok[0]] = tok[1]
    for key in ("n_entradas=", "n_clases=", "fich1=", "n_patrons1="):
        if key not in meta:
            raise ValueError(f"{path}: metadata key {key!r} is missing")
    return meta


def _read_index_lines(path: str, n: int, n_lines: int) -> List[np.ndarray]:
    with open(path) as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.strip()]
    if len(lines) != n_lines:
        raise ValueError(f"{path}: expected {n_lines} lines of indices, found {len(lines)}")
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            idx = np.array(ln.split(), dtype=np.int64)
        except ValueError:
            raise ValueError(f"{path}:{i}: indices must be integers") from None
        if idx.size == 0:
            raise ValueError(f"{path}:{i}: empty index line")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{path}:{i}: index out of range [0, {n}) (indices are 0-based "
                             f"row positions of the data file)")
        out.append(idx)
    return out


def load_uci(root: PathLike, name: str) -> UCIDataset:
    """Load data set ``name`` from the UCI collection folder ``root``.

    Reads features ``X`` (fields 1..d of the data file), labels ``y`` (last field), the fixed
    train/validation split and the four train/test splits; checks shapes, label range and index
    ranges. No preprocessing is applied (the collection is already standardised).

    Example::

        >>> ds = load_uci("/data/uci", "iris")
        >>> X_tr, y_tr = ds.X[ds.train_idx], ds.y[ds.train_idx]
    """
    root = _check_dir(root)
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a data set folder name, got {name!r}")
    folder = os.path.join(root, name)
    meta_path = os.path.join(folder, name + ".txt")
    if not os.path.isfile(meta_path):
        raise ValueError(f"no data set {name!r} under {root!r} (missing {meta_path}); "
                         f"see ntkit.data.list_uci(root) for the available names")
    meta = _read_meta(meta_path)
    d, c, n = int(meta["n_entradas="]), int(meta["n_clases="]), int(meta["n_patrons1="])
    if int(meta.get("n_patrons2=", "0") or 0) > 0:
        raise ValueError(f"{name}: data sets with a separate test file (n_patrons2 > 0) are not "
                         f"supported; the UCI protocol of Arora et al. excludes them")
    data_path = os.path.join(folder, meta["fich1="])
    try:
        A = np.loadtxt(data_path, skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{data_path}: cannot parse the data table: {e}") from None
    if A.shape != (n, d + 2):
        raise ValueError(f"{data_path}: expected {n} rows x {d + 2} fields (row number, {d} "
                         f"features, class), got {A.shape}")
    X = np.ascontiguousarray(A[:, 1:-1])
    y_f = A[:, -1]
    y = y_f.astype(np.int64)
    if not np.array_equal(y, y_f) or y.min() < 0 or y.max() >= c:
        raise ValueError(f"{data_path}: labels must be integers in [0, {c}) (n_clases={c})")
    tr, va = _read_index_lines(os.path.join(folder, "conxuntos.dat"), n, 2)
    kf = _read_index_lines(os.path.join(folder, "conxuntos_kfold.dat"), n, 8)
    folds = tuple((kf[2 * r], kf[2 * r + 1]) for r in range(4))
    return UCIDataset(name=name, X=X, y=y, n_classes=c, train_idx=tr, val_idx=va, folds=folds,
                      meta=meta)


# =========================================================================================
# IDX (MNIST / Fashion-MNIST)
# =========================================================================================

_IDX_TYPES: Dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
                              0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a numpy array of its declared shape and type.

    Header: two zero bytes, a type code (0x08 = uint8 ... 0x0E = float64), the number of
    dimensions, then the sizes as big-endian uint32. Example::

        >>> images = load_idx(".../train-images-idx3-ubyte.gz")    # (60000, 28, 28) uint8
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"`path`={path!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        buf = fh.read()
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    nd = buf[3]
    if len(buf) < 4 + 4 * nd:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * nd, buf[4:4 + 4 * nd])
    dt = np.dtype(_IDX_TYPES[buf[2]])
    count = int(np.prod(dims)) if nd else 1
    body = buf[4 + 4 * nd:]
    if len(body) != count * dt.itemsize:
        raise ValueError(f"{path}: IDX body has {len(body)} bytes, header {dims} needs "
                         f"{count * dt.itemsize} (truncated or corrupt file)")
    arr = np.frombuffer(body, dtype=dt).reshape(dims)
    return arr.astype(dt.newbyteorder("="), copy=True)


def _find(folder: str, stem: str) -> str:
    for cand in (stem, stem + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    raise ValueError(f"{folder!r} has neither {stem} nor {stem}.gz")


def load_idx_dataset(folder: PathLike) -> Tuple[Tuple[np.ndarray, np.ndarray],
                                      Tuple[np.ndarray, np.ndarray]]:
    """``((x_train, y_train), (x_test, y_test))`` from an MNIST-layout folder.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``). Images ``(n, 28, 28)`` uint8, labels
    ``(n,)`` uint8. Example (Debian package ``dataset-fashion-mnist``)::

        >>> (xtr, ytr), (xte, yte) = load_idx_dataset("/usr/share/datasets/fashion-mnist")
    """
    folder = _check_dir(folder, "folder")
    out = []
    for split in ("train", "t10k"):
        x = load_idx(_find(folder, f"{split}-images-idx3-ubyte"))
        y = load_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{folder}: {split} has {x.shape[0]} images but {y.shape[0]} labels")
        out.append((x, y))
    return out[0], out[1]


# =========================================================================================
# CIFAR-10-style .npz
# =========================================================================================

def load_npz_dataset(path: PathLike,
                     keys: Tuple[str, str, str, str] = ("x_train", "y_train", "x_test", "y_test")
                     ) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """``((x_train, y_train), (x_test, y_test))`` from an ``.npz`` holding those four arrays.

    Arrays are returned as stored (e.g. CIFAR-10: ``(n, 32, 32, 3)`` uint8 HWC, labels uint8);
    use ``x.transpose(0, 3, 1, 2)`` for PyTorch's NCHW. Example::

        >>> (xtr, ytr), (xte, yte) = load_npz_dataset("cifar10.npz")
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"`path`={path!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; it holds {sorted(z.files)} "
                             f"(pass `keys=` to name them)")
        xtr, ytr, xte, yte = (z[k] for k in keys)
    for x, y, s in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: {s} has {x.shape[0]} inputs but {y.shape[0]} labels")
    return (xtr, ytr), (xte, yte)


# =========================================================================================
# CIFAR-10, official binary and python distributions
# =========================================================================================
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_REC = 1 + 3 * 32 * 32


def _cifar_bin(path: str) -> Tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_REC:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                         f"({_CIFAR_REC} bytes: 1 label + 3x32x32 pixels); truncated file?")
    rec = raw.reshape(-1, _CIFAR_REC)
    return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), rec[:, 0].copy()


def _cifar_pickle(path: str) -> Tuple[np.ndarray, np.ndarray]:
    import pickle

    class _Arrays(pickle.Unpickler):      # only numpy's array reconstruction: no code runs
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in {("numpy.core.multiarray", "_reconstruct"),
                                  ("numpy._core.multiarray", "_reconstruct"),
                                  ("numpy", "ndarray"), ("numpy", "dtype")}:
                return super().find_class(module, name)
            raise ValueError(f"{path}: refuses to unpickle {module}.{name}; a CIFAR-10 batch "
                             f"holds only numpy arrays and lists")

    with open(path, "rb") as f:
        try:
            d = _Arrays(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels'")
    x = np.asarray(d[b"data"], dtype=np.uint8)
    y = np.asarray(d[b"labels"], dtype=np.uint8)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{path}: data {x.shape} and labels {y.shape} are not (n, 3072), (n,)")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y


def load_cifar10(folder: PathLike
                 ) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """``((x_train, y_train), (x_test, y_test))`` from the official CIFAR-10 files.

    ``folder`` holds ``data_batch_1 .. 5`` and ``test_batch`` of the python distribution
    (``cifar-10-batches-py``) or the same names with ``.bin`` (``cifar-10-batches-bin``).
    Images come back as in :func:`load_npz_dataset`: ``(n, 32, 32, 3)`` uint8 HWC, labels uint8
    (50,000 / 10,000 for the full set). Example::

        >>> (xtr, ytr), (xte, yte) = load_cifar10("~/data/cifar-10-batches-py")
        >>> x = torch.from_numpy(xtr).permute(0, 3, 1, 2).float() / 255     # (n, 3, 32, 32)
    """
    folder = _check_dir(os.path.expanduser(os.fspath(folder)) if isinstance(
        folder, (str, os.PathLike)) else folder, "folder")
    names = _CIFAR_TRAIN + ("test_batch",)
    if all(os.path.isfile(os.path.join(folder, n + ".bin")) for n in names):
        read, ext = _cifar_bin, ".bin"
    elif all(os.path.isfile(os.path.join(folder, n)) for n in names):
        read, ext = _cifar_pickle, ""
    else:
        raise ValueError(f"{folder}: expected data_batch_1..5 and test_batch (python version) or "
                         f"the same with .bin (binary version); found "
                         f"{sorted(os.listdir(folder))[:10]}")
    parts = [read(os.path.join(folder, n + ext)) for n in _CIFAR_TRAIN]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read(os.path.join(folder, "test_batch" + ext))
    for y, s in ((ytr, "train"), (yte, "test")):
        if y.size and int(y.max()) > 9:
            raise ValueError(f"{folder}: {s} labels go up to {int(y.max())}; CIFAR-10 has 0..9")
    return (xtr, ytr), (xte, yte)
