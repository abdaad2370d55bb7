"""On-disk tiled kernel matrices: a Zarr group with one array per kernel, a tile ledger and a
checksum per tile, in a directory that ntkit marks as its own.

Layout of a store (a Zarr v3 group in a local directory ``k.zarr``)::

    .ntkit-store                  ownership marker (JSON: random store id, layout, entries)
    .ntkit-lock                   present while a writer runs (JSON: pid, host, token)
    attrs["ntkit_kernel_store"]   layout version
    attrs["store_id"]             the marker's id
    attrs["fingerprint"]          {component: text} (function, x1, x2, dtype, tile, get, version)
    attrs["meta"]                 n1, n2, tile, keys, symmetric, tail, mirror, dtype
    <key>  (n1, n2, *tail)        one per kernel ('nngp', 'ntk', ...), chunks = one tile
    sums   (n_row_tiles, n_col_tiles, n_keys) uint32 CRC-32 of each stored tile, per kernel
    done   (n_row_tiles, n_col_tiles) uint8, one chunk per tile: 1 = tile complete

Guarantees:

* **Nothing that is not ours is removed or overwritten.** A store is created only in a new or
  empty directory, after the path was resolved (``os.path.realpath``) and checked: empty paths,
  ``.``/``..``, the current directory or any of its ancestors, the home directory, a filesystem
  root, regular files, non-empty directories without the marker and symlinks to them are refused
  before anything is touched. ``overwrite=True`` deletes only the entries the marker lists.
* **A "done" tile is verified on every read.** A tile's data is written first, then its
  checksums, then its flag; a process killed in between leaves an unflagged tile, recomputed on
  resume. Reads compare each tile's CRC-32 with the stored one and raise
  :class:`StoreDamagedError` on a mismatch, a missing or truncated chunk; rerunning the same
  computation recomputes exactly the damaged tiles; :meth:`KernelStore.verify` lists them.
* **One writer at a time.** Writers hold ``.ntkit-lock`` (created with ``O_CREAT | O_EXCL``); a
  second writer gets :class:`StoreBusyError`; a lock left by a dead process on the same host is
  taken over.

When ``x2`` is ``None`` only tiles with ``i <= j`` are stored; reads mirror the lower triangle.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["KernelStore", "TiledMatrix", "StoreStatus", "VerifyReport", "open_store",
           "verify_store", "StoreDamagedError", "StoreBusyError", "StoreIncompleteError"]

LAYOUT = 2
MARKER = ".ntkit-store"
LOCK = ".ntkit-lock"
RESERVED = ("done", "sums", "zarr.json", MARKER, LOCK)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


# ---- messages: Python API or command line -------------------------------------------------
_HINTS = contextvars.ContextVar("ntkit_scale_hints", default="python")


def hint(python: str, cli: str) -> str:
    """The fix to suggest, in the caller's terms (Python arguments or CLI flags)."""
    return cli if _HINTS.get() == "cli" else python


@contextlib.contextmanager
def cli_hints():
    """Inside this block, messages name command-line flags instead of Python arguments."""
    token = _HINTS.set("cli")
    try:
        yield
    finally:
        _HINTS.reset(token)


class StoreDamagedError(RuntimeError):
    """A stored tile (or the store's ledger) does not match what was written."""


class StoreBusyError(RuntimeError):
    """Another process holds the store's write lock."""


class StoreIncompleteError(RuntimeError):
    """The store does not hold every tile yet (rerun the computation to finish it)."""


def _rerun_hint(path: str) -> str:
    return hint(f"rerun the same ntkit.compute_kernel(...) call to recompute them "
                f"(ntkit.scale.verify_store({path!r}) lists the damaged tiles)",
                f"rerun the same `ntkit kernel ... --store {path}` command to recompute them "
                f"(`ntkit kernel verify {path}` lists the damaged tiles)")


