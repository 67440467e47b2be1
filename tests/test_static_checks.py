"""Static checks in the test command: the linter (ruff, configured in pyproject.toml) finds nothing.

Skipped only where ruff is not installed (the ``test`` extra installs it, so CI runs it). A type
checker is not run yet: mypy still reports errors on src/trp (see pyproject.toml's [tool.mypy]).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """The tool beside this interpreter (the venv's), else on PATH; skip when neither exists."""
    local = Path(sys.executable).with_name(name)
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' installs it)")
    return found


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "src", "tests", "benchmarks", "scripts"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}{result.stderr}"
