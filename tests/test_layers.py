"""
The layer rules of doc/architecture.md, checked on the source: a module
imports only from its own layer or below (function-level imports count too),
sibling packages of one layer know nothing of each other, nothing in the
runtime imports the harness, and no dftx module is much above 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dftx"

# The layers, bottom first; a name covers the module and, for a package,
# every module in it.  Keep in step with doc/architecture.md.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("dftx.errors", "dftx.update", "dftx.codec", "dftx.deferreds",
              "dftx.reconnect", "dftx.endpoints")),
    ("protocols", ("dftx.redis", "dftx.ovsdb")),
    ("drivers", ("dftx.db", "dftx.pubsub")),
    ("coordination", ("dftx.nb", "dftx.registry", "dftx.ha", "dftx.cache", "dftx.spread", "dftx.own_rows")),
    ("services", ("dftx.config", "dftx.config_values", "dftx.service", "dftx.runner", "dftx.http",
                  "dftx.publisher", "dftx.controller", "dftx.cli", "dftx.testing",
                  "dftx.__main__", "dftx")),
    ("harness", ("dftx.harness", "dftx.sandbox")),
]
# Packages of one layer that must not import each other.
SIBLINGS = [("dftx.redis", "dftx.ovsdb"), ("dftx.db", "dftx.pubsub"),
            ("dftx.controller", "dftx.publisher")]
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def owner(name: str, prefixes: tuple[str, ...]) -> str | None:
    """The longest of C{prefixes} that C{name} is or is inside."""
    found = [p for p in prefixes if name == p or (p != "dftx" and name.startswith(p + "."))]
    return max(found, key=len) if found else None


def layer_of(name: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for rank, (_, prefixes) in enumerate(LAYERS):
        p = owner(name, prefixes)
        if p is not None and (best is None or len(p) > best[0]):
            best = (len(p), rank)
    assert best is not None, f"{name} is in no layer: add it to LAYERS and doc/architecture.md"
    return best[1]


def dftx_imports(path: Path) -> set[str]:
    """Every dftx module C{path} imports, at any depth of its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            # "from dftx import x" may name a module x
            found.update(f"{base}.{a.name}" for a in node.names
                         if (ROOT / Path(*f"{base}.{a.name}".split("."))).with_suffix(".py").exists()
                         or (ROOT / Path(*f"{base}.{a.name}".split("."))).is_dir())
    return {n for n in found if n == "dftx" or n.startswith("dftx.")}


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    me = module_name(path)
    mine = layer_of(me)
    wrong = []
    for target in sorted(dftx_imports(path)):
        if target == "dftx" and me != "dftx":
            continue  # the package itself: only __version__ is read from it
        if layer_of(target) > mine:
            wrong.append(f"{target} ({LAYERS[layer_of(target)][0]})")
        for a, b in SIBLINGS:
            for x, y in ((a, b), (b, a)):
                if owner(me, (x,)) and owner(target, (y,)):
                    wrong.append(f"{target} (sibling of {x})")
    assert not wrong, f"{me} ({LAYERS[mine][0]}) imports upward or sideways: {', '.join(wrong)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_module_size(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines: split it along a seam"


def test_no_import_cycles():
    """Imports between dftx modules (function-level ones too) form no cycle;
    naming a module through its parent package is not an edge to the parent."""
    modules = {module_name(p) for p in SOURCES}
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        me = module_name(path)
        graph[me] = {n for n in dftx_imports(path)
                     if n in modules and n != me and not me.startswith(n + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        seen[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if seen.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in seen:
                visit(m)
        stack.pop()
        seen[n] = 2

    for n in sorted(graph):
        if n not in seen:
            visit(n)


def test_every_public_module_has_all():
    missing = [module_name(p) for p in SOURCES
               if not p.name.startswith("_") or p.name == "__init__.py"
               if "__all__" not in p.read_text(encoding="utf-8")
               and module_name(p) not in ("dftx.__main__",)]
    assert not missing, f"modules without __all__: {', '.join(missing)}"