# ---- status reports -----------------------------------------------------------------------
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


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`KernelStore.verify`: every "done" tile re-read and its checksum compared.

    Attributes: ``path``; ``total`` tiles; ``done`` (flagged complete); ``missing`` tiles not
    computed yet ``[(i, j)]``; ``damaged`` ``[(i, j, key, reason)]`` (flagged done but unreadable
    or not matching their checksum); ``problems``: store-level damage (a missing ledger or
    array). ``ok``: nothing damaged; ``complete``: ``ok`` and nothing missing.
    """
    path: str
    total: int
    done: int
    missing: Tuple[Tuple[int, int], ...]
    damaged: Tuple[Tuple[int, int, str, str], ...]
    problems: Tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.problems

    @property
    def complete(self) -> bool:
        return self.ok and not self.missing

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.done}/{self.total} tiles done, "
                 f"{len(self.damaged)} damaged tile(s), {len(self.missing)} not computed"]
        lines += [f"  store: {p}" for p in self.problems]
        lines += [f"  damaged tile ({i}, {j}) of {k!r}: {r}" for i, j, k, r in self.damaged]
        if self.ok:
            lines.append("  all computed tiles match their checksums"
                         + ("" if not self.missing else " (the store is incomplete)"))
        return "\n".join(lines)


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


def checksum(blk: np.ndarray) -> int:
    """CRC-32 of a tile's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(blk).view(np.uint8).reshape(-1).data) & 0xFFFFFFFF


# ---- paths: what may be written / removed ---------------------------------------------------
def _protected_dirs() -> Dict[str, str]:
    """Directories a store may never be: the cwd and its ancestors, home, filesystem roots."""
    out: Dict[str, str] = {}
    try:
        d = os.path.realpath(os.getcwd())
        out[d] = "the current directory"
        while os.path.dirname(d) != d:
            d = os.path.dirname(d)
            out.setdefault(d, "a parent of the current directory")
    except OSError:
        pass
    home = os.path.expanduser("~")
    if home and home != "~":
        out[os.path.realpath(home)] = "your home directory"
    return out


def read_marker(real: str) -> Optional[dict]:
    """The ownership marker of directory ``real``, or None if absent/unreadable."""
    try:
        with open(os.path.join(real, MARKER), "r", encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("ntkit_store"), str):
        return None
    return m


def check_store_path(path, name: str = "store") -> str:
    """Validate a store path before anything is touched; returns its resolved real path.

    Refuses (``ValueError``) what ntkit must never write into or delete: an empty path, a
    URL, the current directory or any parent of it ('.', '..'), the home directory, a
    filesystem root, a regular file, and a symlink to something that is not an ntkit store."""
    flag = hint(f"`{name}`", "--store")
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{flag} must be a directory path (str or os.PathLike) or None, got "
                        f"{type(path).__name__}")
    if not path.strip():
        raise ValueError(f"{flag} is an empty path, which would mean the current directory; "
                         f"name a new folder such as 'k.zarr'")
    if "://" in path:
        raise ValueError(f"{flag} {path!r}: only local directory paths are supported")
    real = os.path.realpath(path)
    why = "a filesystem root" if os.path.dirname(real) == real else _protected_dirs().get(real)
    if why is not None:
        raise ValueError(f"{flag} {path!r} resolves to {real!r}, {why}; a kernel store needs a "
                         f"folder of its own -- name a new folder such as 'k.zarr'. Nothing "
                         f"was written or removed.")
    if os.path.lexists(path) and not os.path.exists(path):
        raise ValueError(f"{flag} {path!r} is a broken symbolic link; remove it or choose "
                         f"another path")
    if os.path.exists(real) and not os.path.isdir(real):
        raise ValueError(f"{flag} {path!r} is an existing file, not a kernel store folder; "
                         f"choose a new folder such as 'k.zarr'. The file was not touched.")
    if os.path.islink(path) and read_marker(real) is None:
        raise ValueError(f"{flag} {path!r} is a symbolic link to {real!r}, which is not an "
                         f"ntkit kernel store; ntkit only follows links to its own stores")
    return real


