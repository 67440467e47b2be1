"""The ``trp`` command line: train, decompose, evaluate, demo."""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import engine, workflow
from ..core.counting import count_macs, count_params
from ..core.decompose import Decomposition
from ..deploy.io import atomic_write
from .config import DecomposeStep, parse_layers, parse_patterns
from .report import CompressionSummary
from ..core.schemes import SCHEMES

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


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err)) from err


def _epoch_line(row: dict[str, Any]) -> None:
    if row["epoch"] == 0:
        console.print(f"no training (epochs 0): test {row['test_top1']:.2f}% (top-5 {row['test_top5']:.2f}%)")
        return
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
@click.option("--optimizer", type=click.Choice(engine.OPTIMIZERS), default="sgd", show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--milestones", default=None, help="Comma-separated epochs where lr is divided by 10 "
              "[default: 81/164 and 122/164 of --epochs].")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=None, help="[default: 1e-4; 1e-3 for lorita]")
@click.option("--energy", type=float, default=0.9, show_default=True, help="TRP projection energy e.")
@click.option("--period", type=int, default=20, show_default=True, help="Project every PERIOD iterations.")
@click.option("--nuclear-weight", type=float, default=3e-4, show_default=True, help="λ of the nuclear norm (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--factor", type=int, default=2, show_default=True, help="lorita: linear maps per layer (N).")
@click.option("--holdout", type=int, default=0, show_default=True, help="Keep the last N training examples out of "
              "training (scores `trp decompose --criterion search:X`).")
