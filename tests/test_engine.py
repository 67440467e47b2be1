"""The training loop: run directory, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import trp
from trp.engine import TrainConfig, Trainer, load_model_file, train


def _config(root: Path, **kw) -> TrainConfig:
    base = dict(model="resnet20", data="cifar10", data_dir=str(root), method="trp", scheme="channel",
                epochs=3, batch_size=16, lr=0.05, period=2, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
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


@pytest.mark.parametrize("method", ["trp", "nuclear", "baseline"])
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
