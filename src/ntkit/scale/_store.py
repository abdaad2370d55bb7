"""On-disk tiled kernel matrices: a Zarr group with one array per kernel and a tile ledger.

Layout of a store (a Zarr v3 group, a directory ``k.zarr`` for local paths)::

    attrs["ntkit_kernel_store"]   layout version
    attrs["fingerprint"]          {component: text} (function, x1, x2, dtype, tile, get, version)
    attrs["meta"]                 n1, n2, tile, keys, symmetric, tail, mirror
    <key>  (n1, n2, *tail)        one per kernel ('nngp', 'ntk', ...), chunks = one tile
    done   (n_row_tiles, n_col_tiles) uint8, one chunk per tile: 1 = tile complete

Why a per-tile ``done`` flag: a tile's data is written first, then its flag (each chunk write is
atomic in Zarr's local store: written to a temporary file and renamed). A process killed between
the two leaves an unflagged tile, which is recomputed on resume, so a "done" tile is never corrupt.
When ``x2`` is ``None`` only tiles with ``i <= j`` are stored; reads mirror the lower triangle.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["KernelStore", "TiledMatrix", "StoreStatus", "open_store"]

LAYOUT = 1


@dataclasses.dataclass(frozen=True)
class StoreStatus:
    """Progress of a tiled kernel computation.

    Attributes: ``done`` / ``total`` tiles, ``fraction``, ``complete``, ``shape`` ``(n1, n2)``,
    ``tile`` edge, ``keys`` stored, ``symmetric`` (upper triangle only), ``path``.
    """
    path: str
    shape: Tuple[int, int]
    tile: int
    keys: Tuple[str, ...]
    symmetric: bool
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def __str__(self) -> str:
        kind = "symmetric, upper-triangle tiles" if self.symmetric else "rectangular"
        return (f"{self.path}: {self.shape[0]} x {self.shape[1]} kernel ({', '.join(self.keys)}), "
                f"tile {self.tile}, {kind}: {self.done}/{self.total} tiles done "
                f"({100 * self.fraction:.1f}%){'' if self.complete else ' -- incomplete'}")


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover
        raise ImportError("on-disk kernel stores need zarr>=3: pip install 'ntkit[scale]'") \
            from None
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"ntkit.scale needs zarr>=3, found {zarr.__version__}")
    return zarr


def n_tiles(n: int, tile: int) -> int:
    return -(-n // tile)


def tile_pairs(n1: int, n2: int, tile: int, symmetric: bool) -> List[Tuple[int, int]]:
    """All stored tiles ``(i, j)``, row-major (upper triangle only when symmetric)."""
    a, b = n_tiles(n1, tile), n_tiles(n2, tile)
    return [(i, j) for i in range(a) for j in range(b) if not symmetric or j >= i]


class TiledMatrix:
    """Lazy view of one stored kernel, ``(n1, n2, *tail)``; slicing reads only the tiles it needs.

    ``m[i0:i1, j0:j1]`` returns a float torch tensor (integer indices and steps are allowed; the
    bounding rows/columns are read). Tiles not computed yet read as NaN. ``m.load()`` is ``m[:, :]``
    but refuses an incomplete store.
    """

    def __init__(self, store: "KernelStore", key: str):
        self.store, self.key = store, key
        self._arr = store._group[key]

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._arr.shape)

    @property
    def dtype(self):
        return self._arr.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TiledMatrix({self.store.path!r}, key={self.key!r}, shape={self.shape})"

    def _tile(self, i: int, j: int) -> np.ndarray:
        """Stored tile ``(i, j)`` (mirrored from ``(j, i)`` below the diagonal), NaN if missing."""
        s = self.store
        if s.symmetric and j < i:
            return s._mirror(self._tile(j, i))
        I, J = s.rows(i), s.cols(j)
        if not s.is_done(i, j):
            return np.full((I.stop - I.start, J.stop - J.start) + s.tail, np.nan, self.dtype)
        return np.asarray(self._arr[I, J])

    def __getitem__(self, idx) -> torch.Tensor:
        if not isinstance(idx, tuple):
            idx = (idx, slice(None))
        if len(idx) != 2:
            raise IndexError("index a kernel as m[rows, cols] (two slices or integers)")
        n1, n2 = self.shape[:2]
        sel, squeeze = [], []
        for k, (ix, n) in enumerate(zip(idx, (n1, n2))):
            if isinstance(ix, (int, np.integer)):
                ix = int(ix) + (n if ix < 0 else 0)
                if not 0 <= ix < n:
                    raise IndexError(f"index {ix} out of range for axis {k} of size {n}")
                sel.append(slice(ix, ix + 1, 1))
                squeeze.append(k)
            elif isinstance(ix, slice):
                sel.append(slice(*ix.indices(n)))
            else:
                raise IndexError(f"kernel views take slices or integers, got {type(ix).__name__}")
        (a0, a1, sa), (b0, b1, sb) = [(s.start, s.stop, s.step) for s in sel]
        if sa < 0 or sb < 0:
            raise IndexError("negative steps are not supported; read the block and flip it")
        t = self.store.tile
        out = np.empty((max(a1 - a0, 0), max(b1 - b0, 0)) + self.store.tail, self.dtype)
        if out.size:
            for i in range(a0 // t, n_tiles(a1, t)):
                for j in range(b0 // t, n_tiles(b1, t)):
                    blk = self._tile(i, j)
                    r0, r1 = max(a0, i * t), min(a1, (i + 1) * t)
                    c0, c1 = max(b0, j * t), min(b1, (j + 1) * t)
                    out[r0 - a0:r1 - a0, c0 - b0:c1 - b0] = blk[r0 - i * t:r1 - i * t,
                                                                  c0 - j * t:c1 - j * t]
        out = out[::sa, ::sb]
        res = torch.from_numpy(np.ascontiguousarray(out))
        for k in reversed(squeeze):
            res = res.squeeze(k)
        return res

    def load(self) -> torch.Tensor:
        """The full ``(n1, n2, *tail)`` matrix as a torch tensor (must be complete)."""
        self.store._require_complete()
        return self[:, :]

    def diagonal(self) -> torch.Tensor:
        """``K[i, i]`` for a symmetric 2-D kernel, from the diagonal tiles only."""
        s = self.store
        if not s.symmetric or s.tail:
            raise ValueError("diagonal() needs a symmetric 2-D kernel (computed with x2=None)")
        parts = []
        for i in range(n_tiles(s.n1, s.tile)):
            blk = self._tile(i, i)
            parts.append(np.diagonal(blk).copy())
        return torch.from_numpy(np.concatenate(parts))

    def iter_tiles(self, prefetch: bool = True) -> Iterator[Tuple[slice, slice, np.ndarray]]:
        """Stored tiles ``(rows, cols, block)`` (upper triangle only when symmetric), each read
        once; the next tile is read in a background thread while the caller works on this one."""
        s = self.store
        s._require_complete()
        pairs = s.pairs()
        if not prefetch:
            for i, j in pairs:
                yield s.rows(i), s.cols(j), np.asarray(self._arr[s.rows(i), s.cols(j)])
            return
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as ex:
            nxt = ex.submit(lambda p: np.asarray(self._arr[s.rows(p[0]), s.cols(p[1])]), pairs[0]) \
                if pairs else None
            for k, (i, j) in enumerate(pairs):
                blk = nxt.result()
                if k + 1 < len(pairs):
                    p = pairs[k + 1]
                    nxt = ex.submit(lambda p: np.asarray(self._arr[s.rows(p[0]), s.cols(p[1])]), p)
                yield s.rows(i), s.cols(j), blk

    def matmul(self, v, progress: bool = False) -> torch.Tensor:
        """``K @ v`` for ``v`` of shape ``(n2,)`` or ``(n2, k)``, in one pass over the stored tiles
        (float64). For a symmetric store each upper tile is used twice (``K_ij v_j`` and
        ``K_ij^T v_i``)."""
        s = self.store
        if s.tail:
            raise ValueError("matmul needs a 2-D kernel (no spatial axes)")
        v = torch.as_tensor(v, dtype=torch.float64)
        vec = v.ndim == 1
        v2 = (v[:, None] if vec else v).numpy()
        if v2.shape[0] != s.n2:
            raise ValueError(f"`v` must have {s.n2} rows (the kernel is {s.n1} x {s.n2}), got "
                             f"{tuple(v.shape)}")
        out = np.zeros((s.n1, v2.shape[1]))
        from tqdm.auto import tqdm
        for I, J, blk in tqdm(self.iter_tiles(), total=len(s.pairs()), desc="K @ v",
                              disable=not progress, leave=False):
            blk = blk.astype(np.float64, copy=False)
            out[I] += blk @ v2[J]
            if s.symmetric and I != J:
                out[J] += blk.T @ v2[I]
        res = torch.from_numpy(out)
        return res[:, 0] if vec else res


class KernelStore:
    """Handle on a tiled kernel store (returned by :func:`ntkit.compute_kernel`).

    ``h['ntk']`` is a lazy :class:`TiledMatrix` (``h['ntk'][0:100, 0:100]`` reads only the tiles
    it needs); ``h.load('ntk')`` is the full torch tensor; ``h.status()`` reports progress.

    Example::

        >>> h = ntkit.compute_kernel(arch, x, store='k.zarr', tile=1024)
        >>> h.status()                     # StoreStatus(... done=55, total=55)
        >>> block = h['ntk'][:10, :10]     # (10, 10) tensor, one tile read
        >>> K = h.load('ntk')              # (n, n) tensor, the lower triangle mirrored
    """

    def __init__(self, path, mode: str = "r"):
        zarr = _zarr()
        self.path = path if isinstance(path, str) else getattr(path, "path", repr(path))
        if isinstance(path, str) and mode == "r" and not os.path.exists(path):
            raise FileNotFoundError(f"no kernel store at {path!r}")
        try:
            self._group = zarr.open_group(path, mode=mode)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise ValueError(f"{self.path!r} is not a readable Zarr kernel store ({e})") from None
        attrs = dict(self._group.attrs)
        if "ntkit_kernel_store" not in attrs:
            raise ValueError(f"{self.path!r} is a Zarr group but not an ntkit kernel store (no "
                             f"'ntkit_kernel_store' attribute); choose another store path")
        meta = attrs["meta"]
        self.fingerprint: Dict[str, str] = dict(attrs["fingerprint"])
        self.n1, self.n2 = int(meta["n1"]), int(meta["n2"])
        self.tile = int(meta["tile"])
        self.keys: Tuple[str, ...] = tuple(meta["keys"])
        self.symmetric = bool(meta["symmetric"])
        self.tail: Tuple[int, ...] = tuple(meta["tail"])
        self._perm = tuple(meta["mirror"])
        self._done_arr = self._group["done"]
        self._done = np.asarray(self._done_arr[:]).astype(bool)
        self._valid = np.zeros(self._done.shape, dtype=bool)
        for p in self.pairs():
            self._valid[p] = True

    # ---- geometry ----------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int]:
        return (self.n1, self.n2)

    def rows(self, i: int) -> slice:
        return slice(i * self.tile, min((i + 1) * self.tile, self.n1))

    def cols(self, j: int) -> slice:
        return slice(j * self.tile, min((j + 1) * self.tile, self.n2))

    def pairs(self) -> List[Tuple[int, int]]:
        return tile_pairs(self.n1, self.n2, self.tile, self.symmetric)

    def _mirror(self, blk: np.ndarray) -> np.ndarray:
        return np.transpose(blk, (1, 0) + tuple(2 + p for p in self._perm))

    # ---- progress ------------------------------------------------------------------------
    def is_done(self, i: int, j: int) -> bool:
        if not self._done[i, j]:
            self._done[i, j] = bool(self._done_arr[i, j])
        return bool(self._done[i, j])

    def refresh(self) -> "KernelStore":
        """Re-read the tile ledger (another process may be writing)."""
        self._done = np.asarray(self._done_arr[:]).astype(bool)
        return self

    def missing(self) -> List[Tuple[int, int]]:
        """Tiles not yet complete."""
        self.refresh()
        return [p for p in self.pairs() if not self._done[p]]

    def status(self) -> StoreStatus:
        """Tiles done / total (re-reads the ledger)."""
        pairs = self.pairs()
        done = len(pairs) - len(self.missing())
        return StoreStatus(self.path, self.shape, self.tile, self.keys, self.symmetric, done,
                           len(pairs))

    def _require_complete(self) -> None:
        if self._done[self._valid].all():   # flags only go 0 -> 1: no re-read per CG pass
            return
        st = self.status()
        if not st.complete:
            raise RuntimeError(f"kernel store {self.path!r} is incomplete ({st.done}/{st.total} "
                               f"tiles); rerun the same ntkit.compute_kernel(...) call (or `ntkit "
                               f"kernel ... --store {self.path}`) to finish it")

    # ---- data ------------------------------------------------------------------------
    def __getitem__(self, key: str) -> TiledMatrix:
        if key not in self.keys:
            raise KeyError(f"kernel {key!r} is not in store {self.path!r}; it holds {self.keys}")
        return TiledMatrix(self, key)

    def load(self, key: Optional[str] = None) -> torch.Tensor:
        """The full matrix ``key`` (default: the only stored kernel) as a torch tensor."""
        if key is None:
            if len(self.keys) != 1:
                raise ValueError(f"store {self.path!r} holds {self.keys}; say which: "
                                 f"load({self.keys[-1]!r})")
            key = self.keys[0]
        return self[key].load()

    def __repr__(self) -> str:
        return f"KernelStore({self.status()})"

    # ---- writing (used by compute_kernel) -------------------------------------------------
    def _write_tile(self, i: int, j: int, blocks: Dict[str, np.ndarray]) -> None:
        I, J = self.rows(i), self.cols(j)
        for key in self.keys:
            blk = blocks[key]
            if self.symmetric and i == j:
                # the upper triangle is the computed one; mirror it so K == K^T exactly
                low = np.tril(np.ones(blk.shape[:2], dtype=bool), -1)
                low = low.reshape(low.shape + (1,) * len(self.tail))
                blk = np.where(low, self._mirror(blk), blk)
            self._group[key][I, J] = blk                  # data first ...
        self._mark_done(i, j)                              # ... then the flag

    def _mark_done(self, i: int, j: int) -> None:
        self._done_arr[i, j] = 1
        self._done[i, j] = True


def create_store(path, *, n1: int, n2: int, tile: int, keys: Sequence[str], symmetric: bool,
                 tail: Tuple[int, ...], mirror: Tuple[int, ...], dtype: np.dtype,
                 fingerprint: Dict[str, str], overwrite: bool) -> KernelStore:
    zarr = _zarr()
    g = zarr.open_group(path, mode="w" if overwrite else "w-")
    kw = dict(compressors=None, fill_value=np.nan)
    for key in keys:
        g.create_array(key, shape=(n1, n2) + tuple(tail), chunks=(tile, tile) + tuple(tail),
                       dtype=dtype, **kw)
    g.create_array("done", shape=(n_tiles(n1, tile), n_tiles(n2, tile)), chunks=(1, 1),
                   dtype="uint8", fill_value=0, compressors=None)
    g.attrs.update({"fingerprint": dict(fingerprint),
                    "meta": dict(n1=n1, n2=n2, tile=tile, keys=list(keys), symmetric=symmetric,
                                 tail=list(tail), mirror=list(mirror)),
                    "ntkit_kernel_store": LAYOUT})          # written last: marks a valid store
    return KernelStore(path if isinstance(path, str) else g.store, mode="r+")


def open_store(path) -> KernelStore:
    """Open an existing kernel store read-only (for reading and :func:`ntkit.scale.solve`).

    Example::

        >>> h = ntkit.scale.open_store('k.zarr'); print(h.status())
    """
    return KernelStore(path, mode="r")
