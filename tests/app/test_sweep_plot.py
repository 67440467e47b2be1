"""Criterion sweeps on a tiny model, their files, and trade-off plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trp.core.criteria import Energy, Ratio, Value
from trp.core.decompose import decompose
from trp.app.engine import evaluate
from trp.models import create_model
from trp.app.plot import plot_tradeoff
from trp.app.sweep import SweepPoint, default_criteria, load_sweep, save_sweep, sweep

INPUT_SHAPE = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10).eval()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():  # labels = the dense model's predictions: dense top-1 is 100%
        y = model(x).argmax(1)
    data = TensorDataset(x, y)
    return model, DataLoader(data, batch_size=16)


@pytest.fixture(scope="module")
def points(setup) -> list[SweepPoint]:
    model, loader = setup
    return sweep(model, "channel", [Energy(0.6), Energy(0.999), Energy(0.9)], loader, INPUT_SHAPE, "cpu")


def test_sweep_points(setup, points: list[SweepPoint]) -> None:
    model, loader = setup
    assert [p.criterion for p in points] == ["energy:0.999", "energy:0.9", "energy:0.6"]
    speedups = [p.conv_mac_reduction for p in points]
    assert speedups == sorted(speedups) and speedups[-1] > speedups[0] * 1.3
    assert points[-1].conv_macs < points[0].conv_macs and points[-1].params < points[0].params
    # at energy 0.999 the model is (almost) unchanged: same accuracy, at most one sample apart
    assert evaluate(model, loader, torch.device("cpu"))["top1"] == 100.0
    assert points[0].conv_mac_reduction == pytest.approx(1.0, abs=0.1)
    assert points[0].top1 >= 100 - 100 / 32
    # each point is the decomposed model's own evaluation
    strong = decompose(model, "channel", Energy(0.6), input_shape=INPUT_SHAPE)
    assert points[-1].top1 == evaluate(strong, loader, torch.device("cpu"))["top1"] < 100
    assert all(0 <= p.top1 <= p.top5 <= 100 for p in points)


def test_sweep_criterion_leaving_everything_dense(setup) -> None:
    model, loader = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes a sweep
        (point,) = sweep(model, "channel", [Ratio(1.0)], loader, INPUT_SHAPE, "cpu")
    assert point.criterion == "ratio:1" and point.conv_mac_reduction == 1.0 and point.mac_reduction == 1.0


def test_sweep_passes_other_criteria_through(setup) -> None:
    model, loader = setup

    class Half:  # a plain callable criterion without spec()
        def __call__(self, sigma: torch.Tensor) -> int:
            return max(1, sigma.shape[-1] // 4)

        def __repr__(self) -> str:
            return "Half()"

    (point,) = sweep(model, "spatial", [Half()], loader, INPUT_SHAPE, "cpu")
    assert point.criterion == "Half()" and point.conv_mac_reduction > 1.5
    with pytest.raises(ValueError, match="no criteria"):
        sweep(model, "channel", [], loader, INPUT_SHAPE, "cpu")


def test_default_criteria() -> None:
    energies = default_criteria("energy")
    assert len(energies) == 8 and all(isinstance(c, Energy) for c in energies)
    es = [c.e for c in energies]
    assert es[0] == pytest.approx(0.999) and es[-1] == pytest.approx(0.5) and es == sorted(es, reverse=True)
    values = [c.t for c in default_criteria("value", 5)]
    assert values[0] == pytest.approx(0.01) and values[-1] == pytest.approx(0.5) and values == sorted(values)
    assert all(isinstance(c, Value) for c in default_criteria("value", 3))
    ratios = [c.p for c in default_criteria("ratio", 4)]
    assert ratios[0] == pytest.approx(0.8) and ratios[-1] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="energy, value, ratio"):
        default_criteria("rank")
    with pytest.raises(ValueError, match="n must"):
        default_criteria("energy", 0)


def test_save_load_round_trip(points: list[SweepPoint], tmp_path: Path) -> None:
    path = save_sweep(points, tmp_path / "sweep.json", {"model": "resnet20", "scheme": "channel"})
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]
    doc = json.loads(path.read_text())
    assert (doc["kind"], doc["version"], doc["model"]) == ("trp-sweep", 1, "resnet20")
    meta, back = load_sweep(path)
    assert meta == {"model": "resnet20", "scheme": "channel"} and back == points
    with pytest.raises(ValueError, match="reserved"):
        save_sweep(points, tmp_path / "x.json", {"points": 1})
    with pytest.raises(FileNotFoundError, match="no sweep file"):
        load_sweep(tmp_path / "missing.json")
    path.write_text("{bad")
    with pytest.raises(ValueError, match="sweep.json is not valid JSON"):
        load_sweep(path)
    path.write_text(json.dumps({"kind": "trp-decomposition", "version": 1}))
    with pytest.raises(ValueError, match="not a trp sweep file"):
        load_sweep(path)
    path.write_text(json.dumps({"kind": "trp-sweep", "version": 1, "points": [{"criterion": "x"}]}))
    with pytest.raises(ValueError, match="point 0 is malformed"):
        load_sweep(path)


def test_load_reads_sweeps_written_before_speedup_became_mac_reduction(points, tmp_path: Path) -> None:
    path = save_sweep(points, tmp_path / "sweep.json")
    doc = json.loads(path.read_text())
    for p in doc["points"]:
        p["speedup"], p["conv_speedup"] = p.pop("mac_reduction"), p.pop("conv_mac_reduction")
    path.write_text(json.dumps(doc))
    assert load_sweep(path)[1] == points


def _pt(c: str, top1: float, s: float) -> SweepPoint:
    return SweepPoint(c, top1, None, 100, 90, 10, s, s)


def test_plot_writes_png(tmp_path: Path) -> None:
    curves = {
        "TRP2+Nu": [_pt("value:0.1", 95.0, 3.0), _pt("value:0.05", 97.0, 2.0)],
        "Jaderberg et al. (spatial)": [_pt("energy:0.6", 40.0, 3.1), _pt("energy:0.9", 90.0, 1.5)],
    }
    out = plot_tradeoff(curves, tmp_path / "plots" / "tradeoff.png", title="resnet20 on mnist5k",
                        reference=98.0, markers={"paper TRP2+Nu (cifar10)": (2.84, 90.62)})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 2_000_000
    assert [p.name for p in out.parent.iterdir()] == ["tradeoff.png"]  # no temp file left
    with pytest.raises(ValueError, match="x must be"):
        plot_tradeoff(curves, tmp_path / "x.png", x="macs")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_tradeoff({"a": []}, tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_sweep_reports_and_skips_unreachable_targets() -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import trp
    from trp.app.sweep import sweep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 2, (16,))), batch_size=8)
    skipped = []
    points = sweep(model, "channel", [trp.TargetMACs(1.2), trp.TargetMACs(100.0)], loader, (1, 8), "cpu",
                   on_error=lambda c, e: skipped.append((c.spec(), str(e))))
    assert [p.criterion for p in points] == ["macs:1.2"]
    assert skipped and skipped[0][0] == "macs:100" and "cannot be reached" in skipped[0][1]
    with pytest.raises(ValueError, match="cannot be reached"):
        sweep(model, "channel", [trp.TargetMACs(100.0)], loader, (1, 8), "cpu")
