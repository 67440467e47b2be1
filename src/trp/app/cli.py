"""The ``trp`` command line: train, decompose, evaluate, export, sweep, table, demo.

Importing this module imports no torch: the library is loaded by the commands that use it,
so ``trp --help`` and ``trp --version`` answer at once.

This module holds argument parsing and printing only: config precedence is
:func:`trp.app.config.train_config`, the train -> decompose -> fine-tune chain
:func:`trp.app.workflow.decompose_run`, the tables :mod:`trp.app.tables`, and every command's
refusals become one ``Error:`` line in one place (:class:`_Commands`). Why it is long (~650 lines):
most of it is the click option declarations of its eleven commands, kept here so each option sits
with its command.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
import warnings
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..methods.trp_config import DEFAULTS as TRP_DEFAULTS
from .factory import factory_options
from .config import (MAX_BATCH, METHODS, OPTIMIZERS, PRECISIONS, DecomposeStep, parse_layers, parse_milestones,
                     parse_patterns, resume_config, train_config)

if TYPE_CHECKING:
    from ..core.decompose import Decomposition
    from .report import CompressionSummary


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
    from ..core.counting import count_macs as count

    return count(*args, **kwargs)


def count_params(*args: Any, **kwargs: Any) -> int:
    from ..core.counting import count_params as count

    return count(*args, **kwargs)


def atomic_write(path: Path):
    from ..deploy.io import atomic_write as write

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


def _epoch_line(row: dict[str, Any]) -> None:
    console.print(tables.epoch_line(row))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trp")
def main() -> None:
    """Low-rank training (Trained Rank Pruning) and decomposition of PyTorch models."""


# --------------------------------------------------------------------------- train
@main.command()
@click.option("--model", default="resnet20", show_default=True, help="Model name from the registry.")
@click.option("--data", default="mnist5k", show_default=True, help="mnist5k, fashion-mnist, cifar10, cifar100 or imagenet.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Local data folder (required for CIFAR and ImageNet; "
              "Fashion-MNIST defaults to the Debian package's folder).")
@click.option("--hflip", is_flag=True, help="Fashion-MNIST: also flip training images horizontally.")
@click.option("--method", type=click.Choice(METHODS), default="trp", show_default=True)
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=TRP_DEFAULTS.scheme, show_default=True)
@click.option("--epochs", type=int, default=164, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--milestones", default=None, help="Comma-separated epochs where lr is divided by 10 "
              "[default: 81/164 and 122/164 of --epochs].")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=None, help="[default: 1e-4; 1e-3 for lorita]")
@click.option("--energy", type=float, default=TRP_DEFAULTS.energy, show_default=True, help="TRP projection energy e.")
@click.option("--period", type=int, default=TRP_DEFAULTS.period, show_default=True, help="Project every PERIOD iterations.")
@click.option("--nuclear-weight", type=float, default=TRP_DEFAULTS.nuclear_weight, show_default=True, help="λ of the nuclear norm (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--factor", type=int, default=2, show_default=True, help="lorita: linear maps per layer (N).")
@click.option("--target-speedup", type=float, default=None, help="TRP: project toward this whole-model MAC "
              "reduction (ranks from TargetSpeedup at every projection; the run splits with it).")
@click.option("--target-latency", type=float, default=None, help="TRP: project toward this measured latency "
              "reduction (trp.TargetLatency).")
@click.option("--target-warmup", type=int, default=0, show_default=True, help="TRP with a target: energy-driven "
              "projections for the first N epochs, then the target's.")
@click.option("--holdout", type=int, default=0, show_default=True, help="Keep the last N training examples out of "
              "training (scores `trp decompose --criterion search:X`).")
@click.option("--image-size", type=int, default=None, help="ImageNet crop size [default: 224].")
@click.option("--verify-images", is_flag=True, default=False, help="Image folders: decode every image once before "
              "training; corrupt ones fail the run with one error listing them all.")
@click.option("--skip-corrupt", is_flag=True, default=False, help="Image folders: decode every image once and leave "
              "the corrupt ones out (listed in RUN/skipped_images.txt); train on the rest.")
@click.option("--steps-per-epoch", type=int, default=None, help="Stop each epoch after this many batches "
              "(smoke runs) [default: the whole training set].")
@click.option("--layers", default=None, help=LAYERS_HELP)
@click.option("--exclude", default=None, help=EXCLUDE_HELP)
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), help="Start from this model file "
              "(e.g. a baseline run's model.safetensors; a decomposed one with --method finetune).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Local pretrained weights "
              "(.pth or .safetensors state_dict, e.g. torchvision's); nothing is downloaded.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML config (see configs/); options given on the command line override it.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [default: runs/MODEL-DATA-METHOD-SCHEME].")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), help="Continue this run directory from its last checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes to train on (data parallel): launches torchrun; or run `torchrun --nproc_per_node N "
                   "-m trp train ...` yourself. --batch-size stays the global batch.")
@click.option("--sync-bn", is_flag=True, help="With several processes: SyncBatchNorm (CUDA only).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Autocast precision; fp16 uses a GradScaler.")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True,
              help="Train in the channels_last memory format (with --precision bf16 the fastest CPU setting "
                   "measured; see the README's training section).")
def train(resume: Optional[str], out: Optional[str], no_progress: bool, milestones: Optional[str],
          config_file: Optional[Path], nproc: int, **opts: Any) -> None:
    """Train a model (baseline, nuclear-norm only, TRP, LoRITa, fine-tune) and write a run directory.

    With --config, the file's settings replace the defaults and options given on the
    command line replace the file's; a config's `decompose` entries run after training.
    """
    ctx = click.get_current_context()
    if distributed.launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if ctx.get_parameter_source("nproc") == click.core.ParameterSource.COMMANDLINE and nproc != world:
            raise click.ClickException(f"--nproc {nproc} under torchrun with {world} processes: leave out --nproc")
        if int(os.environ["RANK"]) != 0:
            warnings.simplefilter("ignore")  # rank 0 says it once
    elif nproc > 1:
        command = distributed.torchrun_command(nproc, ["train", *_given_options(ctx, skip={"nproc"})])
        sys.exit(subprocess.run(command).returncode)
    try:
        opts["milestones"] = parse_milestones(milestones) if milestones else None
        if resume:
            run_dir = Path(resume)
            config = _resume_config(ctx, run_dir, opts, out, config_file)
        else:
            config = train_config(config_file, opts, _given(ctx, opts))
            default_name = (f"{config_file.parent.name}/{config_file.stem}" if config_file
                            else f"{config.model}-{config.data}-{config.method}-{config.scheme}")
            run_dir = Path(out or f"runs/{default_name}")
            if (run_dir / "checkpoint.pt").exists():
                raise click.ClickException(
                    f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another --out"
                )
        with progress_bars(not no_progress and _is_main()) as bars:
            trainer = engine.Trainer(config, run_dir, bars)
            if trainer.skipped_images and trainer.env.is_main:
                console.print(f"skipped {len(trainer.skipped_images)} corrupt image(s) (--skip-corrupt); listed in "
                              f"{run_dir / engine.SKIPPED_IMAGES}", markup=False, highlight=False)
            if resume:
                trainer.resume()
                if trainer.env.is_main:
                    console.print(f"resuming {run_dir} after epoch {trainer.epoch}")
            trainer.run(on_epoch=_epoch_line)
    finally:
        if distributed.launched_by_torchrun():
            distributed.shutdown()
    if not trainer.env.is_main:
        return
    final = trainer.final_model()
    console.print(tables.run_table(run_dir, config, trainer, count_macs(final, trainer.spec.input_shape),
                                   count_params(final)))
    console.print(f"model: {trainer.model_path}")
    # the config's decompose steps (a run toward a target: its split), as engine.train runs them
    with progress_bars(not no_progress) as bars:
        for result in workflow.decompose_run(run_dir, config, progress=bars, on_epoch=_epoch_line,
                                             on_step=lambda step: _decomposing(run_dir, step)):
            _print_result(result)


def _resume_config(ctx: click.Context, run_dir: Path, opts: dict[str, Any], out: Optional[str],
                   config_file: Optional[Path]) -> "engine.TrainConfig":
    """The saved run's config; options given with --resume are checked against it."""
    if config_file is not None:
        raise ValueError("--resume continues a run with its saved config.json: drop --config")
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise ValueError(f"--resume {run_dir} writes to that run directory: drop --out {out}")
    given = {name: opts[name] for name in _given(ctx, opts)}
    return resume_config(engine.load_config(run_dir), given)


