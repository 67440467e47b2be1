"""BatchNorm statistics re-estimation after a split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trp
from trp.deploy.batchnorm import recalibrate_batchnorm


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_statistics_equal_the_data_statistics() -> None:
    torch.manual_seed(0)
    model = _net()
    data = [torch.randn(16, 3, 8, 8) * 3 + 1 for _ in range(4)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    used = recalibrate_batchnorm(model, data, max_batches=3)
    assert used == 3 and not model.training
    # The first BatchNorm's mean and variance are those of the first conv's outputs over the 3 batches.
    with torch.no_grad():
        out = torch.cat([model[0](x) for x in data[:3]])
    torch.testing.assert_close(model[1].running_mean, out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, out.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-4)
    assert model[1].momentum == 0.1  # restored
    for k, v in weights.items():  # no learned weight changes
        assert torch.equal(model.state_dict()[k], v)


def test_recovers_an_aggressive_split() -> None:
    torch.manual_seed(1)
    model = _net()
    data = [torch.randn(32, 3, 8, 8) for _ in range(8)]
    recalibrate_batchnorm(model, data, max_batches=8)  # consistent statistics for the dense model
    compact = trp.decompose(model, "channel", trp.FixedRank(1), layers=["3"], input_shape=(1, 3, 8, 8))
    x = torch.cat(data)
    with torch.no_grad():
        bn_in = compact[3](compact[2](compact[1](compact[0](x))))  # the split layer's new outputs
        stale = (compact[4].running_mean - bn_in.mean((0, 2, 3))).abs().max()
        recalibrate_batchnorm(compact, data, max_batches=8)
        bn_in = compact[3](compact[2](compact[1](compact[0](x))))
        fresh = (compact[4].running_mean - bn_in.mean((0, 2, 3))).abs().max()
    # the BatchNorm after the split now follows its input again (up to batch- vs running-statistics
    # normalization in the BatchNorm before it)
    assert fresh < 1e-3 < stale and fresh < stale / 20


def test_errors() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)], 1)
    with pytest.raises(ValueError, match="empty"):
        recalibrate_batchnorm(_net(), [], 1)
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_batchnorm(_net(), [torch.zeros(1, 3, 8, 8)], 0)
