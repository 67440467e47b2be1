"""The library behind the command line, in one namespace: training, evaluation, model files.

The pieces live in :mod:`trp.app.trainer` (the training loop and run directory),
:mod:`trp.app.loaders` (devices, loaders, evaluation), :mod:`trp.app.files` (untrusted model and
checkpoint files), :mod:`trp.app.config` (the settings) and :mod:`trp.app.workflow` (decompose,
fine-tune); :func:`train` runs a config the way ``trp train`` does, its ``decompose`` steps included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from .config import METHODS, OPTIMIZERS, TrainConfig, load_config, read_config_file
from .files import MAX_CHANNELS, MAX_CLASSES, MAX_INPUT_SIDE, ModelSpec, check_finite, load_model_file, read_checkpoint
from .loaders import (SKIPPED_IMAGES, ProgressFactory, evaluate, holdout_split, make_loader, resolve_device,
                      screen_datasets)
from .trainer import Trainer, make_target

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "TrainConfig",
    "ModelSpec",
    "Trainer",
    "train",
    "evaluate",
    "make_loader",
    "resolve_device",
    "load_model_file",
    "check_finite",
    "screen_datasets",
    "SKIPPED_IMAGES",
    "load_config",
    "read_checkpoint",
    "read_config_file",
    "holdout_split",
    "make_target",
    "ProgressFactory",
    "MAX_CHANNELS",
    "MAX_CLASSES",
    "MAX_INPUT_SIDE",
]


def train(
    config: TrainConfig, run_dir: Path, resume: bool = False, progress: Optional[ProgressFactory] = None,
    stop_after: Optional[int] = None, decompose: bool = True,
    on_decomposed: Optional[Callable[[Any], None]] = None,
) -> Trainer:
    """Train (or resume) a run; return the trainer holding the trained model.

    As ``trp train`` does, a run that trains to its last epoch then runs the config's ``decompose``
    steps (a run toward a target: its default split) with :func:`trp.app.workflow.decompose_run`,
    unless ``decompose=False``; ``on_decomposed`` receives each step's result.
    """
    from .workflow import decompose_run

    trainer = Trainer(config, run_dir, progress)
    if resume:
        trainer.resume()
    trainer.run(stop_after=stop_after)
    if decompose and trainer.env.is_main and trainer.epoch >= config.epochs:
        for result in decompose_run(Path(run_dir), config, progress=progress):
            if on_decomposed is not None:
                on_decomposed(result)
    return trainer