def _given(ctx: click.Context, opts: dict[str, Any]) -> set[str]:
    """The options typed on the command line (or set through the environment), not left at their defaults."""
    return {name for name in opts if ctx.get_parameter_source(name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}


def _is_main() -> bool:
    return not distributed.launched_by_torchrun() or int(os.environ["RANK"]) == 0


def _given_options(ctx: click.Context, skip: set[str]) -> list[str]:
    """The options given on the command line, as arguments again (for relaunching under torchrun)."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        if name in skip or ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            if value:
                args.append(flag)
        else:
            args += [flag, str(value)]
    return args


# ----------------------------------------------------------------------- decompose
def _print_result(result: workflow.DecomposeResult) -> None:
    for item in tables.result_lines(result):
        console.print(item)


def _decomposing(source: Path, step: DecomposeStep) -> None:
    console.print(f"decomposing {source}: {step.scheme}, {step.criterion}"
                  + (f", then {step.finetune} fine-tune epoch(s)" if step.finetune else ""))


def run_decompositions(source: Path, steps: list[DecomposeStep], out: Optional[Path], data_dir: Optional[str],
                       evaluate: bool, device: str, no_progress: bool = False, layers: Any = None,
                       exclude: Optional[list[str]] = None,
                       bench: bool = False) -> None:
    """Run each decomposition step on ``source`` and print its tables (and measured speedups with ``bench``)."""
    if out is not None and len(steps) > 1:
        raise ValueError("--out names one file, but several decompositions were requested")
    for step in steps:
        _decomposing(source, step)
        with progress_bars(not no_progress) as bars:
            result = workflow.decompose_source(source, step, out=out, data_dir=data_dir, evaluate=evaluate,
                                               device=device, progress=bars, on_epoch=_epoch_line,
                                               layers=layers, exclude=exclude)
        _print_result(result)
        if bench:
            _bench_result(source, result, device)


def _bench_result(source: Path, result: workflow.DecomposeResult, device: str) -> None:
    """Time the split model against the dense one (eager and ONNX Runtime, batch 1 and 64); add it to the summary."""
    from .bench import bench_decomposition

    _print_bench(bench_decomposition(source, result, device), "measured speedup of the split model")


def _print_bench(record: dict[str, Any], title: str) -> None:
    console.print(tables.bench_table(record, title))
    console.print(tables.bench_note(record))


@main.command(name="decompose")
@factory_options
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=None, help="[default: the run's scheme, else channel]")
@click.option("--criterion", default=None, help="Per layer: energy:E, value:T, ratio:P, rank:K; whole model: "
              "speedup:X, global:P, global-speedup:X (speedup = MAC reduction), latency:X[:RUNTIME[:BATCH]] "
              "(measured time, see `trp profile`) [default: the run config's decompose entries, else its target, else value:0.05].")
@click.option("--target-speedup", type=float, default=None, help="Same as --criterion speedup:X: a whole-model MAC reduction of X (not measured time).")
@click.option("--finetune", type=int, default=0, show_default=True, help="Fine-tune the compact model for this many epochs.")
@click.option("--finetune-lr", type=float, default=0.01, show_default=True)
@click.option("--recalibrate-bn", type=int, default=0, show_default=True,
              help="Re-estimate BatchNorm statistics on this many training batches after the split (no training).")
@click.option("--calibrate", type=int, default=0, show_default=True,
              help="Calibrated (data-aware) split from this many training images of the run's data set "
                   "(0: plain SVD); the fidelity to the dense model on further held-out images is printed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file [default: next to SOURCE].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder for the accuracy check (CIFAR, ImageNet).")
@click.option("--no-eval", is_flag=True, help="Skip the top-1 check on the test split.")
@click.option("--layers", default=None, help=LAYERS_HELP + " [default: the run's selection]")
@click.option("--exclude", default=None, help=EXCLUDE_HELP + " [default: the run's]")
@click.option("--device", default="auto", show_default=True)
@click.option("--bench/--no-bench", default=False, show_default=True,
              help="Also measure the split model's speedup (eager and ONNX Runtime, batch 1 and 64; takes a while).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def decompose_cmd(source: Path, scheme: Optional[str], criterion: Optional[str], target_speedup: Optional[float],
                  finetune: int, finetune_lr: float, recalibrate_bn: int, calibrate: int, out: Optional[Path],
                  data_dir: Optional[str], no_eval: bool,
                  layers: Optional[str], exclude: Optional[str], device: str, bench: bool,
                  no_progress: bool) -> None:
    """Split a trained model's layers into thin layers and report what it bought."""
    if criterion and target_speedup:
        raise ValueError("give either --criterion or --target-speedup, not both")
    if target_speedup is not None:
        criterion = f"speedup:{target_speedup:g}"
    config = engine.load_config(source) if Path(source).is_dir() else None
    default_scheme = scheme or (config.scheme if config else "channel")
    if (criterion is None and config is not None and config.decompose and scheme is None and not finetune
            and not recalibrate_bn and not calibrate):
        steps = [DecomposeStep.from_dict(d, default_scheme) for d in config.decompose]
    else:
        default = config.default_criterion() if config else "value:0.05"
        steps = [DecomposeStep(default_scheme, criterion or default, finetune, finetune_lr,
                                        recalibrate_bn, calibrate)]
    run_decompositions(source, steps, out, data_dir, not no_eval, device, no_progress, parse_layers(layers),
                       parse_patterns(exclude) if exclude is not None else None, bench)


@main.command(name="finetune")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--epochs", type=int, required=True, help="Fine-tuning epochs.")
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory [default: finetune-<file stem> beside it].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder (CIFAR, ImageNet).")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def finetune_cmd(model_file: Path, epochs: int, lr: float, out: Optional[Path], data_dir: Optional[str],
                 device: str, no_progress: bool) -> None:
    """Fine-tune a (decomposed) model file with plain SGD; writes a run directory."""
    _, spec, config = workflow.load_source(model_file, "cpu")
    out = out or model_file.parent / f"finetune-{model_file.stem}"
    with progress_bars(not no_progress) as bars:
        trainer = workflow.finetune_model(model_file, out, epochs, lr, config, spec,
                                          data_dir or (config.data_dir if config else None), device, bars, _epoch_line)
    console.print(f"fine-tuned model: {trainer.model_path}  (top-1 {trainer.last_row['test_top1']:.2f}%)")


