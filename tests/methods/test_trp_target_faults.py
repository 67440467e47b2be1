"""Training toward a latency target (issue 21): one decision under DDP, the layer selection, the split's ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trp
from trp.core._util import eval_mode
from trp.core.decompose import recipe_of
from trp.deploy.profile import LatencyTable, LayerLatency, profile_layers

sys.path.insert(0, str(Path(__file__).parents[1]))
from _fake_hardware import FakeHardware  # noqa: E402
from _gloo import spawn_gloo  # noqa: E402

SHAPE = (1, 3, 16, 16)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # "2"
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # "4"
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # "6"
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def _train(model: nn.Module, pruner: trp.TRP, steps: int, rank: int = 0, world: int = 1) -> None:
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(4, *SHAPE[1:], generator=g), torch.randint(0, 5, (4,), generator=g)
        local = slice(rank * 4 // world, (rank + 1) * 4 // world)
        loss = F.cross_entropy(model(x[local]), y[local])
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
        pruner.step()


# --- fault 1: under DDP the whole-model ranks are decided once, for every rank -------------------------
def _table(fast: str) -> LatencyTable:
    """A synthetic table in which only layer ``fast`` gains from a split (each rank of the test gets another)."""
    lats = {}
    for name in ("2", "4", "6"):
        split = [1.0, 2.0, 4.0, 8.0] if name == fast else [11.0, 12.0, 14.0, 18.0]
        lats[name] = LayerLatency(name, "channel", (1, 16, 16, 16), 16, 10.0, [2, 4, 8, 12], split)
    return LatencyTable(lats, 40.0, "onnxruntime", "cpu: fake", 1, 1, "channel")


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    ddp = nn.parallel.DistributedDataParallel(_net())
    latency = trp.TargetLatency(1.2, table=_table("2" if rank == 0 else "6"), calibrate=0)
    pruner = trp.TRP(ddp, criterion=latency, period=2, nuclear_weight=1e-2, input_shape=SHAPE)
    _train(ddp, pruner, 5, rank, world)
    pruner.project(final=True)
    torch.save({"state": ddp.module.state_dict(), "ranks": pruner.ranks}, f"{tmp}/rank{rank}.pt")


def test_two_ranks_with_different_latency_tables_train_the_same_model(tmp_path: Path) -> None:
    spawn_gloo(_ddp_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ranks"] == r1["ranks"]
    assert r0["ranks"]["2"] < 16 and r0["ranks"]["6"] == 16  # rank 0's table decided
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


# --- fault 2: the latency table covers the layers TRP trains ---------------------------------------
def test_layers_all_with_a_latency_target_trains(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=500.0)
    model = _net(1)
    with hw.running():
        latency = trp.TargetLatency(1.3, runtime="eager", timer=hw, repeats=1, warmup=0, calibrate=0)
        pruner = trp.TRP(model, criterion=latency, layers="all", period=2, nuclear_weight=1e-3, input_shape=SHAPE)
        assert pruner.layer_names == ["0", "2", "4", "6", "10"]
        _train(model, pruner, 4)
    assert set(latency.table.layers) == set(pruner.layer_names)
    assert set(pruner.ranks) == set(pruner.layer_names)
    assert any(pruner.ranks[n] < 16 for n in ("2", "4", "6"))


# --- fault 3: the ranks trained toward are the ranks split at -----------------------------------------
def test_the_final_split_has_the_ranks_of_the_last_projection(tmp_path: Path, monkeypatch) -> None:
    # Layers timed alone take 0.7x their time inside the model: the table alone misjudges the model's time
    # (uncalibrated, the projections take other ranks than the calibrated split); training and the final
    # split must use the same time model.
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=500.0, isolation=0.7)
    model = _net(2)
    with hw.running():
        with eval_mode(model):
            table = profile_layers(model, torch.zeros(SHAPE), "channel", runtime="eager", timer=hw, repeats=1, warmup=0)
        latency = trp.TargetLatency(1.5, table=table, runtime="eager", timer=hw, repeats=1, warmup=0)
        pruner = trp.TRP(model, criterion=latency, period=2, nuclear_weight=1e-3, input_shape=SHAPE)
        _train(model, pruner, 5)
        pruner.project(final=True)
        compact = pruner.decompose()
    split = {n: e["rank"] for n, e in recipe_of(compact).items()}
    dense = {n for n in pruner.layer_names if n not in split}
    assert split == {n: r for n, r in pruner.ranks.items() if n not in dense}
    assert split and all(pruner.ranks[n] == 16 for n in dense)
    assert abs(latency.measured / 1.5 - 1.0) <= 0.05  # and the calibrated ranks land on the target


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_the_final_split_of_a_mac_target_has_the_ranks_of_the_last_projection(scheme: str) -> None:
    model = _net(3)
    pruner = trp.TRP(model, scheme, criterion=trp.TargetMACs(2.5), period=2, nuclear_weight=1e-3, input_shape=SHAPE)
    _train(model, pruner, 5)
    pruner.project(final=True)
    report = trp.decompose_with_report(model, scheme, pruner.criterion, pruner.layer_names, SHAPE)
    assert {r.name: r.rank for r in report.layers} == pruner.ranks  # dense ones: the rank saves no MACs


def test_the_fixed_calibration_travels_in_the_state_dict(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=500.0, isolation=0.7)
    model = _net(2)

    def latency(table=None):
        return trp.TargetLatency(1.5, table=table, runtime="eager", timer=hw, repeats=1, warmup=0)

    with hw.running():
        with eval_mode(model):
            table = profile_layers(model, torch.zeros(SHAPE), "channel", runtime="eager", timer=hw, repeats=1, warmup=0)
        pruner = trp.TRP(model, criterion=latency(table), period=2, nuclear_weight=1e-3, input_shape=SHAPE)
        _train(model, pruner, 3)
        path = tmp_path / "trp.pt"
        torch.save(pruner.state_dict(), path)
        state = torch.load(path, weights_only=True)
        assert set(state["calibration"]) == {"target", "scale", "rest"}
        twin_model = _net(5)
        twin_model.load_state_dict(model.state_dict())
        twin = trp.TRP(twin_model, criterion=latency(table), period=2, nuclear_weight=1e-3, input_shape=SHAPE)
        twin.load_state_dict(state)
        _train(model, pruner, 4)
        _train(twin_model, twin, 4)
    assert twin.criterion.history == []  # resumed without measuring the model again
    assert twin.ranks == pruner.ranks
    for (k, a), b in zip(model.state_dict().items(), twin_model.state_dict().values()):
        assert torch.equal(a, b), k


# --- under DDP: large layers of a whole-model criterion, and an allocation that fails -------------------
def _linear_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3))


def _train_linear(model: nn.Module, pruner: trp.TRP, rank: int = 0, world: int = 1) -> None:
    g = torch.Generator().manual_seed(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        x, y = torch.randn(4, 12, generator=g), torch.randint(0, 3, (4,), generator=g)
        local = slice(rank * 4 // world, (rank + 1) * 4 // world)
        loss = F.cross_entropy(model(x[local]), y[local])
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
        pruner.step()


def _ddp_target_worker(rank: int, world: int, tmp: str, x: float) -> None:
    import trp.core.svd

    trp.core.svd.FULL_SVD_MAX = 8  # the 40-wide layers count as large: leading triplets only
    ddp = nn.parallel.DistributedDataParallel(_linear_net())
    pruner = trp.TRP(ddp, criterion=trp.TargetMACs(x), period=2, nuclear_weight=1e-2, input_shape=(1, 12))
    try:
        _train_linear(ddp, pruner, rank, world)
        out = {"state": ddp.module.state_dict(), "ranks": pruner.ranks}
    except (ValueError, RuntimeError) as err:
        out = {"error": f"{type(err).__name__}: {err}"}
    torch.save(out, f"{tmp}/rank{rank}.pt")


def test_two_ranks_share_the_large_layers_of_a_whole_model_target(tmp_path: Path, monkeypatch) -> None:
    import trp.core.svd

    spawn_gloo(_ddp_target_worker, tmp_path, 2.0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ranks"] == r1["ranks"]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 8)
    model = _linear_net()
    pruner = trp.TRP(model, criterion=trp.TargetMACs(2.0), period=2, nuclear_weight=1e-2, input_shape=(1, 12))
    _train_linear(model, pruner)
    assert pruner.ranks == r0["ranks"] and min(pruner.ranks.values()) < 40
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_an_allocation_that_fails_on_rank_0_stops_every_rank(tmp_path: Path) -> None:
    spawn_gloo(_ddp_target_worker, tmp_path, 500.0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert "cannot be reached" in r0["error"]
    assert "rank 0 could not allocate" in r1["error"]
