"""Shared fixtures: fake CIFAR, ImageNet and Fashion-MNIST folders in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

N_PER_BATCH = 10


def _dump(path: Path, obj: dict) -> None:
    # The real release was written by Python 2 with pickle protocol 2.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict:
    return {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def make_fake_cifar10(root: Path) -> Path:
    """Fake ``root/cifar-10-batches-py`` in the real on-disk format; returns that folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", _batch(rng, N_PER_BATCH, b"labels", 10))
    _dump(folder / "test_batch", _batch(rng, N_PER_BATCH, b"labels", 10))
    _dump(
        folder / "batches.meta",
        {
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_cases_per_batch": N_PER_BATCH,
            b"num_vis": 3072,
        },
    )
    return folder


def make_fake_cifar100(root: Path) -> Path:
    """Fake ``root/cifar-100-python`` in the real on-disk format; returns that folder."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", 5 * N_PER_BATCH), ("test", N_PER_BATCH)):
        batch = _batch(rng, n, b"fine_labels", 100)
        batch[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, size=n)]
        _dump(folder / name, batch)
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return folder


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    make_fake_cifar10(tmp_path)
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path: Path) -> Path:
    make_fake_cifar100(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests run many tiny ops: one thread avoids OpenMP spin-wait stalls on busy machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IMAGEFOLDER_CLASSES = ("cat", "dog", "fish")
IMAGEFOLDER_SIZES = ((40, 50), (64, 48), (50, 40), (48, 64))  # (width, height)


def make_fake_imagefolder(
    root: Path,
    classes: tuple[str, ...] = IMAGEFOLDER_CLASSES,
    n_train: int = 4,
    n_val: int = 2,
) -> Path:
    """Fake ``root/{train,val}/<class>/<image>.JPEG`` with small random JPEGs of mixed sizes; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = IMAGEFOLDER_SIZES[(label + i) % len(IMAGEFOLDER_SIZES)]
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{name}_{i}.JPEG", format="JPEG")
    return root


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    return make_fake_imagefolder(tmp_path / "imagenet")


# -- Fashion-MNIST: the four IDX files --------------------------------------------------------
FASHION_N_TRAIN, FASHION_N_TEST = 24, 8


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_fake_fashion_mnist(folder: Path, gz: bool, seed: int = 0, n_train: int = FASHION_N_TRAIN) -> dict[str, np.ndarray]:
    """Write the four IDX files of a tiny Fashion-MNIST into ``folder``; return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (FASHION_N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, FASHION_N_TEST, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """A folder holding a tiny gzipped Fashion-MNIST (24 training and 8 test images)."""
    make_fake_fashion_mnist(tmp_path / "fashion", gz=True)
    return tmp_path / "fashion"