# --------------------------------------------------------------------- sweep, table
SPEEDUP_GRID = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


def _sweep_criteria(kind: str, points: int) -> list[Any]:
    from ..core.allocation import Global, TargetSpeedup
    from .sweep import default_criteria

    if kind == "speedup":
        return [TargetSpeedup(x) for x in SPEEDUP_GRID]
    if kind == "global":
        return [Global(speedup=x) for x in SPEEDUP_GRID]
    return default_criteria(kind, points)


def _run_label(run_dir: Path) -> str:
    from .results import method_label

    return method_label(dataclasses.asdict(engine.load_config(run_dir)))


@main.command(name="sweep")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=None, help="[default: each run's scheme]")
@click.option("--kind", type=click.Choice(["speedup", "global", "energy", "value", "ratio"]), default="speedup",
              show_default=True, help="speedup/global: whole-model criteria at 1.5x..6x MAC reduction; else a grid of that criterion.")
@click.option("--points", type=int, default=8, show_default=True, help="Grid size for energy/value/ratio.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Save a MAC-reduction-vs-top-1 PNG of all runs here.")
@click.option("--title", default="", help="Plot title.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder (CIFAR, ImageNet).")
@click.option("--layers", default=None, help=LAYERS_HELP + " [default: each run's selection]")
@click.option("--exclude", default=None, help=EXCLUDE_HELP + " [default: each run's]")
@click.option("--device", default="auto", show_default=True)
def sweep_cmd(run_dirs: tuple[Path, ...], scheme: Optional[str], kind: str, points: int, plot: Optional[Path],
              title: str, data_dir: Optional[str], layers: Optional[str], exclude: Optional[str], device: str) -> None:
    """Decompose each run under a range of criteria; save sweep-<scheme>-<kind>.json per run (and a plot)."""
    from .plot import plot_tradeoff
    from .sweep import save_sweep, sweep

    curves: dict[str, Any] = {}
    dev = engine.resolve_device(device)
    criteria = _sweep_criteria(kind, points)
    for run_dir in run_dirs:
        model, spec, config = workflow.load_source(run_dir, dev)
        sch = scheme or (config.scheme if config else "channel")
        loader = workflow.test_loader(spec, data_dir or (config.data_dir if config else None), config.seed if config else 0)
        label = f"{_run_label(run_dir)} ({sch})"
        console.print(f"sweeping {run_dir}: {label}, {len(criteria)} criteria")
        run_layers = parse_layers(layers) if layers is not None else (config.layers if config else None)
        run_exclude = parse_patterns(exclude) if exclude is not None else (config.exclude if config else [])
        pts = sweep(model, sch, criteria, loader, spec.input_shape, dev, layers=run_layers, exclude=run_exclude,
                    on_point=lambda p: console.print(f"  {p.criterion:>18}  MAC reduction {p.conv_mac_reduction:5.2f}x conv, "
                                                     f"{p.mac_reduction:5.2f}x all  top-1 {p.top1:6.2f}%"),
                    on_error=lambda c, e: console.print(f"  {c.spec():>18}  skipped: {e}"))
        if not pts:
            raise ValueError(f"no criterion of the sweep could be applied to {run_dir}")
        path = save_sweep(pts, run_dir / f"sweep-{sch}-{kind}.json",
                          meta={"source": str(run_dir), "label": label, "scheme": sch, "criterion_kind": kind})
        console.print(f"  saved {path}")
        curves[label] = pts
    if plot:
        plot_tradeoff(curves, plot, title=title)
        console.print(f"plot: {plot}")


