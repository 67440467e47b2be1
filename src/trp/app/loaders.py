"""Devices, data loaders, evaluation and image screening: what training and every command share."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..integrations import distributed

__all__ = ["ProgressFactory", "resolve_device", "make_loader", "evaluate", "holdout_split", "screen_datasets",
           "SKIPPED_IMAGES"]

ProgressFactory = Callable[[int, str], Any]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; a device this machine lacks raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: trp runs on cpu, cuda or mps")
    return device


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling is fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
        pin_memory=False, drop_last=False, persistent_workers=False,
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, across_ranks: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in %) of ``model`` on ``loader``.

    ``across_ranks``: each rank's loader holds a disjoint shard; the counts are summed over ranks.
    """
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
    if across_ranks:
        loss_sum, top1, top5, total = distributed.all_reduce_sums([loss_sum, top1, top5, total], device)
    if total == 0:
        raise ValueError("evaluation data set is empty")
    return {"loss": loss_sum / total, "top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total}


def holdout_split(train_set: Dataset, holdout: int) -> tuple[Dataset, Dataset]:
    """``(training part, held-out part)``: the last ``holdout`` examples are held out."""
    from torch.utils.data import Subset

    n = len(train_set)  # type: ignore[arg-type]
    if holdout == 0:
        return train_set, Subset(train_set, [])
    if holdout >= n:
        raise ValueError(f"holdout {holdout} leaves nothing to train on ({n} training examples)")
    return Subset(train_set, range(n - holdout)), Subset(train_set, range(n - holdout, n))


SKIPPED_IMAGES = "skipped_images.txt"


def screen_datasets(datasets: list[Dataset], skip: bool, progress: Optional[ProgressFactory] = None,
                    threads: int = 0) -> list[tuple[str, str]]:
    """Decode every image of the image-folder data sets among ``datasets`` once (``--verify-images``).

    Corrupt images raise one ValueError listing them, or with ``skip`` (``--skip-corrupt``) are
    dropped from their data set and returned as ``(path, reason)``. Data sets read from arrays
    (MNIST, CIFAR) have nothing to decode: a warning says the option does nothing for them.
    """
    from ..data.imagenet import screen_images

    folders = [d for d in datasets if hasattr(d, "samples") and hasattr(d, "root")]
    if not folders:
        warnings.warn("--verify-images/--skip-corrupt check image folders (--data imagenet); this data set "
                      "is read from arrays, so there is nothing to check", stacklevel=2)
        return []
    total = sum(len(d.samples) for d in folders)
    advance = progress(total, "checking images") if progress is not None else None
    return screen_images(folders, skip, advance, threads)
