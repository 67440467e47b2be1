"""scripts/verify_fashion.py: the top-1 each committed model file must reproduce (what the table shows for it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "verify_fashion.py"


def _module():
    spec = importlib.util.spec_from_file_location("verify_fashion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expected_top1_of_each_kind_of_model_file(tmp_path: Path) -> None:
    verify = _module()
    run = tmp_path / "resnet20-baseline-s0"
    (run / "finetune-spatial-macs3").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "test_top1": 80.5}\n{"epoch": 2, "test_top1": 93.1}\n')
    (run / "finetune-spatial-macs3" / "metrics.jsonl").write_text('{"epoch": 1, "test_top1": 92.39}\n')
    (run / "decomposed-spatial-macs3.json").write_text(json.dumps(
        {"decomposed": {"top1": 84.38}, "bn_recalibrated": {"batches": 50, "top1": 90.96}}))
    (run / "decomposed-channel-macs2.json").write_text(json.dumps({"decomposed": {"top1": 79.8}}))
    assert verify.expected_top1(run / "model.safetensors") == 93.1  # the last epoch's
    assert verify.expected_top1(run / "finetune-spatial-macs3" / "model.safetensors") == 92.39
    # the saved split model holds the re-estimated BatchNorm statistics: their top-1 is the one to reproduce
    assert verify.expected_top1(run / "decomposed-spatial-macs3.safetensors") == 90.96
    assert verify.expected_top1(run / "decomposed-channel-macs2.safetensors") == 79.8
    assert verify.expected_top1(run / "decomposed-channel-macs9.safetensors") is None  # no summary
