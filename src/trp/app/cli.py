"""The ``trp`` command line: train, decompose, finetune, evaluate, export, sweep, table, demo, bench, profile.

Importing this module imports no torch: the library is loaded by the commands that use it,
so ``trp --help`` and ``trp --version`` answer at once.

The command line holds argument parsing and printing only: the commands live in
:mod:`trp.app.commands` (one module per family, their options beside them), config precedence is
:func:`trp.app.config.train_config`, the train -> decompose -> fine-tune chain
:func:`trp.app.workflow.decompose_run`, the tables :mod:`trp.app.tables`. This module is the
``trp`` group, where every command's refusals become one ``Error:`` line (:class:`_Commands`).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .commands.common import SCHEMES
from .commands.decompose import decompose_cmd, finetune_cmd, run_decompositions
from .commands.deploy import bench_cmd, demo, evaluate_cmd, export_cmd, profile_cmd
from .commands.results import sweep_cmd, table_cmd
from .commands.train import train
from .config import METHODS, OPTIMIZERS

__all__ = ["main", "run_decompositions", "SCHEMES", "METHODS", "OPTIMIZERS"]


def _fail(err: BaseException) -> None:
    """Exit with a one-line ``Error: ...``: the message of a refusal, or the file and fix of a failed write."""
    from ..errors import Error, is_write_failure, one_line, write_error

    if isinstance(err, Error):
        pass  # already one line naming the problem and the fix
    elif isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        err = write_error(err)
    elif isinstance(err, RuntimeError) and is_write_failure(err):
        err = write_error(err)
    elif isinstance(err, RecursionError):
        err = ValueError("an input is nested too deeply to read (a corrupt or crafted file)")
    elif isinstance(err, MemoryError):
        err = ValueError("out of memory: an input declares more than this machine holds; check the file "
                         "and the sizes given")
    elif isinstance(err, (OverflowError, ArithmeticError)) and not isinstance(err, FloatingPointError):
        err = ValueError(f"a number is out of range ({one_line(err)}): give a smaller value")
    raise click.ClickException(one_line(err)) from err


# What the command line turns into one line instead of a traceback: trp.Error and every ValueError-class
# refusal, the OS's own failures (full disk, read-only, permissions, a directory in the way), missing
# optional packages, and a failure inside torch (its message names the cause).
_REFUSALS = (ValueError, OSError, RuntimeError, ArithmeticError, ImportError, MemoryError)


class _Commands(click.Group):
    """The ``trp`` group: every command's refusals and failed writes become one ``Error:`` line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except _REFUSALS as err:
            _fail(err)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trp")
def main() -> None:
    """Low-rank training (Trained Rank Pruning) and decomposition of PyTorch models."""


for _command in (train, decompose_cmd, finetune_cmd, sweep_cmd, table_cmd, evaluate_cmd, export_cmd, demo, bench_cmd,
                 profile_cmd):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
