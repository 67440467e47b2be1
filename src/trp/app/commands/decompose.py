"""``trp decompose`` and ``trp finetune``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from ..config import DecomposeStep, command_steps, parse_layers, parse_patterns
from ..factory import factory_options
from .common import (EXCLUDE_HELP, LAYERS_HELP, SCHEMES, _decomposing, _epoch_line, _print_bench, _print_result, console,
                     deprecated_option, mac_option, progress_bars, workflow)

# The deprecated criterion kinds, as trp.core.criteria.OLD_KINDS (not imported here: --help needs no torch).
OLD_KINDS = {"speedup": "macs", "global-speedup": "global-macs"}


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
    from ..bench import bench_decomposition

    _print_bench(bench_decomposition(source, result, device), "measured speedup of the split model")


@click.command(name="decompose")
@factory_options
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=None, help="[default: the run's scheme, else channel]")
@click.option("--criterion", default=None, help="Per layer: energy:E, value:T, ratio:P, rank:K; whole model: "
              "macs:X (a MAC reduction), global:P, global-macs:X, latency:X[:RUNTIME[:BATCH]] "
              "(measured time, see `trp profile`) [default: the run config's decompose entries, else its target, "
              "else value:0.05].")
@click.option("--target-macs", type=float, default=None,
              help="Same as --criterion macs:X: a whole-model MAC reduction of X (not measured time).")
@click.option("--target-speedup", type=float, default=None, hidden=True, help="Deprecated name of --target-macs.")
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
def decompose_cmd(source: Path, scheme: Optional[str], criterion: Optional[str], target_macs: Optional[float],
                  target_speedup: Optional[float], finetune: int, finetune_lr: float, recalibrate_bn: int, calibrate: int,
                  out: Optional[Path],
                  data_dir: Optional[str], no_eval: bool,
                  layers: Optional[str], exclude: Optional[str], device: str, bench: bool,
                  no_progress: bool) -> None:
    """Split a trained model's layers into thin layers and report what it bought."""
    target_macs = mac_option(target_speedup, target_macs, "--target-speedup", "--target-macs")
    if criterion and target_macs:
        raise ValueError("give either --criterion or --target-macs, not both")
    if target_macs is not None:
        criterion = f"macs:{target_macs:g}"
    kind = (criterion or "").partition(":")[0].strip().lower()
    if kind in OLD_KINDS:
        deprecated_option(f"--criterion {kind}:X", f"--criterion {OLD_KINDS[kind]}:X")
    steps = command_steps(source, scheme, criterion, finetune, finetune_lr, recalibrate_bn, calibrate)
    run_decompositions(source, steps, out, data_dir, not no_eval, device, no_progress, parse_layers(layers),
                       parse_patterns(exclude) if exclude is not None else None, bench)


@click.command(name="finetune")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--epochs", type=int, required=True, help="Fine-tuning epochs.")
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory [default: finetune-<file stem> beside it].")
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