@click.option("--image-size", type=int, default=None, help="ImageNet crop size [default: 224].")
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
def train(resume: Optional[str], out: Optional[str], no_progress: bool, milestones: Optional[str],
          config_file: Optional[Path], **opts: Any) -> None:
    """Train a model (baseline, nuclear-norm only, TRP, LoRITa, fine-tune) and write a run directory.

    With --config, the file's settings replace the defaults and options given on the
    command line replace the file's; a config's `decompose` entries run after training.
    """
    ctx = click.get_current_context()
    try:
        if resume:
            run_dir = Path(resume)
            config = engine.load_config(run_dir)
        else:
            opts["milestones"] = [int(m) for m in milestones.split(",") if m.strip()] if milestones else None
            settings = engine.read_config_file(config_file) if config_file else {}
            for name, value in opts.items():
                given = ctx.get_parameter_source(name) in (
                    click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
                if given or name not in settings:
                    settings[name] = value
            config = engine.TrainConfig.from_dict(settings)
            config.validate()
            default_name = (f"{config_file.parent.name}/{config_file.stem}" if config_file
                            else f"{config.model}-{config.data}-{config.method}-{config.scheme}")
            run_dir = Path(out or f"runs/{default_name}")
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
    final = trainer.final_model()
    table.add_row(
        config.method, config.scheme if config.method != "baseline" else "-",
        f"{last['test_top1']:.2f}%", f"{count_macs(final, trainer.spec.input_shape) / 1e6:.2f}M",
        f"{count_params(final):,}", f"{trainer.train_seconds:.1f}s",
        f"{trainer.trp_seconds:.1f}s ({100 * trainer.trp_seconds / max(trainer.train_seconds, 1e-9):.1f}%)",
    )
    console.print(table)
    console.print(f"model: {trainer.model_path}")
    if config.decompose:
        try:
            steps = [DecomposeStep.from_dict(d, config.scheme) for d in config.decompose]
            run_decompositions(run_dir, steps, None, config.data_dir, True, config.device, no_progress)
        except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as err:
            _fail(err)


# ----------------------------------------------------------------------- decompose
def _summary_table(summary: CompressionSummary, before: Optional[float], after: Optional[float]) -> Table:
    table = Table(title="decomposition")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("conv MACs", f"{summary.conv_macs_before:,}", f"{summary.conv_macs_after:,}", f"{summary.conv_speedup:.2f}x")
    table.add_row("all MACs", f"{summary.macs_before:,}", f"{summary.macs_after:,}", f"{summary.speedup:.2f}x")
    if summary.layer_macs_before is not None and summary.layer_macs_after is not None:
        table.add_row("  in layers trp can split", f"{summary.layer_macs_before:,}", f"{summary.layer_macs_after:,}", "")
        table.add_row("  everything else", f"{summary.macs_before - summary.layer_macs_before:,}",
                      f"{summary.macs_after - summary.layer_macs_after:,}", "")
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


def _print_result(result: workflow.DecomposeResult) -> None:
    rec = result.record
    before = rec["dense"]["top1"] if rec["dense"] else None
    after = rec["decomposed"]["top1"] if rec["decomposed"] else None
    console.print(_layer_table(result.report))
    console.print(_summary_table(result.summary, before, after))
    if rec.get("bn_recalibrated"):
        bn = rec["bn_recalibrated"]
        console.print(f"BatchNorm statistics re-estimated on {bn['batches']} training batches: top-1 {bn['top1']:.2f}% "
                      "(the saved compact model has them)")
    if rec["finetune"]:
        ft = rec["finetune"]
        console.print(f"fine-tuned {ft['epochs']} epoch(s) at lr {ft['lr']:g}: top-1 {ft['top1']:.2f}% ({ft['run_dir']})")
    console.print(f"compact model: {result.model_path}  summary: {result.summary_path}")


def run_decompositions(source: Path, steps: list[DecomposeStep], out: Optional[Path], data_dir: Optional[str],
                       evaluate: bool, device: str, no_progress: bool = False, layers: Any = None,
                       exclude: Optional[list[str]] = None) -> None:
    """Run each decomposition step on ``source`` and print its tables."""
    if out is not None and len(steps) > 1:
        raise ValueError("--out names one file, but several decompositions were requested")
    for step in steps:
        console.print(f"decomposing {source}: {step.scheme}, {step.criterion}"
                      + (f", then {step.finetune} fine-tune epoch(s)" if step.finetune else ""))
        with progress_bars(not no_progress) as bars:
            result = workflow.decompose_source(source, step, out=out, data_dir=data_dir, evaluate=evaluate,
                                               device=device, progress=bars, on_epoch=_epoch_line,
                                               layers=layers, exclude=exclude)
        _print_result(result)


@main.command(name="decompose")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=None, help="[default: the run's scheme, else channel]")
@click.option("--criterion", default=None, help="Per layer: energy:E, value:T, ratio:P, rank:K; whole model: "
              "speedup:X, global:P, global-speedup:X [default: the run config's decompose entries, else value:0.05].")
@click.option("--target-speedup", type=float, default=None, help="Same as --criterion speedup:X (whole-model MACs).")
@click.option("--finetune", type=int, default=0, show_default=True, help="Fine-tune the compact model for this many epochs.")
@click.option("--finetune-lr", type=float, default=0.01, show_default=True)
@click.option("--recalibrate-bn", type=int, default=0, show_default=True,
              help="Re-estimate BatchNorm statistics on this many training batches after the split (no training).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file [default: next to SOURCE].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder for the accuracy check (CIFAR, ImageNet).")
