"""The callbacks take a TRPConfig or any of its fields, a target criterion included (issue 21)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
from trp.integrations.options import TRPOptions

sys.path.insert(0, str(Path(__file__).parent))
from test_callbacks import BATCH, N, LitNet, _data, _fresh  # noqa: E402

SHAPE = (1, 12)


def _hand_loop(epochs: int, **settings) -> tuple[nn.Module, trp.TRP]:
    model = _fresh()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = trp.TRP.from_config(model, trp.TRPConfig(**settings))
    for _ in range(epochs):
        for i in range(0, N, BATCH):
            loss = nn.functional.cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH])
            opt.zero_grad()
            loss.backward()
            pruner.regularize()
            opt.step()
            pruner.step()
    return model, pruner


class ForwardLitNet(LitNet):
    """A LightningModule with a forward: a target counts the MACs of a forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _lightning_fit(tmp_path: Path, callback, epochs: int) -> ForwardLitNet:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    module = ForwardLitNet(_fresh())
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(*_data()), batch_size=BATCH, shuffle=False))
    return module


def test_lightning_callback_trains_toward_a_target_and_splits_with_it(tmp_path: Path) -> None:
    from trp.integrations.lightning import TRPCallback

    settings = dict(criterion=trp.TargetMACs(2), period=3, nuclear_weight=1e-2)
    callback = TRPCallback(**settings, input_shape=SHAPE)
    module = _lightning_fit(tmp_path, callback, 2)
    model, pruner = _hand_loop(2, **settings, input_shape=SHAPE)
    assert callback.pruner.target is not None and callback.pruner.allocated
    for (k, a), b in zip(model.state_dict().items(), module.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    # the split at the end uses the target: at least 2x fewer MACs
    assert trp.count_macs(module.net, SHAPE) / trp.count_macs(callback.compact.net, SHAPE) >= 2.0


def test_options_from_a_config_from_fields_and_by_position() -> None:
    cfg = trp.TRPConfig(criterion=trp.TargetMACs(3), period=5, input_shape=SHAPE)
    assert TRPOptions.from_arguments((), {"config": cfg}).config is cfg
    assert TRPOptions.from_arguments((), {"config": cfg, "period": 7}).config.period == 7
    old = TRPOptions.from_arguments(("spatial", 0.8, 4), {"save_path": "x.safetensors"})
    assert (old.config.scheme, old.config.energy, old.config.period, old.save_path) == ("spatial", 0.8, 4, "x.safetensors")
    assert TRPOptions().config == trp.TRPConfig()  # one set of defaults
    with pytest.raises(TypeError, match="both by position and by name"):
        TRPOptions.from_arguments(("channel",), {"scheme": "spatial"})
    with pytest.raises(TypeError, match="unknown setting"):
        TRPOptions.from_arguments((), {"energi": 0.9})
    with pytest.raises(ValueError, match="unknown scheme"):
        TRPOptions.from_arguments((), {"scheme": "tucker"})


@pytest.mark.parametrize("field, value", [("energy", 0.0), ("energy", float("nan")), ("period", 0), ("period", 2.5),
                                          ("nuclear_weight", float("inf")), ("warmup", -1), ("warmup", True),
                                          ("subgradient_period", 0), ("criterion", "energy:0.9")])
def test_config_checks_its_numbers(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        trp.TRPConfig(**{field: value})
