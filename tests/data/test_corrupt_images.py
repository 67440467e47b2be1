"""A corrupt image in an ImageFolder gives a ValueError naming the file (issue 11, defect 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trp.data.imagenet import imagenet


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg", b"GIF89a" + b"\x00" * 3])
def test_corrupt_image_names_the_file(imagefolder_root: Path, content: bytes) -> None:
    dataset = imagenet(imagefolder_root, train=False, crop_size=16, resize_size=20)
    path, _ = dataset.samples[1]
    Path(path).write_bytes(content)
    image, label = dataset[0]  # the others still load
    assert image.shape == (3, 16, 16)
    with pytest.raises(ValueError, match=rf"corrupt or unreadable image {path} .*replace or remove it"):
        dataset[1]
