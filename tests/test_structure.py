"""The import rule of ``astsep`` (README, "Layout"): read from the source, every import counted,
those inside functions too.

1. No import cycle between modules of ``astsep``.
2. No private name (``_x``) crosses a module boundary: never ``from astsep.m import _x``, never
   ``m._x`` on an imported ``astsep`` module.
3. The front ends (``astsep.frontends``) are leaves: no module outside them imports them.
4. No module over ~500 lines; no function over 60 lines without a reason at its top (its docstring
   says "Stays whole: ..." and why).

Run alone: ``python -m pytest -q tests/test_structure.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "astsep"
FRONTENDS = "astsep.frontends"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` in module ``current``."""
    if level == 0:
        return target or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(the ``astsep`` modules ``name`` imports, private names it takes from other modules)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    edges: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> imported astsep module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "astsep":
                    edges.add(a.name)
                    aliases[(a.asname or a.name).split(".")[0] if not a.asname else a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(name, is_package, node.level, node.module)
            if src.split(".")[0] != "astsep":
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in known:  # `from . import pipeline`: the submodule itself
                    edges.add(sub)
                    aliases[a.asname or a.name] = sub
                    continue
                edges.add(src)
                if a.name.startswith("_") and not a.name.startswith("__") and src != name:
                    private.append(f"{name}: from {src} import {a.name} (line {node.lineno})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name:
                private.append(f"{name}: {node.value.id}.{node.attr} (line {node.lineno})")
    return {e for e in edges if e in known and e != name}, private


def graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    known = set(mods)
    g, private = {}, []
    for name, path in mods.items():
        g[name], p = imports(name, path, known)
        private += p
    return g, private


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_astsep():
    g, _ = graph()
    assert cycles(g) == []


def test_no_private_name_is_imported_across_modules():
    _, private = graph()
    assert private == []


def test_front_ends_are_imported_by_nothing_but_front_ends():
    g, _ = graph()
    bad = [f"{m} imports {t}" for m, targets in g.items() if not m.startswith(FRONTENDS)
           for t in targets if t.startswith(FRONTENDS)]
    assert bad == []


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def test_no_module_is_over_500_lines():
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}


def test_no_function_is_over_60_lines_without_a_reason_at_its_top():
    bare = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and "Stays whole:" not in (ast.get_docstring(node) or ""):
                    bare.append(f"{name}.{node.name} (line {node.lineno}): {lines} lines")
    assert bare == []


@pytest.mark.parametrize("source, found", [
    ("from .b import c\n", {"astsep.b"}),
    ("def f():\n    from .b import _hidden\n", {"astsep.b"}),
])
def test_the_checker_sees_imports_inside_functions_and_private_names(tmp_path, source, found):
    pkg = tmp_path / "astsep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "a.py").write_text(source)
    global PKG
    old, PKG = PKG, pkg
    try:
        g, private = graph()
    finally:
        PKG = old
    assert g["astsep.a"] == found
    assert cycles(g) == [["astsep.a", "astsep.b"]]
    assert bool(private) == ("_hidden" in source)
