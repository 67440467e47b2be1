"""The ``trp`` command line: train, decompose, evaluate, demo."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from . import engine
from .counting import count_macs, count_params
from .criteria import parse_criterion
from .decompose import Decomposition, decompose_with_report
from .io import save
from .report import CompressionSummary, summarize
from .schemes import SCHEMES

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


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err)) from err


def _epoch_line(row: dict[str, Any]) -> None:
    rank = f"  mean rank {row['mean_rank']:.1f}" if "mean_rank" in row else ""
    console.print(
        f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}  "
        f"train {row['train_top1']:.2f}%  test {row['test_top1']:.2f}%  "
        f"{row['epoch_seconds']:.1f}s (TRP {row['trp_seconds']:.2f}s){rank}"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trp")
def main() -> None:
    """Low-rank training (Trained Rank Pruning) and decomposition of PyTorch models."""


# --------------------------------------------------------------------------- train
@main.command()
@click.option("--model", default="resnet20", show_default=True, help="Model name from the registry.")
@click.option("--data", default="mnist5k", show_default=True, help="mnist5k, cifar10 or cifar100.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Local CIFAR folder (required for CIFAR).")
@click.option("--method", type=click.Choice(engine.METHODS), default="trp", show_default=True)
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default="channel", show_default=True)
@click.option("--epochs", type=int, default=164, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--milestones", default=None, help="Comma-separated epochs where lr is divided by 10 "
              "[default: 81/164 and 122/164 of --epochs].")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--energy", type=float, default=0.9, show_default=True, help="TRP projection energy e.")
@click.option("--period", type=int, default=20, show_default=True, help="Project every PERIOD iterations.")
@click.option("--nuclear-weight", type=float, default=3e-4, show_default=True, help="λ of the nuclear norm (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), help="Start from this dense model file "
              "(e.g. a baseline run's model.safetensors) instead of random weights.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [default: runs/MODEL-DATA-METHOD-SCHEME].")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), help="Continue this run directory from its last checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(resume: Optional[str], out: Optional[str], no_progress: bool, milestones: Optional[str], **opts: Any) -> None:
    """Train a model (baseline, nuclear-norm only, or TRP) and write a run directory."""
    try:
        if resume:
            run_dir = Path(resume)
            config = engine.load_config(run_dir)
        else:
            ms = [int(m) for m in milestones.split(",") if m.strip()] if milestones else None
            config = engine.TrainConfig(milestones=ms, **opts)
            config.validate()
            run_dir = Path(out or f"runs/{config.model}-{config.data}-{config.method}-{config.scheme}")
            if (run_dir / "checkpoint.pt").exists():
                raise click.ClickException(
                    f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another --out"
                )
        with progress_bars(not no_progress) as bars:
            trainer = engine.Trainer(config, run_dir, bars)
            if resume:
                trainer.resume()
                console.print(f"resuming {run_dir} after epoch {trainer.epoch}")
            trainer.run(on_epoch=_epoch_line)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)
    table = Table(title=f"run {run_dir}")
    for col in ("method", "scheme", "test top-1", "MACs", "params", "train time", "TRP time"):
        table.add_column(col)
    last = trainer.last_row
    table.add_row(
        config.method, config.scheme if config.method != "baseline" else "-",
        f"{last['test_top1']:.2f}%", f"{count_macs(trainer.model, trainer.spec.input_shape) / 1e6:.2f}M",
        f"{count_params(trainer.model):,}", f"{trainer.train_seconds:.1f}s",
        f"{trainer.trp_seconds:.1f}s ({100 * trainer.trp_seconds / max(trainer.train_seconds, 1e-9):.1f}%)",
    )
    console.print(table)
    console.print(f"model: {trainer.model_path}")


# ----------------------------------------------------------------------- decompose
def _load_source(source: Path, device: torch.device) -> tuple[nn.Module, engine.ModelSpec, Optional[engine.TrainConfig]]:
    """A trained model from a run directory, its checkpoint.pt, or a model file."""
    config = None
    if source.is_dir():
        config = engine.load_config(source)
        source = source / "model.safetensors" if (source / "model.safetensors").exists() else source / "checkpoint.pt"
    if source.suffix == ".pt":
        config = config or engine.load_config(source.parent)
        spec = engine.ModelSpec.from_info(config.model, engine.DATASET_INFO[config.data])
        model = spec.build().to(device)
        model.load_state_dict(engine.read_checkpoint(source, device)["model"])
        return model, spec, config
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a run directory or a model file")
    model, spec = engine.load_model_file(source, device)
    if config is None and (source.parent / "config.json").exists():
        config = engine.load_config(source.parent)
    return model, spec, config


def _test_loader(spec: engine.ModelSpec, data_dir: Optional[str], seed: int, batch_size: int):
    from .data import get_datasets

    _, test_set, _ = get_datasets(spec.data, data_dir, seed=seed)
    return engine.make_loader(test_set, batch_size, False)


def _summary_table(summary: CompressionSummary, before: Optional[float], after: Optional[float]) -> Table:
    table = Table(title="decomposition")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("conv MACs", f"{summary.conv_macs_before:,}", f"{summary.conv_macs_after:,}", f"{summary.conv_speedup:.2f}x")
    table.add_row("all MACs", f"{summary.macs_before:,}", f"{summary.macs_after:,}", f"{summary.speedup:.2f}x")
    table.add_row("params", f"{summary.params_before:,}", f"{summary.params_after:,}", f"{summary.param_ratio:.2f}x")
    if before is not None and after is not None:
        table.add_row("top-1", f"{before:.2f}%", f"{after:.2f}%", f"{after - before:+.2f} pt")
    return table


def _layer_table(report: Decomposition) -> Table:
    table = Table(title="layers")
    for col in ("layer", "scheme", "rank", "MACs before", "MACs after", "status"):
        table.add_column(col, justify="right" if col.startswith(("rank", "MACs")) else "left")
    for r in report.layers:
        rank = f"{r.rank}/{r.max_rank}" if r.rank is not None else "-"
        table.add_row(
            r.name, r.scheme, rank,
            f"{r.macs_before:,}" if r.macs_before is not None else "-",
            f"{r.macs_after:,}" if r.macs_after is not None else "-",
            r.status + (f" ({r.reason})" if r.reason else ""),
        )
    return table


@main.command(name="decompose")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=None, help="[default: the run's scheme, else channel]")
@click.option("--criterion", default="value:0.05", show_default=True, help="energy:E, value:T, ratio:P or rank:K.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file [default: next to SOURCE].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder for the accuracy check (CIFAR).")
@click.option("--no-eval", is_flag=True, help="Skip the top-1 check on the test split.")
@click.option("--device", default="auto", show_default=True)
def decompose_cmd(source: Path, scheme: Optional[str], criterion: str, out: Optional[Path],
                  data_dir: Optional[str], no_eval: bool, device: str) -> None:
    """Split a trained model's layers into thin layers and report what it bought."""
    try:
        dev = engine.resolve_device(device)
        crit = parse_criterion(criterion)
        model, spec, config = _load_source(source, dev)
        scheme = scheme or (config.scheme if config else "channel")
        report = decompose_with_report(model, scheme, crit, input_shape=spec.input_shape)
        summary = summarize(model, report.model, spec.input_shape)
        before = after = None
        if not no_eval:
            loader = _test_loader(spec, data_dir or (config.data_dir if config else None), config.seed if config else 0, 512)
            before = engine.evaluate(model, loader, dev)["top1"]
            after = engine.evaluate(report.model, loader, dev)["top1"]
        if out is None:
            base = source if source.is_dir() else source.parent
            out = base / f"decomposed-{scheme}-{criterion.replace(':', '')}.safetensors"
        meta = {**spec.metadata(), "scheme": scheme, "criterion": crit.spec()}
        save(report.model, out, metadata=meta)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    console.print(_layer_table(report))
    console.print(_summary_table(summary, before, after))
    console.print(f"compact model: {out}")


