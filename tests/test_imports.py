"""The shape of the house: the import graph of ``src/ntkit`` has no cycles, imports point down
the layers of CONTRIBUTING.md, and no module imports another package's private modules.

The graph is built statically from the source (``ast``), so it sees every import, including
those inside functions (which run later, but still tie the modules together), and needs no
optional dependency. An edge ``a -> b`` means: running ``a`` (or one of its functions) imports
``b``. Rules:

* ``import p.q.m`` and ``from p.q import m`` (``m`` a module) give ``a -> p.q.m``, and also
  ``a -> p.q`` and ``a -> p`` for the packages above ``m`` that do not contain ``a`` (Python runs
  their ``__init__`` first); ``from p.q import name`` gives ``a -> p.q``.
* A package whose ``__init__`` resolves names lazily through an ``_EXPORTS`` table (``ntkit``,
  ``ntkit.scale``) sends ``from p import name`` to the module the table names, since that is
  what runs.
* Imports under ``if TYPE_CHECKING:`` never run and are skipped.

Known problems that are not fixed yet are listed below, each with the issue that tracks it; an
entry that no longer occurs fails the test too, so the lists only shrink.
"""
from __future__ import annotations

import ast
import fnmatch
import functools
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "ntkit"

# Layers, bottom first (CONTRIBUTING.md, "Direction of imports"): a module may import its own
# layer and the ones below, never one above. Every module must be placed (patterns: fnmatch).
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("foundation", ("ntkit", "ntkit.kernel", "ntkit._validation", "ntkit._linalg",
                    "ntkit._files", "ntkit.data", "ntkit._system", "ntkit._settings",
                    "ntkit._threads", "ntkit._malloc", "ntkit._typing", "ntkit._text")),
    ("layers", ("ntkit.layers", "ntkit.layers.*")),
    ("kernels", ("ntkit.empirical", "ntkit.empirical.*", "ntkit.monte_carlo", "ntkit.testing",
                 "ntkit.features", "ntkit.scale", "ntkit.scale.*")),
    ("predict", ("ntkit.predict", "ntkit.estimators", "ntkit._uci_ntk")),
    ("diagnostics", ("ntkit.diagnostics", "ntkit.diagnostics.*")),
    ("presentation", ("ntkit.plots", "ntkit.report", "ntkit._demo", "ntkit._dynamics_demo",
                      "ntkit.cli", "ntkit.cli.*", "ntkit.__main__")),
]

# Cycles still present (none left, issue 17). A cycle is allowed only if all its modules
# match one entry.
ALLOWED_CYCLES: Dict[str, str] = {}
# Imports that go up a layer (issue 17): (importer, imported).
ALLOWED_UPWARD: Dict[Tuple[str, str], str] = {}
# Imports of a private module (a ``_name`` module) of another package (none left, issue 17:
# ntkit.features and ntkit.scale import the engine seams that ntkit.layers re-exports).
ALLOWED_PRIVATE: Dict[Tuple[str, str], str] = {}
# Old modules kept for a few importers only (none left: ntkit._cli_io is gone, issue 17).
LEGACY: Dict[str, Set[str]] = {}


def _modules() -> Dict[str, Tuple[pathlib.Path, bool]]:
    mods = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return ((isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
            or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> Iterator[ast.AST]:
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _exports(path: pathlib.Path, pkg: str) -> Dict[str, str]:
    """A lazy package's ``_EXPORTS`` table: public name -> module that defines it."""
    for node in ast.parse(path.read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)):
            table = ast.literal_eval(node.value)
            return {k: v if v.startswith("ntkit") else f"{pkg}.{v}" for k, v in table.items()}
    return {}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@functools.lru_cache(maxsize=None)
def build_graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]]]:
    """``(edges, spelled)``: every module's imports as they run, and as they are written (for
    the private-module rule, which is about what the code names). Cached: do not mutate."""
    mods = _modules()
    exports = {m: _exports(p, m) for m, (p, is_pkg) in mods.items() if is_pkg}
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    spelled: Dict[str, Set[str]] = {m: set() for m in mods}

    def known(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    for m, (path, is_pkg) in mods.items():
        pkg = m if is_pkg else m.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets = []                                  # (as written, as it runs)
            if isinstance(node, ast.Import):
                targets = [(a.name, a.name) for a in node.names]
            else:
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in mods:
                        targets.append((sub, sub))
                    else:
                        targets.append((base, exports.get(base, {}).get(a.name, base)))
            for written, runs in targets:
                written, runs = known(written), known(runs)
                if not _inside(runs, "ntkit"):
                    continue                              # torch, numpy, the standard library
                spelled[m].add(written)
                edges[m].add(runs)
                for t in {written, runs}:                 # packages above it run first
                    q = t.rpartition(".")[0]
                    while q and not _inside(m, q):
                        edges[m].add(q)
                        q = q.rpartition(".")[0]
        edges[m].discard(m)
    return edges, spelled


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _allowed_cycle(comp: List[str]) -> str:
    for key in ALLOWED_CYCLES:
        pats = key.split("|")
        if all(any(fnmatch.fnmatchcase(m, p) for p in pats) for m in comp):
            return key
    return ""


def _layer(module: str) -> int:
    for i, (_, pats) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in pats):
            return i
    return -1