@main.command(name="table")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write OUT.md and OUT.csv (a path without suffix).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also plot every sweep-*.json found in the runs.")
@click.option("--title", default="", help="Plot title.")
def table_cmd(run_dirs: tuple[Path, ...], out: Optional[Path], plot: Optional[Path], title: str) -> None:
    """Collect run directories into one comparison table, with the paper's numbers beside each row."""
    from .plot import plot_tradeoff
    from .results import collect, markdown_table, seed_table, tradeoff_notes, write_csv
    from .sweep import load_sweep

    rows = collect(run_dirs)
    text = markdown_table(rows)
    notes = tradeoff_notes(rows)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    for note in notes:
        console.print(f"- {note}", markup=False, highlight=False)
    seeds = seed_table(rows)
    if seeds:
        console.print("\nRows trained with several seeds:\n" + seeds, markup=False, highlight=False, soft_wrap=True)
    if out:
        md = out.with_suffix(".md")
        with atomic_write(md) as tmp:
            tmp.write_text(text + "\n\n" + "".join(f"- {n}\n" for n in notes)
                           + (f"\nRows trained with several seeds:\n\n{seeds}\n" if seeds else ""))
        write_csv(rows, out.with_suffix(".csv"))
        console.print(f"wrote {md} and {out.with_suffix('.csv')}")
    if plot:
        curves, markers = {}, {}
        for run_dir in run_dirs:
            for path in sorted(run_dir.glob("sweep-*.json")):
                meta, pts = load_sweep(path)
                curves[str(meta.get("label", path.stem)) + f" [{meta.get('criterion_kind', '')}]"] = pts
        for r in rows:
            if r.finetuned and r.top1 is not None and r.conv_mac_reduction:
                markers[f"{r.label}, fine-tuned"] = (r.conv_mac_reduction, r.top1)
        if not curves:
            raise ValueError("no sweep-*.json in these runs: run `trp sweep RUN_DIR...` first")
        plot_tradeoff(curves, plot, title=title, markers=markers)
        console.print(f"plot: {plot}")


