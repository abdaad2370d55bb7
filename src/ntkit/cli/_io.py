"""What the subcommands share: reading arrays, checking output paths, reporting what was written.

Reading: :func:`load_matrix` reads a numeric array from a ``.npy`` or ``.npz`` file and says
what is wrong (missing, unreadable, empty, not a NumPy file, damaged, object data, wrong entry,
NaN/Inf) in terms of the flag that named the file; :func:`load_array` is the same for
``ntkit kernel``/``ntkit solve`` (their messages say "corrupt or truncated"). Writing: the
rules of :mod:`ntkit._files` (never lose a file ntkit did not write), plus
:func:`check_out_path` for the kernel commands. :func:`print_written` ends a command that wrote
files; :func:`store_errors` turns a kernel store's state errors into user errors.

Only the standard library is imported here (numpy on first use), so ``ntkit --help`` stays fast.

Example::

    >>> k = load_matrix("k.npz", "--k-train-train", "ntk", key_flag="--key")   # (n, n)
    >>> times = parse_floats("0,10,inf", "--t")                                 # [0.0, 10.0, inf]
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CLIError", "load_matrix", "load_array", "parse_floats", "check_out_path",
           "print_written", "store_errors"]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


class CLIError(Exception):
    """A user error: printed as one paragraph, exit code 2."""


def print_written(paths) -> None:
    """End of a subcommand: the absolute paths of the files it wrote, one per line."""
    print("wrote:")
    for p in paths:
        print(f"  {os.path.abspath(p)}")


def load_matrix(path: str, what: str, key: str = "ntk", *, key_flag: Optional[str] = None,
                finite: bool = True):
    """Read a numeric array from ``.npy`` (or ``.npz``: entry ``key``, or its only entry).

    Args:
      path: the file. what: the flag (or metavar) that named it, used in every message.
      key: the ``.npz`` entry to read. key_flag: the flag choosing ``key``, named when the entry
        is missing (``None``: ``key`` is fixed, the message says how to name the array).
      finite: refuse NaN/Inf values.

    Returns a non-empty real ``numpy.ndarray``. Raises ``ValueError`` (``FileNotFoundError`` for
    a missing file) whose message starts with ``what``.
    """
    import numpy as np
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} is empty; name a .npy or .npz file")
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path} is a folder; expected a .npy or .npz file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        reason = (e.strerror or str(e) or type(e).__name__).lower()
        raise ValueError(f"{what}: cannot read {path}: {reason}") from None
    if not head:
        raise ValueError(f"{what}: {path} is empty (0 bytes), not a .npy/.npz file; save the "
                         f"array with numpy.save")
    if head.startswith(_NPY_MAGIC):
        kind = ".npy"
    elif head[:4] in _ZIP_MAGICS:
        kind = ".npz"
    else:
        raise ValueError(f"{what}: {path} is not a valid .npy or .npz file (no NumPy or zip "
                         f"signature at its start); save the array with numpy.save or "
                         f"numpy.savez")
    try:
        obj = np.load(path, allow_pickle=False)
        if kind == ".npz":
            with obj:
                names = list(obj.files)
                if key in names:
                    entry = key
                elif len(names) == 1:
                    entry = names[0]
                elif not names:
                    raise _Refused(f"{what}: {path} holds no arrays")
                else:
                    fix = (f"choose one with {key_flag}" if key_flag else
                           f"name the array {key!r} or save it alone with numpy.save")
                    raise _Refused(f"{what}: {path} holds the entries {', '.join(names)} but "
                                   f"none named {key!r}; {fix}")
                arr = obj[entry]
            where = f"{path} (entry {entry!r})"
        else:
            arr, where = obj, path
    except _Refused as e:
        raise ValueError(str(e)) from None
    except MemoryError:
        raise MemoryError(f"{what}: {path} does not fit in memory") from None
    except Exception as e:          # anything the parser trips on: the file is not readable
        text = str(e)
        if "allow_pickle" in text or "pickle" in text.lower():
            raise ValueError(f"{what}: {path} holds Python objects (an object array), which "
                             f"ntkit does not load because that can run code; save a numeric "
                             f"array") from None
        raise ValueError(f"{what}: {path} is a damaged {kind} file ({type(e).__name__}: "
                         f"{text}); save the array again") from None
    if arr.dtype.kind == "c":
        raise ValueError(f"{what}: {where} holds complex values; ntkit needs real numbers")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what}: {where} is not numeric (dtype {arr.dtype}); save a float or "
                         f"integer array")
    if arr.size == 0:
        raise ValueError(f"{what}: {where} holds an empty array of shape {arr.shape}")
    if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{what}: {where} contains {bad} NaN/Inf value(s); clean or impute "
                         f"them first")
    return arr


class _Refused(Exception):
    pass


def parse_floats(text: str, name: str) -> List[float]:
    """``'0,10,1e3,inf'`` -> floats; errors name the option."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers (e.g. 0,10,100,inf), got "
                         f"{text!r}") from None
    if not vals:
        raise ValueError(f"{name} is empty")
    return vals


