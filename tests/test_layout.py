"""The test tree's habits: test modules share code only through tests/helpers.py, and slow end-to-end runs
live under tests/e2e/ (every module there marked slow, none marked slow outside it)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
MODULES = sorted(TESTS.rglob("*.py"))


def imported_test_modules(path: Path) -> list[str]:
    imported = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported.extend(alias.name for alias in node.names)
    return [name for name in imported if name.split(".")[0] == "tests" and name != "tests.helpers"]


def test_test_modules_import_shared_code_from_helpers_only():
    offenders = {str(path.relative_to(TESTS)): imported_test_modules(path) for path in MODULES}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_slow_tests_live_under_e2e():
    e2e = TESTS / "e2e"
    for path in MODULES:
        text = path.read_text(encoding="utf-8")
        if path.parent == e2e and path.name.startswith("test_"):
            assert "pytestmark = pytest.mark.slow" in text, f"{path.name}: mark the module slow"
        elif path != Path(__file__):
            assert "mark.slow" not in text, f"{path.relative_to(TESTS)}: move its slow tests to tests/e2e/"
