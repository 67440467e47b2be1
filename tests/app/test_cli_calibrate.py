"""`trp decompose RUN --calibrate N` and the `calibrate` key of config decompose entries (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trp.app.cli import main
from trp.app.config import DecomposeStep


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch baseline run on fake CIFAR-10."""
    from conftest import make_fake_cifar10

    root = tmp_path_factory.mktemp("data")
    make_fake_cifar10(root)
    run = tmp_path_factory.mktemp("runs") / "base"
    result = invoke("train", "--data", "cifar10", "--data-dir", root, "--method", "baseline", "--epochs", "1",
                    "--batch-size", "25", "--lr", "0.05", "--out", run, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    return run


def test_decompose_calibrate_prints_fidelity_and_records_it(run: Path) -> None:
    result = invoke("decompose", run, "--scheme", "channel", "--criterion", "rank:2", "--calibrate", "40",
                    "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "fidelity of the split model to the dense model: top-1 agreement" in result.output
    assert "held-out calibration" in result.output
    summary = json.loads((run / "decomposed-channel-rank2-cal40.json").read_text())
    assert summary["calibrate"] == 40 and summary["fidelity"]["held_out"]
    assert summary["fidelity"]["metric"] == "top-1 agreement"
    # the run's model has BatchNorms: their statistics are re-estimated on the calibration images, and said so
    assert any("BatchNorm" in n for n in summary["notes"]) and "note: running statistics of" in result.output


def test_calibrate_refuses_the_spatial_scheme(run: Path) -> None:
    result = CliRunner().invoke(main, ["decompose", str(run), "--scheme", "spatial", "--criterion", "rank:2",
                                       "--calibrate", "16", "--no-eval", "--device", "cpu"])
    assert result.exit_code != 0 and "not available for the spatial scheme" in result.output


def test_config_decompose_entry_takes_calibrate() -> None:
    step = DecomposeStep.from_dict({"criterion": "macs:2", "calibrate": 256}, "channel")
    assert step.calibrate == 256 and step.stem.endswith("-cal256")
    with pytest.raises(ValueError, match="calibrate must be"):
        DecomposeStep.from_dict({"criterion": "macs:2", "calibrate": -1}, "channel")


def test_calibrated_split_repeats_exactly_whatever_the_global_rng(run: Path, tmp_path: Path) -> None:
    """Two calibrated splits of one run are identical: calibration images are not randomly cropped or flipped,
    and the BatchNorm re-estimation is seeded (the training data of this run are augmented)."""
    import torch
    from safetensors.torch import load_file

    outs = []
    for i, seed in enumerate((1, 2)):
        torch.manual_seed(seed)  # a caller's RNG state must not leak into the split
        out = tmp_path / f"split{i}.safetensors"
        result = invoke("decompose", run, "--scheme", "channel", "--criterion", "macs:1.5", "--calibrate", "60",
                        "--recalibrate-bn", "2", "--device", "cpu", "--no-progress", "--out", out)
        assert result.exit_code == 0, result.output
        outs.append((load_file(str(out)), json.loads(out.with_suffix(".json").read_text())))
    (w0, s0), (w1, s1) = outs
    assert s0["ranks"] == s1["ranks"] and s0["fidelity"] == s1["fidelity"]
    assert s0["bn_recalibrated"] == s1["bn_recalibrated"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
