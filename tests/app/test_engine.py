"""The training loop: run directory, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import trp
from trp.app.engine import TrainConfig, Trainer, load_model_file, train


def _config(root: Path, **kw) -> TrainConfig:
    base = dict(model="resnet20", data="cifar10", data_dir=str(root), method="trp", scheme="channel",
                epochs=3, batch_size=16, lr=0.05, period=2, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # timings differ between runs
        for k in ("epoch_seconds", "trp_seconds"):
            r.pop(k)
    return rows


def test_run_directory_contents(cifar10_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = train(_config(cifar10_root, epochs=2), run)
    assert json.loads((run / "config.json").read_text())["method"] == "trp"
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"lr", "train_loss", "test_top1", "test_top5", "mean_rank"} <= set(rows[0])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["trp"]["iteration"] == trainer.pruner.iteration
    model, spec = load_model_file(run / "model.safetensors")
    assert spec.model == "resnet20" and spec.num_classes == 10 and spec.input_size == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    trainer.model.eval(), model.eval()
    assert torch.equal(model(x), trainer.model(x))
    assert not list(run.glob(".*tmp"))  # no temporary files left behind


@pytest.mark.parametrize("method", ["trp", "nuclear", "baseline", "lorita"])
def test_resume_ends_where_uninterrupted_run_ends(cifar10_root: Path, tmp_path: Path, method: str) -> None:
    cfg = _config(cifar10_root, method=method, milestones=[2])
    full = train(cfg, tmp_path / "full")
    part = train(cfg, tmp_path / "part", stop_after=1)
    assert part.epoch == 1 and not (tmp_path / "part" / "model.safetensors").exists()
    # an interrupted epoch may have appended a metrics row after the checkpoint: resume drops it
    with (tmp_path / "part" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 2, "junk": True}) + "\n")
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert resumed.epoch == 3
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert _rows(tmp_path / "part") == [pytest.approx(r, abs=1e-4) for r in _rows(tmp_path / "full")]


def test_resume_without_checkpoint(cifar10_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(cifar10_root), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        trainer.resume()


def test_corrupt_checkpoint(cifar10_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(_config(cifar10_root), run).resume()


def test_divergence_is_reported(cifar10_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match="diverged"):
        train(_config(cifar10_root, lr=1e12, method="baseline"), tmp_path / "run")


@pytest.mark.parametrize(
    "change, message",
    [({"method": "bogus"}, "method"), ({"epochs": 0}, "epochs"), ({"data": "imagenet21k"}, "unknown dataset"),
     ({"lr": -1.0}, "lr"), ({"scheme": "tucker"}, "unknown scheme"), ({"energy": 1.5}, "energy")],
)
def test_bad_config(cifar10_root: Path, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(dataclasses.replace(_config(cifar10_root), **change), tmp_path / "run")


def test_trp_training_lowers_ranks(cifar10_root: Path, tmp_path: Path) -> None:
    trainer = train(_config(cifar10_root, epochs=1), tmp_path / "run")
    pruner = trainer.pruner
    # after projections every target layer's weight is exactly at most its recorded rank
    pruner.project()
    for name in pruner.layer_names:
        w = trainer.model.get_submodule(name).weight.detach()
        s = torch.linalg.svdvals(w.flatten(1).double())
        assert int((s > s[0] * 1e-5).sum()) == pruner.ranks[name] < min(w.flatten(1).shape)
    compact = pruner.decompose(trp.Value(1e-4), input_shape=(1, 3, 32, 32))
    assert trp.count_macs(compact, (1, 3, 32, 32)) < trp.count_macs(trainer.model, (1, 3, 32, 32))


def test_lorita_run_saves_the_collapsed_model(cifar10_root: Path, tmp_path: Path) -> None:
    cfg = _config(cifar10_root, method="lorita", factor=3, epochs=1)
    assert cfg.weight_decay == 1e-3  # LoRITa's default (SPEC §2)
    trainer = train(cfg, tmp_path / "run")
    assert trp.lorita.is_overparameterized(trainer.model)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert any(".factors.2." in k for k in state)  # checkpoints hold the factors
    model, _ = load_model_file(tmp_path / "run" / "model.safetensors")
    fresh = trp.models.create_model("resnet20", in_channels=3, num_classes=10)
    assert list(model.state_dict()) == list(fresh.state_dict())  # the original structure
    x = torch.randn(2, 3, 32, 32)
    model.eval(), trainer.model.eval()
    torch.testing.assert_close(model(x), trainer.model(x), rtol=1e-4, atol=1e-5)


def test_adamw_holdout_and_steps_per_epoch(cifar10_root: Path, tmp_path: Path) -> None:
    cfg = _config(cifar10_root, method="baseline", optimizer="adamw", lr=1e-3, holdout=8, steps_per_epoch=1, epochs=1)
    trainer = Trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    n = len(trp.data.get_datasets("cifar10", str(cifar10_root))[0])
    assert len(trainer.train_set) == n - 8
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]) if m.training else None)
    trainer.run()
    assert seen == [cfg.batch_size]  # one step, then the epoch ends
    with pytest.raises(ValueError, match="holdout"):
        Trainer(_config(cifar10_root, holdout=10**6), tmp_path / "bad")
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(_config(cifar10_root, optimizer="lion"), tmp_path / "bad")


def test_short_runs_keep_their_learning_rate() -> None:
    assert TrainConfig(epochs=1).resolved_milestones() == [1]  # after the only epoch: harmless
    assert TrainConfig(epochs=2).resolved_milestones() == [1]
    assert TrainConfig(epochs=164).resolved_milestones() == [81, 122]
