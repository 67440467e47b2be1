"""Calibration under torch.distributed: each rank's statistics summed, so every rank splits alike (issue 17)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trp

sys.path.insert(0, str(Path(__file__).parents[1]))
from _gloo import spawn_gloo  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BATCH = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():  # "trained" statistics: those of the dense model on the data
        model.train()
        model[3].momentum = None
        for x in _batches():
            model(x)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(12, 12, generator=g) * torch.logspace(0, -2, 12)
    return [torch.randn(BATCH, 12, generator=g) @ mix for _ in range(6)]


def _split(calibration, samples: int, criterion=None, **kw) -> nn.Module:
    return trp.decompose(_model(), criterion=criterion or trp.TargetMACs(1.6), layers="all", exclude=["7"],
                         calibration=calibration, calibration_samples=samples, **kw)


def _worker(rank: int, world: int, tmp: str) -> None:
    batches = _batches()
    # Each rank: two batches of its own for statistics, then one held out (for its fidelity figure).
    mine = [batches[rank], batches[2 + rank], batches[4 + rank]]
    model = _split(mine, 2 * BATCH)  # ranks from summed statistics and summed output gains
    torch.save(model.state_dict(), Path(tmp) / f"rank{rank}.pt")
    fixed = _split(mine, 2 * BATCH, trp.FixedRank(5), calibration_batchnorm=False)
    torch.save(fixed.state_dict(), Path(tmp) / f"fixed{rank}.pt")
    # BatchNorm re-estimation alone: each rank on its own two batches, then averaged across ranks
    from trp.core.bn_stats import reestimate_batchnorm
    from trp.core.inputs import ModelInputs

    bn = _model()
    reestimate_batchnorm(bn, [ModelInputs((batches[rank],), {}), ModelInputs((batches[2 + rank],), {})])
    torch.save(bn.state_dict(), Path(tmp) / f"bn{rank}.pt")


def test_two_ranks_sum_statistics_and_split_alike(tmp_path: Path) -> None:
    spawn_gloo(_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
    # One process calibrated on all four statistics batches splits the same way.
    b = _batches()
    reference = _split([b[0], b[2], b[1], b[3], b[4]], 4 * BATCH, trp.FixedRank(5),
                       calibration_batchnorm=False).state_dict()
    r0 = torch.load(tmp_path / "fixed0.pt", weights_only=True)
    assert reference.keys() == r0.keys()
    # factors are defined up to the sign of each eigenvector: compare their products
    for name in {k.rsplit(".", 2)[0] for k in r0 if k.endswith("first.weight")}:
        w_dist = r0[f"{name}.second.weight"] @ r0[f"{name}.first.weight"]
        w_ref = reference[f"{name}.second.weight"] @ reference[f"{name}.first.weight"]
        torch.testing.assert_close(w_dist, w_ref, rtol=1e-4, atol=1e-5)
    assert any(k.endswith("first.weight") for k in r0)
    # BatchNorm statistics re-estimated on each rank's share, averaged: those of one process on all batches.
    from trp.core.bn_stats import reestimate_batchnorm
    from trp.core.inputs import ModelInputs

    single = _model()
    reestimate_batchnorm(single, [ModelInputs((x,), {}) for x in (b[0], b[2], b[1], b[3])])
    bn0, bn1 = (torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("3.running_mean", "3.running_var"):
        assert torch.equal(bn0[key], bn1[key])
        torch.testing.assert_close(bn0[key], single.state_dict()[key], rtol=1e-5, atol=1e-6)
        assert not torch.equal(bn0[key], _model().state_dict()[key])
