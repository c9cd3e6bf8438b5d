"""Linters run as tests, each with the repository's own configuration (pyproject.toml):
ruff (pyflakes, pycodestyle, bugbear, pyupgrade, isort, simplify), mypy --strict over src/
and the plugin, and import-linter's contracts (the layers of src/repdisk, no import cycles).

A failure shows the tool's own report; `make lint` runs only these.  Last, the test
modules' own rule: they share code through tests/helpers and fixtures through conftest.py,
never by importing another test module or conftest.
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def check(argv: list[str]) -> None:
    """Run a linter from the repository root; it must exit 0."""
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"


def test_ruff() -> None:
    check([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise"])


def test_mypy_strict() -> None:
    check([sys.executable, "-m", "mypy"])


def test_mypy_strict_plugin() -> None:
    # A file of its own: the script is named like the package it imports (repdisk).
    check([sys.executable, "-m", "mypy", "nbdplugin/repdisk.py"])


def test_import_contracts() -> None:
    check([os.path.join(BIN, "lint-imports"), "--no-logo", "--no-cache"])


def test_no_test_module_imports_another_or_conftest() -> None:
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*tests", "**", "*.py"), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{os.path.relpath(path, ROOT)}:{node.lineno}: {name}" for name in names
                      if name.split(".")[-1].startswith("test_") or name.endswith("conftest")]
    assert not found, "import from tests/helpers instead:\n" + "\n".join(found)


def test_stage_has_one_writer() -> None:
    """A replica's stage is a plain field (the I/O gates read it without a call), so
    nothing checks its writers at run time: only StageMachine.__init__ and set_stage
    assign ``.stage`` anywhere in src/."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.py"), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                targets = (node.targets if isinstance(node, ast.Assign) else
                           [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign)
                           else [])
                for target in targets:
                    for t in ast.walk(target):
                        if isinstance(t, ast.Attribute) and t.attr == "stage":
                            found.append((os.path.relpath(path, ROOT), func.name, node.lineno))
    writers = {(path, name) for path, name, _line in found}
    assert writers == {("src/repdisk/replication/stage.py", "__init__"),
                       ("src/repdisk/replication/stage.py", "set_stage")}, found


def test_no_import_inside_a_function() -> None:
    """Imports are at the top of a module (a try for an optional package included): an
    import inside a function would hide a cycle from import-linter's contracts."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.py"), recursive=True)
                       + [os.path.join(ROOT, "nbdplugin", "repdisk.py")]):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                found += [f"{os.path.relpath(path, ROOT)}:{node.lineno}" for node in ast.walk(func)
                          if isinstance(node, ast.Import | ast.ImportFrom)]
    assert not found, "move these imports to the top of their module:\n" + "\n".join(found)
