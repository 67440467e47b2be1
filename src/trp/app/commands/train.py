"""``trp train``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import click

from ...methods.trp_config import DEFAULTS as TRP_DEFAULTS
from ..config import METHODS, OPTIMIZERS, PRECISIONS, parse_milestones, resume_run_config, train_config
from .common import (EXCLUDE_HELP, LAYERS_HELP, SCHEMES, _decomposing, _epoch_line, _print_result, console, count_macs,
                     count_params, distributed, engine, mac_option, progress_bars, tables, workflow)


@click.command()
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
@click.option("--nuclear-weight", type=float, default=TRP_DEFAULTS.nuclear_weight, show_default=True,
              help="λ of the nuclear norm (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--factor", type=int, default=2, show_default=True, help="lorita: linear maps per layer (N).")
@click.option("--target-macs", type=float, default=None, help="TRP: project toward this whole-model MAC "
              "reduction (ranks from TargetMACs at every projection; the run splits with it).")
@click.option("--target-speedup", type=float, default=None, hidden=True, help="Deprecated name of --target-macs.")
@click.option("--target-latency", type=float, default=None, help="TRP: project toward this measured latency "
              "reduction (trp.TargetLatency, ONNX Runtime).")
@click.option("--target-latency-batch", type=int, default=1, show_default=True,
              help="TRP with --target-latency: the batch size the latency is measured at.")
@click.option("--target-warmup", type=int, default=0, show_default=True, help="TRP with a target: energy-driven "
              "projections for the first N epochs, then the target's.")
@click.option("--target-ramp", type=int, default=0, show_default=True, help="TRP with --target-macs: grow the "
              "MAC reduction over N epochs (after the warm-up; cubic, most of it early) instead of all at once.")
@click.option("--factored-epochs", type=int, default=0, show_default=True, help="TRP: train the last N epochs "
              "as each layer's rank-r factors (after a final projection), with no projection-induced jumps.")
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
@click.option("--resume", type=click.Path(exists=True, file_okay=False),
              help="Continue this run directory from its last checkpoint.")
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
        sys.exit(distributed.relaunch(nproc, ["train", *_given_options(ctx, skip={"nproc"})]))
    try:
        opts["milestones"] = parse_milestones(milestones) if milestones else None
        old_target = opts.pop("target_speedup")
        given = _given(ctx, opts)
        if old_target is not None:
            opts["target_macs"] = mac_option(old_target, opts["target_macs"], "--target-speedup", "--target-macs")
            given.add("target_macs")
        if resume:
            run_dir = Path(resume)
            config = resume_run_config(run_dir, {name: opts[name] for name in given}, out, config_file)
        else:
            config = train_config(config_file, opts, given)
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

