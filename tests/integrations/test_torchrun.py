"""``trp train`` under torchrun (2 gloo processes on CPU) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trp.app.engine import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("rank_probe.py")
SETTINGS = dict(model="mlp", data="mnist5k", epochs=2, batch_size=16, lr=0.05, period=2, seed=3, device="cpu")
STEPS = 3  # per epoch: a projection every 2 steps crosses the epoch boundary


def _single(run_dir: Path, stop_after: int | None = None, **kw) -> Trainer:
    trainer = Trainer(TrainConfig(**{**SETTINGS, **kw}, steps_per_epoch=STEPS), run_dir)
    trainer.run(stop_after=stop_after)
    return trainer


def _cli_args(tmp_path: Path, **kw) -> list[str]:
    (tmp_path / "steps.yaml").write_text(f"steps_per_epoch: {STEPS}\n")
    args = ["--config", str(tmp_path / "steps.yaml"), "--no-progress"]
    for key, value in {**SETTINGS, **kw}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _torchrun(dump: Path, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    dump.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(PROBE), str(dump), "train", *args]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


PROJECTED = ("features.fc1.weight", "features.fc2.weight", "features.fc3.weight")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding. A split batch's gradient sums round differently (~1e-7
    relative, as the biases show); a projection truncates inside a dense float32 spectrum,
    where SVD's own rounding moves the kept subspace, which turns that into ~1e-5 relative
    on the projected weights."""
    assert a.keys() == b.keys()
    for k in a:
        error = (a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)
        assert error < (2e-4 if k in PROJECTED else 1e-5), (k, error.item())


@pytest.mark.parametrize("method", ["trp", pytest.param("lorita", marks=pytest.mark.slow)])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path, method: str) -> None:
    run = tmp_path / "run"
    result = _torchrun(tmp_path / "dump", _cli_args(tmp_path, method=method, out=run))
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for k in r0["state"]:  # bit-identical on both ranks, projections included
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    single = _single(tmp_path / "single", method=method)
    _assert_close(r0["state"], single.model.state_dict())
    if method == "trp":
        assert r0["ranks"] == r1["ranks"] == single.pruner.ranks and r0["ranks"]
    # rank 0 alone wrote the run directory and printed; the test set counted once
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_top1"] == pytest.approx(single.last_row["test_top1"], abs=1e-9)
    assert rows[-1]["train_loss"] == pytest.approx(single.last_row["train_loss"], rel=1e-5)
    assert result.stdout.count("epoch   2") == 1 and (run / "model.safetensors").is_file()


def test_a_stopped_run_resumes_on_another_number_of_processes(tmp_path: Path) -> None:
    full = _single(tmp_path / "full")
    _single(tmp_path / "part", stop_after=1)  # one process, stopped after epoch 1
    assert not (tmp_path / "part" / "model.safetensors").exists()
    _torchrun(tmp_path / "dump", ["--resume", str(tmp_path / "part"), "--no-progress"])
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    _assert_close(r0["state"], full.model.state_dict())
    rows = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_global_batch_must_split_evenly(tmp_path: Path) -> None:
    from trp.integrations.distributed import DistEnv, train_loader

    with pytest.raises(ValueError, match="divisible by the number of processes 2"):
        train_loader(list(range(10)), 15, DistEnv(0, 2, 0), lambda e: list(range(10)), 0)


def test_nproc_relaunches_the_same_command_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from trp.app import cli

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launched: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: launched.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    result = CliRunner().invoke(cli.main, ["train", "--model", "mlp", "--nproc", "3", "--sync-bn", "--precision",
                                           "bf16", "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 0, result.output
    (command,) = launched
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m"]
    args = command[6:]
    assert args[:2] == ["trp", "train"] and "--nproc" not in args
    pairs = dict(zip(args[2:], args[3:]))
    assert pairs["--model"] == "mlp" and pairs["--precision"] == "bf16" and pairs["--out"] == str(tmp_path / "r")
    assert "--sync-bn" in args and "--no-progress" in args and "--epochs" not in args  # defaults stay defaults


def test_nproc_must_agree_with_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from trp.app import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli.main, ["train", "--nproc", "4"])
    assert result.exit_code != 0 and "leave out --nproc" in result.output


def test_sync_batchnorm_on_cpu_says_it_needs_cuda() -> None:
    from trp.integrations.distributed import wrap_ddp

    with pytest.raises(ValueError, match="SyncBatchNorm needs CUDA"):
        wrap_ddp(torch.nn.BatchNorm2d(3), torch.device("cpu"), sync_batchnorm=True)