# ------------------------------------------------------------------------ evaluate
@main.command(name="evaluate")
@factory_options
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder (CIFAR).")
@click.option("--seed", type=int, default=None, help="Split seed (MNIST-5k) [default: the run's seed, else 0].")
@click.option("--device", default="auto", show_default=True)
@click.option("--verify-images", is_flag=True, help="Image folders: decode every test image first; corrupt ones "
              "fail with one error listing them all.")
@click.option("--skip-corrupt", is_flag=True, help="Image folders: leave corrupt test images out (listed) and "
              "evaluate on the rest.")
def evaluate_cmd(path: Path, data_dir: Optional[str], seed: Optional[int], device: str, verify_images: bool,
                 skip_corrupt: bool) -> None:
    """Evaluate a saved (compact) model on its data set's test split."""
    dev = engine.resolve_device(device)
    model, spec, config = workflow.load_source(path, dev)
    engine.check_finite(model, str(path))
    if seed is None:
        seed = config.seed if config else 0
    loader = workflow.test_loader(spec, data_dir or (config.data_dir if config else None), seed, 512)
    if verify_images or skip_corrupt:
        with progress_bars(sys.stdout.isatty()) as bars:
            skipped = engine.screen_datasets([loader.dataset], skip_corrupt, bars)
        if skipped:
            console.print(tables.skipped_lines(skipped), markup=False, highlight=False)
    start = time.perf_counter()
    metrics = engine.evaluate(model, loader, dev)
    seconds = time.perf_counter() - start
    console.print(tables.evaluate_table(path, metrics, count_macs(model, spec.input_shape),
                                        count_macs(model, spec.input_shape, convs_only=True), count_params(model),
                                        seconds))


