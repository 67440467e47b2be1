"""ImageNet end to end through the command line on a tiny fake ImageFolder: pretrained
torchvision weights from a local file, the paper's fine-tuning recipe, decomposition, top-5."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import trp
from trp.app.cli import main


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_imagenet_resnet18_trp_from_local_weights(imagefolder_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = trp.models.create_model("resnet18", num_classes=3)  # the fake set has 3 classes
    weights = tmp_path / "resnet18.pth"
    torch.save(pretrained.state_dict(), weights)
    run = tmp_path / "run"
    result = invoke(
        "train", "--config", "configs/imagenet/resnet18-trp1-nu.yaml", "--data-dir", imagefolder_root,
        "--weights", weights, "--image-size", 64, "--epochs", 1, "--batch-size", 6, "--workers", 0,
        "--device", "cpu", "--out", run, "--no-progress",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 1e-4 and config["milestones"] == [] and config["weights"] == str(weights)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["test_top1"] <= rows[0]["test_top5"] <= 100
    # The config's decomposition ran on the trained model.
    summary = json.loads((run / "decomposed-channel-value0.05.json").read_text())
    assert summary["scheme"] == "channel" and summary["dense"]["top1"] == rows[0]["test_top1"]
    # A whole-model target on the same run.
    result = invoke("decompose", run, "--target-macs", 2, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "decomposed-channel-macs2.json").read_text())
    assert 2.0 <= summary["mac_reduction"] <= 2.3
    model, spec = trp.app.engine.load_model_file(run / "decomposed-channel-macs2.safetensors")
    assert spec.num_classes == 3 and spec.input_size == (64, 64)
    result = invoke("evaluate", run / "decomposed-channel-macs2.safetensors", "--device", "cpu")
    assert result.exit_code == 0 and "top-5" in result.output


def test_imagenet_weights_file_errors(imagefolder_root: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "resnet18-1000.pth"
    torch.save(trp.models.create_model("resnet18", num_classes=1000).state_dict(), wrong)
    result = CliRunner().invoke(main, [
        "train", "--model", "resnet18", "--data", "imagenet", "--data-dir", str(imagefolder_root),
        "--weights", str(wrong), "--image-size", "64", "--epochs", "1", "--out", str(tmp_path / "r"), "--no-progress",
    ])
    assert result.exit_code != 0
    assert "class" in result.output and "Traceback" not in result.output
