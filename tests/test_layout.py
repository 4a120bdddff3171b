"""The layout's one rule of imports: the planner may use the runtime's torch
layer, the runtime never imports the planner (it runs where no solver is)."""

from __future__ import annotations

import ast

import pytest

from helpers import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "runtime").glob("*.py")), ids=lambda p: p.name)
def test_runtime_never_imports_the_planner(path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert not name.startswith("neuroflux.planner"), f"{path.name} imports {name}"
