"""Decompose a trained run, evaluate it, optionally fine-tune it, and record the result.

This is what ``trp decompose`` and ``trp train --config`` (its ``decompose`` entries) run.
Each decomposition writes two files next to the run (or model file):
``decomposed-<scheme>-<criterion>.safetensors`` (the compact model, :func:`trp.save`
format) and ``decomposed-<scheme>-<criterion>.json``, a summary that ``trp table``
collects: top-1/top-5 before and after, MACs (convs only and all), parameters,
MAC reductions, and the fine-tuned accuracy when ``finetune`` epochs were run (the fine-tune
run directory sits beside it as ``finetune-<scheme>-<criterion>/``).

A run trained toward a target and split with that target (its default) is split at the ranks it
trained toward (``trained_ranks.json``, else the finished run's ``checkpoint.pt``), not allocated
again; the summary names where they came from (``ranks_from``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .config import TrainConfig, load_config
from .files import ModelSpec, load_model_file, read_checkpoint
from .loaders import ProgressFactory, holdout_split, make_loader, resolve_device
from .loaders import evaluate as evaluate_model
from .trainer import Trainer
from ..data import DATASET_INFO, get_datasets
from ..core.allocation import LayerRanks
from ..core.criteria import current_spelling, parse_criterion
from ..deploy import target_latency  # noqa: F401  (registers the latency:X criterion)
from ..core.decompose import Decomposition, decompose_with_report
from ..core.layers import LayerSelector
from ..deploy.batchnorm import recalibrate_batchnorm
from ..deploy.io import atomic_write, save
from .config import DecomposeStep
from .report import CompressionSummary, summarize
from .rundir import TRAINED_RANKS, check_writable, read_trained_ranks

__all__ = ["DecomposeResult", "load_source", "decompose_source", "finetune_model", "test_loader", "search_criterion"]

SUMMARY_KIND = "trp-decomposition"


@dataclass
class DecomposeResult:
    """What one decomposition produced."""

    report: Decomposition
    summary: CompressionSummary
    record: dict[str, Any]
    model_path: Path
    summary_path: Path


def load_source(source: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec, Optional[TrainConfig]]:
    """A trained model from a run directory, its ``checkpoint.pt``, or a model file.

    A model from outside the registry (``--model-factory``, or a file recording its factory) comes
    from :func:`trp.app.factory.resolve_source`.
    """
    from .factory import resolve_source

    found = resolve_source(Path(source), device)
    if found is not None:
        return found  # type: ignore[return-value]
    source = Path(source)
    config = None
    if source.is_dir():
        config = load_config(source)
        source = source / "model.safetensors" if (source / "model.safetensors").exists() else source / "checkpoint.pt"
    if source.suffix == ".pt":
        config = config or load_config(source.parent)
        if config.method == "lorita":
            raise ValueError(
                f"{source} holds an over-parameterized LoRITa model in training; wait for the run to "
                "finish (it writes model.safetensors with the factors multiplied back)"
            )
        spec = ModelSpec.from_info(config.model, DATASET_INFO[config.data])
        model = spec.build().to(device)
        model.load_state_dict(read_checkpoint(source, device)["model"])
        return model, spec, config
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a run directory or a model file")
    model, spec = load_model_file(source, device)
    if config is None and (source.parent / "config.json").exists():
        config = load_config(source.parent)
    return model, spec, config


def test_loader(spec: ModelSpec, data_dir: Optional[str], seed: int, batch_size: int = 512):
    """The test split of the model's data set."""
    image_size = spec.input_size[0] if spec.data == "imagenet" else None
    _, test_set, _ = get_datasets(spec.data, data_dir, seed=seed, image_size=image_size)
    return make_loader(test_set, batch_size, False)


def finetune_model(
    model_file: Path, out_dir: Path, epochs: int, lr: float, base: Optional[TrainConfig],
    spec: ModelSpec, data_dir: Optional[str], device: str = "auto",
    progress: Optional[ProgressFactory] = None, on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
) -> Trainer:
    """Train a (decomposed) model file for ``epochs`` more epochs with plain SGD; return the trainer."""
    config = TrainConfig(
        model=spec.model, data=spec.data, data_dir=data_dir, method="finetune", scheme=base.scheme if base else "channel",
        epochs=epochs, batch_size=base.batch_size if base else 128, lr=lr, milestones=[],
        momentum=base.momentum if base else 0.9, weight_decay=1e-4, seed=base.seed if base else 0,
        device=device, init_from=str(model_file), workers=base.workers if base else 0,
        steps_per_epoch=base.steps_per_epoch if base else None,
        image_size=spec.input_size[0] if spec.data == "imagenet" else None,
    )
    for stale in ("checkpoint.pt", "metrics.jsonl", "model.safetensors"):
        (Path(out_dir) / stale).unlink(missing_ok=True)
    trainer = Trainer(config, Path(out_dir), progress)
    trainer.run(on_epoch=on_epoch)
    return trainer


