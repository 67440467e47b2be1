"""Mixed precision in the training loop: autocast, fp16 loss scaling unscaled before TRP's sub-gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trp.app.engine import TrainConfig, Trainer, train

SETTINGS = dict(model="mlp", data="mnist5k", epochs=2, batch_size=32, lr=0.05, period=2, seed=3, device="cpu",
                steps_per_epoch=3)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        TrainConfig(**SETTINGS, precision="fp8").validate()


def test_fp16_gradients_are_unscaled_when_trp_adds_its_subgradient(tmp_path: Path) -> None:
    trainer = Trainer(TrainConfig(**{**SETTINGS, "epochs": 1}, precision="fp16"), tmp_path)
    assert trainer.scaler is not None and trainer.scaler.get_scale() > 1000
    weight = trainer.model.features.fc2.weight
    seen: list[float] = []
    regularize = trainer.pruner.regularize

    def spy() -> None:
        seen.append(weight.grad.norm().item())
        regularize()

    trainer.pruner.regularize = spy
    trainer.run()
    # the same first step's gradient in plain fp32: an unscaled fp16 gradient has its size
    fresh = Trainer(TrainConfig(**SETTINGS), tmp_path / "ref")
    x, y = next(iter(torch.utils.data.DataLoader(fresh.train_set, batch_size=32)))
    torch.nn.functional.cross_entropy(fresh.model(x), y).backward()
    reference = fresh.model.features.fc2.weight.grad.norm().item()
    assert len(seen) == 3
    assert all(0.1 * reference < g < 10 * reference for g in seen), (seen, reference)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_resumes_exactly_and_keeps_fp32_weights(tmp_path: Path, precision: str) -> None:
    cfg = TrainConfig(**SETTINGS, precision=precision)
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part", stop_after=1)
    if precision == "fp16":
        assert "scaler" in torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert full.last_row["train_loss"] < 3.0 and full.pruner.ranks
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    plain = train(TrainConfig(**SETTINGS), tmp_path / "fp32")
    assert abs(full.last_row["train_loss"] - plain.last_row["train_loss"]) < 0.5
