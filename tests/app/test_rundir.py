"""Run directories: one owner (lock), whole metrics lines, leftovers removed (issue 11, defects 2, 5, 7)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trp.app.engine import TrainConfig, Trainer, train
from trp.app.rundir import LOCK_NAME, RunInUse, RunLock, append_metrics, check_writable, read_metrics


def _config(root: Path, **kw) -> TrainConfig:
    base = dict(model="mlp", data="cifar10", data_dir=str(root), method="baseline", epochs=2, batch_size=16,
                lr=0.05, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_owner_refuses_a_second_process(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(RunInUse, match=rf"in use by pid {holder.pid} on host .*choose another --out"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_two_trainers_on_one_directory(cifar10_root: Path, tmp_path: Path) -> None:
    first = Trainer(_config(cifar10_root), tmp_path / "run")
    first.lock.acquire()  # the first run is writing
    second = Trainer(_config(cifar10_root, lr=0.2), tmp_path / "run")
    with pytest.raises(RunInUse, match="in use by pid"):
        second.run()
    assert not (tmp_path / "run" / "config.json").exists()  # the second run wrote nothing
    first.lock.release()
    first.run()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released at the end


def test_stale_lock_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    lock = RunLock(tmp_path)
    with pytest.warns(UserWarning, match=rf"pid {pid}\) is no longer running; taking the run over"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_on_another_host_is_reported(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunInUse, match=f"on host elsewhere.*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()


def test_partial_last_metrics_line_dropped_on_resume(cifar10_root: Path, tmp_path: Path) -> None:
    cfg = _config(cifar10_root, epochs=3)
    run = tmp_path / "run"
    train(cfg, run, stop_after=1)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "lr": 0.0')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped a partial last line"):
        trainer = train(cfg, run, resume=True)
    assert trainer.epoch == 3
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_bad_metrics_line_in_the_middle_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics row"):
        read_metrics(path)


def test_append_metrics_writes_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for epoch in (1, 2):
        append_metrics(path, {"epoch": epoch, "x": 0.5})
    assert path.read_text() == '{"epoch": 1, "x": 0.5}\n{"epoch": 2, "x": 0.5}\n'


def test_stale_temporaries_removed(cifar10_root: Path, tmp_path: Path) -> None:
    cfg = _config(cifar10_root, epochs=2)
    run = tmp_path / "run"
    train(cfg, run, stop_after=1)
    leftovers = [run / ".checkpoint.pt.abc123.tmp", run / ".metrics.jsonl.x.tmp", run / ".model.safetensors.q.tmp"]
    for p in leftovers:
        p.write_bytes(b"0" * 100)
    keep = run / "notes.tmp"
    keep.write_text("mine")
    with pytest.warns(UserWarning, match="removed 3 temporary file"):
        train(cfg, run, resume=True)
    assert not any(p.exists() for p in leftovers) and keep.exists()


def test_unwritable_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    def read_only(*args, **kwargs):  # a read-only mount (root can write to a chmod 500 folder)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ValueError, match=r"run directory .* is not writable \(Read-only file system\)"):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_too_little_free_space(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"MiB free, .* MiB needed: free some space"):
        check_writable(tmp_path, need_bytes=2**62)
