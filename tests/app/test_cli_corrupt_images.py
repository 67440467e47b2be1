"""`trp train` / `trp evaluate` on an image folder with corrupt files: --verify-images, --skip-corrupt (issue 11)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trp.app.cli import main
from trp.app.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from test_corrupt_images import corrupt  # noqa: E402  (the fake corrupt files)

TRAIN = ("train", "--model", "mlp", "--data", "imagenet", "--image-size", "32", "--epochs", "1",
         "--batch-size", "6", "--method", "baseline", "--device", "cpu", "--no-progress")


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def broken(imagefolder_root: Path) -> tuple[Path, list[Path]]:
    return imagefolder_root, corrupt(imagefolder_root)


def test_without_an_option_the_mid_epoch_error_names_the_file_and_both_options(broken, tmp_path: Path) -> None:
    root, bad = broken
    result = invoke(*TRAIN, "--data-dir", root, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: corrupt or unreadable image ") and any(str(p) in line for p in bad)
    assert "--verify-images" in line and "--skip-corrupt" in line


def test_verify_images_fails_before_training_listing_every_file(broken, tmp_path: Path) -> None:
    root, bad = broken
    result = invoke(*TRAIN, "--data-dir", root, "--out", tmp_path / "run", "--verify-images")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: 3 corrupt or unreadable image(s)") and all(str(p) in line for p in bad)
    assert "--skip-corrupt" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no epoch ran


def test_skip_corrupt_trains_on_the_rest_and_lists_the_skipped(broken, tmp_path: Path) -> None:
    root, bad = broken
    run = tmp_path / "run"
    result = invoke(*TRAIN, "--data-dir", root, "--out", run, "--skip-corrupt")
    assert result.exit_code == 0, result.output
    listed = [line.split("\t") for line in (run / "skipped_images.txt").read_text().splitlines()]
    assert sorted(Path(p) for p, _ in listed) == bad and all(reason for _, reason in listed)
    assert "skipped 3 corrupt image(s)" in result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert json.loads((run / "config.json").read_text())["skip_corrupt"] is True
    # evaluate on a test split with a corrupt image: refused with --verify-images, skipped with --skip-corrupt
    val_bad = corrupt(root, "val")
    result = invoke("evaluate", run / "model.safetensors", "--device", "cpu", "--verify-images")
    assert result.exit_code == 1 and "Error: 3 corrupt or unreadable image(s)" in result.output
    result = invoke("evaluate", run / "model.safetensors", "--device", "cpu", "--skip-corrupt")
    assert result.exit_code == 0, result.output
    assert "skipped 3 corrupt image(s)" in result.output and all(str(p) in result.output for p in val_bad)
    assert "top-1" in result.output


def test_the_options_are_config_keys_checked_like_the_others() -> None:
    assert TrainConfig.from_dict({"verify_images": True}).verify_images is True
    with pytest.raises(ValueError, match="skip_corrupt must be true or false"):
        TrainConfig.from_dict({"skip_corrupt": "yes"}).validate()


def test_a_run_stopped_by_a_corrupt_image_resumes_with_skip_corrupt(imagefolder_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke(*TRAIN, "--data-dir", imagefolder_root, "--out", run).exit_code == 0
    bad = corrupt(imagefolder_root)  # files that went bad after the first epoch
    result = invoke("train", "--resume", run, "--epochs", 2, "--no-progress")
    assert result.exit_code == 1 and "--skip-corrupt" in result.output
    result = invoke("train", "--resume", run, "--epochs", 2, "--no-progress", "--skip-corrupt")
    assert result.exit_code == 0, result.output
    assert sorted(Path(line.split("\t")[0]) for line in (run / "skipped_images.txt").read_text().splitlines()) == bad
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
