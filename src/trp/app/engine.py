"""The training and evaluation loop behind the command line.

A run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl``
(one JSON object per epoch), ``checkpoint.pt`` (written atomically after every epoch;
loads with ``torch.load(weights_only=True)``) and, when training ends, ``model.safetensors``
(:func:`trp.save` format, with the metadata needed to rebuild the model). Each epoch
reseeds the random generators from ``(seed, epoch)``, so a run resumed from its last
checkpoint ends exactly where an uninterrupted run would (on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import METHODS, OPTIMIZERS, TrainConfig, load_config, read_config_file
from ..data import DatasetInfo, get_datasets
from ..deploy.io import atomic_write, read_metadata, save
from ..deploy.io import load as load_weights
from ..models import create_model
from ..methods.trained_rank import TRP

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
    "load_config",
    "read_checkpoint",
    "read_config_file",
    "holdout_split",
]

@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model from scratch: registry name, channels, classes, input size."""

    model: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    data: str = ""

    def build(self) -> nn.Module:
        return create_model(self.model, in_channels=self.in_channels, num_classes=self.num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, *self.input_size)

    def metadata(self) -> dict[str, str]:
        return {"trp_model": json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_info(cls, model: str, info: DatasetInfo) -> "ModelSpec":
        return cls(model, info.in_channels, info.num_classes, tuple(info.input_size), info.name)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> "ModelSpec":
        if "trp_model" not in meta:
            raise ValueError(
                f"{path} does not say which model it holds (no 'trp_model' metadata): "
                "it was not written by `trp train` / `trp decompose`; load it in Python with trp.load"
            )
        d = json.loads(meta["trp_model"])
        return cls(d["model"], int(d["in_channels"]), int(d["num_classes"]), tuple(d["input_size"]), d.get("data", ""))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling is fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
        pin_memory=False, drop_last=False, persistent_workers=False,
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in %) of ``model`` on ``loader``."""
    was_training = model.training
    model.eval()
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        hits = pred.eq(y[:, None])
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        total += y.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluation data set is empty")
    return {"loss": loss_sum / total, "top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total}


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A training checkpoint written by :class:`Trainer` (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no checkpoint yet")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is corrupt or not a trp checkpoint ({err}); start the run again") from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a trp training checkpoint (no 'model' entry)")
    return state


def holdout_split(train_set: Dataset, holdout: int) -> tuple[Dataset, Dataset]:
    """``(training part, held-out part)``: the last ``holdout`` examples are held out."""
    from torch.utils.data import Subset

    n = len(train_set)  # type: ignore[arg-type]
    if holdout == 0:
        return train_set, Subset(train_set, [])
    if holdout >= n:
        raise ValueError(f"holdout {holdout} leaves nothing to train on ({n} training examples)")
    return Subset(train_set, range(n - holdout)), Subset(train_set, range(n - holdout, n))


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


ProgressFactory = Callable[[int, str], Any]


class Trainer:
    """Trains one run in ``run_dir``; :meth:`run` trains (or resumes) to the last epoch."""

    def __init__(self, config: TrainConfig, run_dir: Path, progress: Optional[ProgressFactory] = None) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.device = resolve_device(config.device)
        train_set, test_set, info = get_datasets(config.data, config.data_dir, seed=config.seed, image_size=config.image_size)
        self.spec = ModelSpec.from_info(config.model, info)
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
            self.pruner = TRP(self.model, config.scheme, config.energy, config.period, config.nuclear_weight,
                              layers=config.layers, exclude=config.exclude)
        elif config.method == "nuclear":
            if config.nuclear_weight <= 0:
                raise ValueError("method 'nuclear' needs --nuclear-weight > 0")
            self.pruner = TRP(
                self.model, config.scheme, config.energy, period=None,
                nuclear_weight=config.nuclear_weight, subgradient_period=config.period,
                layers=config.layers, exclude=config.exclude,
            )
        self.epoch = 0  # epochs completed
        self.last_row: dict[str, Any] = {}
        self.train_seconds = 0.0
        self.trp_seconds = 0.0

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
        if json.loads(meta.get("recipe", "{}")) and self.config.method != "finetune":
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
        }
        with atomic_write(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def resume(self) -> None:
        """Load the last checkpoint of ``run_dir`` and drop metrics of later epochs."""
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(
                f"nothing to resume: {self.checkpoint_path} does not exist (the run never finished an epoch)"
            )
        state = read_checkpoint(self.checkpoint_path, self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.pruner is not None and state.get("trp") is not None:
            self.pruner.load_state_dict(state["trp"])
        self.epoch = int(state["epoch"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.trp_seconds = float(state.get("trp_seconds", 0.0))
        if self.metrics_path.exists():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["epoch"] <= self.epoch]
            self.last_row = kept[-1] if kept else {}
            with atomic_write(self.metrics_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # -- training --------------------------------------------------------------------
    def _train_epoch(self) -> dict[str, float]:
        cfg = self.config
        torch.manual_seed(_epoch_seed(cfg.seed, self.epoch))
        loader = make_loader(self.train_set, cfg.batch_size, True, _epoch_seed(cfg.seed, self.epoch), cfg.workers)
        self.model.train()
        # Sums stay on the device: no host sync inside the step.
        total = 0
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        bar = self.progress(len(loader), f"epoch {self.epoch + 1}/{cfg.epochs}") if self.progress else None
        trp_before = self.pruner.seconds if self.pruner else 0.0
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.pruner:
                self.pruner.regularize()
            self.optimizer.step()
            if self.pruner:
                self.pruner.step()
            loss_sum += loss.detach() * y.numel()
            correct += out.detach().argmax(1).eq(y).sum()
            total += y.numel()
            if bar:
                bar(1)
            if cfg.steps_per_epoch is not None and total >= cfg.steps_per_epoch * cfg.batch_size:
                break
        mean_loss = loss_sum.item() / total
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
            "train_loss": mean_loss, "train_top1": 100.0 * correct.item() / total,
            "epoch_seconds": seconds, "trp_seconds": trp_seconds,
        }

    def run(
        self, stop_after: Optional[int] = None, on_epoch: Optional[Callable[[dict[str, Any]], None]] = None
    ) -> dict[str, Any]:
        """Train to ``config.epochs`` (or stop after epoch ``stop_after``); return the last metrics row.

        ``on_epoch`` receives each epoch's metrics row as it is logged.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        test_loader = make_loader(self.test_set, 512, False, workers=self.config.workers)
        row: dict[str, Any] = self.last_row
        if self.config.epochs == 0 and not row:  # evaluate the given weights only
            row = {"epoch": 0, "lr": 0.0, "train_loss": None, "train_top1": None,
                   "epoch_seconds": 0.0, "trp_seconds": 0.0}
            row.update({f"test_{k}": v for k, v in evaluate(self.model, test_loader, self.device).items()})
            with atomic_write(self.metrics_path) as tmp:
                tmp.write_text(json.dumps(row) + "\n")
            self.last_row = row
            if on_epoch:
                on_epoch(row)
        while self.epoch < self.config.epochs:
            lr = self.optimizer.param_groups[0]["lr"]
            stats = self._train_epoch()
            self.scheduler.step()
            self.epoch += 1
            row = {"epoch": self.epoch, "lr": lr, **stats}
            row.update({f"test_{k}": v for k, v in evaluate(self.model, test_loader, self.device).items()})
            if self.pruner and self.pruner.ranks:
                row["mean_rank"] = sum(self.pruner.ranks.values()) / len(self.pruner.ranks)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self._write_checkpoint()
            self.last_row = row
            if on_epoch:
                on_epoch(row)
            if stop_after is not None and self.epoch >= stop_after:
                return row
        save(self.final_model(), self.model_path, metadata=self.spec.metadata())
        return row

    def final_model(self) -> nn.Module:
        """The trained model in its deployable structure (LoRITa factors multiplied back)."""
        if self.config.method == "lorita":
            from ..methods.lorita import collapse

            return collapse(self.model)
        return self.model


def train(
    config: TrainConfig, run_dir: Path, resume: bool = False, progress: Optional[ProgressFactory] = None,
    stop_after: Optional[int] = None,
) -> Trainer:
    """Train (or resume) a run; return the trainer holding the trained model."""
    trainer = Trainer(config, run_dir, progress)
    if resume:
        trainer.resume()
    trainer.run(stop_after=stop_after)
    return trainer


def load_model_file(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild and load a model saved by ``trp train`` / ``trp decompose``."""
    path = Path(path)
    spec = ModelSpec.from_metadata(read_metadata(path), path)
    model = spec.build().to(device)
    return load_weights(path, model), spec
