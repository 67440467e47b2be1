"""ImageNet-style classification data from a local ImageFolder tree (never downloaded).

Expected layout: ``DATA_DIR/{train,val}/<class>/<image>.JPEG``, one sub-folder per class in
each split, with the same class folders in both (the usual layout after re-foldering the
ImageNet validation images into per-class folders). Any number of classes works, so a
subset or a small fake tree loads the same way as the full 1000-class set.

A corrupt image fails with a ValueError naming it when it is reached; :func:`find_corrupt_images`
decodes every image up front, and :func:`screen_images` turns what it finds into one error
listing the files, or drops them (``skip=True``, the CLI's ``--skip-corrupt``).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from torchvision import transforms
from PIL import Image

from ..limits import limit
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
    "find_corrupt_images",
    "drop_images",
    "screen_images",
    "CORRUPT_FIX",
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
            with warnings.catch_warnings():  # trp's own pixel budget below decides, not Pillow's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f)  # reads the header only
            budget = limit("TRP_MAX_IMAGE_PIXELS")
            if image.width * image.height > budget:
                raise ValueError(f"{image.width}×{image.height} pixels, over the budget of {budget:,} pixels "
                                 "per decoded image (raise it with $TRP_MAX_IMAGE_PIXELS)")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"corrupt or unreadable image {path} ({type(err).__name__}: {err}): replace or remove it, "
            f"then start again. {CORRUPT_FIX}"
        ) from None


CORRUPT_FIX = (
    "To find every such file first, pass --verify-images to trp train or trp evaluate (config: verify_images: "
    "true); to leave them out and use the rest, pass --skip-corrupt (config: skip_corrupt: true), "
    "which lists them in the run directory's skipped_images.txt."
)


def _decode_error(path: str) -> Optional[str]:
    """Why the image at ``path`` does not decode, or None when it does."""
    try:
        load_image(path)
    except ValueError as err:
        reason = str(err).split(": replace or remove it")[0].removeprefix(f"corrupt or unreadable image {path} ")
        return reason[1:-1] if reason.startswith("(") and reason.endswith(")") else reason
    return None


def find_corrupt_images(
    dataset: Any, advance: Optional[Callable[[int], None]] = None, threads: int = 0
) -> list[tuple[str, str]]:
    """``(path, reason)`` of every image of an ImageFolder-style ``dataset`` (``.samples``) that does not decode.

    Each image is decoded once, in ``threads`` threads (0: up to 8, by CPU count);
    ``advance(n)`` is called as images are checked (progress).
    """
    paths = [str(path) for path, _ in dataset.samples]
    threads = threads or min(8, os.cpu_count() or 1)
    bad = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path, reason in zip(paths, pool.map(_decode_error, paths, chunksize=64)):
            if reason is not None:
                bad.append((path, reason))
            if advance is not None:
                advance(1)
    return bad


def drop_images(dataset: Any, paths: Sequence[str]) -> None:
    """Remove ``paths`` from an ImageFolder-style ``dataset`` in place (labels of the rest unchanged)."""
    gone = {str(p) for p in paths}
    dataset.samples = [s for s in dataset.samples if str(s[0]) not in gone]
    dataset.imgs = dataset.samples
    dataset.targets = [label for _, label in dataset.samples]
    if not dataset.samples:
        raise ValueError(f"no readable image left in {dataset.root}: every image is corrupt; replace the files")


def screen_images(
    datasets: Sequence[Any], skip: bool, advance: Optional[Callable[[int], None]] = None, threads: int = 0
) -> list[tuple[str, str]]:
    """Decode every image of the ImageFolder-style ``datasets`` once; corrupt ones raise one
    ValueError listing them all (the first 10 and a count), or with ``skip`` are dropped.

    Returns the dropped ``(path, reason)`` pairs (empty when all images decode).
    """
    found = [(dataset, find_corrupt_images(dataset, advance, threads)) for dataset in datasets]
    bad = [item for _, items in found for item in items]
    if bad and not skip:
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        roots = ", ".join(str(dataset.root) for dataset, items in found if items)
        raise ValueError(
            f"{len(bad)} corrupt or unreadable image(s) in {roots}: {listed}{more}. Replace or remove "
            "them, or pass --skip-corrupt (config: skip_corrupt: true) to train on the rest (the skipped "
            "files are then listed in the run directory's skipped_images.txt)."
        )
    for dataset, items in found:
        if items:
            drop_images(dataset, [path for path, _ in items])
    return bad


def imagenet(
    data_dir: str | os.PathLike[str],
    train: bool,
    *,
    crop_size: int = 224,
    resize_size: int = 256,
    augment: bool | None = None,
) -> ImageFolder:
    """The ``train`` or ``val`` split of a local ImageFolder tree, with standard preprocessing.

    Items are ``(float32 tensor (3, crop_size, crop_size), int label)``; class indices
    follow the sorted class folder names. ``augment`` (default: ``train``) picks the training
    preprocessing (random resized crop and flip) over the evaluation one. When both splits exist their class folders must
    match, so that labels mean the same in both. Missing folders, a split without class
    folders and a class folder without images raise ``FileNotFoundError``; differing
    class folders raise ``ValueError``.
    """
    if augment is None:
        augment = train
    transform = imagenet_transform(augment, crop_size, resize_size)
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
    dataset.augment = augment  # type: ignore[attr-defined]
    return dataset
