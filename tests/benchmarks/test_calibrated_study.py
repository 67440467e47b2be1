"""benchmarks/calibrated.py on tiny models: the CNN study (plain / calibrated / +BN) and the --model-file path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trp

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("calibrated_study", BENCH / "calibrated.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(BENCH))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cnn_study_rows(study):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    calib = [torch.randn(16, 1, 12, 12) for _ in range(3)]
    xs = torch.randn(32, 1, 12, 12)
    with torch.no_grad():
        ref = model(xs).argmax(-1)

    def agreement(m):
        with torch.no_grad():
            return float((m.eval()(xs).argmax(-1) == ref).float().mean())

    rows = study.cnn_study("tiny", model, calib, agreement, "agreement", xs[:1], [1.5], 48, lambda s: None)
    methods = [r.method for r in rows]
    assert methods == ["original", "plain", "calibrated, trained BN statistics", "calibrated"]
    assert all(abs(r.reduction - 1.5) < 0.1 for r in rows[1:])


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resnet20_from_a_model_file(study, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r20.safetensors"
    trp.save(trp.models.create_model("resnet20", in_channels=1, num_classes=10), path)
    rows, desc = study.resnet20_study(path, None, None, [1.5], 64, False, lambda s: None, limit=100)
    assert [r.method for r in rows] == ["original", "plain", "calibrated, trained BN statistics", "calibrated"]
    assert desc["test"] == "100 test images"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_latency_rows_record_the_measured_speedup_and_an_unreachable_target(study, monkeypatch, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from _fake_hardware import FakeHardware

    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    hw = FakeHardware(overhead=10.0)
    real = trp.TargetLatency
    target = {"x": 1.5}
    monkeypatch.setattr(trp, "TargetLatency", lambda x, **kw: real(target["x"], runtime="eager", timer=hw, repeats=1,
                                                                   warmup=0, tolerance=0.1))
    calib = [torch.randn(8, 1, 12, 12) for _ in range(2)]
    with hw.running():
        rows = study._latency_rows("tiny", model, calib[0], calib, 8, lambda m: 1.0, "agreement", print)
        target["x"] = 50.0
        failed = study._latency_rows("tiny", model, calib[0], calib, 8, lambda m: 1.0, "agreement", print)
    assert [r.method for r in rows] == ["plain latency", "calibrated latency"]
    for r in rows:
        assert abs(r.extra["measured_speedup"] / 1.5 - 1) <= 0.1 and r.reduction > 1.0
    assert all("cannot be reached" in r.extra["error"] for r in failed)
    result = {"command": "c", "machine": "m", "models": {"tiny": {}},
              "rows": [vars(r) for r in rows + failed]}
    text = study.markdown(result)
    assert "1.5x measured (ORT b1)" in text and f"{rows[0].extra['measured_speedup']:.3f}x" in text
    assert "unreachable: TargetLatency" in text
