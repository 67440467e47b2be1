"""Fashion-MNIST from the four original IDX files on disk (gzipped or not; never downloaded)."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision import transforms
from torchvision.datasets import FashionMNIST, VisionDataset
from torchvision.datasets.mnist import read_image_file, read_label_file

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_HOLDOUT",
    "LocalFashionMNIST",
    "fashion_mnist",
    "fashion_mnist_files",
    "fashion_mnist_transform",
]

# Statistics of the 60,000 training images scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the files.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# The held-out split used by the benchmark configs: the last 5,000 training images in file order
# (500 ± 30 per class), kept out of training with `holdout: 5000`.
FASHION_MNIST_HOLDOUT = 5000
_URL = "https://github.com/zalandoresearch/fashion-mnist"
_HOW_TO_GET = (
    "install them with `apt-get install dataset-fashion-mnist` (they land in "
    f"{FASHION_MNIST_DEBIAN_DIR}), or download the four *-ubyte.gz files by hand from {_URL} "
    "and pass their folder as --data-dir; they are never downloaded automatically"
)
_STEMS = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_HW = (28, 28)


def _candidate_folders(data_dir: Path) -> list[Path]:
    """``data_dir`` itself, then torchvision's download layout beneath it."""
    return [data_dir, data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist"]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_files(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """The four IDX files by stem, found in ``data_dir`` (default: the Debian package's folder).

    Each may be plain or gzipped (``.gz``); ``data_dir/FashionMNIST/raw`` (torchvision's
    layout) is also searched. Raises ``FileNotFoundError`` saying how to get the files.
    """
    root = Path(data_dir if data_dir is not None else FASHION_MNIST_DEBIAN_DIR).expanduser()
    stems = [s for pair in _STEMS.values() for s in pair]
    for folder in _candidate_folders(root):
        found = {s: _find(folder, s) for s in stems}
        if all(found.values()):
            return found  # type: ignore[return-value]
    if not root.exists():
        problem = f"{root} does not exist"
    else:
        found = {s: _find(root, s) for s in stems}
        problem = f"missing {', '.join(s + '[.gz]' for s, p in found.items() if p is None)} in {root}"
    where = "--data-dir" if data_dir is not None else "the default location (no --data-dir given)"
    raise FileNotFoundError(f"Fashion-MNIST not found in {where}: {problem}. To get the files, {_HOW_TO_GET}.")


def _read(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Read one IDX file with torchvision's reader, decompressing a ``.gz`` to a temporary file first."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.TemporaryDirectory(prefix="trp-idx-") as tmp:
            plain = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return reader(str(plain))
    except (AssertionError, TypeError, ValueError, OSError, EOFError, RuntimeError) as err:
        raise ValueError(f"{path}: not a valid IDX file ({type(err).__name__}: {err}); "
                         f"replace it with the original from {_URL}") from err


@lru_cache(maxsize=4)
def _load(images: Path, labels: Path, stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    data = _read(images, read_image_file)
    targets = _read(labels, read_label_file)
    if tuple(data.shape[1:]) != _IMAGE_HW:
        raise ValueError(f"{images}: images are {tuple(data.shape[1:])}, expected 28×28")
    if len(data) != len(targets):
        raise ValueError(f"{images} holds {len(data)} images but {labels} holds {len(targets)} labels")
    if len(targets) == 0:
        raise ValueError(f"{labels}: no examples")
    if int(targets.min()) < 0 or int(targets.max()) >= 10:
        raise ValueError(f"{labels}: label {int(targets.max())} is outside the 10 classes")
    return data, targets


class LocalFashionMNIST(FashionMNIST):
    """torchvision's FashionMNIST read from the four IDX files where they lie (see :func:`fashion_mnist_files`).

    Items are ``(transform(PIL image), int label)`` as in torchvision; ``data`` is the uint8
    ``(N, 28, 28)`` tensor and ``targets`` the int64 labels.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        train: bool = True,
        transform: Callable[..., Any] | None = None,
        target_transform: Callable[..., Any] | None = None,
    ) -> None:
        files = fashion_mnist_files(root)
        VisionDataset.__init__(self, str(files[_STEMS[train][0]].parent), transform=transform,
                               target_transform=target_transform)
        self.train = train
        images, labels = (files[s] for s in _STEMS[train])
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (images, labels))
        self.data, self.targets = _load(images, labels, stamp)

    def download(self) -> None:
        """Refuse to download: the files must be installed or fetched by hand."""
        raise RuntimeError(f"Fashion-MNIST is never downloaded automatically; {_HOW_TO_GET}")


def fashion_mnist_transform(augment: bool, hflip: bool = False, padding: int = 2) -> transforms.Compose:
    """ToTensor + Normalize, preceded by RandomCrop(28, padding) (and a horizontal flip if ``hflip``) when ``augment``."""
    steps: list[Any] = []
    if augment:
        steps.append(transforms.RandomCrop(28, padding=padding))
        if hflip:
            steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)]
    return transforms.Compose(steps)


def fashion_mnist(
    data_dir: str | os.PathLike[str] | None, train: bool, augment: bool | None = None, hflip: bool = False
) -> LocalFashionMNIST:
    """The Fashion-MNIST train (60,000) or test (10,000) split, normalized, augmented if ``augment``.

    ``augment`` defaults to ``train``: a random 28×28 crop of the image padded by 2 pixels;
    horizontal flips only with ``hflip``. ``data_dir`` None reads the Debian package's folder.
    """
    if augment is None:
        augment = train
    dataset = LocalFashionMNIST(data_dir, train=train, transform=fashion_mnist_transform(augment, hflip))
    dataset.augment = augment  # type: ignore[attr-defined]
    return dataset
