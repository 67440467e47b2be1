"""Corrupt images in an ImageFolder (issue 11, defect 4): named when reached, or found up front.

The fake folders are written by the tests: a truncated JPEG, a truncated PNG and a text file
named ``.jpg`` stand for the corrupt files of a real download.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trp.data.imagenet import drop_images, find_corrupt_images, imagenet, screen_images


def _truncated(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


def corrupt(root: Path, split: str = "train") -> list[Path]:
    """Write three corrupt files into ``root/split``'s class folders; return their paths."""
    files = {
        root / split / "cat" / "broken.jpg": _truncated("JPEG"),
        root / split / "dog" / "broken.png": _truncated("PNG"),
        root / split / "fish" / "notes.jpg": b"these are my notes, not an image\n",
    }
    for path, data in files.items():
        path.write_bytes(data)
    return sorted(files)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg", b"GIF89a" + b"\x00" * 3])
def test_corrupt_image_names_the_file_and_both_options(imagefolder_root: Path, content: bytes) -> None:
    dataset = imagenet(imagefolder_root, train=False, crop_size=16, resize_size=20)
    path, _ = dataset.samples[1]
    Path(path).write_bytes(content)
    image, label = dataset[0]  # the others still load
    assert image.shape == (3, 16, 16)
    with pytest.raises(ValueError, match=rf"corrupt or unreadable image {path} .*replace or remove it") as err:
        dataset[1]
    assert "--verify-images" in str(err.value) and "--skip-corrupt" in str(err.value)


def test_find_corrupt_images_reports_each_bad_file_once(imagefolder_root: Path) -> None:
    bad = corrupt(imagefolder_root)
    dataset = imagenet(imagefolder_root, train=True, crop_size=16, resize_size=20)
    seen = []
    found = find_corrupt_images(dataset, advance=seen.append, threads=2)
    assert sorted(Path(p) for p, _ in found) == bad
    assert all(reason for _, reason in found)
    assert sum(seen) == len(dataset.samples) == 12 + 3


def test_screen_images_fails_once_listing_every_corrupt_file(imagefolder_root: Path) -> None:
    bad = corrupt(imagefolder_root) + corrupt(imagefolder_root, "val")
    train = imagenet(imagefolder_root, train=True, crop_size=16, resize_size=20)
    val = imagenet(imagefolder_root, train=False, crop_size=16, resize_size=20)
    before = list(train.samples)
    with pytest.raises(ValueError) as err:
        screen_images([train, val], skip=False)
    message = str(err.value)
    assert message.startswith("6 corrupt or unreadable image(s)")
    assert all(str(p) in message for p in bad) and "--skip-corrupt" in message
    assert train.samples == before  # nothing dropped without skip


def test_screen_images_lists_the_first_ten_and_counts_the_rest(imagefolder_root: Path) -> None:
    for i in range(12):
        (imagefolder_root / "train" / "cat" / f"empty{i:02d}.jpg").write_bytes(b"")
    train = imagenet(imagefolder_root, train=True, crop_size=16, resize_size=20)
    with pytest.raises(ValueError, match=r"^12 corrupt .* and 2 more\. Replace or remove them") as err:
        screen_images([train], skip=False)
    assert sum(f"empty{i:02d}.jpg" in str(err.value) for i in range(12)) == 10


def test_skip_drops_the_corrupt_files_and_keeps_the_labels(imagefolder_root: Path) -> None:
    bad = corrupt(imagefolder_root)
    train = imagenet(imagefolder_root, train=True, crop_size=16, resize_size=20)
    good = [(p, y) for p, y in train.samples if Path(p) not in bad]
    skipped = screen_images([train], skip=True)
    assert sorted(Path(p) for p, _ in skipped) == bad
    assert train.samples == good and train.imgs == good and train.targets == [y for _, y in good]
    for i in range(len(train)):  # every remaining image loads
        image, label = train[i]
        assert image.shape == (3, 16, 16) and label == good[i][1]
    assert screen_images([train], skip=False) == []  # nothing left to find


def test_dropping_every_image_is_an_error(imagefolder_root: Path) -> None:
    val = imagenet(imagefolder_root, train=False, crop_size=16, resize_size=20)
    with pytest.raises(ValueError, match="no readable image left"):
        drop_images(val, [p for p, _ in val.samples])
