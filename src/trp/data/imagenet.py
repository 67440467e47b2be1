"""ImageNet-style classification data from a local ImageFolder tree (never downloaded).

Expected layout: ``DATA_DIR/{train,val}/<class>/<image>.JPEG``, one sub-folder per class in
each split, with the same class folders in both (the usual layout after re-foldering the
ImageNet validation images into per-class folders). Any number of classes works, so a
subset or a small fake tree loads the same way as the full 1000-class set.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from torchvision import transforms
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_SPLITS",
    "imagenet",
    "imagenet_layout",
    "imagenet_transform",
    "load_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SPLITS = ("train", "val")

_FIX = (
    "ImageNet is never downloaded automatically: get it by hand (e.g. from "
    "https://image-net.org) and lay it out as {layout}, sorting the validation images into "
    "one folder per class (the usual val re-foldering)."
)


def imagenet_layout(data_dir: str = "DATA_DIR") -> str:
    """The expected on-disk layout under ``data_dir``: ``DATA_DIR/{train,val}/<class>/<image>.JPEG``."""
    return f"{str(data_dir).rstrip('/') or '/'}/{{train,val}}/<class>/<image>.JPEG"


def imagenet_transform(train: bool, crop_size: int = 224, resize_size: int = 256) -> transforms.Compose:
    """Standard ImageNet preprocessing, ending in ToTensor + Normalize(ImageNet mean/std).

    Training: RandomResizedCrop(crop_size) + horizontal flip. Evaluation:
    Resize(resize_size) + CenterCrop(crop_size).
    """
    for label, value in (("crop_size", crop_size), ("resize_size", resize_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if resize_size < crop_size:
        raise ValueError(
            f"resize_size ({resize_size}) must be at least crop_size ({crop_size}); "
            "the usual pair is 256/224"
        )
    steps: list[Any]
    if train:
        steps = [transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(resize_size), transforms.CenterCrop(crop_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_folders(split_dir: Path, data_dir: Path) -> list[str]:
    """Sorted class folder names of one split; missing or flat splits raise ``FileNotFoundError``."""
    layout = imagenet_layout(str(data_dir))
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"ImageNet split folder {split_dir} not found; expected {layout}. "
            + _FIX.format(layout=layout)
        )
    with os.scandir(split_dir) as entries:
        names = sorted(e.name for e in entries if e.is_dir())
    if not names:
        loose = sum(1 for p in split_dir.iterdir() if p.is_file() and _is_image(p.name))
        detail = (
            f" It holds {loose} image(s) directly: sort them into one sub-folder per class "
            "(for ImageNet val, the usual re-foldering by the ground-truth labels)."
            if loose
            else ""
        )
        raise FileNotFoundError(
            f"no class folders in {split_dir}; expected {layout}.{detail}"
        )
    return names


def load_image(path: str) -> Image.Image:
    """An image file as RGB; an unreadable or corrupt file raises ValueError naming it and the fix."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"corrupt or unreadable image {path} ({type(err).__name__}: {err}): replace or remove it, "
            "then start again (PIL's verify() on each file finds all such images)"
        ) from None


def imagenet(
    data_dir: str | os.PathLike[str],
    train: bool,
    *,
    crop_size: int = 224,
    resize_size: int = 256,
) -> ImageFolder:
    """The ``train`` or ``val`` split of a local ImageFolder tree, with standard preprocessing.

    Items are ``(float32 tensor (3, crop_size, crop_size), int label)``; class indices
    follow the sorted class folder names. When both splits exist their class folders must
    match, so that labels mean the same in both. Missing folders, a split without class
    folders and a class folder without images raise ``FileNotFoundError``; differing
    class folders raise ``ValueError``.
    """
    transform = imagenet_transform(train, crop_size, resize_size)
    root = Path(data_dir).expanduser()
    layout = imagenet_layout(str(data_dir))
    if not root.is_dir():
        raise FileNotFoundError(
            f"ImageNet data directory {data_dir} does not exist; expected {layout}. "
            + _FIX.format(layout=layout)
        )
    split = "train" if train else "val"
    other = "val" if train else "train"
    classes = _class_folders(root / split, root)
    if (root / other).is_dir():
        other_classes = _class_folders(root / other, root)
        if other_classes != classes:
            only_here = sorted(set(classes) - set(other_classes))
            only_there = sorted(set(other_classes) - set(classes))
            raise ValueError(
                f"class folders differ between {root / 'train'} and {root / 'val'} "
                f"({len(classes)} in {split}, {len(other_classes)} in {other}; "
                f"only in {split}: {only_here[:5]}, only in {other}: {only_there[:5]}), "
                "so the class→index mapping would differ between the splits. Give both "
                f"splits the same class folders ({layout})."
            )

    dataset = ImageFolder(str(root / split), transform=transform, allow_empty=True, loader=load_image)
    counts = Counter(dataset.targets)
    empty = [c for c in dataset.classes if counts[dataset.class_to_idx[c]] == 0]
    if empty:
        raise FileNotFoundError(
            f"{len(empty)} class folder(s) in {root / split} hold no images, e.g. "
            f"{', '.join(str(root / split / c) for c in empty[:3])}; expected {layout} "
            f"with image files ({', '.join(IMG_EXTENSIONS)}). Remove empty class folders "
            "from both splits or add their images."
        )
    dataset.augment = train  # type: ignore[attr-defined]
    return dataset
