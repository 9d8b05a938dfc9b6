"""The tests' own layout: conftest.py holds pytest's fixtures only; the plain helpers that test files share live in
tests/helpers_*.py and are imported from there, never from conftest (which pytest loads itself)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FROM_CONFTEST = re.compile(r"\bfrom\s+conftest\s+import\b|\bimport\s+conftest\b")


def test_no_test_module_imports_from_conftest() -> None:
    found = [f"{path.name}:{number}: {line.strip()}" for path in sorted(TESTS.glob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if FROM_CONFTEST.search(line)]
    assert found == [], "import these from tests/helpers_*.py instead:\n" + "\n".join(found)


def test_conftest_defines_only_fixtures() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text(encoding="utf-8"))
    plain = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
             and not any("fixture" in ast.unparse(d) for d in getattr(node, "decorator_list", []))]
    assert plain == [], f"helpers belong in tests/helpers_*.py, not conftest.py: {plain}"


def test_only_helpers_browser_starts_a_browser() -> None:
    """Every browser test drives chromium through helpers_browser.headless_chromium, not a driver of its own."""
    starts = re.compile(r"\bwebdriver\.(Chrome|Firefox|Remote)\b|\bplaywright\b|--headless|--remote-debugging")
    found = [path.name for path in sorted(TESTS.glob("*.py"))
             if path.name not in ("helpers_browser.py", Path(__file__).name) and starts.search(path.read_text())]
    assert found == [], f"start the browser with helpers_browser.headless_chromium: {found}"
