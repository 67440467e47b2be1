"""The command line end to end on fake CIFAR-10: train --config (with decompose entries),
decompose --target-macs, sweep, table; and clean errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_fake_cifar10
from trp.app.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _config(root: Path, **settings) -> str:
    base = {"model": "resnet20", "data": "cifar10", "data_dir": str(root), "epochs": 1, "steps_per_epoch": 2,
            "batch_size": 4, "lr": 0.05, "device": "cpu", "seed": 0}
    base.update(settings)
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in base.items())  # JSON values are valid YAML


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A baseline and a TRP1+Nu run trained with `trp train --config`, each with a decompose entry."""
    tmp = tmp_path_factory.mktemp("cli-tables")
    make_fake_cifar10(tmp / "data")
    out: dict[str, Path] = {"data": tmp / "data"}
    configs = {
        "baseline": _config(tmp / "data", method="baseline", scheme="channel", nuclear_weight=0.0,
                            decompose=[{"scheme": "channel", "criterion": "energy:0.9"}]),
        "trp": _config(tmp / "data", method="trp", scheme="channel", nuclear_weight=3e-4, period=1,
                       decompose=[{"criterion": "value:0.05"}]),
    }
    for name, text in configs.items():
        path = tmp / f"{name}.yaml"
        path.write_text(text)
        result = invoke("train", "--config", path, "--out", tmp / name, "--no-progress")
        assert result.exit_code == 0, result.output
        out[name] = tmp / name
        (tmp / f"{name}.log").write_text(result.output)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def test_train_config_runs_its_decompose_entries(runs: dict[str, Path]) -> None:
    for name, stem, criterion in (("baseline", "decomposed-channel-energy0.9", "energy:0.9"),
                                  ("trp", "decomposed-channel-value0.05", "value:0.05")):
        run = runs[name]
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
        record = json.loads((run / f"{stem}.json").read_text())
        assert record["kind"] == "trp-decomposition" and record["criterion"] == criterion
        assert record["scheme"] == "channel"  # the trp entry names no scheme: the run's
        assert (run / f"{stem}.safetensors").is_file()
        log = re.sub(r"\s+", " ", (run.parent / f"{name}.log").read_text())  # undo rich's line wrapping
        assert f"decomposing {run}: channel, {criterion}" in log
        assert f"summary: {run / (stem + '.json')}" in log
        assert f"{record['decomposed']['top1']:.2f}%" in log


def test_decompose_target_speedup_prints_speedup(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["trp"], tmp_path)
    result = invoke("decompose", run, "--target-macs", "1.5", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((run / "decomposed-channel-macs1.5.json").read_text())
    assert record["criterion"] == "macs:1.5" and 1.5 <= record["mac_reduction"] <= 1.15 * 1.5
    printed = re.search(r"all MACs.*?([\d.]+)x", result.output)
    assert printed and printed.group(1) == f"{record['mac_reduction']:.2f}"
    printed_conv = re.search(r"conv MACs.*?([\d.]+)x", result.output)
    assert printed_conv and printed_conv.group(1) == f"{record['conv_mac_reduction']:.2f}"


def test_decompose_without_criterion_runs_the_config_entries(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["baseline"], tmp_path)
    for p in run.glob("decomposed-*"):
        p.unlink()
    result = invoke("decompose", run, "--no-eval", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.glob("decomposed-*")) == [
        "decomposed-channel-energy0.9.json", "decomposed-channel-energy0.9.safetensors"]
    # An explicit criterion replaces the entries.
    result = invoke("decompose", run, "--criterion", "rank:3", "--no-eval", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "decomposed-channel-rank3.json").read_text())["criterion"] == "rank:3"


