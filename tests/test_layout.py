"""The package layout: imports flow one way with no circles, and the public API is pinned."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import trp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_imports  # noqa: E402

# The public API. Changing it is a decision: update this list in the same commit.
PUBLIC_API = [
    "TRP", "TRPConfig", "Error", "Criterion", "Energy", "Value", "Ratio", "FixedRank", "parse_criterion", "TargetMACs",
    "TargetSpeedup",
    "Global", "LayerRanks", "WholeModelCriterion", "decompose", "decompose_with_report", "Decomposition",
    "LayerReport", "LowRank", "SCHEMES", "SVDError", "count_macs", "count_params", "layer_macs", "mac_breakdown",
    "MacCount", "unwrap", "save", "register_layer", "plain_layer",
    "load", "lorita", "models", "data", "__version__",
    "measure_latency", "compare_latency", "LatencyResult", "LatencyComparison",
    "profile_layers", "LatencyTable", "TargetLatency", "fold_batchnorm", "export_onnx", "ExportResult", "ort_session",
]


def test_public_api_is_pinned():
    assert sorted(trp.__all__) == sorted(PUBLIC_API)
    for name in trp.__all__:
        assert getattr(trp, name) is not None


def test_public_names_are_the_objects_of_their_modules():
    assert trp.decompose is importlib.import_module("trp.core.decompose").decompose
    assert trp.TRP is importlib.import_module("trp.methods.trained_rank").TRP
    assert trp.lorita is importlib.import_module("trp.methods.lorita")
    assert trp.save is importlib.import_module("trp.deploy.io").save
    assert callable(trp.lorita.collapse) and callable(trp.models.create_model)


def test_the_package_has_no_import_circles_and_flows_one_way():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_imports.py")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "trp" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        # core reaching up into the application
        ({"core/a.py": "from ..app import cli\n", "app/cli.py": ""}, "core/ may import only from itself"),
        # a lazy import inside a function counts too
        ({"methods/m.py": "def f():\n    from ..deploy.io import save\n", "deploy/io.py": ""},
         "methods/ may import only from ['core']"),
        # a circle inside one folder
        ({"core/a.py": "from .b import x\n", "core/b.py": "from . import a\nx = 1\n"},
         "import circle: trp.core.a <-> trp.core.b"),
        # an absolute import of the package's own module
        ({"core/a.py": "import trp.app.cli\n", "app/cli.py": ""}, "core/ may import only from itself"),
        # a new folder nobody placed in the flow
        ({"misc/a.py": ""}, "folder 'misc' has no rule"),
    ],
)
def test_checker_finds_what_it_is_for(tmp_path, files, expected):
    problems = check_imports.check(_package(tmp_path, {"__init__.py": "", **files}))
    assert any(expected in p for p in problems), problems


def test_checker_accepts_downward_imports(tmp_path):
    files = {"__init__.py": "from .app import cli\n", "core/a.py": "import torch\n",
             "methods/m.py": "from ..core.a import x\n", "app/cli.py": "from ..methods import m\n"}
    assert check_imports.check(_package(tmp_path, files)) == []