# -------------------------------------------------------------------------- export
@main.command(name="export")
@factory_options
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The ONNX file to write.")
@click.option("--batch", type=int, default=1, show_default=True,
              help="Batch size of the example input (the file takes any batch size unless --static-batch).")
@click.option("--static-batch", is_flag=True, help="Fix the batch size in the file to --batch.")
@click.option("--no-fold-batchnorm", is_flag=True, help="Keep BatchNorm layers instead of folding them into the layer before.")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: torch.onnx's].")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Largest relative error against PyTorch accepted; above it nothing is written.")
def export_cmd(path: Path, onnx_path: Path, batch: int, static_batch: bool, no_fold_batchnorm: bool,
               opset: Optional[int], tolerance: float) -> None:
    """Write a saved (compact) model as ONNX, checked against PyTorch in ONNX Runtime."""
    import torch

    from ..deploy.export import export_onnx

    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"--batch must be >= 1 and <= {MAX_BATCH}, got {batch}")
    model, spec, _ = workflow.load_source(path, "cpu")
    example = torch.randn(batch, *spec.input_shape[1:], generator=torch.Generator().manual_seed(0))
    result = export_onnx(model, onnx_path, example, fold_batchnorm=not no_fold_batchnorm,
                         dynamic_batch=not static_batch, opset=opset, tolerance=tolerance)
    console.print(f"wrote {result.path} (ONNX opset {result.opset}, input {spec.input_shape[1:]}, "
                  f"batch {'any' if result.dynamic_batch else batch}); {result.folded_batchnorms} BatchNorm folded"
                  + (f", {len(result.unfolded_batchnorms)} kept" if result.unfolded_batchnorms else ""))
    console.print(f"max error vs PyTorch: {result.max_abs_error:.3g} absolute, {result.max_rel_error:.3g} relative "
                  f"(tolerance {result.tolerance:g}; ONNX Runtime {', '.join(result.providers)}, "
                  f"batch {', '.join(map(str, result.checked_batch_sizes))})")


