"""Layers point one way: the compiler imports neither the runtime nor the CLI, and the
runtime does not import the CLI (DESIGN.md, Conventions 8)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"compiler": ("optc.runtime", "optc.cli", "optc.commands", "optc.search", "optc.api"),
             "runtime": ("optc.cli", "optc.commands", "optc.search")}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / layer).rglob("*.py"))
           for name in _imports(path) if name.startswith(FORBIDDEN[layer])]
    assert not bad, bad
