"""Writing files without losing the user's: the output rules of the command line and of
:meth:`ntkit.report.Report.save`.

Writing never loses a file ntkit did not write: :func:`check_out_file` refuses, before any work
is done, a wrong suffix (ntkit writes exactly the path named, in the format its suffix says), a
missing or read-only folder, a folder or special file, and an existing file that does not carry
ntkit's marker unless ``force``; :func:`write_atomic` writes to a temporary file next to the
target and moves it into place, so a failure leaves no partial file. :class:`OutFolder` does the
same for a folder of outputs, recording what it wrote (name and SHA-256) in a manifest: a later
run replaces a file only if it is still exactly what ntkit wrote. Messages name ``flag`` (the
CLI flag, or the Python argument in backticks).

Example::

    >>> path = check_out_file("p.npz", "--out", (".npz",), force=False)   # before any work
    >>> write_atomic(path, "--out", lambda f: np.savez(f, t=t))           # after it
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["check_out_file", "write_atomic", "OutFolder", "sha256_file"]


def _reason(e: OSError) -> str:
    return (e.strerror or str(e) or type(e).__name__).lower()


def _check_folder(folder: str, flag: str, path: str) -> None:
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {folder}")


def check_out_file(path: str, flag: str, suffixes: Sequence[str], *, force: bool = False,
                   ours: Optional[Callable[[str], bool]] = None) -> str:
    """Refuse an output file that is unsafe or would not be written as named; returns its
    absolute path. Call it before any work, and :func:`write_atomic` after.

    ``ours(path)`` tells whether an existing file was written by this command (then it may be
    replaced); otherwise an existing file is replaced only with ``force`` (``--force``).
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{flag} is empty; name an output file ending in "
                         f"{' or '.join(suffixes)}")
    if not path.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise ValueError(f"{flag} {path}: the name must end in {' or '.join(suffixes)} (the "
                         f"format written; ntkit writes exactly the path named)")
    full = os.path.abspath(path)
    _check_folder(os.path.dirname(full), flag, path)
    if os.path.isdir(full):
        raise ValueError(f"{flag} {path} is a folder; name a file")
    if os.path.lexists(full):
        if os.path.islink(full) or not os.path.isfile(full):
            raise ValueError(f"{flag} {path} exists and is not a regular file (a link or a "
                             f"device); choose another name")
        if not force and not (ours is not None and ours(full)):
            raise ValueError(f"{flag} {path} already exists and was not written by ntkit; "
                             f"pass --force to replace it, or choose another name")
    return full


def _tmp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".ntkit-tmp-{secrets.token_hex(4)}-{base}")


