"""The Lightning and Hugging Face callbacks train with TRP exactly as a hand-written loop does."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import trp

N, BATCH, EPOCHS, LR = 32, 8, 3, 0.1
SETTINGS = dict(energy=0.8, period=3, nuclear_weight=1e-2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.e = nn.Linear(16, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.stem, self.a, self.b, self.e):
            x = torch.relu(layer(x))
        return self.head(x)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 12, generator=g), torch.randint(0, 3, (N,), generator=g)


def _fresh() -> Net:
    torch.manual_seed(0)
    return Net()


def _hand_loop(batch: int, epochs: int) -> tuple[Net, trp.TRP]:
    model = _fresh()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pruner = trp.TRP(model, **SETTINGS)
    for _ in range(epochs):
        for i in range(0, N, batch):
            loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            opt.zero_grad()
            loss.backward()
            pruner.regularize()
            opt.step()
            pruner.step()
    return model, pruner


def _same_split(compact: nn.Module, pruner: trp.TRP, model: nn.Module, ranks: dict[str, int]) -> None:
    assert ranks == pruner.ranks and ranks  # projections happened, same ranks
    reference = pruner.decompose()
    x = _data()[0]
    torch.testing.assert_close(compact(x), reference(x), rtol=1e-4, atol=1e-5)
    assert [type(m) for m in compact.modules()] == [type(m) for m in reference.modules()]
    torch.testing.assert_close(compact(x), model(x), rtol=1e-3, atol=1e-3)  # the split is the trained model


def _blocked(monkeypatch: pytest.MonkeyPatch, package: str, module: str) -> str:
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)
    return str(info.value)


# --------------------------------------------------------------------------- Lightning
class LitNet(pl.LightningModule):
    """A plain LightningModule around a network (module level: ddp_spawn pickles it)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class UnshuffledLitNet(LitNet):
    """Each rank takes examples rank, rank + world, ... in order: together a global batch of BATCH."""

    def train_dataloader(self):
        from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

        data = TensorDataset(*_data())
        return DataLoader(data, batch_size=BATCH // 2, sampler=DistributedSampler(data, shuffle=False))


def _lightning_module(net: nn.Module) -> LitNet:
    return LitNet(net)


def _lightning_fit(tmp_path: Path, callback, epochs: int, ckpt: Path | None = None):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    module = _lightning_module(_fresh())
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(*_data()), batch_size=BATCH, shuffle=False), ckpt_path=ckpt)
    return trainer, module


def test_lightning_callback_trains_like_the_hand_loop_and_saves_the_split(tmp_path: Path) -> None:
    from trp.integrations.lightning import TRPCallback

    callback = TRPCallback(**SETTINGS, save_path=tmp_path / "split.safetensors")
    _, module = _lightning_fit(tmp_path, callback, EPOCHS)
    model, pruner = _hand_loop(BATCH, EPOCHS)
    assert callback.pruner.iteration == pruner.iteration == EPOCHS * N // BATCH
    assert callback.pruner.layer_names == ["net." + n for n in pruner.layer_names]
    for (k, a), b in zip(model.state_dict().items(), module.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    ranks = {k.removeprefix("net."): v for k, v in callback.pruner.ranks.items()}
    _same_split(callback.compact.net, pruner, model, ranks)
    loaded = trp.load(tmp_path / "split.safetensors", _lightning_module(Net()))
    x = _data()[0]
    torch.testing.assert_close(loaded.net(x), callback.compact.net(x))


def test_lightning_resume_restores_the_trp_state(tmp_path: Path) -> None:
    from trp.integrations.lightning import TRPCallback

    full_cb = TRPCallback(**SETTINGS)
    _, full = _lightning_fit(tmp_path / "full", full_cb, 2)
    first_cb = TRPCallback(**SETTINGS)
    trainer, _ = _lightning_fit(tmp_path / "part", first_cb, 1)
    trainer.save_checkpoint(tmp_path / "part.ckpt")
    resumed_cb = TRPCallback(**SETTINGS)
    _, resumed = _lightning_fit(tmp_path / "part", resumed_cb, 2, ckpt=tmp_path / "part.ckpt")
    assert resumed_cb.pruner.iteration == full_cb.pruner.iteration == 2 * N // BATCH
    assert resumed_cb.pruner.ranks == full_cb.pruner.ranks
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)


