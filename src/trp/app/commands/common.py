"""What the commands share: the console, progress bars, printing, and the library loaded on first use.

Importing this module imports no torch (``trp --help`` answers at once).
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import DecomposeStep


class _LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


engine: Any = _LazyModule("trp.app.engine")
workflow: Any = _LazyModule("trp.app.workflow")
tables: Any = _LazyModule("trp.app.tables")
distributed: Any = _LazyModule("trp.integrations.distributed")


# The conv schemes' names, for option choices without importing torch (a test pins them to trp.SCHEMES).
SCHEMES = ("channel", "decouple", "spatial")


def count_macs(*args: Any, **kwargs: Any) -> int:
    from ...core.counting import count_macs as count

    return count(*args, **kwargs)


def count_params(*args: Any, **kwargs: Any) -> int:
    from ...core.counting import count_params as count

    return count(*args, **kwargs)


def atomic_write(path: Path):
    from ...deploy.io import atomic_write as write

    return write(path)


LAYERS_HELP = ("Layers to train low-rank / split: default (every layer but the first conv and the last linear), "
               "paper (the reference selection: no 1×1 convs), all, or comma-separated module names / glob "
               "patterns, e.g. 'layer*.conv2,fc1'.")


EXCLUDE_HELP = "Comma-separated glob patterns of layers to leave dense, e.g. '*.downsample.*'."


# Wide enough for the layer table when the output goes to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Optional[engine.ProgressFactory]]:
    """A factory of progress bars ``(total, description) -> advance(n)``, or None."""
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:

        def factory(total: int, description: str):
            task = progress.add_task(description, total=total)
            done = 0

            def advance(n: int = 1) -> None:
                nonlocal done
                done += n
                progress.advance(task, n)
                if done >= total:
                    progress.remove_task(task)

            return advance

        yield factory


def _epoch_line(row: dict[str, Any]) -> None:
    console.print(tables.epoch_line(row))


def _print_result(result: workflow.DecomposeResult) -> None:
    for item in tables.result_lines(result):
        console.print(item)


def _decomposing(source: Path, step: DecomposeStep) -> None:
    console.print(f"decomposing {source}: {step.scheme}, {step.criterion}"
                  + (f", then {step.finetune} fine-tune epoch(s)" if step.finetune else ""))


def _print_bench(record: dict[str, Any], title: str) -> None:
    console.print(tables.bench_table(record, title))
    console.print(tables.bench_note(record))


def deprecated_option(old: str, new: str) -> None:
    """Say once, on stderr, that the option or value ``old`` is deprecated in favour of ``new`` (it still works)."""
    from ...core._util import WARNED, warn_deprecated

    if old not in WARNED:
        click.echo(f"Warning: {old} is deprecated: use {new} (the same MAC reduction; 'speedup' now means "
                   "measured time only)", err=True)
    warn_deprecated(old, new)


def mac_option(old: Optional[float], new: Optional[float], old_flag: str, new_flag: str) -> Optional[float]:
    """The value of ``new_flag``, or of its deprecated name ``old_flag`` (said once); both: UsageError."""
    if old is None:
        return new
    if new is not None:
        raise click.UsageError(f"give {new_flag} only ({old_flag} is its deprecated name)")
    deprecated_option(old_flag, new_flag)
    return old
