"""`trp train` toward a target on Fashion-MNIST: config, CLI, the run's split, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import trp
from trp.app.cli import main
from trp.app.config import TrainConfig
from trp.app.engine import Trainer, load_model_file, train
from trp.app.results import collect, method_label


def _config(root: Path, **kw) -> TrainConfig:
    base = dict(model="resnet20", data="fashion-mnist", data_dir=str(root), method="trp", scheme="channel",
                epochs=2, batch_size=8, lr=0.05, period=2, seed=1, device="cpu", target_macs=3.0)
    base.update(kw)
    return TrainConfig(**base)


def test_cli_target_run_lands_on_the_target_and_splits_losslessly(fashion_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--model", "resnet20", "--data", "fashion-mnist", "--data-dir", str(fashion_root),
        "--method", "trp", "--target-macs", "3", "--epochs", "2", "--batch-size", "8", "--period", "2",
        "--device", "cpu", "--out", str(run), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["target_macs"] == 3.0
    # With no decompose entries, the run is split with its own target.
    summary = json.loads((run / "decomposed-channel-macs3.json").read_text())
    assert summary["criterion"] == "macs:3"
    assert 3.0 <= summary["mac_reduction"] <= 3.0 * 1.03
    # The run ends projected at the allocated ranks: the split computes the trained function.
    dense, spec = load_model_file(run / "model.safetensors")
    compact, _ = load_model_file(run / "decomposed-channel-macs3.safetensors")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-4)
    assert summary["dense"]["top1"] == summary["decomposed"]["top1"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["trp"]["target"] == "macs:3"
    # `trp decompose RUN` without a criterion uses the target too.
    out = tmp_path / "again.safetensors"
    result = CliRunner().invoke(main, ["decompose", str(run), "--no-eval", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text())["criterion"] == "macs:3"
    labels = {r.label for r in collect([run])}
    assert "TRP1+Nu → 3× MACs" in labels


@pytest.mark.parametrize("schedule", [dict(target_warmup=1), dict(target_ramp=2)])
def test_resume_keeps_the_target_and_ends_where_an_uninterrupted_run_ends(fashion_root: Path, tmp_path: Path,
                                                                          schedule: dict) -> None:
    cfg = _config(fashion_root, epochs=3, **schedule)
    full = train(cfg, tmp_path / "full")
    part = train(cfg, tmp_path / "part", stop_after=1)
    if "target_warmup" in schedule:
        assert part.pruner.allocated == {} and part.pruner.ranks  # epoch 1 (3 steps): energy-driven warm-up only
    else:  # epoch 1 of a 2-epoch ramp: the ranks are those of a milder target
        assert part.pruner.ranks == part.pruner.allocated
        assert sum(part.pruner.ranks.values()) > sum(full.pruner.ranks.values())
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert resumed.pruner.iteration == full.pruner.iteration
    assert resumed.pruner.ranks == full.pruner.ranks == full.pruner.allocated
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_warmup_epochs_become_iterations(fashion_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(fashion_root, epochs=4, target_warmup=2, target_ramp=1, steps_per_epoch=2), tmp_path / "w")
    assert trainer.pruner.warmup == 4  # 2 epochs × min(24/8 = 3, steps_per_epoch 2)
    assert trainer.pruner.ramp == 2
    assert trainer.pruner.input_shape == (1, 1, 28, 28)


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(method="baseline"), "use it with method 'trp'"),
        (dict(target_latency=2.0), "not both"),
        (dict(target_macs=1.0), "reduction factor > 1"),
        (dict(target_warmup=-1), "target_warmup"),
        (dict(target_macs=None, target_warmup=2), "set target_macs or target_latency"),
        (dict(target_ramp=-1), "target_ramp"),
        (dict(target_macs=None, target_latency=2.0, target_ramp=1), "target_ramp grows a MAC target"),
        (dict(epochs=3, target_warmup=1, target_ramp=2), "must be fewer than the 3 epochs"),
    ],
)
def test_bad_target_config(fashion_root: Path, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _config(fashion_root, **kw).validate()


def test_target_latency_is_wired_to_trp_target_latency(fashion_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    class FakeLatency(trp.TargetMACs):
        def __init__(self, x: float, table=None, batch_size: int = 1) -> None:
            super().__init__(x)
            seen["table"] = table
            seen["batch"] = batch_size

        def prepare(self, model, scheme, layers, input_shape, example_inputs=None) -> None:  # TRP profiles with its own selection
            seen["profile"] = (tuple(input_shape), scheme, tuple(layers))

        def spec(self) -> str:
            return f"latency:{self.x:g}"

    monkeypatch.setattr("trp.deploy.target_latency.TargetLatency", FakeLatency)
    trainer = Trainer(_config(fashion_root, target_macs=None, target_latency=2.0, scheme="spatial"), tmp_path / "lat")
    assert isinstance(trainer.pruner.target, FakeLatency) and trainer.pruner.target.x == 2.0
    assert seen == {"table": None, "batch": 1}  # profiled at the first allocation, not before
    trainer.run()
    assert seen["profile"] == ((1, 1, 28, 28), "spatial", tuple(trainer.pruner.layer_names))
    assert trainer.model_path.exists()
    assert trainer.checkpoint_path.exists()
    assert torch.load(trainer.checkpoint_path, weights_only=True)["trp"]["target"] == "latency:2"
    # target_latency_batch: the batch the target is timed at, in the criterion and its string
    config = _config(fashion_root, target_macs=None, target_latency=2.0, target_latency_batch=64, scheme="spatial")
    assert config.target_criterion == "latency:2:onnxruntime:64"
    Trainer(config, tmp_path / "lat64")
    assert seen["batch"] == 64
    with pytest.raises(ValueError, match="target_latency_batch"):
        _config(fashion_root, target_latency_batch=64).validate()


def test_labels_of_target_runs() -> None:
    # target_macs, or target_speedup in a run written before issue 21
    for key in ("target_macs", "target_speedup"):
        assert method_label({"method": "trp", "scheme": "spatial", "nuclear_weight": 3e-4, key: 3.0}) == "TRP2+Nu → 3× MACs"
    assert method_label({"method": "trp", "scheme": "channel", "nuclear_weight": 0, "target_latency": 2.0}) == "TRP1 → 2× latency"


def test_cli_factored_epochs_end_at_the_trained_ranks_and_split_losslessly(fashion_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "factored"
    result = CliRunner().invoke(main, [
        "train", "--model", "resnet20", "--data", "fashion-mnist", "--data-dir", str(fashion_root),
        "--method", "trp", "--scheme", "spatial", "--target-macs", "3", "--factored-epochs", "1", "--epochs", "3",
        "--batch-size", "8", "--period", "2", "--device", "cpu", "--out", str(run), "--no-progress"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["trp"]["factored"] is True  # the last epoch trained the factors
    assert any(k.endswith("parametrizations.weight.original1") for k in state["model"])
    ranks = json.loads((run / "trained_ranks.json").read_text())["ranks"]
    assert ranks == state["trp"]["ranks"]
    dense, _ = load_model_file(run / "model.safetensors")  # the factors multiplied back: plain weights ...
    scheme = trp.core.schemes.get_scheme("spatial")
    for name, rank in ranks.items():
        s = torch.linalg.svdvals(scheme.to_matrix(dense.get_submodule(name).weight.detach().double()))
        assert int((s > s[0] * 1e-6).sum()) == rank, name  # ... of exactly the trained ranks
    summary = json.loads((run / "decomposed-spatial-macs3.json").read_text())
    assert 3.0 <= summary["mac_reduction"] <= 3.0 * 1.03
    compact, _ = load_model_file(run / "decomposed-spatial-macs3.safetensors")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-4)
    assert summary["dense"]["top1"] == summary["decomposed"]["top1"]


def test_a_run_resumed_inside_its_factored_epochs_ends_where_an_uninterrupted_run_ends(fashion_root: Path,
                                                                                       tmp_path: Path) -> None:
    cfg = _config(fashion_root, epochs=3, factored_epochs=2, nuclear_weight=3e-4)
    full = train(cfg, tmp_path / "full")
    part = train(cfg, tmp_path / "part", stop_after=2)  # factored from epoch 2 on: its checkpoint holds factors
    assert part.pruner.factored
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert not resumed.pruner.factored and not full.pruner.factored  # merged when the run ended
    assert resumed.pruner.ranks == full.pruner.ranks
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(factored_epochs=2), "must be fewer than the 2 epochs"),
        (dict(method="lorita", target_macs=None, factored_epochs=1), "use it with method 'trp'"),
        (dict(epochs=4, target_ramp=2, factored_epochs=3), "must end before the 3 factored epochs begin"),
    ],
)
def test_bad_factored_config(fashion_root: Path, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _config(fashion_root, **kw).validate()