@click.option("--no-eval", is_flag=True, help="Skip the top-1 check on the test split.")
@click.option("--layers", default=None, help=LAYERS_HELP + " [default: the run's selection]")
@click.option("--exclude", default=None, help=EXCLUDE_HELP + " [default: the run's]")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def decompose_cmd(source: Path, scheme: Optional[str], criterion: Optional[str], target_speedup: Optional[float],
                  finetune: int, finetune_lr: float, recalibrate_bn: int, out: Optional[Path], data_dir: Optional[str], no_eval: bool,
                  layers: Optional[str], exclude: Optional[str], device: str, no_progress: bool) -> None:
    """Split a trained model's layers into thin layers and report what it bought."""
    try:
        if criterion and target_speedup:
            raise ValueError("give either --criterion or --target-speedup, not both")
        if target_speedup is not None:
            criterion = f"speedup:{target_speedup:g}"
        config = engine.load_config(source) if Path(source).is_dir() else None
        default_scheme = scheme or (config.scheme if config else "channel")
        if (criterion is None and config is not None and config.decompose and scheme is None and not finetune
                and not recalibrate_bn):
            steps = [DecomposeStep.from_dict(d, default_scheme) for d in config.decompose]
        else:
            steps = [DecomposeStep(default_scheme, criterion or "value:0.05", finetune, finetune_lr,
                                            recalibrate_bn)]
        for step in steps:
            step.validate()
        run_decompositions(source, steps, out, data_dir, not no_eval, device, no_progress, parse_layers(layers),
                           parse_patterns(exclude) if exclude is not None else None)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as err:
        _fail(err)


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
    try:
        _, spec, config = workflow.load_source(model_file, "cpu")
        out = out or model_file.parent / f"finetune-{model_file.stem}"
        with progress_bars(not no_progress) as bars:
            trainer = workflow.finetune_model(model_file, out, epochs, lr, config, spec,
                                              data_dir or (config.data_dir if config else None), device, bars, _epoch_line)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as err:
        _fail(err)
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
              show_default=True, help="speedup/global: whole-model criteria at 1.5x..6x MACs; else a grid of that criterion.")
@click.option("--points", type=int, default=8, show_default=True, help="Grid size for energy/value/ratio.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Save a speedup-vs-top-1 PNG of all runs here.")
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
    try:
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
                        on_point=lambda p: console.print(f"  {p.criterion:>18}  {p.conv_speedup:5.2f}x conv  "
                                                         f"{p.speedup:5.2f}x all  top-1 {p.top1:6.2f}%"),
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
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)


@main.command(name="table")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write OUT.md and OUT.csv (a path without suffix).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also plot every sweep-*.json found in the runs.")
@click.option("--title", default="", help="Plot title.")
def table_cmd(run_dirs: tuple[Path, ...], out: Optional[Path], plot: Optional[Path], title: str) -> None:
    """Collect run directories into one comparison table, with the paper's numbers beside each row."""
    from .plot import plot_tradeoff
    from .results import collect, markdown_table, tradeoff_notes, write_csv
    from .sweep import load_sweep

    try:
        rows = collect(run_dirs)
        text = markdown_table(rows)
        notes = tradeoff_notes(rows)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        for note in notes:
            console.print(f"- {note}", markup=False, highlight=False)
        if out:
            md = out.with_suffix(".md")
            with atomic_write(md) as tmp:
                tmp.write_text(text + "\n\n" + "".join(f"- {n}\n" for n in notes))
            write_csv(rows, out.with_suffix(".csv"))
            console.print(f"wrote {md} and {out.with_suffix('.csv')}")
        if plot:
            curves, markers = {}, {}
            for run_dir in run_dirs:
                for path in sorted(run_dir.glob("sweep-*.json")):
                    meta, pts = load_sweep(path)
                    curves[str(meta.get("label", path.stem)) + f" [{meta.get('criterion_kind', '')}]"] = pts
            for r in rows:
                if r.finetuned and r.top1 is not None and r.conv_speedup:
                    markers[f"{r.label}, fine-tuned"] = (r.conv_speedup, r.top1)
            if not curves:
                raise ValueError("no sweep-*.json in these runs: run `trp sweep RUN_DIR...` first")
            plot_tradeoff(curves, plot, title=title, markers=markers)
            console.print(f"plot: {plot}")
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


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
        model, spec, config = workflow.load_source(path, dev)
        if seed is None:
            seed = config.seed if config else 0
        loader = workflow.test_loader(spec, data_dir or (config.data_dir if config else None), seed, 512)
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