def _publish(tmp: str, path: str, replace: bool, flag: str) -> None:
    """Move ``tmp`` (ours) to ``path``; a new name must still be free at that moment."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)                      # fails if ``path`` appeared meanwhile
    except FileExistsError:
        raise ValueError(f"{flag} {path} was created by something else while ntkit was "
                         f"running; nothing was overwritten, choose another name") from None
    except OSError:                             # no hard links on this filesystem
        if os.path.lexists(path):
            raise ValueError(f"{flag} {path} was created by something else while ntkit was "
                             f"running; nothing was overwritten") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_atomic(path: str, flag: str, write: Callable, *, replace: Optional[bool] = None,
                 binary: bool = True) -> str:
    """``write(file_object)`` into a temporary file next to ``path``, then move it to ``path``.

    ``replace``: whether an existing ``path`` may be replaced (default: it existed when this
    was called, i.e. :func:`check_out_file` allowed it). On any error the temporary file is
    removed and ``path`` is untouched. Returns ``path``.
    """
    full = os.path.abspath(path)
    if replace is None:
        replace = os.path.lexists(full)
    tmp = _tmp_name(full)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        _publish(tmp, full, replace, flag)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)                      # our own temporary file
        if isinstance(e, OSError):
            raise ValueError(f"{flag} {path}: cannot write: {_reason(e)}") from None
        raise
    return path


class OutFolder:
    """A folder of outputs (``--out DIR``) that never loses a file ntkit did not write.

    :meth:`check` (before any work) refuses a path that is a file, a missing parent, a folder
    without write permission, and existing files of the names to be written unless they are
    unchanged since an earlier ntkit run wrote them (their SHA-256 is in the manifest
    ``.ntkit_manifest.json``) or ``force``. :meth:`stage` gives a temporary path for each file;
    :meth:`commit` moves them all into place and updates the manifest; :meth:`discard` removes
    the temporary files (on error).

    Example::

        >>> out = OutFolder("lazy_out", "--out", force=False)
        >>> out.check(["summary.txt"])
        >>> p = out.stage("summary.txt"); open(p, "w").write("...")
        >>> out.commit()              # -> ['lazy_out/summary.txt']
    """
    MANIFEST = ".ntkit_manifest.json"

    def __init__(self, path: str, flag: str, *, force: bool = False):
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{flag} is empty; name an output folder")
        self.path, self.flag, self.force = path, flag, force
        self.full = os.path.abspath(path)
        self._staged: Dict[str, str] = {}

    def _manifest(self) -> Dict[str, str]:
        m = os.path.join(self.full, self.MANIFEST)
        if not os.path.exists(m):
            return {}
        try:
            with open(m) as f:
                data = json.load(f)
            files = data["files"]
            if data.get("written_by") != "ntkit" or not isinstance(files, dict):
                raise ValueError
            return {str(k): str(v) for k, v in files.items()}
        except Exception:
            if self.force:
                return {}
            raise ValueError(f"{self.flag} {self.path}: {self.MANIFEST} there was not written "
                             f"by ntkit; pass --force, or choose another folder") from None

    def check(self, names: Sequence[str]) -> None:
        full = self.full
        if os.path.lexists(full) and not os.path.isdir(full):
            raise ValueError(f"{self.flag} {self.path} exists and is not a folder; name a "
                             f"folder for the outputs")
        parent = full
        while not os.path.isdir(parent):            # the nearest existing ancestor
            up = os.path.dirname(parent)
            if up == parent:
                break
            parent = up
        if parent != full and os.path.lexists(parent) and not os.path.isdir(parent):
            raise ValueError(f"{self.flag} {self.path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{self.flag} {self.path}: no permission to write in {parent}")
        if not os.path.isdir(full):
            return
        manifest = self._manifest()
        clash = []
        for n in list(names) + [self.MANIFEST]:
            p = os.path.join(full, n)
            if n == self.MANIFEST or not os.path.lexists(p):
                continue
            if os.path.islink(p) or not os.path.isfile(p):
                clash.append(n)
            elif not self.force and manifest.get(n) != sha256_file(p):
                clash.append(n)
        if clash:
            raise ValueError(f"{self.flag} {self.path} already holds {', '.join(clash)}, not "
                             f"written by ntkit (or changed since); pass --force to replace "
                             f"them, or choose another folder")

    def stage(self, name: str) -> str:
        """A temporary path in the folder for output ``name`` (created on first use)."""
        try:
            os.makedirs(self.full, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.flag} {self.path}: cannot create the folder: "
                             f"{_reason(e)}") from None
        tmp = _tmp_name(os.path.join(self.full, name))
        self._staged[name] = tmp
        return tmp

    def discard(self) -> None:
        for tmp in self._staged.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)
        self._staged.clear()

    def commit(self) -> List[str]:
        """Move every staged file into place; returns the final paths in staging order."""
        written = []
        try:
            self.check(list(self._staged))      # nothing changed under us since the start
            manifest = self._manifest()
            for name, tmp in self._staged.items():
                dest = os.path.join(self.full, name)
                digest = sha256_file(tmp)
                _publish(tmp, dest, os.path.lexists(dest), self.flag)
                manifest[name] = digest
                written.append(os.path.join(self.path, name))
            mpath = os.path.join(self.full, self.MANIFEST)
            write_atomic(mpath, self.flag, lambda f: json.dump(
                {"written_by": "ntkit", "files": manifest}, f, indent=1), binary=False,
                replace=True)
        finally:
            self.discard()
        return written


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
