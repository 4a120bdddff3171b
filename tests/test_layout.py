"""The layout's one rule of imports: the planner may use the runtime's torch
layer, the runtime never imports the planner (it runs where no solver is)."""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "runtime").glob("*.py")), ids=lambda p: p.name)
def test_runtime_never_imports_the_planner(path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            assert not name.startswith("neuroflux.planner"), f"{path.name} imports {name}"


def test_no_function_over_60_lines_and_no_module_over_500() -> None:
    """Long functions are split into named phases, long modules by
    responsibility (planner, runtime, schemas, tools, neuroflux)."""
    long = []
    for folder in ("planner", "runtime", "schemas", "tools", "neuroflux"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") > 500:
                long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
                    )
    assert not long, long


def test_no_private_name_is_imported_across_modules() -> None:
    crossing = []
    for folder in ("planner", "runtime", "schemas", "tools", "neuroflux"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neuroflux"):
                    crossing += [
                        f"{path.relative_to(ROOT)}: {a.name}"
                        for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                    ]
    assert not crossing, crossing


def test_the_suite_never_touches_the_users_cache() -> None:
    """conftest.py gives the session its own cache folder (device profiles),
    which every CLI a test starts inherits through NEUROFLUX_CACHE."""
    from neuroflux.planner.device_profile import cache_dir

    home = Path.home() / ".cache" / "neuroflux"
    assert cache_dir().resolve() != home.resolve()
    assert Path(tempfile.gettempdir()).resolve() in cache_dir().resolve().parents
