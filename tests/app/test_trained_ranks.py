"""A target run is split at the ranks it trained toward (issue 21, fault 3 at the command line).

The run's default split used to parse ``latency:X`` again into a fresh ``TargetLatency``, which profiles and
calibrates again and can land on other ranks. Here a fake latency target lands elsewhere on every fresh
calibration, so the split only matches the training when it re-uses the recorded ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import trp
from trp.app.cli import main
from trp.app.config import TrainConfig
from trp.app.engine import train


class DriftingLatency(trp.TargetMACs):
    """A latency target whose every fresh calibration lands on another reduction (the first: X itself)."""

    built = 0
    progress = None

    def __init__(self, x: float, **kw) -> None:
        DriftingLatency.built += 1
        self.asked = x
        super().__init__(x * DriftingLatency.built)

    def prepare(self, model, scheme, layers, input_shape, example_inputs=None) -> None:
        pass

    def spec(self) -> str:
        return f"latency:{self.asked:g}"


@pytest.fixture
def latency_run(fashion_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    DriftingLatency.built = 0
    monkeypatch.setattr("trp.deploy.target_latency.TargetLatency", DriftingLatency)
    cfg = TrainConfig(model="resnet20", data="fashion-mnist", data_dir=str(fashion_root), method="trp", scheme="channel",
                      epochs=2, batch_size=8, lr=0.05, period=2, seed=1, device="cpu", target_latency=1.5)
    results = []
    trainer = train(cfg, tmp_path / "run", on_decomposed=results.append)
    return trainer, results, tmp_path / "run"


def _split_ranks(record: dict, trained: dict[str, int]) -> None:
    assert record["ranks"] and set(record["ranks"]) <= set(trained)
    assert record["ranks"] == {n: trained[n] for n in record["ranks"]}


def test_the_default_split_is_at_the_ranks_trained_toward(latency_run, tmp_path: Path) -> None:
    trainer, results, run = latency_run
    trained = dict(trainer.pruner.ranks)
    (result,) = results
    _split_ranks(result.record, trained)
    saved = json.loads((run / "trained_ranks.json").read_text())
    assert saved["criterion"] == "latency:1.5" and saved["ranks"] == trained and saved["scheme"] == "channel"
    assert result.record["criterion"] == "latency:1.5"
    assert result.record["ranks_from"] == str(run / "trained_ranks.json")
    # `trp decompose RUN` (no criterion, or the run's own target) after the checkpoint is gone: the same ranks.
    (run / "checkpoint.pt").unlink()
    for extra in ([], ["--criterion", "latency:1.5"]):
        out = tmp_path / f"again{len(extra)}.safetensors"
        res = CliRunner().invoke(main, ["decompose", str(run), "--no-eval", "--out", str(out), "--device", "cpu",
                                        "--no-progress", *extra])
        assert res.exit_code == 0, res.output
        assert "the ranks trained toward" in res.output
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["criterion"] == "latency:1.5"
        _split_ranks(record, trained)


def test_another_criterion_is_allocated_as_before(latency_run, tmp_path: Path) -> None:
    _, _, run = latency_run
    out = tmp_path / "other.safetensors"
    res = CliRunner().invoke(main, ["decompose", str(run), "--no-eval", "--out", str(out), "--device", "cpu",
                                    "--no-progress", "--criterion", "macs:2"])
    assert res.exit_code == 0, res.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["criterion"] == "macs:2" and "ranks_from" not in record


@pytest.mark.parametrize("text", ["{not json", '{"kind": "trp-trained-ranks", "criterion": "latency:1.5", '
                                  '"scheme": "channel", "ranks": {"layer1.0.conv1": -3}}', "[]"])
def test_a_corrupt_record_is_refused_in_one_line(latency_run, tmp_path: Path, text: str) -> None:
    _, _, run = latency_run
    (run / "trained_ranks.json").write_text(text)
    res = CliRunner().invoke(main, ["decompose", str(run), "--no-eval", "--out", str(tmp_path / "x.safetensors"),
                                    "--device", "cpu", "--no-progress"])
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if "trained_ranks.json" in line]
    assert len(lines) == 1 and "corrupt" in lines[0], res.output
    assert "Traceback" not in res.output
