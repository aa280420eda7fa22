"""The test suite's own layout: test modules share code through the kit (tests/kit.py,
helpers, rigs), never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
MODULES = sorted(TESTS.rglob("test_*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_module_imports_another(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported = (node.module or "").split(".")
            assert not any(part.startswith("test_") for part in imported), (
                f"{path.name} imports {node.module}: move what it needs to tests/kit.py"
            )
