"""The layout keeps the architecture visible: every package says its job, no module grows past
350 lines, no two packages import each other (directly or round a loop), and
docs/architecture.md names only packages and modules that exist."""

from __future__ import annotations

import ast
import os
import re

from helpers.common import ROOT

PACKAGE = os.path.join(ROOT, "kdscale")
MAX_LINES = 350


def modules() -> list[str]:
    found = []
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def package_of(path: str) -> str:
    """``kdscale.<package>`` for a module in a subpackage, ``kdscale`` for a top-level module."""
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(parts[:2]) if len(parts) > 2 else "kdscale"


def imported_modules(path: str) -> set[str]:
    """Every ``kdscale`` module ``path`` imports at run time (``if TYPE_CHECKING:`` blocks are
    for type checkers only and are left out)."""
    tree = ast.parse(open(path).read())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "kdscale" or n.startswith("kdscale.")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in modules():
        source = package_of(path)
        for name in imported_modules(path):
            parts = name.split(".")
            target = ".".join(parts[:2]) if len(parts) > 1 and os.path.isdir(os.path.join(PACKAGE, parts[1])) \
                else "kdscale"
            if target != source and target != "kdscale":
                graph.setdefault(source, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_package_import_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_module_over_350_lines():
    long = {os.path.relpath(p, ROOT): n for p in modules() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, long


def test_every_package_says_its_job():
    for folder, dirs, _files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        init = os.path.join(folder, "__init__.py")
        assert os.path.isfile(init), f"{os.path.relpath(folder, ROOT)} has no __init__.py"
        assert ast.get_docstring(ast.parse(open(init).read())), f"{os.path.relpath(init, ROOT)} has no docstring"


def test_architecture_page_names_what_exists():
    page = os.path.join(ROOT, "docs", "architecture.md")
    if not os.path.isfile(page):
        return  # written with the layout; checked once it exists
    text = open(page).read()
    named = set(re.findall(r"`(kdscale/[\w/]+(?:\.py)?)/?`", text))
    assert named, "docs/architecture.md names no kdscale/ path"
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, missing
