"""`trp train` toward a latency target with ``layers: all`` (issue 21, fault 2): the table covers the trained layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trp.deploy.target_latency as target_latency
from trp.app.config import TrainConfig
from trp.app.engine import Trainer
from trp.core.safety import split_targets
from trp.core.schemes import scheme_for
from trp.deploy.profile import LatencyTable, LayerLatency


def test_layers_all_with_a_latency_target_trains(fashion_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = {}

    def fake_profile(model, example_inputs, scheme="channel", runtime="onnxruntime", ranks=None, layers=None, **kw):
        """A synthetic table of the layers asked for (the real one runs ONNX Runtime): low ranks pay."""
        targets, _ = split_targets(model, layers)
        asked["layers"] = [n for n, _ in targets]
        lats = {}
        for name, module in targets:
            top = scheme_for(module, scheme).max_rank(module)
            lats[name] = LayerLatency(name, scheme, tuple(example_inputs.shape), top, 1.0, [1, max(top // 2, 1)], [0.2, 0.9])
        return LatencyTable(lats, len(lats) + 1.0, runtime, "cpu: fake", 1, 1, scheme)

    class Uncalibrated(target_latency.TargetLatency):  # no timing of the whole model either
        def __init__(self, x: float, **kw) -> None:
            super().__init__(x, calibrate=0, **kw)

    monkeypatch.setattr(target_latency, "profile_layers", fake_profile)
    monkeypatch.setattr("trp.deploy.profile.profile_layers", fake_profile)
    monkeypatch.setattr(target_latency, "TargetLatency", Uncalibrated)
    cfg = TrainConfig(model="resnet20", data="fashion-mnist", data_dir=str(fashion_root), method="trp", scheme="channel",
                      epochs=1, batch_size=8, lr=0.05, period=2, seed=1, device="cpu", target_latency=1.2,
                      layers="all", steps_per_epoch=2)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run()
    names = trainer.pruner.layer_names
    assert "conv1" in names and "fc" in names  # the layers the default selection leaves out
    assert asked["layers"] == names
    assert set(trainer.pruner.ranks) == set(names) and trainer.pruner.ranks == trainer.pruner.allocated
    assert torch.load(trainer.checkpoint_path, weights_only=True)["trp"]["target"] == "latency:1.2"