# ------------------------------------------------------------------------ evaluate
@main.command(name="evaluate")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder (CIFAR).")
@click.option("--seed", type=int, default=None, help="Split seed (MNIST-5k) [default: the run's seed, else 0].")
@click.option("--device", default="auto", show_default=True)
def evaluate_cmd(path: Path, data_dir: Optional[str], seed: Optional[int], device: str) -> None:
    """Evaluate a saved (compact) model on its data set's test split."""
    try:
        dev = engine.resolve_device(device)
        model, spec, config = _load_source(path, dev)
        if seed is None:
            seed = config.seed if config else 0
        loader = _test_loader(spec, data_dir or (config.data_dir if config else None), seed, 512)
        start = time.perf_counter()
        metrics = engine.evaluate(model, loader, dev)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    table = Table(title=str(path))
    for col in ("top-1", "top-5", "loss", "MACs", "conv MACs", "params", "eval time"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{metrics['top1']:.2f}%", f"{metrics['top5']:.2f}%", f"{metrics['loss']:.4f}",
        f"{count_macs(model, spec.input_shape):,}", f"{count_macs(model, spec.input_shape, convs_only=True):,}",
        f"{count_params(model):,}", f"{seconds:.2f}s",
    )
    console.print(table)


# ---------------------------------------------------------------------------- demo
@main.command()
@click.option("--epochs", type=int, default=None, help="Epochs per model [default: the demo's setting].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(epochs: Optional[int], out: Path, seed: int, no_progress: bool) -> None:
    """Train a ResNet-20 baseline and a TRP+Nu model on MNIST-5k, decompose both, compare."""
    from .demo import run_demo

    try:
        with progress_bars(not no_progress) as bars:
            run_demo(out, epochs=epochs, seed=seed, progress=bars, log=console.print, on_epoch=_epoch_line)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
