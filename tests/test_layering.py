"""Layers point one way (DESIGN.md, Conventions 8): the compiler imports neither the
runtime nor the CLI, the runtime does not import the CLI, and no module imports in a
circle. Read from the source with `ast`, so an import inside a function counts as much
as one at the top of a file: a lazy import still ties the layers together."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> import name (pyproject.toml's package-dir).
PACKAGES = {"optc": "optc", "compiler": "optc.compiler", "runtime": "optc.runtime", "models": "optc.models"}
CLI = ("optc.cli", "optc.commands", "optc.search")
FORBIDDEN = {
    "optc.compiler": ("optc.runtime", "optc.api", *CLI),
    "optc.runtime": CLI,
}
# (importer, imported) pairs the rules above tolerate for now, each with why. Keep empty.
ALLOWED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((pkg, *parts))] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The optc module an imported dotted name lands in (longest known prefix), or None
    for anything outside optc. `from optc.compiler import capture` names a module;
    `from optc.compiler.capture import capture` a function inside one."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every optc module `module` imports, anywhere in its file (module level, inside
    functions, under TYPE_CHECKING). Package `__init__`s that Python runs on the way to
    a submodule are not edges: only names imported from a package itself are (the
    `__init__`s are empty or lazy, optc/__init__.py included)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .x import y` inside `package`
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] or [base]
        for name in names:
            target = _resolve(name)
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for module in MODULES:
        graph.add_edges_from((module, target) for target in imports_of(module))
    return graph


def test_walk_sees_the_whole_package():
    """Guards the test itself: a mapping or parsing slip would make every check pass."""
    graph = import_graph()
    assert {"optc.cli", "optc.compiler.pipeline", "optc.runtime.artifact", "optc.models.zoo"} <= set(graph)
    assert graph.number_of_edges() > len(MODULES)  # real code imports itself a lot
    # a relative import resolves (compiler/codegen/ops.py: `from .kernels.sparse_linear import ...`)
    assert "optc.compiler.codegen.kernels.sparse_linear" in imports_of("optc.compiler.codegen.ops")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    bad = sorted(
        f"{MODULES[src].relative_to(ROOT)} imports {dst}"
        for src, dst in import_graph().edges
        if src.startswith(layer + ".") and dst.startswith(FORBIDDEN[layer]) and (src, dst) not in ALLOWED
    )
    assert not bad, "layering violations (DESIGN.md, Conventions 8):\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = import_graph()
    graph.remove_edges_from(ALLOWED)
    cycles = sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)
    # one concrete loop per tangle, so the message says which import to move
    loops = [" -> ".join([*nx.find_cycle(graph.subgraph(c))[0][:1], *(e[1] for e in nx.find_cycle(graph.subgraph(c)))])
             for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(loops)


@pytest.mark.parametrize("src, dst", sorted(ALLOWED))
def test_allowed_exceptions_still_exist(src, dst):
    """An allow-list entry whose import is gone must be removed, so the list only shrinks."""
    assert dst in imports_of(src), f"{src} no longer imports {dst}: drop it from ALLOWED"