def test_the_graph_sees_imports_inside_functions_and_lazy_tables():
    edges, _ = build_graph()
    # ntkit.cli imports each command module inside a function, never at the top
    assert {"ntkit.cli.kernel", "ntkit.cli.lazy", "ntkit.cli.demo"} <= edges["ntkit.cli"]
    # `from ..scale import compute_kernel` runs ntkit.scale._compute (ntkit.scale's _EXPORTS)
    assert {"ntkit.scale", "ntkit.scale._compute"} <= edges["ntkit.cli.kernel"]
    # a cycle through a function-level import is found
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(toy) == [["a", "b", "c"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges, _ = build_graph()
    found = cycles(edges)
    bad = [c for c in found if not _allowed_cycle(c)]
    assert not bad, ("import cycles (break them: move the shared piece down a layer, see "
                     f"CONTRIBUTING.md): {bad}")
    used = {_allowed_cycle(c) for c in found}
    stale = set(ALLOWED_CYCLES) - used
    assert not stale, f"fixed, remove from ALLOWED_CYCLES: {sorted(stale)}"


def test_every_module_has_a_layer_and_imports_point_down():
    edges, _ = build_graph()
    unplaced = sorted(m for m in edges if _layer(m) < 0)
    assert not unplaced, f"place these modules in LAYERS (and CONTRIBUTING.md): {unplaced}"
    up = {(a, b) for a, bs in edges.items() for b in bs if _layer(b) > _layer(a)}
    bad = sorted(up - set(ALLOWED_UPWARD))
    assert not bad, ("imports from a lower layer to a higher one (layers, bottom first: "
                     f"{[name for name, _ in LAYERS]}): {bad}")
    stale = set(ALLOWED_UPWARD) - up
    assert not stale, f"fixed, remove from ALLOWED_UPWARD: {sorted(stale)}"


def test_no_private_modules_of_other_packages():
    _, spelled = build_graph()
    found = set()
    for a, bs in spelled.items():
        for b in bs:
            owner = b.rpartition(".")[0]                  # the package b is private to
            if b.rpartition(".")[2].startswith("_") and not _inside(a, owner):
                found.add((a, b))
    bad = sorted(found - set(ALLOWED_PRIVATE))
    assert not bad, ("imports of another package's private module; import its public names "
                     f"(the package's __init__) instead: {bad}")
    stale = set(ALLOWED_PRIVATE) - found
    assert not stale, f"fixed, remove from ALLOWED_PRIVATE: {sorted(stale)}"


def test_legacy_modules_have_only_their_listed_importers():
    _, spelled = build_graph()
    for legacy, allowed in LEGACY.items():
        users = {a for a, bs in spelled.items() if legacy in bs}
        assert users <= allowed, f"{legacy} is kept only for {sorted(allowed)}; " \
            f"{sorted(users - allowed)} must import its replacement"


def test_the_cli_is_one_package_and_scale_is_engine_only():
    """Issue 17: the command line lives in ntkit/cli/ only, and nothing below it imports it."""
    edges, _ = build_graph()
    assert not (SRC / "cli.py").exists() and not (SRC / "scale" / "_cli.py").exists()
    assert not list(SRC.glob("_cli_*.py"))
    users = {a for a, bs in edges.items() if any(_inside(b, "ntkit.cli") for b in bs)}
    assert users <= {"ntkit.__main__"} | {m for m in edges if _inside(m, "ntkit.cli")}, users


# The foundation's leaf modules: cheap, and importing nothing of ntkit above them, so a module
# imports them at its top. An import inside a function hides the dependency (issue 17: "51 of
# 114 internal imports are inside functions") and is kept only where listed, with the reason.
FOUNDATION_LEAVES = ("ntkit._validation", "ntkit._system", "ntkit._typing", "ntkit._settings",
                     "ntkit._linalg", "ntkit._files", "ntkit._threads", "ntkit._malloc",
                     "ntkit._text")
ALLOWED_LOCAL_FOUNDATION: Dict[Tuple[str, str], str] = {
    ("ntkit.cli.kernel", "ntkit._validation"): "the CLI starts without torch (`ntkit --help`)",
    ("ntkit.cli.predict", "ntkit._linalg"): "the CLI starts without torch (`ntkit --help`)",
}


def _local_foundation_imports() -> Set[Tuple[str, str]]:
    """``(importer, leaf)`` for every import of a foundation leaf inside a function."""
    found: Set[Tuple[str, str]] = set()

    def walk(m: str, pkg: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif child.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - child.level + 1]
                                    + ([child.module] if child.module else []))
                    names = [base] + [f"{base}.{a.name}" for a in child.names]
                else:
                    names = [child.module or ""]
                found.update((m, n) for n in names if n in FOUNDATION_LEAVES)
            walk(m, pkg, child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for m, (path, is_pkg) in _modules().items():
        walk(m, m if is_pkg else m.rpartition(".")[0], ast.parse(path.read_text(), str(path)),
             False)
    return found


def test_foundation_leaves_are_imported_at_the_top():
    found = _local_foundation_imports()
    bad = sorted(found - set(ALLOWED_LOCAL_FOUNDATION))
    assert not bad, ("import these foundation modules at the top of the importer (they are cheap "
                     f"and cannot form a cycle): {bad}")
    stale = set(ALLOWED_LOCAL_FOUNDATION) - found
    assert not stale, f"fixed, remove from ALLOWED_LOCAL_FOUNDATION: {sorted(stale)}"
