"""The package's folders are its layers: imports only run down, and no modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lgur"
# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = ("files", "synth", "data", "model", "search", "eval", "training", "app", "cli")
TOP = {"lgur", "lgur.__main__", "lgur.cli"}  # the package's API and its command line


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def package_imports(package: Path) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports when it runs (at the top or
    inside a function; not the imports that only type checkers read)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        found: set[str] = set()
        pending = list(ast.parse(path.read_text()).body)
        while pending:
            node = pending.pop()
            if _type_checking(node):
                pending.extend(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
                found.update(next(([c] for c in candidates if c in modules), []))
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
            pending.extend(ast.iter_child_nodes(node))
        graph[name] = found - {name}
    return graph


def layer_of(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_every_module_is_in_a_layer() -> None:
    for module in package_imports(PACKAGE):
        assert module in TOP or module.split(".")[1] in LAYERS, f"{module} is in no layer of {LAYERS}"


def test_imports_only_run_down() -> None:
    assert upward_imports(package_imports(PACKAGE)) == []


def test_no_import_circles() -> None:
    assert import_circles(package_imports(PACKAGE)) == []


@pytest.fixture
def crooked_package(tmp_path: Path) -> Path:
    """A package with one import up a layer and one circle, each the checks must find."""
    package = tmp_path / "lgur"
    for folder in ("model", "search"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "files.py").write_text("")
    (package / "model" / "lgur.py").write_text("from ..search.engine import SearchEngine\n")
    (package / "search" / "engine.py").write_text("from .atlas import Atlas\nimport lgur.files\n")
    (package / "search" / "atlas.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .gallery import Gallery\n"
        "def atlas():\n    from .engine import SearchEngine\n"
    )
    (package / "search" / "gallery.py").write_text("from .atlas import atlas\n")
    return package


def test_the_checks_find_an_upward_import_and_a_circle(crooked_package: Path) -> None:
    graph = package_imports(crooked_package)
    assert graph["lgur.search.engine"] == {"lgur.search.atlas", "lgur.files"}
    assert graph["lgur.search.atlas"] == {"lgur.search.engine"}  # the type checkers' import is not run
    assert upward_imports(graph) == ["lgur.model.lgur -> lgur.search.engine"]
    assert import_circles(graph) == [["lgur.search.atlas", "lgur.search.engine"]]