def test_lightning_callback_without_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _blocked(monkeypatch, "lightning", "trp.integrations.lightning")
    assert "pip install 'trp[lightning]'" in message


def test_callback_checks_its_settings_when_made() -> None:
    from trp.integrations.lightning import TRPCallback

    with pytest.raises(ValueError, match="energy"):
        TRPCallback(energy=1.5)


# ----------------------------------------------------------------------- transformers
class HFNet(nn.Module):
    """The Trainer's model contract: keyword inputs, a dict with the loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(tmp_path: Path, callback, steps: int, save_steps: int = 0, resume: str | None = None) -> HFNet:
    from transformers import Trainer, TrainingArguments

    model = HFNet(_fresh())
    # One batch is the whole data set, so the Trainer's shuffling cannot change the gradient.
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=N, max_steps=steps, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True,
        logging_strategy="no", seed=0, dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[callback]).train(resume_from_checkpoint=resume)
    return model


def test_transformers_callback_trains_like_the_hand_loop_and_saves_the_split(tmp_path: Path) -> None:
    from trp.integrations.transformers import TRPCallback

    steps = 7
    callback = TRPCallback(**SETTINGS, save_path=tmp_path / "split.safetensors")
    hf = _hf_train(tmp_path / "out", callback, steps)
    model, pruner = _hand_loop(N, steps)
    assert callback.pruner.iteration == pruner.iteration == steps
    for (k, a), b in zip(model.state_dict().items(), hf.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    ranks = {k.removeprefix("net."): v for k, v in callback.pruner.ranks.items()}
    _same_split(callback.compact.net, pruner, model, ranks)
    loaded = trp.load(tmp_path / "split.safetensors", HFNet(Net()))
    x = _data()[0]
    torch.testing.assert_close(loaded(x)["logits"], callback.compact(x)["logits"])


def test_transformers_resume_reads_the_trp_state_of_the_checkpoint(tmp_path: Path) -> None:
    from trp.integrations.transformers import STATE_FILE, TRPCallback

    full_cb = TRPCallback(**SETTINGS)
    full = _hf_train(tmp_path / "full", full_cb, 7)
    _hf_train(tmp_path / "part", TRPCallback(**SETTINGS), 4, save_steps=4)
    assert (tmp_path / "part" / "checkpoint-4" / STATE_FILE).is_file()
    resumed_cb = TRPCallback(**SETTINGS)
    resumed = _hf_train(tmp_path / "part", resumed_cb, 7, resume=str(tmp_path / "part" / "checkpoint-4"))
    assert resumed_cb.pruner.iteration == 7 and resumed_cb.pruner.ranks == full_cb.pruner.ranks
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)


def test_transformers_callback_without_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _blocked(monkeypatch, "transformers", "trp.integrations.transformers")
    assert "pip install 'trp[transformers]'" in message


@pytest.mark.slow
def test_lightning_callback_under_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    """Lightning's ddp_spawn on CPU (gloo): each rank sees half of every batch; the saved split equals one process's."""
    from trp.integrations.lightning import TRPCallback

    callback = TRPCallback(**SETTINGS, save_path=tmp_path / "split.safetensors", final_criterion=trp.Energy(0.999))
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], default_root_dir=tmp_path, use_distributed_sampler=False)
    trainer.fit(UnshuffledLitNet(_fresh()))
    model, pruner = _hand_loop(BATCH, EPOCHS)
    loaded = trp.load(tmp_path / "split.safetensors", _lightning_module(Net()))
    reference = pruner.decompose(trp.Energy(0.999))
    x = _data()[0]
    torch.testing.assert_close(loaded.net(x), reference(x), rtol=1e-4, atol=1e-4)
    assert [type(m) for m in loaded.net.modules()] == [type(m) for m in reference.modules()]