# ---------------------------------------------------------------------------- demo
@main.command()
@click.option("--epochs", type=int, default=None, help="Epochs per model [default: the demo's setting].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--bench/--no-bench", default=False, show_default=True,
              help="Also time the splits against the dense models and split the TRP model for a measured 2x "
                   "(ONNX Runtime, batch 64).")
def demo(epochs: Optional[int], out: Path, seed: int, no_progress: bool, bench: bool) -> None:
    """Train a ResNet-20 baseline and a TRP+Nu model on MNIST-5k, decompose both, compare."""
    from .demo import run_demo

    with progress_bars(not no_progress) as bars:
        run_demo(out, epochs=epochs, seed=seed, progress=bars, log=console.print, on_epoch=_epoch_line, bench=bench)


# ------------------------------------------------------------------ bench, profile
_RUNTIME_HELP = "Comma-separated runtimes: eager, compile, onnxruntime."


@main.command(name="bench")
@factory_options
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dense", type=click.Path(exists=True, path_type=Path), default=None,
              help="The dense model (file or run directory) [default: the source in the decomposition summary "
                   "beside PATH, else the architecture freshly built].")
@click.option("--runtime", "runtimes", default="eager,onnxruntime", show_default=True, help=_RUNTIME_HELP)
@click.option("--batch", "batches", default="1,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", type=int, default=None, help="Intra-op threads [default: the runtime's default].")
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed runs per model and setting.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="JSON file [default: bench-<stem>.json beside PATH].")
def bench_cmd(path: Path, dense: Optional[Path], runtimes: str, batches: str, threads: Optional[int], repeats: int,
              warmup: int, out: Optional[Path]) -> None:
    """Measure how much faster a split model file runs than its dense original (MAC reduction beside it)."""
    from .bench import bench_source, parse_list

    record, saved = bench_source(path, dense, out, runtimes=parse_list(runtimes, str, "--runtime"),
                                 batches=parse_list(batches, int, "--batch"), threads=threads, repeats=repeats,
                                 warmup=warmup)
    _print_bench(record, f"{path} against {record['dense']}")
    console.print(f"saved {saved}")


@main.command(name="profile")
@factory_options
@click.argument("source", type=click.Path(exists=True, allow_dash=True, path_type=Path))
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=None, help="[default: the run's scheme, else channel]")
@click.option("--runtime", type=click.Choice(["eager", "compile", "onnxruntime"]), default="onnxruntime", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="Intra-op threads [default: the runtime's default].")
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--no-cache", is_flag=True, help="Measure again instead of reading the cache ($TRP_CACHE_DIR or ~/.cache/trp).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file [default: latency-<scheme>-<runtime>-b<batch>.json beside SOURCE].")
def profile_cmd(source: Path, scheme: Optional[str], runtime: str, batch: int, threads: Optional[int], repeats: int,
                no_cache: bool, out: Optional[Path]) -> None:
    """Time each target layer of a model dense and split at a grid of ranks (the table TargetLatency uses)."""
    import torch

    from ..deploy.profile import profile_layers

    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"--batch must be >= 1 and <= {MAX_BATCH}, got {batch}")
    model, spec, config = workflow.load_source(source, "cpu")
    sch = scheme or (config.scheme if config else "channel")
    x = torch.randn((batch, *spec.input_shape[1:]), generator=torch.Generator().manual_seed(0))
    table = profile_layers(model, x, sch, runtime, threads=threads, repeats=repeats, cache=not no_cache)
    base = source if source.is_dir() else source.parent
    out = out or base / f"latency-{sch}-{runtime}-b{batch}.json"
    table.save(out)
    console.print(tables.profile_table(f"{source}: {sch} split, {runtime}, batch {batch}, {table.threads} threads",
                                       table.rows()))
    console.print(f"whole dense model: {1000 * table.model:.3f} ms ({table.device}); saved {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
