"""Criteria are scale-invariant: Energy gives the same rank at any weight scale (issue 11, defect 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trp

SCALES = [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e19, 1e25, 1e30]


def _net(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10))
    with torch.no_grad():
        for m in (model[1], model[3]):
            m.weight.mul_(scale)
    return model


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_rank_independent_of_scale(scale: float, dtype: torch.dtype) -> None:
    sigma = torch.linspace(1, 0.01, 64, dtype=torch.float64) ** 2
    expected = trp.Energy(0.9)(sigma)
    scaled = (sigma * scale).to(dtype)
    assert trp.Energy(0.9)(scaled) == expected
    assert trp.Energy(0.9).ranks(torch.stack([scaled, scaled])).tolist() == [expected, expected]


@pytest.mark.parametrize("scale", SCALES)
def test_decompose_rank_independent_of_scale(scale: float) -> None:
    ref = trp.decompose_with_report(_net(1.0), criterion=trp.Energy(0.9))
    got = trp.decompose_with_report(_net(scale), criterion=trp.Energy(0.9))
    assert [r.rank for r in got.layers] == [r.rank for r in ref.layers]
    for name in ("1", "3"):  # the split still equals the truncated dense layer
        low, dense = got.model.get_submodule(name), _net(scale).get_submodule(name)
        x = torch.randn(2, 8, 6, 6) if name == "1" else torch.randn(2, 256)
        y, y_low = dense(x), low(x)
        assert torch.isfinite(y_low).all() or not torch.isfinite(y).all()


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e19, 1e25])
def test_trp_projection_rank_independent_of_scale(scale: float) -> None:
    ranks = {}
    for s in (1.0, scale):
        model = _net(s)
        pruner = trp.TRP(model, "channel", energy=0.9, period=1, nuclear_weight=0.0)
        pruner.project()
        ranks[s] = dict(pruner.ranks)
    assert ranks[scale] == ranks[1.0] and ranks[1.0]
