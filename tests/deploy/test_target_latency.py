"""TargetLatency: choices on synthetic tables and on a fake machine (no wall-clock values asserted)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trp
from trp.core.allocation import LayerSpectrum
from trp.deploy.profile import LatencyTable, LayerLatency

sys.path.insert(0, str(Path(__file__).parents[1]))
from _fake_hardware import FakeHardware  # noqa: E402


def _spectrum(name: str, k: int = 8, dense_macs: int = 1000) -> LayerSpectrum:
    sigma = torch.linspace(1.0, 0.1, k)
    return LayerSpectrum(name, sigma, dense_macs, lambda r: 10 * r)


def _table(layers: dict[str, tuple[float, list[int], list[float]]], model: float) -> LatencyTable:
    lats = {n: LayerLatency(n, "channel", (1, 4, 4, 4), 8, dense, ranks, split) for n, (dense, ranks, split) in layers.items()}
    return LatencyTable(lats, model, "onnxruntime", "cpu: fake", 1, 1, "channel")


def _predicted(table: LatencyTable, ranks: dict[str, int]) -> float:
    t = table.model
    for name, lat in table.layers.items():
        if name in ranks:
            t -= lat.dense - lat.split_time(ranks[name])
    return t


def test_a_layer_whose_split_is_slower_stays_dense():
    table = _table({"a": (10.0, [1, 2, 4], [2.0, 4.0, 8.0]), "b": (10.0, [1, 2, 4], [12.0, 14.0, 16.0])}, 40.0)
    crit = trp.TargetLatency(1.1, table=table)
    ranks = crit.allocate([_spectrum("a"), _spectrum("b")], 0)
    assert "b" not in ranks  # dense
    assert ranks == {"a": 2}  # 36.4 allowed: a may take 6.4, so rank 2 (4.0) and not rank 4 (8.0)
    assert _predicted(table, ranks) <= 40.0 / 1.1


def test_the_best_reachable_speedup_is_stated():
    table = _table({"a": (10.0, [1, 2, 4], [2.0, 4.0, 8.0]), "b": (10.0, [1], [12.0])}, 40.0)
    with pytest.raises(ValueError, match=r"best reachable speedup is about 1\.25x"):
        trp.TargetLatency(1.5, table=table).allocate([_spectrum("a"), _spectrum("b")], 0)


def test_the_runtime_call_overhead_is_not_counted_as_layer_time():
    lats = {"a": LayerLatency("a", "channel", (1, 4, 4, 4), 8, 10.0, [1, 2, 4], [4.0, 6.0, 10.5], overhead=2.0)}
    table = LatencyTable(lats, 20.0, "onnxruntime", "cpu", 1, 1, "channel")
    # layer work 8.0 of a 20.0 model (12.0 elsewhere); split work 2.0 / 4.0 / 8.5 (slower than dense)
    assert trp.TargetLatency(1.2, table=table).allocate([_spectrum("a")], 0) == {"a": 2}  # 16.7 allowed
    assert trp.TargetLatency(1.3, table=table).allocate([_spectrum("a")], 0) == {"a": 1}  # 15.4 allowed


def test_rank_rounding_on_the_latency_criterion():
    table = _table({"a": (10.0, [1, 8], [1.0, 8.0])}, 20.0)
    ranks = trp.TargetLatency(1.3, table=table, round_to=4).allocate([_spectrum("a")], 0)
    assert ranks["a"] % 4 == 0


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), x=st.floats(1.05, 4.0))
def test_the_budget_is_met_on_synthetic_tables(data, n, x):
    layers, spectra = {}, []
    for i in range(n):
        dense = data.draw(st.floats(1.0, 100.0))
        ranks = sorted(data.draw(st.sets(st.integers(1, 8), min_size=1, max_size=5)))
        split = [data.draw(st.floats(0.1, 150.0)) for _ in ranks]
        layers[f"l{i}"] = (dense, ranks, split)
        spectra.append(_spectrum(f"l{i}"))
    rest = data.draw(st.floats(0.0, 100.0))
    table = _table(layers, rest + sum(d for d, _, _ in layers.values()))
    crit = trp.TargetLatency(x, table=table, monotone=False)
    try:
        ranks = crit.allocate(spectra, 0)
    except ValueError as err:
        assert "best reachable speedup" in str(err)
        fastest = rest + sum(min([d, *s]) for d, _, s in layers.values())
        assert table.model / fastest < x * (1 + 1e-9)
        return
    assert _predicted(table, ranks) <= table.model / x * (1 + 1e-9)
    for name, r in ranks.items():
        dense, grid, split = layers[name]
        assert split[grid.index(r)] < dense  # only splits measured faster are used


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # "2": 16x16 maps, splitting pays
        nn.MaxPool2d(8),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # "5": 2x2 maps, the per-call overhead eats the saving
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()


def test_end_to_end_on_a_fake_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=20_000.0)
    model = _net()
    shape = (1, 3, 16, 16)
    with hw.running():
        crit = trp.TargetLatency(1.5, runtime="eager", timer=hw, repeats=2, warmup=0)
        report = trp.decompose_with_report(model, "channel", crit, input_shape=shape)
    status = {r.name: r.status for r in report.layers}
    assert status == {"2": "factorized", "5": "dense"}
    assert crit.history and crit.measured >= 1.5 * 0.95
    x = torch.randn(2, *shape[1:])
    rank = report.layers[0].rank
    torch.testing.assert_close(report.model(x), trp.decompose(model, "channel", trp.FixedRank(rank), layers=["2"])(x))


def test_latency_criterion_strings():
    crit = trp.parse_criterion("latency:2")
    assert isinstance(crit, trp.TargetLatency) and crit.x == 2.0 and crit.runtime == "onnxruntime"
    crit = trp.parse_criterion("latency:3:eager:64")
    assert (crit.x, crit.runtime, crit.batch_size) == (3.0, "eager", 64)
    assert trp.parse_criterion(crit.spec()).spec() == "latency:3:eager:64"
    for bad, match in (("latency:0.5", "x must be"), ("latency:2:tvm", "unknown runtime"),
                       ("latency:2:eager:0", "batch_size"), ("latency:2:eager:1:x", "latency:X")):
        with pytest.raises(ValueError, match=match):
            trp.parse_criterion(bad)


def test_a_table_of_another_setting_is_refused():
    table = _table({"a": (10.0, [1], [1.0])}, 20.0)
    with pytest.raises(ValueError, match="batch 1"):
        trp.TargetLatency(2.0, table=table, batch_size=64)
    with pytest.raises(ValueError, match="no layer 'zz'"):
        trp.TargetLatency(1.1, table=table).allocate([_spectrum("zz")], 0)


def test_a_given_table_must_match_the_scheme_and_a_profiled_one_follows_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    table = _table({"2": (10.0, [1], [1.0]), "5": (10.0, [1], [1.0])}, 30.0)
    with pytest.raises(ValueError, match="times the channel split"):
        trp.decompose(_net(), "spatial", trp.TargetLatency(1.1, table=table, calibrate=0), input_shape=(1, 3, 16, 16))
    hw = FakeHardware(overhead=20_000.0)
    crit = trp.TargetLatency(1.2, runtime="eager", timer=hw, repeats=1, warmup=0, calibrate=0)
    with hw.running():
        trp.decompose(_net(), "channel", crit, input_shape=(1, 3, 16, 16))
        first = crit.table
        trp.decompose(_net(), "channel", crit, input_shape=(1, 3, 32, 32))
    assert crit.table is not first and crit.table.layers["2"].input_shape == (1, 16, 32, 32)


def test_unreachable_on_a_fake_machine_states_the_best_speedup(tmp_path, monkeypatch):
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=1e9)  # every extra layer call costs more than any saving: no split is faster
    with hw.running(), pytest.raises(ValueError, match=r"best reachable speedup is about 1\.00x"):
        trp.decompose(_net(), "channel", trp.TargetLatency(1.5, runtime="eager", timer=hw, repeats=1, warmup=0),
                      input_shape=(1, 3, 16, 16))


def test_calibration_steps_are_damped_and_bracketed():
    from trp.deploy.target_latency import Calibration

    crit = trp.TargetLatency(1.5, table=_table({"a": (10.0, [1], [1.0])}, 20.0))
    crit.history = [Calibration(1.5, 4.0, {})]  # a wild measurement moves the target by 30% at most
    assert crit._next_target(fastest=10.0) == pytest.approx(1.5 / 1.3)
    crit.history = [Calibration(1.5, 1.2, {}), Calibration(2.0, 1.8, {})]  # bracketed: interpolate in logs
    nxt = crit._next_target(fastest=10.0)
    assert 1.5 < nxt < 2.0
    assert nxt == pytest.approx(1.5 * (2.0 / 1.5) ** (math.log(1.5 / 1.2) / math.log(1.8 / 1.2)))


def _deep_net() -> nn.Module:
    torch.manual_seed(0)
    body = []
    for _ in range(4):
        body += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *body,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("x", [1.5, 2.0, 3.0])
def test_layers_timed_alone_that_overstate_the_model_still_land_on_the_target(tmp_path, monkeypatch, x):
    # Layers timed alone cost 1.6x what they cost inside the model (ONNX Runtime on ResNet-18: about
    # 1.5x), so their sum exceeds the model's time; the fitted time model must absorb that.
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=500.0, isolation=1.6)
    model, shape = _deep_net(), (1, 3, 16, 16)
    with hw.running():
        crit = trp.TargetLatency(x, runtime="eager", timer=hw, repeats=1, warmup=0, tolerance=0.05)
        crit.prepare(model, "channel", None, shape)
        table = crit.table
        assert sum(lat.dense - lat.overhead for lat in table.layers.values()) > table.model  # the trap
        report = trp.decompose_with_report(model, "channel", crit, input_shape=shape)
    fastest = crit.history[1]
    assert fastest.ranks == {name: lat.best[0] for name, lat in table.layers.items()}  # truly the fastest plan
    assert fastest.measured == max(c.measured for c in crit.history)
    assert abs(crit.measured / x - 1) <= 0.05
    ranks = {r.name: r.rank for r in report.factorized}
    assert ranks == min(crit.history, key=lambda c: abs(math.log(c.measured / x))).ranks


def test_without_calibration_the_table_is_scaled_to_the_model():
    # layers alone sum to 30 for a 20 model: the time model scales them by 2/3 (nothing left for the rest)
    table = _table({"a": (15.0, [1, 2, 4], [3.0, 6.0, 12.0]), "b": (15.0, [1, 2, 4], [3.0, 6.0, 12.0])}, 20.0)
    crit = trp.TargetLatency(2.0, table=table, calibrate=0)
    spectra = [_spectrum("a"), _spectrum("b")]
    assert crit._time_model(spectra) == pytest.approx((20.0 / 30.0, 0.0))
    ranks, predicted = crit.plan(spectra, 2.0)
    assert predicted >= 2.0 and sum(table.layers[n].split_time(r) for n, r in ranks.items()) <= 15.0
    assert crit.plan(spectra, None)[1] == pytest.approx(5.0)  # 30 / 6


def test_a_noisy_measurement_does_not_stall_the_search():
    from trp.deploy.target_latency import Calibration

    crit = trp.TargetLatency(1.5, table=_table({"a": (10.0, [1], [1.0])}, 20.0))
    # 1.65 measured slower than 1.5 (noise): read as equal, the search moves on past 1.65
    crit.history = [Calibration(1.0, 1.0, {}), Calibration(10.0, 10.0, {}), Calibration(1.5, 1.36, {}),
                    Calibration(1.65, 1.32, {})]
    nxt = crit._next_target(fastest=10.0)
    assert 1.65 * 1.01 < nxt < 10.0


def test_progress_reports_profiling_and_calibration(tmp_path, monkeypatch, caplog):
    """TargetLatency shows progress through trp's progress factories: layers profiled, calibration rounds."""
    import logging

    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=20_000.0)
    bars: dict[str, list[int]] = {}

    def progress(total: int, description: str):
        bars[description] = [total, 0]

        def advance(n: int = 1) -> None:
            bars[description][1] += n
        return advance

    with hw.running(), caplog.at_level(logging.INFO, logger="trp"):
        crit = trp.TargetLatency(1.5, runtime="eager", timer=hw, repeats=2, warmup=0, progress=progress)
        trp.decompose_with_report(_net(), "channel", crit, input_shape=(1, 3, 16, 16))
    assert bars["profiling layers"] == [2, 2]
    total, done = bars["calibrating (measured speedup)"]
    assert total == crit.calibrate + 1 and done == len(crit.history) - 1 >= 1
    text = caplog.text
    assert "profiling layer 1 of 2" in text and "profiling layer 2 of 2" in text and "calibration round 1 of" in text
