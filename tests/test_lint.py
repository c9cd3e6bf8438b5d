"""Linters run as tests: pyflakes-level errors (undefined names, unused imports, syntax)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_pyflakes_errors() -> None:
    # F811: a fixture imported into a test module is "redefined" by its use as an argument.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "F,E9", "--ignore", "F811",
         "--output-format", "concise", "src", "nbdplugin", "tests", "vmtests", "bench"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
