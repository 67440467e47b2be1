"""CIFAR-10/100 from a local copy of the python-pickle release (never downloaded)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, VisionDataset

from ..errors import FileError

__all__ = [
    "CIFAR_NAMES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_URL",
    "LocalCIFAR10",
    "LocalCIFAR100",
    "cifar",
    "cifar_layout",
    "cifar_transform",
]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR_NAMES = ("cifar10", "cifar100")

_IMAGE_BYTES = 3 * 32 * 32

# Globals a CIFAR pickle may legitimately reference: numpy array reconstruction, and
# ``_codecs.encode`` which Python 3 uses to pickle ``bytes`` at protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a CIFAR batch file needs.

    Arrays are built as :class:`_CheckedArray`, which refuses a shape whose bytes exceed the
    file's size before anything is allocated: a pickle cannot hold more pixel bytes than its file.
    """

    def __init__(self, file: Any, budget: int, path: Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.budget = budget
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a CIFAR file")
        if name == "ndarray":
            _BUDGET.path, _BUDGET.bytes = self.path, self.budget
            return _CheckedArray
        return super().find_class(module, name)


class _Budget:
    """The bytes an array unpickled from the current file may hold (the file's size)."""

    path: Path = Path("?")
    bytes: int = 0


_BUDGET = _Budget()


def _check_declared(shape: Any, dtype: Any) -> None:
    try:
        dt = np.dtype(dtype)
        count = math.prod(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    except (TypeError, ValueError, OverflowError) as err:
        raise FileError(f"{_BUDGET.path}: an array's shape or type is malformed ({err}); the file is corrupt") from None
    if dt.hasobject:
        raise FileError(f"{_BUDGET.path}: an array holds Python objects, not pixel values; the file is crafted")
    if count < 0 or count * dt.itemsize > _BUDGET.bytes:
        raise FileError(f"{_BUDGET.path}: an array declares shape {tuple(shape) if isinstance(shape, (tuple, list)) else shape} "
                        f"({count * dt.itemsize:,} bytes), more than the file's {_BUDGET.bytes:,} bytes hold; "
                        "the file is truncated or crafted: replace it with the original")


class _CheckedArray(np.ndarray):
    """``numpy.ndarray`` as a CIFAR pickle builds it, with the declared size checked first."""

    def __new__(cls, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
        _check_declared(shape, dtype)
        return np.ndarray.__new__(np.ndarray, shape, dtype, *args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 3:
            _check_declared(state[1], state[2])
        super().__setstate__(state)


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _read_dict(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR file into a dict with ``str`` keys; failures raise ``ValueError``."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, os.fstat(f.fileno()).st_size, path, encoding="latin1").load()
    except OSError as e:
        raise ValueError(f"{path}: cannot read file ({e})") from e
    except FileError:
        raise
    except Exception as e:  # a corrupt pickle can fail in many ways
        raise ValueError(
            f"{path}: not a valid CIFAR pickle file ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {_text(k): (np.asarray(v).view(np.ndarray) if isinstance(v, np.ndarray) else v) for k, v in obj.items()}


class _LocalCifarMixin:
    """Loading logic shared by :class:`LocalCIFAR10` and :class:`LocalCIFAR100`."""

    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]
    label_key: str
    num_classes: int
    display_name: str
    archive_name: str
    layout: str

    def __init__(
        self,
        root: str | os.PathLike[str],
        train: bool = True,
        transform: Callable[..., Any] | None = None,
        target_transform: Callable[..., Any] | None = None,
    ) -> None:
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)  # type: ignore[arg-type]
        self.train = train
        self.folder = self._resolve_folder(Path(root).expanduser())
        if not self._check_integrity():
            raise FileNotFoundError(self._not_found_message(Path(root)))

        files = self.train_list if train else self.test_list
        chunks: list[np.ndarray] = []
        self.targets: list[int] = []
        for file_name, _md5 in files:
            data, labels = self._read_batch(self.folder / file_name)
            chunks.append(data)
            self.targets.extend(labels)
        images = np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.data: Any = np.ascontiguousarray(images)  # (N, 32, 32, 3) uint8, HWC
        self._load_meta()

    # -- locating files -------------------------------------------------------------------

    def _expected_files(self) -> list[str]:
        return [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]

    def _resolve_folder(self, data_dir: Path) -> Path:
        nested = data_dir / self.base_folder
        if nested.is_dir():
            return nested
        if data_dir.is_dir() and (
            data_dir.name == self.base_folder
            or any((data_dir / f).exists() for f in self._expected_files())
        ):
            return data_dir
        return nested

    def _check_integrity(self) -> bool:
        """Whether every expected file exists (replaces torchvision's md5 check)."""
        return all((self.folder / f).is_file() for f in self._expected_files())

    def _not_found_message(self, data_dir: Path) -> str:
        if not data_dir.expanduser().exists():
            problem = f"data directory {data_dir} does not exist"
        else:
            missing = [f for f in self._expected_files() if not (self.folder / f).is_file()]
            problem = f"missing {', '.join(missing)} in {self.folder}"
        return (
            f"{self.display_name} not found: {problem}. Expected the python version of "
            f"{self.display_name} as {cifar_layout(self._name, str(data_dir))} "
            f"(or --data-dir pointing at the {self.base_folder} folder itself). It is never "
            f"downloaded automatically: download {self.archive_name} by hand from {CIFAR_URL} "
            f"and extract it into {data_dir}."
        )

    def download(self) -> None:
        """Refuse to download: the data must be fetched by hand."""
        raise RuntimeError(
            f"{self.display_name} is never downloaded automatically; download "
            f"{self.archive_name} from {CIFAR_URL} and extract it by hand"
        )

    @property
    def _name(self) -> str:
        return "cifar10" if self.num_classes == 10 else "cifar100"

    # -- reading and validating -----------------------------------------------------------

    def _read_batch(self, path: Path) -> tuple[np.ndarray, list[int]]:
        entry = _read_dict(path)
        for key in ("data", self.label_key):
            if key not in entry:
                raise ValueError(
                    f"{path}: missing key {key!r} (found keys: {sorted(map(str, entry))})"
                )
        try:
            data = np.asarray(entry["data"])
        except Exception as e:
            raise ValueError(f"{path}: 'data' is not an array ({e})") from e
        if data.ndim != 2 or data.shape[1] != _IMAGE_BYTES or data.shape[0] == 0:
            raise ValueError(
                f"{path}: 'data' has shape {data.shape}, expected (N, {_IMAGE_BYTES}) with N > 0 "
                "(one row of 3x32x32 bytes per image)"
            )
        if data.dtype != np.uint8:
            if not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() > 255:
                raise ValueError(f"{path}: 'data' must hold uint8 pixel values, got {data.dtype}")
            data = data.astype(np.uint8)
        labels_raw = entry[self.label_key]
        try:
            labels = [int(v) for v in labels_raw]
        except Exception as e:
            raise ValueError(f"{path}: {self.label_key!r} is not a list of integers ({e})") from e
        if len(labels) != data.shape[0]:
            raise ValueError(
                f"{path}: {len(labels)} labels for {data.shape[0]} images in {self.label_key!r}"
            )
        bad = [v for v in labels if not 0 <= v < self.num_classes]
        if bad:
            raise ValueError(
                f"{path}: label {bad[0]} in {self.label_key!r} is outside [0, {self.num_classes})"
            )
        return data, labels

    def _load_meta(self) -> None:
        path = self.folder / self.meta["filename"]
        entry = _read_dict(path)
        key = self.meta["key"]
        names = entry.get(key)
        if not isinstance(names, (list, tuple)) or len(names) != self.num_classes:
            raise ValueError(
                f"{path}: expected {key!r} to be a list of {self.num_classes} class names"
            )
        self.classes = [str(_text(n)) for n in names]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class LocalCIFAR10(_LocalCifarMixin, CIFAR10):
    """torchvision CIFAR10 read from a local copy; the md5 check becomes a file-exists check.

    ``root`` is the folder containing ``cifar-10-batches-py/`` or that folder itself.
    Missing files raise ``FileNotFoundError``; malformed files raise ``ValueError``.
    """

    label_key = "labels"
    num_classes = 10
    display_name = "CIFAR-10"
    archive_name = "cifar-10-python.tar.gz"


class LocalCIFAR100(_LocalCifarMixin, CIFAR100):
    """torchvision CIFAR100 read from a local copy; the md5 check becomes a file-exists check.

    ``root`` is the folder containing ``cifar-100-python/`` or that folder itself. Fine
    labels (100 classes) are used. Missing files raise ``FileNotFoundError``; malformed
    files raise ``ValueError``.
    """

    label_key = "fine_labels"
    num_classes = 100
    display_name = "CIFAR-100"
    archive_name = "cifar-100-python.tar.gz"


_CLASSES: dict[str, type[_LocalCifarMixin]] = {"cifar10": LocalCIFAR10, "cifar100": LocalCIFAR100}
_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
_LAYOUTS = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    "cifar100": "cifar-100-python/{train, test, meta}",
}


def _check_name(name: str) -> None:
    if name not in _CLASSES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {', '.join(CIFAR_NAMES)}")


def cifar_layout(name: str, data_dir: str = "DIR") -> str:
    """The on-disk layout expected for ``name`` under ``data_dir``, e.g. ``DIR/cifar-100-python/{train, test, meta}``."""
    _check_name(name)
    return f"{data_dir.rstrip('/') or '/'}/{_LAYOUTS[name]}"


def cifar_transform(name: str, augment: bool) -> transforms.Compose:
    """ToTensor + Normalize, preceded by RandomCrop(32, padding=4) + horizontal flip if ``augment``."""
    _check_name(name)
    mean, std = _STATS[name]
    steps: list[Any] = []
    if augment:
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def cifar(
    name: str, data_dir: str | os.PathLike[str], train: bool, augment: bool | None = None
) -> Dataset:
    """CIFAR-10/100 train or test split from a local copy, with standard augmentation.

    ``augment`` defaults to ``train``. Items are ``(float32 tensor (3, 32, 32), int label)``.
    """
    _check_name(name)
    if augment is None:
        augment = train
    dataset = _CLASSES[name](data_dir, train=train, transform=cifar_transform(name, augment))
    dataset.augment = augment  # type: ignore[attr-defined]
    return dataset  # type: ignore[return-value]
