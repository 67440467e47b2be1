"""Start-up: help and version answer without importing torch (issue 11, defect 13)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import trp
from trp.app import cli

SRC = Path(trp.__file__).parents[1]

PROBE = textwrap.dedent("""
    import sys
    entry = sys.argv[1]
    sys.argv = ["trp", *sys.argv[2:]]
    try:
        if entry == "main":
            import runpy
            runpy.run_module("trp", run_name="__main__")
        else:
            from trp.app.cli import main
            main()
    except SystemExit as exit:
        code = exit.code
    heavy = [m for m in ("torch", "torchvision", "numpy", "safetensors") if m in sys.modules]
    print("HEAVY", heavy, "CODE", code)
""")


@pytest.mark.parametrize("entry", ["script", "main"])
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["decompose", "--help"]])
def test_help_and_version_do_not_import_torch(entry: str, args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, entry, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert "HEAVY [] CODE 0" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Usage:" in out.stdout or "version" in out.stdout


def test_import_trp_is_light_and_names_resolve_on_use() -> None:
    script = ("import sys, trp; assert 'torch' not in sys.modules, 'eager torch'; "
              "from trp import decompose, Energy; import trp.deploy.io; "
              "assert trp.save is trp.deploy.io.save and decompose is trp.decompose; print('OK')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert out.stdout.strip() == "OK", out.stderr[-2000:]


def test_unknown_public_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trp.nope  # noqa: B018


def test_cli_choices_match_the_library() -> None:
    from trp.app import engine

    assert cli.SCHEMES == tuple(sorted(trp.SCHEMES))
    assert cli.METHODS == engine.METHODS and cli.OPTIMIZERS == engine.OPTIMIZERS