def store_errors(fn):
    """Run a subcommand with CLI-worded hints, and turn the store's state errors (busy,
    damaged, incomplete) into user errors: ``ntkit.cli.main`` prints those, like ``OSError``
    (permission denied, disk full: named with the flag of the path), as one line with exit
    code 2 -- no traceback."""
    @functools.wraps(fn)
    def run(args):
        from ..scale import StoreBusyError, StoreDamagedError, StoreIncompleteError
        from ..scale import cli_hints     # messages name flags, not Python arguments
        try:
            with cli_hints():
                return fn(args)
        except (StoreBusyError, StoreDamagedError, StoreIncompleteError) as e:
            raise ValueError(str(e)) from None
    return run


def load_array(path: str, flag: str, key: str, key_flag: str) -> np.ndarray:
    """A numeric array from ``.npy`` or ``.npz`` (entry ``key``, or its only entry), with
    messages naming the flag: missing, empty, corrupt or truncated files, pickled objects."""
    import numpy as np
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; expected a .npy or .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except PermissionError:
        raise ValueError(f"{flag} {path}: permission denied") from None
    if not head:
        raise ValueError(f"{flag} {path} is an empty file (0 bytes); expected a .npy or .npz "
                         f"array saved with numpy.save / numpy.savez")
    if head == _NPY_MAGIC:
        try:
            with open(path, "rb") as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                read = {(1, 0): fmt.read_array_header_1_0,
                        (2, 0): fmt.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"unsupported .npy format version {version}")
                _, _, dtype = read(f)
        except Exception as e:
            raise ValueError(f"{flag} {path} is a corrupt .npy file (bad header: {e})") from None
        if dtype.hasobject:
            raise ValueError(f"{flag} {path} holds Python objects (dtype {dtype}), which ntkit "
                             f"does not unpickle; save a numeric array")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{flag} {path} is a corrupt or truncated .npy file "
                             f"({type(e).__name__}: {e})") from None
    elif head[:4] in _ZIP_MAGICS:
        try:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key in names:
                    name = key
                elif len(names) == 1:
                    name = names[0]
                elif not names:
                    raise ValueError(f"{flag} {path} is an .npz archive with no arrays")
                else:
                    raise ValueError(f"{flag} {path} holds {names}; none is {key!r} (choose "
                                     f"with {key_flag})")
                arr = z[name]
        except ValueError as e:
            msg = str(e)
            if msg.startswith(flag):
                raise
            if "allow_pickle" in msg:
                raise ValueError(f"{flag} {path} holds Python objects, which ntkit does not "
                                 f"unpickle; save numeric arrays") from None
            raise ValueError(f"{flag} {path} is a corrupt or truncated .npz file "
                             f"({msg})") from None
        except Exception as e:
            raise ValueError(f"{flag} {path} is a corrupt or truncated .npz file "
                             f"({type(e).__name__}: {e})") from None
    else:
        raise ValueError(f"{flag} {path} is not a .npy or .npz file (it does not start with "
                         f"the NumPy or zip signature); save arrays with numpy.save")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{flag} in {path} must be a real numeric array, got dtype {arr.dtype}")
    return arr


def check_out_path(path: str, flag: str, suffixes) -> None:
    """``--out`` must name the file that is written: the right suffix, an existing folder."""
    if not path.endswith(tuple(suffixes)):
        raise ValueError(f"{flag} {path}: the file written must end with "
                         f"{' or '.join(suffixes)} (numpy would otherwise append the suffix)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; name a file")
