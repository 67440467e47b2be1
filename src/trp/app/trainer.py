"""The training loop behind ``trp train``: :class:`Trainer` and the run directory it writes.

A run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl``
(one JSON object per epoch), ``checkpoint.pt`` (written atomically after every epoch;
loads with ``torch.load(weights_only=True)``) and, when training ends, ``model.safetensors``
(:func:`trp.save` format, with the metadata needed to rebuild the model); a run toward a target
also records the ranks of its last projection in ``trained_ranks.json`` (its default split uses
them, :func:`trp.app.rundir.write_trained_ranks`), and with
``skip_corrupt`` the image files left out (``skipped_images.txt``, :func:`screen_datasets`). Each epoch
reseeds the random generators from ``(seed, epoch)``, so a run resumed from its last
checkpoint ends exactly where an uninterrupted run would (on CPU).

Under ``torchrun`` the run is data parallel (:mod:`trp.integrations.distributed`): each rank
trains a ``DistributedDataParallel`` copy on its share of every global batch
(``batch_size`` stays the global batch, so the learning-rate recipe is unchanged), the test
set is split across the ranks and the counts summed, and rank 0 alone writes the run
directory. Checkpoints do not depend on the number of processes: resume at any N.
With ``factored_epochs`` K, TRP's last K epochs train each layer as its rank-r factors (after a
final projection; :meth:`trp.TRP.factorize`): the optimizer gets the factors in place of the
weights (their momentum starts afresh), checkpoints of those epochs hold the factors, and the
saved model has them multiplied back into plain weights of the trained ranks.
``precision`` bf16/fp16 runs the forward pass under autocast (fp16 with a GradScaler, whose
gradients are unscaled before TRP adds its sub-gradient); weights stay float32. While a run writes, rank 0 holds
``run.lock`` (:mod:`trp.app.rundir`); model files are untrusted and checked on the ``meta``
device before anything is allocated (:func:`load_model_file`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from ..core.allocation import TargetMACs
from ..data import get_datasets
from ..deploy.io import atomic_write, read_metadata, read_recipe, save
from ..deploy.io import load as load_weights
from ..integrations import distributed
from ..methods.trained_rank import TRP
from ..methods.trp_config import TRPConfig
from .files import ModelSpec, read_checkpoint
from .loaders import SKIPPED_IMAGES, ProgressFactory, evaluate, holdout_split, make_loader, resolve_device, screen_datasets
from .rundir import (TRAINED_RANKS, RunLock, append_metrics, check_writable, disk_error, read_metrics,
                     remove_leftovers, write_trained_ranks)

__all__ = ["Trainer", "make_target"]


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _loader_order(n: int, seed: int) -> list[int]:
    """The order in which ``make_loader(dataset of n, shuffle=True, seed)`` visits the examples."""
    return next(iter(make_loader(range(n), n, True, seed))).tolist()  # type: ignore[arg-type]


class Trainer:
    """Trains one run in ``run_dir``; :meth:`run` trains (or resumes) to the last epoch."""

    def __init__(self, config: TrainConfig, run_dir: Path, progress: Optional[ProgressFactory] = None) -> None:
        # the config was validated when it was built (trp.app.config: one schema, checked once)
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = resolve_device(config.device)
        self.env, self.device = distributed.init_from_env(self.device)
        self.progress = progress if self.env.is_main else None
        train_set, test_set, info = get_datasets(config.data, config.data_dir, seed=config.seed, image_size=config.image_size,
                                                    hflip=config.hflip)
        self.spec = ModelSpec.from_info(config.model, info)
        self.skipped_images: list[tuple[str, str]] = []
        if config.verify_images or config.skip_corrupt:
            self.skipped_images = screen_datasets([train_set, test_set], config.skip_corrupt, self.progress,
                                                  threads=config.workers)
        train_set, _ = holdout_split(train_set, config.holdout)
        self.train_set, self.test_set = train_set, test_set
        torch.manual_seed(config.seed)
        self.model = self.spec.build()
        if config.weights:
            from ..models import load_pretrained

            load_pretrained(self.model, config.weights)
        if config.init_from:
            self._init_from(Path(config.init_from))
        if config.method == "lorita":
            from ..methods.lorita import overparameterize

            self.model = overparameterize(self.model, config.factor, layers=config.layers, exclude=config.exclude)
        self.model.to(self.device)
        if config.channels_last:  # 4-d weights and activations stored NHWC; the saved files are unchanged
            self.model.to(memory_format=torch.channels_last)
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=config.resolved_milestones(), gamma=config.gamma
        )
        self.pruner: Optional[TRP] = None
        if config.method == "trp":
            target = make_target(config, self.model, self.spec.input_shape, self.device)
            self.pruner = TRP.from_config(self.model, TRPConfig(
                config.scheme, target, config.energy, config.period, config.nuclear_weight,
                warmup=config.target_warmup * self._steps_per_epoch() if target is not None else 0,
                ramp=config.target_ramp * self._steps_per_epoch() if target is not None else 0,
                layers=config.layers, exclude=config.exclude,
                input_shape=self.spec.input_shape if target is not None else None))
        elif config.method == "nuclear":
            if config.nuclear_weight <= 0:
                raise ValueError("method 'nuclear' needs --nuclear-weight > 0")
            self.pruner = TRP.from_config(self.model, TRPConfig(
                config.scheme, None, config.energy, period=None, nuclear_weight=config.nuclear_weight,
                subgradient_period=config.period, layers=config.layers, exclude=config.exclude))
        self.lock = RunLock(self.run_dir)
        # fp16 needs loss scaling (its range is narrow); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        # What the training step calls: the DistributedDataParallel wrapper under torchrun.
        self.net: nn.Module = (distributed.wrap_ddp(self.model, self.device, config.sync_bn)
                               if self.env.distributed else self.model)
        self.epoch = 0  # epochs completed
        self.last_row: dict[str, Any] = {}
        self.train_seconds = 0.0
        self.trp_seconds = 0.0

    def _steps_per_epoch(self) -> int:
        steps = math.ceil(len(self.train_set) / self.config.batch_size)  # type: ignore[arg-type]
        return min(steps, self.config.steps_per_epoch) if self.config.steps_per_epoch else steps

    def _init_from(self, path: Path) -> None:
        """Start from the weights of a dense model of the same architecture."""
        meta = read_metadata(path)
        spec = ModelSpec.from_metadata(meta, path)
        if (spec.model, spec.in_channels, spec.num_classes) != (self.spec.model, self.spec.in_channels, self.spec.num_classes):
            raise ValueError(
                f"--init-from {path} holds a {spec.model} with {spec.in_channels} input channels and "
                f"{spec.num_classes} classes; this run trains a {self.spec.model} with "
                f"{self.spec.in_channels} and {self.spec.num_classes}"
            )
        if read_recipe(meta, path) and self.config.method != "finetune":
            raise ValueError(
                f"--init-from {path} is a decomposed model; start from a dense one, "
                "or fine-tune it with method 'finetune'"
            )
        load_weights(path, self.model)  # applies a decomposed model's recipe in place

    # -- files -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def model_path(self) -> Path:
        return self.run_dir / "model.safetensors"

    def _write_checkpoint(self) -> None:
        state = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trp": self.pruner.state_dict() if self.pruner else None,
            "train_seconds": self.train_seconds,
            "trp_seconds": self.trp_seconds,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        with atomic_write(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def resume(self) -> None:
        """Load the last checkpoint of ``run_dir`` and drop metrics of later epochs."""
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(
                f"nothing to resume: {self.checkpoint_path} does not exist (the run never finished an epoch)"
            )
        self._own()
        try:
            self._resume()
        except BaseException:
            self.lock.release()
            raise

    def _resume(self) -> None:
        state = read_checkpoint(self.checkpoint_path, self.device)
        if self.pruner is not None and state.get("trp") is not None:
            self.pruner.load_state_dict(state["trp"])  # first: a factored state factors the layers
            if self.pruner.factored:
                self._new_parameters()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        if self.epoch > self.config.epochs:
            raise ValueError(f"{self.run_dir} has already trained {self.epoch} epochs: --epochs "
                             f"{self.config.epochs} would end before that; give --epochs {self.epoch} or more")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.trp_seconds = float(state.get("trp_seconds", 0.0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.metrics_path.exists():
            rows = read_metrics(self.metrics_path)
            kept = [r for r in rows if r["epoch"] <= self.epoch]
            self.last_row = kept[-1] if kept else {}
            if self.env.is_main:
                with atomic_write(self.metrics_path) as tmp:
                    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if self.env.distributed:
            distributed.barrier()  # every rank has read the files before rank 0 writes again

    # -- training --------------------------------------------------------------------
    def _factorize_if_due(self) -> None:
        """At the first of the last ``factored_epochs`` epochs: TRP's final projection, then the layers train as factors."""
        k = self.config.factored_epochs
        if self.pruner is None or not k or self.pruner.factored or self.epoch < self.config.epochs - k:
            return
        self.pruner.factorize()
        self._new_parameters()

    def _new_parameters(self) -> None:
        """Give the optimizer (and a DDP wrapper) the model's parameters after the layers were factored."""
        params = list(self.model.parameters())
        kept = {id(p) for p in params}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in kept:
                    self.optimizer.state.pop(p, None)
        if len(self.optimizer.param_groups) != 1:
            raise RuntimeError("factored epochs expect the trainer's single parameter group")
        self.optimizer.param_groups[0]["params"] = params
        if self.env.distributed:
            self.net = distributed.wrap_ddp(self.model, self.device, self.config.sync_bn)

    def _train_epoch(self) -> dict[str, float]:
        cfg = self.config
        torch.manual_seed(_epoch_seed(cfg.seed, self.epoch))
        if self.env.distributed:  # same global batches as the single-process loader
            order = lambda epoch: _loader_order(len(self.train_set), _epoch_seed(cfg.seed, epoch))  # noqa: E731
            loader = distributed.train_loader(self.train_set, cfg.batch_size, self.env, order, self.epoch, cfg.workers)
        else:
            loader = make_loader(self.train_set, cfg.batch_size, True, _epoch_seed(cfg.seed, self.epoch), cfg.workers)
        self.model.train()
        # Sums stay on the device: no host sync inside the step.
        total, steps = 0, 0
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        bar = self.progress(len(loader), f"epoch {self.epoch + 1}/{cfg.epochs}") if self.progress else None
        trp_before = self.pruner.seconds if self.pruner else 0.0
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.config.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out = self.net(x)
                loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:  # fp16: unscale before the sub-gradient is added
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.pruner:
                self.pruner.regularize()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.pruner:
                self.pruner.step()
            loss_sum += loss.detach().float() * y.numel()
            correct += out.detach().argmax(1).eq(y).sum()
            total += y.numel()
            steps += 1
            if bar:
                bar(1)
            if cfg.steps_per_epoch is not None and steps >= cfg.steps_per_epoch:
                break
        if self.pruner is not None and self.pruner.target is not None and self.epoch + 1 == cfg.epochs:
            # A target run ends projected: the saved model is exactly at the allocated ranks, so the
            # split with the same criterion (the run's default decomposition) loses nothing.
            self.pruner.project(final=True)
        loss_total, correct_total, total = [loss_sum.item(), correct.item(), total]
        if self.env.distributed:
            loss_total, correct_total, total = distributed.all_reduce_sums([loss_total, correct_total, total], self.device)
        mean_loss = loss_total / total
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"loss became {mean_loss} in epoch {self.epoch + 1}: training diverged; "
                "lower --lr or --nuclear-weight"
            )
        seconds = time.perf_counter() - start
        trp_seconds = (self.pruner.seconds - trp_before) if self.pruner else 0.0
        self.train_seconds += seconds
        self.trp_seconds += trp_seconds
        return {
            "train_loss": mean_loss, "train_top1": 100.0 * correct_total / total,
            "epoch_seconds": seconds, "trp_seconds": trp_seconds,
        }

    def _own(self) -> None:
        """Lock the run directory (see :mod:`trp.app.rundir`) and clear interrupted writes' leftovers."""
        if self.lock.held or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
            return
        self.lock.acquire()
        removed = remove_leftovers(self.run_dir)
        if removed:
            warnings.warn(f"removed {len(removed)} temporary file(s) left by interrupted writes in {self.run_dir}",
                          stacklevel=3)
        size = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        check_writable(self.run_dir, need_bytes=4 * size + 2**20, what="run directory")

    def run(
        self, stop_after: Optional[int] = None, on_epoch: Optional[Callable[[dict[str, Any]], None]] = None
    ) -> dict[str, Any]:
        """Train to ``config.epochs`` (or stop after epoch ``stop_after``); return the last metrics row.

        ``on_epoch`` receives each epoch's metrics row as it is logged. The run directory is
        locked while this runs; a failed write (full disk, permissions) raises ValueError.
        """
        self._own()
        try:
            return self._run(stop_after, on_epoch)
        except OSError as err:
            raise disk_error(err) from err
        finally:
            self.lock.release()

    def _run(self, stop_after: Optional[int], on_epoch: Optional[Callable[[dict[str, Any]], None]]) -> dict[str, Any]:
        main = self.env.is_main  # rank 0 alone writes the run directory
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
            (self.run_dir / TRAINED_RANKS).unlink(missing_ok=True)  # written again when training ends
            if self.skipped_images:
                listing = self.run_dir / SKIPPED_IMAGES
                with atomic_write(listing) as tmp:
                    tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in self.skipped_images))
        test_loader = make_loader(distributed.eval_shard(self.test_set, self.env), 512, False, workers=self.config.workers)
        row: dict[str, Any] = self.last_row
        if self.config.epochs == 0 and not row:  # evaluate the given weights only
            row = {"epoch": 0, "lr": 0.0, "train_loss": None, "train_top1": None,
                   "epoch_seconds": 0.0, "trp_seconds": 0.0}
            row.update({f"test_{k}": v for k, v in self._evaluate(test_loader).items()})
            if main:
                with atomic_write(self.metrics_path) as tmp:
                    tmp.write_text(json.dumps(row) + "\n")
            self.last_row = row
            if on_epoch and main:
                on_epoch(row)
        while self.epoch < self.config.epochs:
            self._factorize_if_due()
            lr = self.optimizer.param_groups[0]["lr"]
            stats = self._train_epoch()
            self.scheduler.step()
            self.epoch += 1
            row = {"epoch": self.epoch, "lr": lr, **stats}
            row.update({f"test_{k}": v for k, v in self._evaluate(test_loader).items()})
            if self.pruner and self.pruner.ranks:
                row["mean_rank"] = sum(self.pruner.ranks.values()) / len(self.pruner.ranks)
            if main:
                append_metrics(self.metrics_path, row)
                self._write_checkpoint()
            self.last_row = row
            if on_epoch and main:
                on_epoch(row)
            if stop_after is not None and self.epoch >= stop_after:
                return row
        if self.pruner is not None:
            self.pruner.merge()  # factored layers: plain weights of their ranks again
        if main:
            save(self.final_model(), self.model_path, metadata=self.spec.metadata())
            self._record_trained_ranks()
        if self.env.distributed:
            distributed.barrier()
        return row

    def _record_trained_ranks(self) -> None:
        """A target run's last projected ranks (and a latency target's fixed calibration) in ``trained_ranks.json``.

        The run's default split uses them (:func:`trp.app.workflow.decompose_source`): the ranks
        trained toward are the ranks split at, with or without ``checkpoint.pt``.
        """
        criterion = self.config.target_criterion
        if self.pruner is None or self.pruner.target is None or criterion is None or not self.pruner.ranks:
            return
        calibration = self.pruner.state_dict().get("calibration")
        write_trained_ranks(self.run_dir, criterion, self.config.scheme, self.pruner.ranks, calibration)

    def _autocast(self) -> torch.autocast:
        """The forward pass's autocast region for ``config.precision`` (disabled for fp32)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Test metrics; under torchrun each rank scores its shard (rank 0's BatchNorm statistics)."""
        if self.env.distributed:
            distributed.broadcast_buffers(self.model)
        return evaluate(self.model, loader, self.device, across_ranks=self.env.distributed)

    def final_model(self) -> nn.Module:
        """The trained model in its deployable structure (LoRITa factors multiplied back)."""
        if self.config.method == "lorita":
            from ..methods.lorita import collapse

            return collapse(self.model)
        return self.model


def make_target(config: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> Any:
    """The whole-model criterion a ``trp`` run trains toward (``target_macs``/``target_latency``), or None.

    A latency target is profiled by TRP at its first allocation, with the layers TRP trains (its
    ``layers``/``exclude`` selection), in its inference form, as ``trp decompose`` profiles a model.
    """
    if config.target_macs is not None:
        return TargetMACs(config.target_macs)
    if config.target_latency is None:
        return None
    from ..deploy.target_latency import TargetLatency

    try:
        return TargetLatency(config.target_latency, batch_size=config.target_latency_batch)
    except TypeError as err:
        raise ValueError(f"--target-latency could not build trp.TargetLatency({config.target_latency:g}): {err}") from err
