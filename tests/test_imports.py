"""The project's import graph, read from the source (imports inside functions count too): no
module reaches itself through imports, and a stage imports only from stages before it and the core.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The data flows one way: compress -> export -> validate -> devices. The core (rankdown.*
# outside the stages) serves them all and imports none; the command line sits above everything.
ORDER = {"rankdown": 0, "rankdown.compress": 1, "rankdown.export": 2, "rankdown.validate": 3, "rankdown.devices": 4}
ENTRY_POINTS = {"rankdown.cli": 5}


def _package_dirs() -> dict[str, Path]:
    """Installed package name -> folder, as pyproject maps them (``rankdown.validate`` is runtime_tests/)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in _package_dirs().items():
        for path in folder.glob("*.py"):  # packages are flat; sub-packages would be listed in pyproject
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an import statement in the file reaches (``from a import b`` gives a and a.b)."""
    is_package = path.stem == "__init__"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to its longest project-module prefix)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported_names(module, path):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                if ".".join(parts[:end]) in modules:
                    targets.add(".".join(parts[:end]))
                    break
        targets.discard(module)  # ``from rankdown.compress import x`` inside the package's own __init__
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def stage_rank(module: str) -> int:
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    return max(rank for package, rank in ORDER.items() if module == package or module.startswith(package + "."))


def test_the_graph_sees_the_stages_and_imports_inside_functions():
    graph = import_graph()
    assert {"rankdown.compress.pipeline", "rankdown.export.pipeline", "rankdown.validate.harness",
            "rankdown.devices.fit", "rankdown.schema"} <= set(graph)
    # cmd_compress imports the pipeline inside the function: the graph must still hold the edge.
    assert "rankdown.compress.pipeline" in graph["rankdown.cli"]
    # ``from rankdown.compress import svd`` is an edge to the submodule, not only to the package.
    assert "rankdown.compress.svd" in graph["rankdown.compress.methods"]


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("package", sorted(ORDER))
def test_a_stage_imports_only_from_earlier_stages_and_the_core(package):
    wrong = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                   if stage_rank(module) == ORDER[package] for target in targets
                   if stage_rank(target) > stage_rank(module))
    assert wrong == []
