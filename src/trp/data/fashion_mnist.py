"""Fashion-MNIST from the four original IDX files on disk (gzipped or not; never downloaded)."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision import transforms
from torchvision.datasets import FashionMNIST, VisionDataset

from ..errors import FileError
from ..limits import limit

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
_REPLACE = f"replace it with the original from {_URL}"


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


# IDX: a 4-byte magic (two zero bytes, the element type, the number of dimensions), one big-endian
# uint32 per dimension, then the elements. Fashion-MNIST holds unsigned bytes only.
_IDX_UBYTE = 0x08
_CHUNK = 1 << 22


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """The uint8 array of the IDX file ``path`` (plain or ``.gz``) with ``ndim`` dimensions.

    The file is untrusted: the header is read and checked first (magic, dimensions, sizes
    within :data:`trp.limits` ``TRP_MAX_EXAMPLES``); a ``.gz`` is decompressed as a stream,
    never more than the header declares, and a file holding fewer bytes than declared is
    refused. Every failure raises :class:`trp.errors.FileError` naming the file.
    """
    expected = 0x0800 | ndim
    kind = "images" if ndim == 3 else "labels"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise FileError(f"{path}: not a valid IDX file (only {len(head)} bytes); {_REPLACE}")
            magic = int.from_bytes(head, "big")
            if head[:2] != b"\0\0" or head[2] != _IDX_UBYTE or head[3] != ndim:
                raise FileError(f"{path}: not a valid IDX file of {kind}: magic number 0x{magic:08x}, expected "
                                f"0x{expected:08x} (unsigned bytes, {ndim} dimension(s)); {_REPLACE}")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise FileError(f"{path}: the IDX header is cut off; {_REPLACE}")
            dims = [int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in range(ndim)]
            if dims[0] == 0:
                raise FileError(f"{path}: the IDX file holds no {kind} (its header declares 0); {_REPLACE}")
            most = limit("TRP_MAX_EXAMPLES")
            if dims[0] > most:
                raise FileError(f"{path}: the IDX header declares {dims[0]:,} {kind}, over the limit of {most:,} "
                                f"(raise it with $TRP_MAX_EXAMPLES); {_REPLACE}")
            if ndim == 3 and tuple(dims[1:]) != _IMAGE_HW:
                raise FileError(f"{path}: images are {tuple(dims[1:])}, expected 28×28; {_REPLACE}")
            count = math.prod(dims)
            if path.suffix != ".gz":
                present = path.stat().st_size - 4 - 4 * ndim
                if present < count:
                    raise FileError(f"{path}: the IDX header declares {count:,} bytes of {kind}, the file holds "
                                    f"{present:,}: it is truncated; {_REPLACE}")
            data = bytearray()
            while len(data) < count:  # grows only with the bytes actually there
                chunk = f.read(min(_CHUNK, count - len(data)))
                if not chunk:
                    raise FileError(f"{path}: the IDX header declares {count:,} bytes of {kind}, the file holds "
                                    f"{len(data):,}: it is truncated; {_REPLACE}")
                data += chunk
    except FileError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise FileError(f"{path}: not a readable IDX file ({type(err).__name__}: {err}); {_REPLACE}") from None
    return torch.frombuffer(data, dtype=torch.uint8).reshape(dims) if count else torch.zeros(dims, dtype=torch.uint8)


@lru_cache(maxsize=4)
def _load(images: Path, labels: Path, stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    data = read_idx(images, 3)
    targets = read_idx(labels, 1).long()
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