def decompose_source(
    source: Path,
    step: DecomposeStep,
    *,
    out: Optional[Path] = None,
    data_dir: Optional[str] = None,
    evaluate: bool = True,
    device: str = "auto",
    progress: Optional[ProgressFactory] = None,
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
    layers: LayerSelector = None,
    exclude: Optional[Sequence[str]] = None,
) -> DecomposeResult:
    """Decompose the model in ``source`` as ``step`` says; write the compact model and its summary.

    ``layers``/``exclude`` default to the run config's (the layers TRP trained).
    """
    if (step.finetune or step.recalibrate_bn) and not evaluate:
        raise ValueError("fine-tuning and BatchNorm re-estimation need the data set: drop --no-eval")
    source = Path(source)
    dev = resolve_device(device)
    target = Path(out) if out is not None else (source if source.is_dir() else source.parent) / f"{step.stem}.safetensors"
    check_writable(target.parent, what="output folder")  # before the long work, not after it
    model, spec, config = load_source(source, dev)
    # The BatchNorm re-estimation and the fine-tune draw random crops: seeded, so a step repeats exactly.
    torch.manual_seed(config.seed if config else 0)
    data_dir = data_dir or (config.data_dir if config else None)
    if layers is None and config is not None:
        layers = config.layers
    if exclude is None:
        exclude = config.exclude if config is not None else []
    if step.criterion.startswith("search:"):
        crit = search_criterion(model, spec, config, step.scheme, float(step.criterion.partition(":")[2]), data_dir, dev,
                                layers, exclude)
    else:
        crit = parse_criterion(step.criterion)
        if isinstance(crit, target_latency.TargetLatency) and crit.progress is None:
            crit.progress = progress  # profiling layer i of n, calibration round j
    trained = _trained_ranks(source, step, config, crit)
    if trained is not None:  # the run's own target: split at the ranks trained toward, not re-allocated
        crit = LayerRanks(trained[1])
    calibration = None
    if step.calibrate:  # N training images (then a few more held out for the fidelity figure)
        calibration = _calibration_images(spec, config, data_dir, step.calibrate, dev)
    report = decompose_with_report(model, step.scheme, crit, layers, spec.input_shape, exclude=exclude,
                                   on_layer=_svd_progress(progress), calibration=calibration,
                                   calibration_samples=step.calibrate or 512)
    summary = summarize(model, report.model, spec.input_shape)
    base_dir = source if source.is_dir() else source.parent
    out = Path(out) if out is not None else base_dir / f"{step.stem}.safetensors"
    record: dict[str, Any] = {
        "kind": SUMMARY_KIND, "version": 1, "source": str(source), "model_file": str(out),
        "scheme": step.scheme,
        "criterion": (step.criterion if step.criterion.startswith("search:")
                      else trained[0] if trained is not None else crit.spec()),
        "dense": None, "decomposed": None,
        "macs_before": summary.macs_before, "macs_after": summary.macs_after,
        "conv_macs_before": summary.conv_macs_before, "conv_macs_after": summary.conv_macs_after,
        "params_before": summary.params_before, "params_after": summary.params_after,
        "mac_reduction": summary.mac_reduction, "conv_mac_reduction": summary.conv_mac_reduction,
        "ranks": {r.name: r.rank for r in report.factorized},
        "finetune": None,
        "calibrate": step.calibrate,
        "fidelity": report.fidelity.to_dict() if report.fidelity is not None else None,
        "notes": list(report.notes),
    }
    if trained is not None:
        record["ranks_from"] = trained[2]  # the ranks of the run's last projection (trained toward)
    if evaluate:
        loader = test_loader(spec, data_dir, config.seed if config else 0)
        record["dense"] = _acc(evaluate_model(model, loader, dev))
        record["decomposed"] = _acc(evaluate_model(report.model, loader, dev))
    if step.recalibrate_bn:
        train_loader = make_loader(_train_split(spec, config, data_dir), 128, True, seed=config.seed if config else 0)
        used = recalibrate_batchnorm(report.model, train_loader, step.recalibrate_bn, dev)
        record["bn_recalibrated"] = {"batches": used, **_acc(evaluate_model(report.model, loader, dev))}
    meta = {**spec.metadata(), "scheme": step.scheme, "criterion": trained[0] if trained is not None else crit.spec()}
    save(report.model, out, metadata=meta)
    if step.finetune:
        ft_dir = out.parent / out.stem.replace("decomposed-", "finetune-", 1)
        trainer = finetune_model(out, ft_dir, step.finetune, step.finetune_lr, config, spec, data_dir, device,
                                 progress, on_epoch)
        last = trainer.last_row
        record["finetune"] = {
            "epochs": step.finetune, "lr": step.finetune_lr, "run_dir": str(ft_dir),
            "top1": last["test_top1"], "top5": last.get("test_top5"),
        }
    summary_path = out.with_suffix(".json")
    with atomic_write(summary_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return DecomposeResult(report, summary, record, out, summary_path)


def decompose_run(
    run_dir: Path,
    config: TrainConfig,
    *,
    data_dir: Optional[str] = None,
    device: Optional[str] = None,
    progress: Optional[ProgressFactory] = None,
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
    on_step: Optional[Callable[[DecomposeStep], None]] = None,
) -> Iterator[DecomposeResult]:
    """The decompose steps of a trained run (train -> decompose -> fine-tune), one result at a time.

    The steps are the config's ``decompose`` entries, else a run toward a target is split with its
    target (:meth:`TrainConfig.decompose_steps`); each runs with :func:`decompose_source` on
    ``run_dir`` (evaluated, fine-tuned as the step says). ``on_step`` hears of each before it runs.
    """
    for step in config.decompose_steps():
        if on_step is not None:
            on_step(step)
        yield decompose_source(run_dir, step, data_dir=data_dir or config.data_dir, evaluate=True,
                               device=device or config.device, progress=progress, on_epoch=on_epoch)


def _trained_ranks(source: Path, step: DecomposeStep, config: Optional[TrainConfig],
                   crit: Any) -> Optional[tuple[str, dict[str, int], str]]:
    """``(target, ranks, where)`` when ``step`` splits a target run with its own target, else None.

    The ranks are those of the run's last projection: ``trained_ranks.json`` (written when the run
    finished), else the TRP state in the finished run's ``checkpoint.pt``. A run toward a latency
    target is then not profiled and calibrated again, which could land on other ranks.
    """
    if config is None or config.target_criterion is None or step.scheme != config.scheme:
        return None
    target = config.target_criterion
    if step.criterion != target and getattr(crit, "spec", lambda: None)() != target:
        return None
    run_dir = source if source.is_dir() else source.parent
    if not source.is_dir() and source.name not in ("model.safetensors", "checkpoint.pt"):
        return None
    record = read_trained_ranks(run_dir)
    if record is not None:
        # a record written before issue 21 spells macs:X as speedup:X
        if current_spelling(str(record["criterion"])) != target or record["scheme"] != config.scheme:
            return None  # from an earlier run in this folder
        return target, {str(k): int(v) for k, v in record["ranks"].items()}, str(run_dir / TRAINED_RANKS)
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.exists():
        return None
    state = read_checkpoint(checkpoint, "cpu")
    trp_state = state.get("trp") or {}
    if (int(state.get("epoch", -1)) != config.epochs or current_spelling(str(trp_state.get("target"))) != target
            or not trp_state.get("ranks")):
        return None
    return target, {str(k): int(v) for k, v in trp_state["ranks"].items()}, str(checkpoint)


def search_criterion(model: nn.Module, spec: ModelSpec, config: Optional[TrainConfig], scheme: str,
                     target: float, data_dir: Optional[str], device: torch.device, layers: LayerSelector = None,
                     exclude: Sequence[str] = ()):
    """Ranks from :func:`trp.methods.search.iterative_rank_search` on the run's held-out training examples."""
    from ..methods.search import iterative_rank_search

    if config is None or config.holdout <= 0:
        raise ValueError(
            "the iterative rank search (search:X) scores ranks on held-out data: train the run with "
            "`holdout: N` (N training examples kept out of training) in its config"
        )
    _, held = holdout_split(_full_train_set(spec, config, data_dir, augment=False), config.holdout)  # fixed images
    loader = make_loader(held, 256, False)
    return iterative_rank_search(model, scheme, loader, target, spec.input_shape, layers=layers, device=device,
                                 exclude=exclude)


def _full_train_set(spec: ModelSpec, config: Optional[TrainConfig], data_dir: Optional[str], augment: bool = True):
    image_size = spec.input_size[0] if spec.data == "imagenet" else None
    train_set, _, _ = get_datasets(spec.data, data_dir, seed=config.seed if config else 0, image_size=image_size,
                                   hflip=config.hflip if config else False, augment=augment)
    return train_set


def _calibration_images(spec: ModelSpec, config: Optional[TrainConfig], data_dir: Optional[str],
                        n: int, device: torch.device):
    """Batches of the run's training images (shuffled with the run's seed): ``n`` to calibrate, then held-out ones.

    The images are not augmented (no random crops or flips), so two calibrations of one run see the
    same images and split alike.
    """
    loader = make_loader(_train_split(spec, config, data_dir, augment=False), 64, True,
                         seed=config.seed if config else 0)
    held = min(128, max(8, n // 4))
    seen = 0
    for batch in loader:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield images.to(device)
        seen += images.shape[0]
        if seen >= n + held:
            return


def _train_split(spec: ModelSpec, config: Optional[TrainConfig], data_dir: Optional[str], augment: bool = True):
    """The examples the run trained on (its held-out part excluded); augmented as in training unless ``augment=False``."""
    return holdout_split(_full_train_set(spec, config, data_dir, augment), config.holdout if config else 0)[0]


def _svd_progress(progress: Optional[ProgressFactory]) -> Optional[Callable[[str, int, int], None]]:
    """A per-layer progress callback for decompose_with_report, drawn with ``progress`` bars."""
    if progress is None:
        return None
    advance: Optional[Callable[[int], None]] = None

    def on_layer(name: str, done: int, total: int) -> None:
        nonlocal advance
        if advance is None:
            advance = progress(total, "spectra of the layers")
        advance(1)

    return on_layer


def _acc(metrics: dict[str, float]) -> dict[str, float]:
    return {"top1": metrics["top1"], "top5": metrics["top5"]}
