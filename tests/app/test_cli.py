"""The command line on tiny fake data: train, resume, decompose, evaluate, demo, errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import trp
import trp.app.demo
from trp.app.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch TRP run on fake CIFAR-10: (data root, run dir)."""
    from conftest import make_fake_cifar10

    root = tmp_path_factory.mktemp("data")
    make_fake_cifar10(root)
    run = tmp_path_factory.mktemp("runs") / "trp-run"
    result = invoke("train", "--data", "cifar10", "--data-dir", root, "--method", "trp", "--scheme", "spatial",
                    "--epochs", "2", "--batch-size", "25", "--period", "1", "--lr", "0.05", "--out", run,
                    "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    return root, run


def test_train_writes_run_and_table(trained: tuple[Path, Path]) -> None:
    root, run = trained
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "model.safetensors"}
    config = json.loads((run / "config.json").read_text())
    assert config["scheme"] == "spatial" and config["period"] == 1 and config["milestones"] is None
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_train_refuses_to_overwrite_and_resume_of_finished_run(trained: tuple[Path, Path]) -> None:
    root, run = trained
    result = CliRunner().invoke(main, ["train", "--data", "cifar10", "--data-dir", str(root), "--out", str(run)])
    assert result.exit_code != 0 and "--resume" in result.output
    result = invoke("train", "--resume", run, "--no-progress")
    assert result.exit_code == 0 and "resuming" in result.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # nothing retrained


def test_decompose_then_evaluate(trained: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = trained
    out = tmp_path / "compact" / "resnet20-small.bin"
    result = invoke("decompose", run, "--criterion", "rank:2", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "layer1.0.conv1" in text and "2/" in text and "conv MACs" in text and "top-1" in text
    speedup = float(re.search(r"conv MACs.*?([\d.]+)x", text).group(1))
    assert speedup > 2
    after = float(re.search(r"top-1\s.*?%\s.*?([\d.]+)%", text).group(1))
    meta = trp.deploy.io.read_metadata(out)
    assert meta["scheme"] == "spatial" and meta["criterion"] == "rank:2"  # the run's scheme by default
    result = invoke("evaluate", out, "--data-dir", root, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"{after:.2f}%" in result.output
    model, spec = trp.app.engine.load_model_file(out)
    assert any(isinstance(m, trp.LowRank) and m.rank == 2 for m in model.modules())


def test_decompose_from_checkpoint_and_default_output(trained: tuple[Path, Path]) -> None:
    root, run = trained
    result = invoke("decompose", run / "checkpoint.pt", "--scheme", "channel", "--criterion", "ratio:0.25", "--no-eval")
    assert result.exit_code == 0, result.output
    assert (run / "decomposed-channel-ratio0.25.safetensors").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["decompose", "{run}", "--criterion", "energy:1.5"], "e must lie in (0, 1]"),
        (["decompose", "{run}", "--criterion", "svd:3"], "not understood"),
        (["decompose", "{tmp}/nope"], "does not exist"),
        (["evaluate", "{tmp}/corrupt.safetensors"], "corrupt"),
        (["train", "--data", "cifar10", "--data-dir", "{tmp}/missing", "--out", "{tmp}/r"], "cifar-10-batches-py"),
        (["train", "--data", "cifar10", "--out", "{tmp}/r"], "--data-dir is required"),
        (["train", "--resume", "{tmp}"], "config.json"),
    ],
)
def test_bad_input_gives_clear_error(trained: tuple[Path, Path], tmp_path: Path, args: list[str], message: str) -> None:
    _, run = trained
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 40)
    args = [a.format(run=run, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_demo_pipeline_on_fake_data(cifar10_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = dataclasses.replace(trp.app.demo.DEMO_CONFIG, data="cifar10", data_dir=str(cifar10_root),
                               epochs=1, batch_size=25, period=1)
    monkeypatch.setattr(trp.app.demo, "DEMO_CONFIG", fast)
    monkeypatch.setattr(trp.app.demo, "DEMO_CRITERION", trp.Ratio(0.3))
    result = invoke("demo", "--out", tmp_path / "demo", "--no-progress")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "demo" / "demo.json").read_text())
    names = [r["model"] for r in results["rows"]]
    assert names[0] == "baseline" and names[2] == "TRP+Nu" and "decomposed" in names[1] and "decomposed" in names[3]
    base_c, trp_c = results["rows"][1], results["rows"][3]
    assert base_c["conv_macs"] <= trp_c["conv_macs"]  # the baseline is matched at equal or lower cost
    assert trp_c["conv_mac_reduction"] > 1.5
    assert "BN statistics re-estimated" in names[4] and results["rows"][4]["conv_macs"] == base_c["conv_macs"]
    assert results["trp_seconds"] > 0
    assert "TRP's own cost" in (tmp_path / "demo" / "demo.md").read_text()


@pytest.mark.slow
def test_real_demo_two_epochs(tmp_path: Path) -> None:
    result = invoke("demo", "--epochs", "2", "--out", tmp_path / "demo", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())["rows"]
    assert rows[0]["top1"] > 80