def store_state(real: str) -> str:
    """'absent', 'empty', 'ours' (marker present), 'legacy' (an ntkit store without marker)
    or 'foreign' (anything else)."""
    if not os.path.exists(real):
        return "absent"
    try:
        entries = os.listdir(real)
    except OSError as e:
        raise ValueError(f"cannot list {real!r}: {e}") from None
    if not [e for e in entries if not (e == LOCK or e.startswith(LOCK + ".stale-")
                                       or (e.startswith(MARKER + ".") and e.endswith(".tmp")))]:
        return "empty"                                # (our own lock file does not count)
    m = read_marker(real)
    if m is not None:
        return "ours"
    try:
        with open(os.path.join(real, "zarr.json"), encoding="utf-8") as f:
            if "ntkit_kernel_store" in json.load(f).get("attributes", {}):
                return "legacy"
    except (OSError, ValueError, AttributeError):
        pass
    return "foreign"


def refuse_foreign(path: str, state: str) -> None:
    if state == "legacy":
        raise ValueError(f"{hint('`store`', '--store')} {path!r} holds an ntkit kernel store "
                         f"without its {MARKER} ownership marker (written by an older ntkit, or "
                         f"the marker was removed), so ntkit can neither trust, resume nor "
                         f"delete it -- choose a new path (or delete it yourself)")
    raise ValueError(f"{hint('`store`', '--store')} {path!r} exists and is not an ntkit kernel "
                     f"store (it is not empty and has no {MARKER} marker); ntkit never writes "
                     f"into or deletes such a folder -- choose a new path such as 'k.zarr'")


