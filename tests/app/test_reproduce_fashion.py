"""scripts/reproduce_fashion.sh: valid bash, and every config it trains exists and parses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from trp.app import engine

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "reproduce_fashion.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_config_the_script_trains_exists_and_parses() -> None:
    text = SCRIPT.read_text()
    models = re.search(r'TRP_MODELS:-([^}]*)\}', text).group(1).split()
    rows = set(re.findall(r'configs/fashion/\$m-([a-z0-9-]+)\.yaml', text))
    rows |= set(re.search(r'for c in ([a-z0-9 -]+); do', text).group(1).split())
    assert models == ["resnet20"]  # ResNet-56's configs stay for a GPU: TRP_MODELS="resnet20 resnet56"
    models = ["resnet20", "resnet56"]
    assert rows == {"baseline", "trp2-nu-macs3", "trp2-nu-latency2", "trp1-nu", "trp2-nu", "lorita2", "trp2-macs3",
                    "trp2-nu-macs3-ramp5", "trp2-nu-macs3-ramp10", "trp2-nu-macs3-ramp5-fact8",
                    "trp2-nu-macs3-ramp10-fact5"}
    for model in models:
        for row in rows:
            path = REPO / "configs" / "fashion" / f"{model}-{row}.yaml"
            settings = engine.read_config_file(path)
            assert settings["model"] == model and settings["data"] == "fashion-mnist"
            assert settings["holdout"] == 5000
    assert sorted(p.name for p in (REPO / "configs" / "fashion").glob("*.yaml")) == sorted(
        f"{m}-{r}.yaml" for m in models for r in rows)
