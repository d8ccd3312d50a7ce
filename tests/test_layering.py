"""The import direction runtime <- exporters <- plugins, and no import cycles, read off the source.

Every module of camrt/ and exporters/camrt_exporters/ is parsed with `ast` and every import
statement counts: module-level, function-local and TYPE_CHECKING ones alike (a function-local
import hides a cycle, it does not remove it). Importing `a.b.c` also runs the packages `a` and
`a.b`, so those count too. Imports by name at run time (the plugin manager's built-ins,
`camrt.__getattr__`'s lazy names) are not statements; what they load is measured by
tests/runtime/test_import_cost.py, which runs the imports.

The rules (docs/architecture.md):
- the runtime (camrt/) imports neither torch nor the exporters nor any plugin package;
- the exporters import from the runtime only its declared seam (`EXPORTER_SEAM`), never a plugin;
- no library module of the runtime imports the CLI (camrt/cli/ may import everything);
- no import cycle between modules, nor between the runtime's subpackages and top-level modules.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME = "camrt"
EXPORTERS = "camrt_exporters"
PACKAGE_ROOTS = {RUNTIME: REPO, EXPORTERS: REPO / "exporters"}
#: What the exporters may import from the runtime: the contract, the errors they subclass, the
#: hook markers, the lazy public names, the layer queries shared with `camrt inspect`, and the
#: plugin manager.
EXPORTER_SEAM = {
    "camrt.contract", "camrt.errors", "camrt.execution.seeded", "camrt.hookspecs", "camrt.lazy", "camrt.modelfile.layers",
    "camrt.modelfile.shapes", "camrt.modelfile.token_layout", "camrt.plugins"}
#: The runtime's command line: it may import every other room of the runtime.
CLI_MODULES = ("camrt.cli", "camrt.__main__")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # the module imported (for `from m import name`: `m.name` when that is a module, else `m`)
    where: str  # path:line of the statement


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: str) -> dict[str, Path]:
    root = PACKAGE_ROOTS[package]
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}


MODULES = {**package_modules(RUNTIME), **package_modules(EXPORTERS)}


def plugin_packages() -> set[str]:
    """Top-level import names of the distributions under plugins/ (modules and packages)."""
    names = set()
    for distribution in (REPO / "plugins").iterdir():
        if not distribution.is_dir():
            continue
        names |= {path.stem for path in distribution.glob("*.py") if path.stem not in ("setup", "conftest")}
        names |= {path.parent.name for path in distribution.glob("*/__init__.py") if path.parent.name != "tests"}
    return names


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    base = parts[:len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


@functools.cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import statement of `module`, parsed once per test session."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, where) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.append(Import(module, child if child in MODULES else source, where))
    return tuple(found)


def executed_modules(target: str) -> list[str]:
    """The known modules an import of `target` runs: the nearest known module and its packages."""
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    parts = target.split(".")
    return [name for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if name in MODULES]


def _in(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(importers: Iterable[str], forbidden) -> list[str]:
    return [f"{i.where}: {i.importer} imports {i.target}"
            for importer in importers for i in imports_of(importer) if forbidden(i.target)]


def runtime_modules() -> list[str]:
    return [m for m in MODULES if _in(m, [RUNTIME])]


def exporter_modules() -> list[str]:
    return [m for m in MODULES if _in(m, [EXPORTERS])]


# --- the direction runtime <- exporters <- plugins ----------------------------------------------


def test_the_runtime_never_imports_torch_the_exporters_or_a_plugin():
    heavy_or_downstream = ["torch", "torchvision", EXPORTERS, *plugin_packages()]
    assert "camrt_example" in heavy_or_downstream  # the plugin list is read, not empty
    found = _violations(runtime_modules(), lambda target: _in(target, heavy_or_downstream))
    assert not found, "\n".join(found)


def test_the_exporters_import_only_the_declared_seam_of_the_runtime_and_no_plugin():
    plugins = plugin_packages()
    found = _violations(exporter_modules(), lambda target: _in(target, plugins))
    assert not found, "\n".join(found)
    used = {m for importer in exporter_modules() for i in imports_of(importer) if _in(i.target, [RUNTIME])
            for m in executed_modules(i.target)[-1:]}
    assert used - EXPORTER_SEAM == set(), "a new coupling of the exporters to the runtime: add it to the seam " \
        "(EXPORTER_SEAM, docs/architecture.md) on purpose, or use what the seam offers"
    assert used == EXPORTER_SEAM  # the seam lists nothing the exporters no longer use


def test_no_library_module_of_the_runtime_imports_the_cli():
    library = [m for m in runtime_modules() if not _in(m, CLI_MODULES)]
    found = _violations(library, lambda target: _in(target, ["camrt.cli"]))
    assert not found, "\n".join(found)


# --- cycles -------------------------------------------------------------------------------------


Graph = dict[str, dict[str, list[str]]]  # node -> node it imports -> where


def import_graph(modules: Iterable[str], node_of=lambda module: module) -> Graph:
    """Edges between the nodes (`node_of(module)`) of the imports among `modules`."""
    graph: Graph = {}
    for module in modules:
        source = node_of(module)
        graph.setdefault(source, {})
        for i in imports_of(module):
            for target in executed_modules(i.target):
                # A module's own packages are already running when it is imported: not an edge.
                if target == module or _in(module, [target]) and target != i.target:
                    continue
                if node_of(target) != source:
                    graph[source].setdefault(node_of(target), []).append(i.where)
    return graph


def _strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one node, each a set of nodes in a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph.get(node, {}):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _cycle_through(graph: Graph, component: list[str]) -> str:
    """One cycle inside `component`, shown with the import statement of every step."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to `start`
        node = frontier.pop(0)
        for successor in sorted(graph[node]):
            if successor == start:
                cycle = paths[node] + [start]
                return " -> ".join(f"{a} ({graph[a][b][0]})" for a, b in zip(cycle, cycle[1:])) + f" -> {start}"
            if successor in members and successor not in paths:
                paths[successor] = paths[node] + [successor]
                frontier.append(successor)
    raise AssertionError(f"{component} is not strongly connected")


def cycles(graph: Graph) -> list[str]:
    return [_cycle_through(graph, component) for component in _strongly_connected(graph)]


def test_the_cycle_finder_reports_a_cycle_with_its_import_statements():
    graph = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:2"], "d": ["b.py:3"]}, "c": {"a": ["c.py:4"]}, "d": {}}
    assert cycles(graph) == ["a (a.py:1) -> b (b.py:2) -> c (c.py:4) -> a"]
    assert cycles({"a": {"b": ["a.py:1"]}, "b": {}}) == []


def test_no_import_cycle_between_modules():
    found = cycles(import_graph(MODULES))
    assert not found, "\n".join(found)


def subpackage_or_top_level_module(module: str) -> str:
    """camrt.execution.session -> camrt.execution; camrt.contract stays camrt.contract."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_the_runtime_subpackages():
    graph = import_graph(runtime_modules(), subpackage_or_top_level_module)
    assert "camrt.modelfile" in graph and "camrt.plugins" in graph["camrt.execution"]  # the graph is read
    found = cycles(graph)
    assert not found, "\n".join(found)
