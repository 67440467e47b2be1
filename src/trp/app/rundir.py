"""Owning and writing a run directory safely: the lock, metrics lines, leftovers, disk checks.

One process owns a run directory at a time: it holds ``run.lock`` (JSON with the owner's pid,
host and start time) while it writes. A lock whose pid is dead on this host is stale: it is
taken over with a warning. Metrics are appended one whole line at a time and flushed to disk,
so an interrupted write can only leave a partial *last* line, which :func:`read_metrics` drops
with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from ..errors import write_error
from ..errors import FileError
from ..limits import parse_json, read_json, read_json_lines
from ..deploy.io import atomic_write, remove_stale_temporaries

__all__ = [
    "LOCK_NAME",
    "RunInUse",
    "RunLock",
    "append_metrics",
    "read_metrics",
    "remove_leftovers",
    "check_writable",
    "disk_error",
    "TRAINED_RANKS",
    "write_trained_ranks",
    "read_trained_ranks",
]

LOCK_NAME = "run.lock"
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "model.safetensors", "config.json", "trained_ranks.json")


class RunInUse(ValueError):
    """Another live process owns the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive ownership of a run directory (``run.lock``); re-entrant within one object."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunInUse` naming the live owner; stale locks are taken over."""
        if self.held:
            return
        check_writable(self.run_dir, what="run directory")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self.held = True
            return
        raise RunInUse(f"{self.run_dir} is being claimed by another process at the same time: try again")

    def _handle_existing(self) -> None:
        try:
            other = json.loads(self.path.read_text())
            pid, host = int(other["pid"]), str(other["host"])
        except FileNotFoundError:
            return  # released meanwhile
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{self.path} is unreadable (an interrupted start); taking the run over", stacklevel=3)
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and not _alive(pid):
            warnings.warn(
                f"{self.path}: its owner (pid {pid}) is no longer running; taking the run over", stacklevel=3
            )
            self.path.unlink(missing_ok=True)
            return
        raise RunInUse(
            f"{self.run_dir} is in use by pid {pid} on host {host} (since {other.get('started', '?')}): wait for "
            f"it to finish or choose another --out; if that process is gone, delete {self.path}"
        )

    def release(self) -> None:
        """Give the lock back (only if this object holds it)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line in a single write, flushed to disk."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a partial last line (an interrupted write) is dropped with a warning.

    Any other bad line raises ValueError naming the file and line.
    """
    lines = read_json_lines(path)
    rows = []
    for number, line in lines:
        if not line.strip():
            continue
        last = number == len(lines)  # text did not end with a newline: the last write was cut off
        try:
            row = parse_json(line, "the line")
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not a metrics row")
        except ValueError as err:
            if last:
                warnings.warn(f"{path}: dropped a partial last line (an interrupted write): {line[:60]!r}",
                              stacklevel=2)
                break
            raise ValueError(f"{path}, line {number}: not a metrics row ({err}); "
                             "delete that line or start the run again") from None
        if last:
            warnings.warn(f"{path}: the last line had no newline (an interrupted write); dropped it", stacklevel=2)
            break
        rows.append(row)
    return rows


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete temporary files interrupted writes left in ``run_dir``; return them."""
    removed: list[Path] = []
    for name in RUN_FILES:
        removed += remove_stale_temporaries(Path(run_dir) / name)
    return removed


def check_writable(folder: Path, need_bytes: int = 0, what: str = "output folder") -> None:
    """ValueError unless ``folder`` (created if missing) is writable with ``need_bytes`` free."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create {what} {folder} ({err.strerror}): choose another location") from None
    try:  # a real write: access() says yes to root on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".trp-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {folder} is not writable ({err.strerror}): fix its permissions "
                         "or choose another location") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ValueError(
            f"{what} {folder} has {free / 2**20:.0f} MiB free, {need_bytes / 2**20:.0f} MiB needed: "
            "free some space or choose another location"
        )


def disk_error(err: OSError, where: Optional[Path] = None) -> ValueError:
    """A one-line :class:`~trp.errors.WriteError` for a failed write (full disk, permissions)."""
    return write_error(err, where)


# -- the ranks a target run trained toward --------------------------------------------
TRAINED_RANKS = "trained_ranks.json"
_TRAINED_KIND = "trp-trained-ranks"


def write_trained_ranks(run_dir: Path, criterion: str, scheme: str, ranks: dict[str, int],
                        calibration: Optional[dict[str, float]] = None) -> Path:
    """Record (atomically) the ranks of a target run's last projection in ``run_dir/trained_ranks.json``.

    The run's default split reads them back (:func:`read_trained_ranks`): the model is split at
    exactly the ranks it was trained toward, even after ``checkpoint.pt`` (the TRP state) is gone,
    and a latency target is not profiled and calibrated a second time.
    """
    record: dict[str, Any] = {"kind": _TRAINED_KIND, "version": 1, "criterion": criterion, "scheme": scheme,
                              "ranks": {str(k): int(v) for k, v in ranks.items()}}
    if calibration is not None:  # the TRP's fixed time model of a measured target (for the record)
        record["calibration"] = {str(k): float(v) for k, v in calibration.items()}
    path = Path(run_dir) / TRAINED_RANKS
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_trained_ranks(run_dir: Path) -> Optional[dict[str, Any]]:
    """The record :func:`write_trained_ranks` wrote in ``run_dir`` (None when there is none).

    A file that is not such a record raises :class:`~trp.errors.FileError` (one line, naming it).
    """
    path = Path(run_dir) / TRAINED_RANKS
    if not path.is_file():
        return None
    data = read_json(path)
    fix = "delete it to split with the run's target again, or train the run again"
    if not isinstance(data, dict) or data.get("kind") != _TRAINED_KIND:
        raise FileError(f"{path} is not a trp trained-ranks record: the file is corrupt; {fix}")
    ranks, criterion, scheme = data.get("ranks"), data.get("criterion"), data.get("scheme")
    if not isinstance(criterion, str) or not isinstance(scheme, str) or not isinstance(ranks, dict) or not ranks:
        raise FileError(f"{path} lacks its criterion, scheme or ranks: the file is corrupt; {fix}")
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 2**31:
            raise FileError(f"{path}: the rank of layer {name!r} is {r!r}, not an integer >= 1: "
                            f"the file is corrupt; {fix}")
    return data
