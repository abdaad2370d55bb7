"""Content fingerprints of what determines a kernel's numbers (architecture or kernel function).

Why not ``repr``: every ``Elementwise(lambda ...)`` prints
``Elementwise(<lambda>, rtol=1e-10)``, so a store computed for ``tanh`` would be resumed for
``sin``. Instead the object is walked and its
*content* hashed (sha256):

* numbers, strings, bytes, ``None``, tuples/lists/dicts/sets, dtypes, enums: by value;
* tensors and arrays: dtype, shape and bytes;
* architectures (frozen dataclasses) and other dataclasses: class name and every field;
* Python functions: bytecode, constants (nested code objects recursively), names, defaults,
  closure cell values and the module globals the code reads (recursively; constants, arrays,
  functions by value, mutable containers and opaque objects by type only); named functions of
  installed packages and the standard library by qualified name (versioned with the package);
* builtins, numpy ufuncs, torch ops, classes and modules: their qualified name;
* ``functools.partial``, bound methods, ``torch.nn.Module`` (class, forward code, repr, state
  dict), instances of plain classes (class code + ``vars``).

Anything else cannot be fingerprinted reliably and raises :class:`UnfingerprintableError`
naming the object, rather than risking a stale store being reused for different numbers.

Example::

    >>> fingerprint(serial(Dense(8), Elementwise(torch.tanh)))  # doctest: +SKIP
    'a3f...'
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import types
import sys
from typing import Any, Dict, List

import numpy as np
import torch

__all__ = ["fingerprint", "UnfingerprintableError"]

# classes from these packages are identified by name (their code is versioned with the package)
_TRUSTED = ("ntkit", "torch", "numpy", "scipy", "builtins", "math", "cmath", "functools",
            "operator", "collections", "typing", "dataclasses", "enum", "abc")


class UnfingerprintableError(TypeError):
    """An object whose effect on the numbers cannot be hashed reliably."""


def _trusted(module) -> bool:
    return isinstance(module, str) and module.split(".")[0] in _TRUSTED


def _library(module) -> bool:
    """Code of an installed package or the standard library: identified by its qualified name
    (it is versioned with the package), not walked."""
    if not isinstance(module, str) or not module:
        return False
    if _trusted(module):
        return True
    top = module.split(".")[0]
    if top in getattr(sys, "stdlib_module_names", ()):
        return True
    f = getattr(sys.modules.get(top), "__file__", None) or ""
    return "site-packages" in f or "dist-packages" in f


class _Hasher:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.stack: List[int] = []          # ids being walked (recursion guard)
        self.memo: Dict[int, str] = {}      # digests of globals already walked (shared DAGs)

    def tag(self, *parts) -> None:
        for p in parts:
            b = p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogatepass")
            self.h.update(len(b).to_bytes(8, "little"))
            self.h.update(b)

    # ------------------------------------------------------------------------------------
    def walk(self, obj: Any, where: str) -> None:
        if obj is None or isinstance(obj, (bool, int, str, bytes)):
            self.tag(type(obj).__name__, repr(obj))
            return
        if isinstance(obj, float):
            self.tag("float", obj.hex())
            return
        if isinstance(obj, complex):
            self.tag("complex", obj.real.hex(), obj.imag.hex())
            return
        if isinstance(obj, (torch.dtype, np.dtype, torch.device)):
            self.tag(type(obj).__name__, str(obj))
            return
        if isinstance(obj, enum.Enum):
            self.tag("enum", type(obj).__module__, type(obj).__qualname__, obj.name)
            self.walk(obj.value, where)
            return
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            self.tag("tensor", str(t.dtype), tuple(t.shape))
            if t.numel():
                self.tag(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            return
        if isinstance(obj, (np.ndarray, np.generic)):
            a = np.asarray(obj)
            if a.dtype == object:
                self.tag("object-array", a.shape)
                for k, v in enumerate(a.reshape(-1)):
                    self.walk(v, f"{where}[{k}]")
                return
            self.tag("ndarray", a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes())
            return
        if isinstance(obj, types.CodeType):
            self._code(obj, where)
            return
        if isinstance(obj, types.ModuleType):
            self.tag("module", obj.__name__)
            return
        if isinstance(obj, type):
            self._class(obj, where)
            return
        key = id(obj)
        if key in self.stack:                   # a function that refers to itself, a cycle
            self.tag("cycle", self.stack.index(key))
            return
        self.stack.append(key)
        try:
            self._compound(obj, where)
        finally:
            self.stack.pop()

    def _compound(self, obj: Any, where: str) -> None:
        if isinstance(obj, (tuple, list)):
            self.tag(type(obj).__name__, len(obj))
            for k, v in enumerate(obj):
                self.walk(v, f"{where}[{k}]")
            return
        if isinstance(obj, dict):
            self.tag("dict", len(obj))
            for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0])):
                self.walk(k, where)
                self.walk(v, f"{where}[{k!r}]")
            return
        if isinstance(obj, (set, frozenset)):
            self.tag("set", len(obj))
            for v in sorted(obj, key=repr):
                self.walk(v, where)
            return
        if isinstance(obj, functools.partial):
            self.tag("partial")
            self.walk(obj.func, f"{where}.func")
            self.walk(obj.args, f"{where}.args")
            self.walk(obj.keywords, f"{where}.keywords")
            return
        if isinstance(obj, types.FunctionType):
            if _library(obj.__module__) and "<lambda>" not in obj.__qualname__ \
                    and "<locals>" not in obj.__qualname__:
                self.tag("library-function", obj.__module__, obj.__qualname__)
                return
            self._function(obj, where)
            return
        if isinstance(obj, types.MethodType):
            self.tag("method")
            self.walk(obj.__func__, f"{where}.__func__")
            self.walk(obj.__self__, f"{where}.__self__")
            return
        if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, np.ufunc,
                            types.MethodDescriptorType, types.WrapperDescriptorType,
                            types.MethodWrapperType, types.ClassMethodDescriptorType)):
            self._builtin(obj, where)
            return
        if dataclasses.is_dataclass(obj):
            self._class(type(obj), where)
            for f in dataclasses.fields(obj):
                self.tag("field", f.name)
                self.walk(getattr(obj, f.name), f"{where}.{f.name}")
            return
        if isinstance(obj, torch.nn.Module):
            self._class(type(obj), where, force_code=True)
            self.tag("module-repr", repr(obj))
            for name, t in obj.state_dict(keep_vars=False).items():
                self.tag("state", name)
                self.walk(t, f"{where}.{name}")
            return
        mod = type(obj).__module__
        if _trusted(mod) and callable(obj) and hasattr(obj, "__qualname__") \
                and not hasattr(obj, "__dict__"):
            self._builtin(obj, where)             # e.g. torch._ops.OpOverload-like callables
            return
        if not _trusted(mod) and hasattr(obj, "__dict__") and not isinstance(obj, type):
            # an instance of a plain user class: its class's code and its attributes
            self._class(type(obj), where, force_code=True)
            self.walk(dict(vars(obj)), f"{where}.__dict__")
            return
        raise UnfingerprintableError(
            f"cannot fingerprint {where} (a {type(obj).__module__}.{type(obj).__qualname__}), so "
            f"a stored kernel could not be matched to it safely")

    # ------------------------------------------------------------------------------------
    def _builtin(self, obj: Any, where: str) -> None:
        owner = getattr(obj, "__objclass__", None)
        mod = getattr(obj, "__module__", None) or (owner.__module__ if owner else None) \
            or type(obj).__module__
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
        if owner is not None:
            name = f"{owner.__qualname__}.{getattr(obj, '__name__', name)}"
        if isinstance(obj, np.ufunc):
            mod, name = "numpy.ufunc", obj.__name__
        if not name:
            raise UnfingerprintableError(f"cannot fingerprint {where}: a builtin without a name")
        self.tag("builtin", mod, name)
        bound = getattr(obj, "__self__", None)
        if bound is not None and not isinstance(bound, types.ModuleType) and \
                not isinstance(bound, type):
            self.walk(bound, f"{where}.__self__")  # a builtin method bound to a value

    def _class(self, cls: type, where: str, force_code: bool = False) -> None:
        self.tag("class", cls.__module__, cls.__qualname__)
        if _trusted(cls.__module__) and not force_code:
            return
        for base in cls.__mro__:
            if _trusted(base.__module__):
                continue
            for name, v in sorted(vars(base).items()):
                if isinstance(v, (staticmethod, classmethod)):
                    v = v.__func__
                if isinstance(v, types.FunctionType):
                    self.tag("def", base.__qualname__, name)
                    self._code(v.__code__, f"{where}.{name}")

    def _code(self, code: types.CodeType, where: str) -> None:
        self.tag("code", code.co_code, code.co_names, code.co_varnames, code.co_freevars,
                 code.co_cellvars, code.co_argcount, code.co_kwonlyargcount, code.co_flags)
        for c in code.co_consts:
            self.walk(c, where)

    def _function(self, fn: types.FunctionType, where: str) -> None:
        code = fn.__code__
        self.tag("function", fn.__module__, fn.__qualname__)
        self._code(code, where)
        self.walk(fn.__defaults__, f"{where} defaults")
        self.walk(fn.__kwdefaults__, f"{where} keyword defaults")
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                val = cell.cell_contents
            except ValueError:                     # an empty cell
                self.tag("empty-cell", name)
                continue
            self.tag("cell", name)
            self.walk(val, f"{where} closure variable {name!r}")
        # module-level names the code reads (a global constant, another function)
        g = fn.__globals__
        for name in sorted(set(_global_names(code))):
            if name in g:
                self.tag("global", name)
                self._global(g[name], f"{where} global {name!r}")

    def _global(self, val: Any, where: str) -> None:
        """A module global the code reads: hashed by value when it is a constant, a function,
        a class or module, an array or an architecture; mutable containers and opaque objects
        (a cache, a call log, a random generator) are recorded by type only, because a value
        that changes as the program runs is state, not a parameter of the kernel."""
        if isinstance(val, (list, dict, set, bytearray)):
            self.tag("mutable-global", type(val).__name__)
            return
        if id(val) in self.memo:
            self.tag("global-value", self.memo[id(val)])
            return
        sub = _Hasher()
        sub.stack, sub.memo = self.stack, self.memo
        try:
            sub.walk(val, where)
            digest = sub.h.hexdigest()
        except UnfingerprintableError:
            digest = f"opaque {type(val).__module__}.{type(val).__qualname__}"
        self.memo[id(val)] = digest
        self.tag("global-value", digest)


def _global_names(code: types.CodeType):
    yield from code.co_names
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _global_names(c)


def fingerprint(obj: Any, what: str = "the kernel function") -> str:
    """sha256 hex digest of the content of ``obj`` (see the module docstring for the rules).

    Raises :class:`UnfingerprintableError` (a ``TypeError``) for objects that cannot be hashed
    reliably."""
    h = _Hasher()
    h.walk(obj, what)
    return h.h.hexdigest()
