"""Tests for trp.data.imagenet: a local ImageFolder tree, from small fake JPEG folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import IMAGEFOLDER_CLASSES, make_fake_imagefolder
from trp.data import (
    DATASET_INFO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    get_datasets,
    imagenet,
    imagenet_layout,
    list_datasets,
)

SMALL = {"crop_size": 32, "resize_size": 36}
LAYOUT = "{train,val}/<class>/<image>.JPEG"


def _types(ds) -> list[type]:
    return [type(t) for t in ds.transform.transforms]


def test_lengths_and_class_mapping(imagefolder_root: Path) -> None:
    train = imagenet(imagefolder_root, train=True, **SMALL)
    val = imagenet(str(imagefolder_root), train=False, **SMALL)
    assert len(train) == 3 * 4 and len(val) == 3 * 2
    assert train.classes == val.classes == sorted(IMAGEFOLDER_CLASSES)
    assert train.class_to_idx == val.class_to_idx == {"cat": 0, "dog": 1, "fish": 2}
    assert sorted(set(train.targets)) == sorted(set(val.targets)) == [0, 1, 2]
    for path, target in val.samples:
        assert Path(path).parent.name == val.classes[target]


@pytest.mark.parametrize("train", [True, False])
def test_sample_shapes(imagefolder_root: Path, train: bool) -> None:
    ds = imagenet(imagefolder_root, train=train, **SMALL)
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
        assert image.shape == (3, 32, 32)
        assert isinstance(label, int) and 0 <= label < 3


def test_transforms(imagefolder_root: Path) -> None:
    train = imagenet(imagefolder_root, train=True)
    val = imagenet(imagefolder_root, train=False)
    assert _types(train) == [
        transforms.RandomResizedCrop,
        transforms.RandomHorizontalFlip,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    assert _types(val) == [transforms.Resize, transforms.CenterCrop, transforms.ToTensor, transforms.Normalize]
    assert train.transform.transforms[0].size == (224, 224)
    assert val.transform.transforms[0].size == 256
    assert val.transform.transforms[1].size == (224, 224)
    for ds in (train, val):
        normalize = ds.transform.transforms[-1]
        assert tuple(normalize.mean) == IMAGENET_MEAN == (0.485, 0.456, 0.406)
        assert tuple(normalize.std) == IMAGENET_STD == (0.229, 0.224, 0.225)
    assert train.augment and not val.augment
    assert val[0][0].shape == (3, 224, 224)


def test_normalization_applied(imagefolder_root: Path) -> None:
    val = imagenet(imagefolder_root, train=False, **SMALL)
    path, _ = val.samples[1]
    with Image.open(path) as raw:
        expected = transforms.ToTensor()(transforms.CenterCrop(32)(transforms.Resize(36)(raw.convert("RGB"))))
    image, _ = val[1]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(image * std + mean, expected, atol=1e-5)
    # Uniform random pixels (mean 0.5) land near zero after normalization, well outside [0, 1].
    batch = torch.stack([val[i][0] for i in range(len(val))])
    assert abs(batch.mean().item()) < 0.5
    assert batch.min().item() < -1.5 and batch.max().item() > 1.5


def test_train_is_random_val_deterministic(imagefolder_root: Path) -> None:
    train = imagenet(imagefolder_root, train=True, **SMALL)
    val = imagenet(imagefolder_root, train=False, **SMALL)
    assert torch.equal(val[0][0], val[0][0])
    torch.manual_seed(0)
    samples = [train[0][0] for _ in range(5)]
    assert any(not torch.equal(samples[0], s) for s in samples[1:])


def test_bad_sizes(imagefolder_root: Path) -> None:
    with pytest.raises(ValueError, match="resize_size"):
        imagenet(imagefolder_root, train=False, crop_size=64, resize_size=32)
    with pytest.raises(ValueError, match="crop_size"):
        imagenet(imagefolder_root, train=True, crop_size=0)


# -- get_datasets ---------------------------------------------------------------------------


def test_get_datasets_imagenet(imagefolder_root: Path) -> None:
    train, val, info = get_datasets("imagenet", str(imagefolder_root), seed=0)
    assert info == DatasetInfo("imagenet", 3, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    assert len(train) == 12 and len(val) == 6
    assert train.class_to_idx == val.class_to_idx
    assert val[0][0].shape == (3, 224, 224)
    assert "imagenet" in list_datasets()
    assert DATASET_INFO["imagenet"].num_classes == 1000  # static default, untouched


def test_get_datasets_imagenet_requires_data_dir() -> None:
    with pytest.raises(ValueError, match="--data-dir") as info:
        get_datasets("imagenet")
    assert LAYOUT in str(info.value)


def test_layout() -> None:
    assert imagenet_layout() == f"DATA_DIR/{LAYOUT}"
    assert imagenet_layout("/data/in1k/") == f"/data/in1k/{LAYOUT}"


# -- errors ---------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        imagenet(missing, train=True)
    assert str(missing) in str(info.value) and LAYOUT in str(info.value)
    assert "never downloaded" in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_datasets("imagenet", str(missing))


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(imagefolder_root: Path, split: str) -> None:
    shutil.rmtree(imagefolder_root / split)
    with pytest.raises(FileNotFoundError, match=f"split folder .*{split}") as info:
        imagenet(imagefolder_root, train=split == "train")
    assert LAYOUT in str(info.value)
    with pytest.raises(FileNotFoundError, match=split):
        get_datasets("imagenet", str(imagefolder_root))


def test_val_alone_loads_without_train(imagefolder_root: Path) -> None:
    shutil.rmtree(imagefolder_root / "train")
    assert len(imagenet(imagefolder_root, train=False, **SMALL)) == 6


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders") as info:
        imagenet(tmp_path, train=True)
    assert LAYOUT in str(info.value)


def test_flat_val_folder_suggests_refoldering(imagefolder_root: Path) -> None:
    val = imagefolder_root / "val"
    for image in list(val.glob("*/*.JPEG")):
        image.rename(val / image.name)
    for folder in [p for p in val.iterdir() if p.is_dir()]:
        folder.rmdir()
    with pytest.raises(FileNotFoundError, match="no class folders") as info:
        imagenet(imagefolder_root, train=False)
    assert "6 image(s) directly" in str(info.value) and "re-folder" in str(info.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_folder_without_images(imagefolder_root: Path, split: str) -> None:
    folder = imagefolder_root / split / "dog"
    for image in folder.iterdir():
        image.unlink()
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="hold no images") as info:
        imagenet(imagefolder_root, train=split == "train")
    assert str(folder) in str(info.value) and LAYOUT in str(info.value)


@pytest.mark.parametrize("train", [True, False])
def test_classes_differ(imagefolder_root: Path, train: bool) -> None:
    (imagefolder_root / "val" / "fish").rename(imagefolder_root / "val" / "shark")
    with pytest.raises(ValueError, match="class folders differ") as info:
        imagenet(imagefolder_root, train=train)
    message = str(info.value)
    assert "'fish'" in message and "'shark'" in message and "class→index" in message
    with pytest.raises(ValueError, match="class folders differ"):
        get_datasets("imagenet", str(imagefolder_root))


def test_missing_class_in_val(tmp_path: Path) -> None:
    make_fake_imagefolder(tmp_path)
    shutil.rmtree(tmp_path / "val" / "dog")
    with pytest.raises(ValueError, match="only in train: \\['dog'\\]"):
        imagenet(tmp_path, train=False)
