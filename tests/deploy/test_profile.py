"""profile_layers: real input sizes, the rank grid, the on-disk cache (hit, miss on a changed key)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
from trp.deploy.profile import LatencyTable, cache_dir, default_ranks
from trp.core.schemes import get_scheme

sys.path.insert(0, str(Path(__file__).parents[1]))
from _fake_hardware import FakeHardware  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # layer "2", 16x16
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # layer "4", same geometry as "2"
        nn.Conv2d(16, 32, 3, stride=2, padding=1),  # layer "6"
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32), nn.Linear(32, 5),
    ).eval()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path / "cache"))


def test_profile_times_each_layer_at_its_real_input_on_a_fake_machine():
    hw = FakeHardware()
    with hw.running():
        table = trp.profile_layers(_net(), torch.zeros(2, 3, 16, 16), "channel", runtime="eager", ranks=[1, 2, 4],
                                   repeats=3, warmup=0, timer=hw)
    assert list(table.layers) == ["2", "4", "6", "9"]
    lat = table.layers["2"]
    assert lat.input_shape == (2, 16, 16, 16) and table.layers["6"].input_shape == (2, 16, 16, 16)
    assert table.layers["9"].input_shape == (2, 32)
    # the fake machine's time is the MACs: dense 16*16*9 per output pixel, split r*(16*9 + 16)
    assert lat.dense == 2 * 16 * 16 * 16 * 16 * 9
    assert lat.split == [2 * 16 * 16 * r * (16 * 9 + 16) for r in (1, 2, 4)]
    assert lat.overhead == 0.0 and lat.best == (1, lat.split[0])
    assert table.model == sum(2 * m for m in trp.layer_macs(_net(), (1, 3, 16, 16)).values())
    assert (table.runtime, table.batch_size, table.scheme) == ("eager", 2, "channel")


def test_the_cache_is_hit_on_a_second_call_and_missed_when_the_key_changes():
    model, x = _net(), torch.zeros(1, 3, 16, 16)
    hw = FakeHardware()
    with hw.running():
        first = trp.profile_layers(model, x, "channel", runtime="eager", repeats=2, warmup=0, timer=hw)
        assert hw.calls > 0
        assert len(list(cache_dir().glob("*.json"))) == 4  # "2" and "4" share one entry; 6, 9 and the model
        calls = hw.calls
        second = trp.profile_layers(model, x, "channel", runtime="eager", repeats=2, warmup=0, timer=hw)
        assert hw.calls == calls  # nothing timed again
        assert second.to_dict() == first.to_dict()
        trp.profile_layers(model, torch.zeros(4, 3, 16, 16), "channel", runtime="eager", repeats=2, warmup=0, timer=hw)
        assert hw.calls > calls  # another input size: measured again
        calls = hw.calls
        trp.profile_layers(model, x, "spatial", runtime="eager", repeats=2, warmup=0, timer=hw)
        assert hw.calls > calls  # another scheme: the convs again
        calls = hw.calls
        trp.profile_layers(model, x, "channel", runtime="eager", repeats=2, warmup=0, timer=hw, cache=False)
        assert hw.calls > calls


def test_a_damaged_cache_entry_is_measured_again():
    model, x = _net(), torch.zeros(1, 3, 16, 16)
    hw = FakeHardware()
    with hw.running():
        trp.profile_layers(model, x, "channel", runtime="eager", repeats=2, warmup=0, timer=hw)
        for path in cache_dir().glob("*.json"):
            path.write_text("{not json")
        calls = hw.calls
        trp.profile_layers(model, x, "channel", runtime="eager", repeats=2, warmup=0, timer=hw)
        assert hw.calls > calls
        json.loads(next(cache_dir().glob("*.json")).read_text())  # rewritten whole


def test_the_statistic_is_part_of_the_key():
    model, x = _net(), torch.zeros(1, 3, 16, 16)
    hw = FakeHardware()
    with hw.running():
        median = trp.profile_layers(model, x, "channel", runtime="eager", repeats=3, warmup=0, timer=hw)
        calls = hw.calls
        fastest = trp.profile_layers(model, x, "channel", runtime="eager", repeats=3, warmup=0, timer=hw,
                                     statistic="min")
        assert hw.calls > calls
    assert fastest.to_dict()["layers"] == median.to_dict()["layers"]  # a steady machine: the same times
    with pytest.raises(ValueError, match="unknown statistic"):
        trp.profile_layers(model, x, runtime="eager", statistic="mean")


def test_table_round_trips_through_json(tmp_path):
    hw = FakeHardware()
    with hw.running():
        table = trp.profile_layers(_net(), torch.zeros(1, 3, 16, 16), runtime="eager", repeats=2, warmup=0, timer=hw)
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json").to_dict() == table.to_dict()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a trp latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_default_rank_grid_stays_below_the_dense_macs():
    conv = nn.Conv2d(128, 128, 3, padding=1)
    sch = get_scheme("channel")
    grid = default_ranks(conv, sch, (8, 8), (8, 8))
    assert grid == sorted(grid) and all(r % 8 == 0 for r in grid)
    assert all(sch.macs(conv, r, (8, 8), (8, 8)) < sch.macs(conv, None, (8, 8), (8, 8)) for r in grid)
    assert len(grid) >= 6


def test_profile_errors():
    with pytest.raises(ValueError, match="outside 1..16"):
        trp.profile_layers(_net(), torch.zeros(1, 3, 16, 16), runtime="eager", ranks=[17], repeats=1, cache=False)
    with pytest.raises(ValueError, match="unknown scheme"):
        trp.profile_layers(_net(), torch.zeros(1, 3, 16, 16), "tucker", runtime="eager")


def test_profile_in_onnxruntime_runs():
    pytest.importorskip("onnxruntime")
    table = trp.profile_layers(_net(), torch.randn(1, 3, 16, 16), "channel", runtime="onnxruntime", ranks=[2, 4],
                               layers=["2", "6"], repeats=2, warmup=1, threads=1)
    assert list(table.layers) == ["2", "6"]
    assert all(t > 0 for lat in table.layers.values() for t in [lat.dense, *lat.split]) and table.model > 0
