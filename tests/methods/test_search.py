"""Iterative per-layer rank search on held-out data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trp
from trp.methods.search import iterative_rank_search


def _task(seed: int = 0):
    """A 3-layer MLP whose middle layer matters much more than the others for the loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, DataLoader(TensorDataset(x, y), batch_size=128)


def test_search_reaches_target_and_is_usable_by_decompose() -> None:
    model, loader = _task()
    layers = ["0", "2", "4"]
    shape = (1, 16)
    ranks = iterative_rank_search(model, "channel", loader, 2.0, shape, layers=layers)
    assert isinstance(ranks, trp.LayerRanks) and set(ranks.ranks) <= set(layers)
    compact = trp.decompose(model, "channel", ranks, layers=layers, input_shape=shape)
    speedup = trp.count_macs(model, shape) / trp.count_macs(compact, shape)
    assert speedup >= 2.0
    # Each factorized layer got exactly the searched rank.
    for name, r in ranks.ranks.items():
        low = compact.get_submodule(name)
        assert isinstance(low, trp.LowRank) and low.rank == r
    # The model itself is untouched.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    iterative_rank_search(model, "channel", loader, 1.5, shape, layers=layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_search_beats_uniform_ranks_on_held_out_loss() -> None:
    model, loader = _task(1)
    layers, shape = ["0", "2", "4"], (1, 16)
    searched = trp.decompose(model, "channel", iterative_rank_search(model, "channel", loader, 3.0, shape, layers=layers),
                             layers=layers, input_shape=shape)
    target = trp.count_macs(searched, shape)
    # The uniform fraction with no more MACs than the searched model.
    uniform = None
    for p in [i / 64 for i in range(64, 0, -1)]:
        cand = trp.decompose(model, "channel", trp.Ratio(p), layers=layers, input_shape=shape)
        if trp.count_macs(cand, shape) <= target:
            uniform = cand
            break
    assert uniform is not None

    def loss(m):
        with torch.no_grad():
            return sum(nn.functional.cross_entropy(m(x), y, reduction="sum").item() for x, y in loader)

    assert loss(searched) <= loss(uniform) + 1e-6


def test_search_errors() -> None:
    model, loader = _task()
    with pytest.raises(ValueError, match="mac_reduction"):
        iterative_rank_search(model, "channel", loader, 1.0, (1, 16))
    with pytest.raises(ValueError, match="shrink"):
        iterative_rank_search(model, "channel", loader, 2.0, (1, 16), shrink=1.5)
    with pytest.raises(ValueError, match="empty"):
        empty = DataLoader(TensorDataset(torch.zeros(0, 16), torch.zeros(0).long()))
        iterative_rank_search(model, "channel", empty, 2.0, (1, 16))
    with pytest.raises(ValueError, match="cannot be reached"):
        iterative_rank_search(model, "channel", loader, 1000.0, (1, 16), layers=["2"])