def test_sweep_writes_points_and_plot(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["trp"], tmp_path)
    plot = tmp_path / "p.png"
    result = invoke("sweep", run, "--kind", "energy", "--points", "3", "--plot", plot, "--device", "cpu")
    assert result.exit_code == 0, result.output
    doc = json.loads((run / "sweep-channel-energy.json").read_text())
    assert doc["kind"] == "trp-sweep" and doc["criterion_kind"] == "energy" and doc["scheme"] == "channel"
    assert doc["label"] == "TRP1+Nu (channel)" and doc["source"] == str(run)
    points = doc["points"]
    assert sorted(p["criterion"] for p in points) == ["energy:0.5", "energy:0.9776", "energy:0.999"]
    assert [p["conv_mac_reduction"] for p in points] == sorted(p["conv_mac_reduction"] for p in points)
    assert all(0.0 <= p["top1"] <= 100.0 and p["conv_mac_reduction"] >= 1.0 for p in points)
    assert result.output.count("x conv") == 3
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_table_collects_runs_with_labels_and_paper_column(runs: dict[str, Path], tmp_path: Path) -> None:
    baseline, trp_run = _copy(runs["baseline"], tmp_path), _copy(runs["trp"], tmp_path)
    assert invoke("sweep", trp_run, "--kind", "ratio", "--points", "2", "--device", "cpu").exit_code == 0
    out, plot = tmp_path / "t", tmp_path / "q.png"
    result = invoke("table", baseline, trp_run, "--out", out, "--plot", plot)
    assert result.exit_code == 0, result.output

    md = (tmp_path / "t.md").read_text()
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table_lines[0].strip("|").split("|")]
    assert header[0] == "label" and header[-1] == "paper (dataset)"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table_lines[2:]]
    assert len(cells) == len(rows) == 4

    expected = [  # label, criterion, run, paper cell
        ("baseline", "", baseline, "91.74 @ 1.00× (cifar10)"),
        ("Zhang et al. (channel)", "energy:0.9", baseline, "–"),
        ("TRP1+Nu", "", trp_run, "–"),  # dense TRP rows have no published number
        ("TRP1+Nu", "value:0.05", trp_run, "90.50 @ 2.17× (cifar10)"),
    ]
    for row, line, (label, criterion, run, paper) in zip(rows, cells, expected):
        assert (row["label"], row["criterion"], row["run_dir"]) == (label, criterion, str(run))
        assert line[0] == label and line[2] == (criterion or "–") and line[-1] == paper
        assert line[4] == f"{float(row['top1']):.2f}"
        assert line[8] == f"{float(row['conv_mac_reduction']):.2f}×"
    summary = json.loads((trp_run / "decomposed-channel-value0.05.json").read_text())
    assert float(rows[3]["conv_mac_reduction"]) == pytest.approx(summary["conv_mac_reduction"])
    assert float(rows[3]["top1"]) == summary["decomposed"]["top1"]
    assert float(rows[0]["paper_top1"]) == 91.74 and rows[0]["paper_dataset"] == "cifar10"
    last = json.loads((baseline / "metrics.jsonl").read_text().splitlines()[-1])
    assert float(rows[0]["top1"]) == last["test_top1"]
    assert "TRP1+Nu (" in md.split("\n\n", 1)[1]  # the trade-off sentence under the table
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert "baseline" in result.output and f"wrote {out.with_suffix('.md')}" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["table", "{tmp}"], "is not a run directory"),
        (["table", "{baseline}", "--plot", "{tmp}/q.png"], "no sweep-*.json"),
        (["table", "{tmp}/missing"], "does not exist"),
        (["sweep", "{tmp}"], "is not a run directory"),
        (["decompose", "{baseline}", "--criterion", "energy:0.9", "--target-macs", "2"], "not both"),
        (["decompose", "{baseline}", "--target-macs", "50", "--no-eval"], "cannot be reached"),
    ],
)
def test_errors_are_clean(runs: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    baseline = _copy(runs["baseline"], tmp_path / "copy")
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path, baseline=baseline) for a in args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught exception


def test_table_rejects_corrupt_summary(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["baseline"], tmp_path)
    (run / "decomposed-channel-energy0.9.json").write_text("{ not json")
    result = CliRunner().invoke(main, ["table", str(run)])
    assert result.exit_code != 0 and "is not valid JSON" in result.output and "Traceback" not in result.output
