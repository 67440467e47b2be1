"""Command-line failures are one line naming the problem and the fix (issue 11, defects 3, 4, 6, 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import trp
from trp.app.cli import main
from trp.app.config import TrainConfig, resume_config


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *needles: str, after_status: bool = False) -> str:
    """The output is one ``Error:`` line (after one status line when ``after_status``)."""
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    if after_status:
        assert len(lines) == 2 and lines[0].startswith("decomposing "), result.output
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch baseline MLP run on fake CIFAR-10: (data root, run dir)."""
    from conftest import make_fake_cifar10

    root = tmp_path_factory.mktemp("data")
    make_fake_cifar10(root)
    run = tmp_path_factory.mktemp("runs") / "mlp"
    result = _run("train", "--model", "mlp", "--data", "cifar10", "--data-dir", root, "--method", "baseline",
                  "--epochs", "2", "--batch-size", "25", "--lr", "0.05", "--out", run, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    return root, run


def test_resume_refuses_contradicting_options(run2: tuple[Path, Path]) -> None:
    _, run = run2
    before = (run / "metrics.jsonl").read_text()
    line = _one_line_error(_run("train", "--resume", run, "--lr", "5", "--method", "trp", "--scheme", "spatial"),
                           "--lr 5.0 (the run has 0.05)", "--method trp (the run has baseline)",
                           "--scheme spatial (the run has channel)", "--epochs")
    assert "--out" in line
    assert (run / "metrics.jsonl").read_text() == before
    _one_line_error(_run("train", "--resume", run, "--config", run / "config.json"), "drop --config")


def test_resume_accepts_same_values_and_extends_epochs(run2: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = run2
    _one_line_error(_run("train", "--resume", run, "--epochs", "1", "--no-progress"),
                    "already trained 2 epochs", "--epochs 2 or more")
    milestones = TrainConfig(epochs=2).resolved_milestones()
    result = _run("train", "--resume", run, "--epochs", "3", "--lr", "0.05", "--method", "baseline",
                  "--device", "cpu", "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["milestones"] == milestones  # the schedule stays the run's


def test_resume_config_unit() -> None:
    saved = TrainConfig(epochs=10, lr=0.1)
    assert resume_config(saved, {"lr": "0.1", "device": "cpu"}).device == "cpu"
    with pytest.raises(ValueError, match=r"--momentum 0.5 \(the run has 0.9\), --seed 4 \(the run has 0\)"):
        resume_config(saved, {"momentum": 0.5, "seed": 4, "epochs": 12})


@pytest.mark.parametrize("args, needles", [
    (["--milestones", "0"], ["milestones must be increasing epochs >= 1"]),
    (["--milestones", "abc"], ["--milestones 'abc'", "e.g. --milestones 81,122"]),
    (["--milestones", "5,3"], ["milestones must be increasing"]),
    (["--momentum", "nan"], ["momentum must be a number in [0, 1]"]),
    (["--image-size", "0"], ["image_size must be an integer from 1 to 4096"]),
    (["--seed", "-1"], ["seed must be an integer from 0 to"]),
    (["--device", "bogus"], ["--device 'bogus' is not a device", "use auto, cpu"]),
    (["--energy", "0"], ["energy must be a number in (0, 1]"]),
])
def test_bad_training_options(run2: tuple[Path, Path], tmp_path: Path, args: list[str], needles: list[str]) -> None:
    root, _ = run2
    result = _run("train", "--model", "mlp", "--data", "cifar10", "--data-dir", root, "--epochs", "1",
                  "--out", tmp_path / "r", "--no-progress", *args)
    _one_line_error(result, *needles)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu(run2: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = run2
    _one_line_error(_run("train", "--model", "mlp", "--data", "cifar10", "--data-dir", root, "--out", tmp_path / "r",
                         "--device", "cuda"), "no CUDA GPU is available", "--device cpu")


@pytest.mark.parametrize("yaml_text, needle", [
    ("milestones: 1\n", "milestones must be a list of epochs"),
    ("milestones: abc\n", "milestones must be a list of epochs"),
    ("milestones: [0.5]\n", "milestones must be a list of epochs (integers)"),
    ("seed: 1e30\n", "seed must be an integer"),
    ("seed: 1e12\n", "seed must be an integer from 0 to 4294967295"),
    ("momentum: .nan\n", "momentum must be a number in [0, 1]"),
    ("decompose: [energy:0.9]\n", "decompose must be a list of mappings"),
    ("{{{", "is not valid YAML"),
])
def test_bad_yaml_settings(tmp_path: Path, yaml_text: str, needle: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 2\n" + yaml_text if not yaml_text.startswith("{") else yaml_text)
    line = _one_line_error(_run("train", "--config", config, "--out", tmp_path / "r"), needle)
    assert str(config) in line or "milestones" in line or "decompose" in line or "seed" in line or "momentum" in line


def test_evaluate_refuses_non_finite_weights(run2: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = run2
    model, spec = trp.app.engine.load_model_file(run / "model.safetensors")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    trp.save(model, bad, metadata=spec.metadata())
    _one_line_error(_run("evaluate", bad, "--data-dir", root, "--device", "cpu"), "holds NaN or Inf", str(bad))


def test_evaluate_bogus_device(run2: tuple[Path, Path]) -> None:
    root, run = run2
    _one_line_error(_run("evaluate", run, "--data-dir", root, "--device", "cuda:x"), "is not a device")


def test_unwritable_output_checked_before_the_work(run2: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import trp.app.workflow

    _, run = run2
    monkeypatch.setattr(trp.app.workflow, "decompose_with_report", lambda *a, **k: pytest.fail("decomposed first"))
    _one_line_error(_run("decompose", run, "--criterion", "rank:2", "--out", "/proc/trp-no/model.safetensors",
                         "--no-eval"), "cannot create output folder /proc/trp-no", "choose another location", after_status=True)
    _one_line_error(_run("train", "--model", "mlp", "--data", "cifar10", "--data-dir", "/nonexistent", "--epochs", "1",
                         "--out", "/proc/trp-no-run"), "Error: ")


def test_full_disk_is_one_line(run2: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import trp.app.workflow

    _, run = run2

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.safetensors"))

    monkeypatch.setattr(trp.app.workflow, "save", full)
    _one_line_error(_run("decompose", run, "--criterion", "rank:2", "--out", tmp_path / "m.safetensors", "--no-eval"),
                    "no space left writing", "free some space", after_status=True)


def test_decompose_shows_progress_per_layer(run2: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trp.app.workflow

    seen = []
    real = trp.app.workflow.decompose_with_report

    def spy(*args, **kwargs):
        on_layer = kwargs["on_layer"]
        kwargs["on_layer"] = lambda *a: (seen.append(a), on_layer(*a))
        return real(*args, **kwargs)

    monkeypatch.setattr(trp.app.workflow, "decompose_with_report", spy)
    _, run = run2
    result = _run("decompose", run, "--criterion", "rank:2", "--out", tmp_path / "m.safetensors", "--no-eval")
    assert result.exit_code == 0, result.output
    assert seen and seen[-1][1] == seen[-1][2] == len(seen)
