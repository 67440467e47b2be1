"""``trp evaluate``, ``trp export``, ``trp demo``, ``trp bench`` and ``trp profile``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import click

from ..config import MAX_BATCH
from ..factory import factory_options
from .common import SCHEMES, _epoch_line, _print_bench, console, count_macs, count_params, engine, progress_bars, tables, workflow


@click.command(name="evaluate")
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


@click.command(name="export")
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

    from ...deploy.export import export_onnx

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


@click.command()
@click.option("--epochs", type=int, default=None, help="Epochs per model [default: the demo's setting].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--bench/--no-bench", default=False, show_default=True,
              help="Also time the splits against the dense models and split the TRP model for a measured 2x "
                   "(ONNX Runtime, batch 64).")
def demo(epochs: Optional[int], out: Path, seed: int, no_progress: bool, bench: bool) -> None:
    """Train a ResNet-20 baseline and a TRP+Nu model on MNIST-5k, decompose both, compare."""
    from ..demo import run_demo

    with progress_bars(not no_progress) as bars:
        run_demo(out, epochs=epochs, seed=seed, progress=bars, log=console.print, on_epoch=_epoch_line, bench=bench)


_RUNTIME_HELP = "Comma-separated runtimes: eager, compile, onnxruntime."


@click.command(name="bench")
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
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file [default: bench-<stem>.json beside PATH].")
def bench_cmd(path: Path, dense: Optional[Path], runtimes: str, batches: str, threads: Optional[int], repeats: int,
              warmup: int, out: Optional[Path]) -> None:
    """Measure how much faster a split model file runs than its dense original (MAC reduction beside it)."""
    from ..bench import bench_source, parse_list

    record, saved = bench_source(path, dense, out, runtimes=parse_list(runtimes, str, "--runtime"),
                                 batches=parse_list(batches, int, "--batch"), threads=threads, repeats=repeats,
                                 warmup=warmup)
    _print_bench(record, f"{path} against {record['dense']}")
    console.print(f"saved {saved}")


@click.command(name="profile")
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

    from ...deploy.profile import profile_layers

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