def _write_marker(real: str, entries: Sequence[str]) -> str:
    sid = uuid.uuid4().hex
    tmp = os.path.join(real, f"{MARKER}.{sid}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"ntkit_store": sid, "layout": LAYOUT, "entries": list(entries),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
    os.replace(tmp, os.path.join(real, MARKER))
    return sid


def remove_store_contents(real: str) -> None:
    """Delete the entries of our store at ``real`` (those its marker lists, plus the standard
    ones); the marker, the lock and anything else in the folder are left alone."""
    m = read_marker(real)
    if m is None:                                     # pragma: no cover - checked by callers
        raise ValueError(f"{real!r} has no {MARKER} marker; refusing to delete anything")
    names = {"zarr.json", "done", "sums"}
    names.update(e for e in m.get("entries", ()) if isinstance(e, str))
    for e in sorted(names):
        if e in (MARKER, LOCK) or not _NAME.match(e):
            continue
        p = os.path.join(real, e)
        if os.path.islink(p) or os.path.isfile(p):
            os.unlink(p)
        elif os.path.isdir(p):
            shutil.rmtree(p)


# ---- the write lock ---------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class StoreLock:
    """Exclusive write lock: a file created with ``O_CREAT | O_EXCL`` holding pid, host and a
    random token. A lock whose process is dead on this host is stale and taken over."""

    def __init__(self, real: str, display: str):
        self.path = os.path.join(real, LOCK)
        self.display = display
        self.token = uuid.uuid4().hex
        self.held = False

    def _read(self, path: Optional[str] = None) -> Optional[dict]:
        try:
            with open(path or self.path, "r", encoding="utf-8") as f:
                d = json.load(f)
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "StoreLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is not None and self._stale(other):
                    self._take_over(other)
                    continue
                if other is None:
                    time.sleep(0.05)                    # being written right now
                    other = self._read()
                raise StoreBusyError(self._busy_message(other)) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise StoreBusyError(self._busy_message(self._read()))

    @staticmethod
    def _stale(other: dict) -> bool:
        try:
            pid = int(other["pid"])
        except (KeyError, TypeError, ValueError):
            return False
        return other.get("host") == socket.gethostname() and pid != os.getpid() \
            and not _pid_alive(pid)

    def _take_over(self, stale: dict) -> None:
        """Remove a stale lock, atomically: rename it aside and check it is the one we saw."""
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        got = self._read(aside)
        if got is not None and got.get("token") == stale.get("token"):
            os.unlink(aside)
            return
        try:                          # we moved a fresh lock of another writer: put it back
            os.link(aside, self.path)
        except OSError:
            pass
        os.unlink(aside)
        raise StoreBusyError(self._busy_message(got))

    def _busy_message(self, other: Optional[dict]) -> str:
        who = "another ntkit process" if other is None else (
            f"another ntkit process (pid {other.get('pid')} on host {other.get('host')}, since "
            f"{other.get('since')})")
        return (f"kernel store {self.display!r} is being written by {who}; two writers must not "
                f"compute the same store. Wait for it to finish (then rerun to resume), or, if "
                f"that process is gone, delete the lock file {self.path!r}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        d = self._read()
        if d is not None and d.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# ---- reading ------------------------------------------------------------------------------
class TiledMatrix:
    """Lazy view of one stored kernel, ``(n1, n2, *tail)``; slicing reads only the tiles it needs.

    ``m[i0:i1, j0:j1]`` returns a float torch tensor (integer indices and steps are allowed; the
    bounding rows/columns are read). Tiles not computed yet read as NaN; every computed tile is
    checked against its checksum (:class:`StoreDamagedError` if it does not match). ``m.load()``
    is ``m[:, :]`` but refuses an incomplete store.
    """

    def __init__(self, store: "KernelStore", key: str):
        self.store, self.key = store, key
        self._arr = store._array(key)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._arr.shape)

    @property
    def dtype(self) -> np.dtype:
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
        return s._read_block(self.key, i, j)

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
        once and checked against its checksum; the next tile is read in a background thread
        while the caller works on this one."""
        s = self.store
        s._require_complete()
        pairs = s.pairs()
        if not prefetch:
            for i, j in pairs:
                yield s.rows(i), s.cols(j), s._read_block(self.key, i, j)
            return
        if not pairs:
            return
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as ex:
            nxt = ex.submit(s._read_block, self.key, *pairs[0])
            for k, (i, j) in enumerate(pairs):
                blk = nxt.result()
                if k + 1 < len(pairs):
                    nxt = ex.submit(s._read_block, self.key, *pairs[k + 1])
                yield s.rows(i), s.cols(j), blk

    def matmul(self, v: Any, progress: bool = False) -> torch.Tensor:
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
    it needs); ``h.load('ntk')`` is the full torch tensor; ``h.status()`` reports progress;
    ``h.verify()`` re-reads every tile and checks its checksum.

    Example::

        >>> h = ntkit.compute_kernel(arch, x, store='k.zarr', tile=1024)
        >>> h.status()                     # StoreStatus(... done=55, total=55)
        >>> block = h['ntk'][:10, :10]     # (10, 10) tensor, one tile read
        >>> K = h.load('ntk')              # (n, n) tensor, the lower triangle mirrored
        >>> h.verify().ok                  # True unless a tile was damaged on disk
    """

    def __init__(self, path: Any, mode: str = "r", *, repair: bool = False) -> None:
        zarr = _zarr()
        self._lock: Optional[StoreLock] = None
        self.path = path if isinstance(path, str) else getattr(path, "path", repr(path))
        if isinstance(path, str):
            if not os.path.exists(path):
                raise FileNotFoundError(f"no kernel store at {path!r}")
            if not os.path.isdir(path):
                raise ValueError(f"{path!r} is a file, not a kernel store folder")
        try:
            self._group = zarr.open_group(path, mode=mode)
            attrs = dict(self._group.attrs)
        except PermissionError as e:
            raise ValueError(f"cannot open kernel store {self.path!r}: permission denied "
                             f"({e})") from None
        except Exception as e:  # zarr raises several kinds for a non-store folder
            raise ValueError(f"{self.path!r} is not a readable Zarr kernel store "
                             f"({type(e).__name__}: {e})") from None
        if "ntkit_kernel_store" not in attrs:
            raise ValueError(f"{self.path!r} is not an ntkit kernel store (no "
                             f"'ntkit_kernel_store' attribute); choose another store path")
        if attrs["ntkit_kernel_store"] != LAYOUT:
            raise ValueError(f"kernel store {self.path!r} has layout "
                             f"{attrs['ntkit_kernel_store']!r}, written by another ntkit version "
                             f"(this one reads layout {LAYOUT}); recompute it into a new path")
        try:
            meta = attrs["meta"]
            self.fingerprint: Dict[str, str] = dict(attrs["fingerprint"])
            self.n1, self.n2 = int(meta["n1"]), int(meta["n2"])
            self.tile = int(meta["tile"])
            self.keys: Tuple[str, ...] = tuple(meta["keys"])
            self.symmetric = bool(meta["symmetric"])
            self.tail: Tuple[int, ...] = tuple(meta["tail"])
            self._perm = tuple(meta["mirror"])
            self._dtype = np.dtype(meta["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreDamagedError(f"kernel store {self.path!r} has damaged metadata ({e!r}); "
                                    f"recompute it into a new path") from None
        self.store_id = attrs.get("store_id")
        self._grid = (n_tiles(self.n1, self.tile), n_tiles(self.n2, self.tile))
        self._valid = np.zeros(self._grid, dtype=bool)
        for p in self.pairs():
            self._valid[p] = True
        self._arrays: Dict[str, Any] = {}        # zarr arrays
        self.problems: List[str] = []
        for key in self.keys + ("sums", "done"):
            try:
                self._arrays[key] = self._group[key]
            except KeyError:
                self.problems.append(f"array {key!r} is missing")
        if self.problems and repair:
            self._repair()
        if "done" in self._arrays and "sums" in self._arrays:
            self._load_ledger()

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

    # ---- ledger ------------------------------------------------------------------------
    def _check_intact(self) -> None:
        if self.problems:
            raise StoreDamagedError(
                f"kernel store {self.path!r} is damaged: {'; '.join(self.problems)}; "
                + hint("rerun the same ntkit.compute_kernel(...) call to repair it",
                       f"rerun the same `ntkit kernel ... --store {self.path}` command to "
                       f"repair it"))

    def _array(self, key: str):
        self._check_intact()
        return self._arrays[key]

    def _load_ledger(self) -> None:
        try:
            self._done = np.asarray(self._arrays["done"][:]).astype(bool)
            self._sums = np.asarray(self._arrays["sums"][:]).astype(np.uint32)
        except Exception as e:
            raise StoreDamagedError(f"the tile ledger of kernel store {self.path!r} is "
                                    f"unreadable ({type(e).__name__}: {e}); recompute it into a "
                                    f"new path") from None
        if self._done.shape != self._grid or self._sums.shape != self._grid + (len(self.keys),):
            raise StoreDamagedError(f"the tile ledger of kernel store {self.path!r} does not "
                                    f"match its metadata; recompute it into a new path")

    def _repair(self) -> None:
        """Recreate missing arrays (writers only). A missing kernel array or checksum array
        makes every tile fail verification (recomputed); a missing ``done`` ledger is rebuilt
        from the tiles whose data match their stored checksums."""
        g = self._group
        lost_done = "done" not in self._arrays
        for key in self.keys:
            if key not in self._arrays:
                self._arrays[key] = g.create_array(
                    key, shape=(self.n1, self.n2) + self.tail, chunks=(self.tile, self.tile)
                    + self.tail, dtype=self._dtype, compressors=None, fill_value=np.nan)
        if "sums" not in self._arrays:
            self._arrays["sums"] = g.create_array(
                "sums", shape=self._grid + (len(self.keys),), chunks=(1, 1, len(self.keys)),
                dtype="uint32", fill_value=0, compressors=None)
            if not lost_done:
                self._arrays["done"][:] = 0       # nothing can be verified any more
        if lost_done:
            self._arrays["done"] = g.create_array("done", shape=self._grid, chunks=(1, 1),
                                                  dtype="uint8", fill_value=0, compressors=None)
        warnings.warn(f"kernel store {self.path!r} was damaged ({'; '.join(self.problems)}); "
                      f"repaired: tiles that cannot be verified will be recomputed",
                      RuntimeWarning, stacklevel=4)
        self.problems = []
        if lost_done:
            self._load_ledger()
            for i, j in self.pairs():
                if self._sums[i, j].any() and self._tile_error(i, j) is None:
                    self._arrays["done"][i, j] = 1

    @property
    def _done_arr(self):
        """The on-disk ``done`` ledger (a Zarr array; tests reset flags through it)."""
        return self._array("done")

    def is_done(self, i: int, j: int) -> bool:
        self._check_intact()
        if not self._done[i, j]:
            if bool(self._arrays["done"][i, j]):
                self._sums[i, j] = np.asarray(self._arrays["sums"][i, j])
                self._done[i, j] = True
        return bool(self._done[i, j])

    def refresh(self) -> "KernelStore":
        """Re-read the tile ledger (another process may be writing)."""
        self._check_intact()
        self._load_ledger()
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
        self._check_intact()
        if self._done[self._valid].all():   # flags only go 0 -> 1: no re-read per CG pass
            return
        st = self.status()
        if not st.complete:
            raise StoreIncompleteError(
                f"kernel store {self.path!r} is incomplete ({st.done}/{st.total} tiles); "
                + hint(f"rerun the same ntkit.compute_kernel(...) call (store={self.path!r}) to "
                       f"finish it", f"rerun the same `ntkit kernel ... --store {self.path}` "
                       f"command to finish it"))

    # ---- integrity ---------------------------------------------------------------------
    def _read_raw(self, key: str, i: int, j: int) -> np.ndarray:
        return np.asarray(self._arrays[key][self.rows(i), self.cols(j)])

    def _block_error(self, key: str, i: int, j: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
        k = self.keys.index(key)
        try:
            blk = self._read_raw(key, i, j)
        except Exception as e:               # a truncated / unreadable chunk file
            return None, f"unreadable ({type(e).__name__}: {e})"
        expect = int(self._sums[i, j, k])
        got = checksum(blk)
        if got != expect:
            what = "missing chunk (reads as the fill value)" if np.isnan(blk).all() else \
                "checksum mismatch"
            return None, f"{what}: CRC-32 {got:08x}, stored {expect:08x}"
        return blk, None

    def _tile_error(self, i: int, j: int) -> Optional[Tuple[str, str]]:
        for key in self.keys:
            _, err = self._block_error(key, i, j)
            if err is not None:
                return key, err
        return None

    def _read_block(self, key: str, i: int, j: int) -> np.ndarray:
        """A done tile, verified against its checksum."""
        self._check_intact()
        blk, err = self._block_error(key, i, j)
        if blk is None:                      # damaged: `err` says how
            raise StoreDamagedError(f"tile ({i}, {j}) of {key!r} in kernel store {self.path!r} "
                                    f"is damaged ({err}); " + _rerun_hint(self.path))
        return blk

    def verify(self, progress: bool = False) -> VerifyReport:
        """Re-read every tile flagged done and compare it with its stored checksum.

        Returns a :class:`VerifyReport` (``report.ok`` is ``True`` when nothing is damaged);
        never raises for damage it can describe. Cost: one read of the whole store."""
        pairs = self.pairs()
        if self.problems:
            return VerifyReport(self.path, len(pairs), 0, (), (), tuple(self.problems))
        try:
            self.refresh()
        except StoreDamagedError as e:
            return VerifyReport(self.path, len(pairs), 0, (), (), (str(e),))
        missing, damaged = [], []
        from tqdm.auto import tqdm
        for i, j in tqdm(pairs, desc="verify tiles", disable=not progress, leave=False):
            if not self._done[i, j]:
                missing.append((i, j))
                continue
            for key in self.keys:
                _, err = self._block_error(key, i, j)
                if err is not None:
                    damaged.append((i, j, key, err))
        return VerifyReport(self.path, len(pairs), len(pairs) - len(missing), tuple(missing),
                            tuple(damaged))

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
        try:
            return f"KernelStore({self.status()})"
        except (StoreDamagedError, ValueError):
            return f"KernelStore({self.path!r}, damaged)"

    # ---- writing (used by compute_kernel) -------------------------------------------------
    def _write_tile(self, i: int, j: int, blocks: Dict[str, np.ndarray]) -> None:
        sums = self._write_data(i, j, blocks)        # data first ...
        self._write_sums(i, j, sums)                 # ... then its checksums ...
        self._mark_done(i, j)                        # ... then the flag

    def _write_data(self, i: int, j: int, blocks: Dict[str, np.ndarray]) -> List[int]:
        I, J = self.rows(i), self.cols(j)
        sums = []
        for key in self.keys:
            arr = self._arrays[key]
            blk = blocks[key]
            if self.symmetric and i == j:
                # the upper triangle is the computed one; mirror it so K == K^T exactly
                low = np.tril(np.ones(blk.shape[:2], dtype=bool), -1)
                low = low.reshape(low.shape + (1,) * len(self.tail))
                blk = np.where(low, self._mirror(blk), blk)
            blk = np.ascontiguousarray(blk, dtype=arr.dtype)
            arr[I, J] = blk
            sums.append(checksum(blk))
        return sums

    def _write_sums(self, i: int, j: int, sums: List[int]) -> None:
        self._arrays["sums"][i, j] = np.asarray(sums, dtype=np.uint32)
        self._sums[i, j] = sums

    def _mark_done(self, i: int, j: int) -> None:
        self._arrays["done"][i, j] = 1
        self._done[i, j] = True

    def _mark_undone(self, i: int, j: int) -> None:
        self._arrays["done"][i, j] = 0
        self._done[i, j] = False

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def create_store(target, *, real: Optional[str], n1: int, n2: int, tile: int,
                 keys: Sequence[str], symmetric: bool, tail: Tuple[int, ...],
                 mirror: Tuple[int, ...], dtype: np.dtype,
                 fingerprint: Dict[str, str]) -> KernelStore:
    """A new store. ``real``: a local directory that exists, is ours or empty, has no Zarr
    group and whose lock the caller holds (the marker is written first, the attributes that
    make it a valid store last); ``None`` for the in-memory Zarr store ``target``."""
    zarr = _zarr()
    sid = None
    if real is not None:
        sid = _write_marker(real, ["zarr.json", "done", "sums", *keys])
        g = zarr.open_group(real, mode="a")
    else:
        g = zarr.open_group(target, mode="w")
    kw = dict(compressors=None, fill_value=np.nan)
    for key in keys:
        g.create_array(key, shape=(n1, n2) + tuple(tail), chunks=(tile, tile) + tuple(tail),
                       dtype=dtype, **kw)
    grid = (n_tiles(n1, tile), n_tiles(n2, tile))
    g.create_array("sums", shape=grid + (len(keys),), chunks=(1, 1, len(keys)), dtype="uint32",
                   fill_value=0, compressors=None)
    g.create_array("done", shape=grid, chunks=(1, 1), dtype="uint8", fill_value=0,
                   compressors=None)
    g.attrs.update({"fingerprint": dict(fingerprint), "store_id": sid,
                    "meta": dict(n1=n1, n2=n2, tile=tile, keys=list(keys), symmetric=symmetric,
                                 tail=list(tail), mirror=list(mirror),
                                 dtype=np.dtype(dtype).str),
                    "ntkit_kernel_store": LAYOUT})          # written last: marks a valid store
    return KernelStore(real if real is not None else g.store, mode="r+")


def open_store(path: Union[str, "os.PathLike[str]"]) -> KernelStore:
    """Open an existing kernel store read-only (for reading and :func:`ntkit.scale.solve`).

    Example::

        >>> h = ntkit.scale.open_store('k.zarr'); print(h.status())
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    return KernelStore(path, mode="r")


def verify_store(path: Union[str, "os.PathLike[str]"], progress: bool = False) -> VerifyReport:
    """Re-read every computed tile of the store at ``path`` and check it against its checksum.

    Returns a :class:`VerifyReport`: ``report.ok`` is ``True`` when no tile is damaged,
    ``report.damaged`` lists ``(i, j, key, reason)`` otherwise (rerunning the same
    :func:`ntkit.compute_kernel` call recomputes exactly those tiles). CLI: ``ntkit kernel
    verify k.zarr`` (exit code 0 when clean, 2 otherwise).

    Example::

        >>> rep = ntkit.scale.verify_store('k.zarr'); print(rep.ok, rep.damaged)
    """
    return open_store(path).verify(progress=progress)
