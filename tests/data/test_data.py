"""Tests for trp.data: MNIST-5k splits and local CIFAR-10/100 loading from fake files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from conftest import N_PER_BATCH, make_fake_cifar10, make_fake_cifar100
from trp.data import DatasetInfo, cifar, get_datasets, list_datasets, mnist5k

def _transform_types(ds) -> list[type]:
    return [type(t) for t in ds.transform.transforms]


# -- CIFAR --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_lengths_shapes_labels(tmp_path: Path, name: str, num_classes: int) -> None:
    (make_fake_cifar10 if name == "cifar10" else make_fake_cifar100)(tmp_path)
    train = cifar(name, tmp_path, train=True)
    test = cifar(name, tmp_path, train=False)
    assert len(train) == 5 * N_PER_BATCH
    assert len(test) == N_PER_BATCH
    assert len(train.classes) == num_classes
    assert all(isinstance(c, str) for c in train.classes)
    for ds in (train, test):
        image, label = ds[3]
        assert isinstance(image, torch.Tensor)
        assert image.shape == (3, 32, 32)
        assert image.dtype == torch.float32
        assert isinstance(label, int)
        assert 0 <= label < num_classes


def test_cifar_pixels_match_file(cifar10_root: Path) -> None:
    folder = cifar10_root / "cifar-10-batches-py"
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    ds = cifar("cifar10", cifar10_root, train=False)
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    image, label = ds[4]
    expected = torch.from_numpy(raw[b"data"][4].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(image * std + mean, expected, atol=1e-5)
    assert label == raw[b"labels"][4]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_accepts_both_dir_forms(tmp_path: Path, name: str) -> None:
    folder = (make_fake_cifar10 if name == "cifar10" else make_fake_cifar100)(tmp_path)
    a = cifar(name, tmp_path, train=False)
    b = cifar(name, folder, train=False)
    c = cifar(name, str(folder), train=False)
    assert len(a) == len(b) == len(c) == N_PER_BATCH
    assert np.array_equal(a.data, b.data)
    assert a.targets == b.targets


def test_cifar_augmentation_defaults(cifar10_root: Path) -> None:
    train = cifar("cifar10", cifar10_root, train=True)
    test = cifar("cifar10", cifar10_root, train=False)
    assert train.augment is True
    assert test.augment is False
    assert transforms.RandomCrop in _transform_types(train)
    assert transforms.RandomHorizontalFlip in _transform_types(train)
    assert transforms.RandomCrop not in _transform_types(test)
    assert _transform_types(test) == [transforms.ToTensor, transforms.Normalize]

    plain_train = cifar("cifar10", cifar10_root, train=True, augment=False)
    assert transforms.RandomCrop not in _transform_types(plain_train)
    # Without augmentation, the same item is deterministic; with it, samples vary.
    assert torch.equal(plain_train[0][0], plain_train[0][0])
    torch.manual_seed(0)
    samples = [train[0][0] for _ in range(10)]
    assert any(not torch.equal(samples[0], s) for s in samples[1:])


def test_cifar100_normalization_stats(cifar100_root: Path) -> None:
    ds = cifar("cifar100", cifar100_root, train=False)
    normalize = ds.transform.transforms[-1]
    assert tuple(normalize.mean) == (0.5071, 0.4865, 0.4409)
    assert tuple(normalize.std) == (0.2673, 0.2564, 0.2762)


def test_cifar_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as info:
        cifar("cifar10", missing, train=True)
    message = str(info.value)
    assert "data_batch_1" in message and "batches.meta" in message
    assert "by hand" in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        cifar("cifar100", tmp_path, train=False)


def test_cifar_missing_file(cifar10_root: Path) -> None:
    os.remove(cifar10_root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar("cifar10", cifar10_root, train=True)


def test_cifar_corrupt_file(cifar10_root: Path) -> None:
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="data_batch_2"):
        cifar("cifar10", cifar10_root, train=True)


def test_cifar_corrupt_meta(cifar10_root: Path) -> None:
    (cifar10_root / "cifar-10-batches-py" / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="batches.meta"):
        cifar("cifar10", cifar10_root, train=False)


@pytest.mark.parametrize(
    "entry,problem",
    [
        ({b"labels": [0] * 10}, "'data'"),
        ({b"data": np.zeros((10, 3072), np.uint8)}, "'labels'"),
        ({b"data": np.zeros((10, 3000), np.uint8), b"labels": [0] * 10}, "shape"),
        ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}, "9 labels"),
        ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [10] * 10}, "outside"),
        ([1, 2, 3], "dict"),
    ],
)
def test_cifar_malformed_batch(cifar10_root: Path, entry: object, problem: str) -> None:
    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch") as info:
        cifar("cifar10", cifar10_root, train=False)
    assert problem in str(info.value)


def test_cifar_rejects_foreign_pickle_globals(cifar10_root: Path) -> None:
    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch"):
        cifar("cifar10", cifar10_root, train=False)


def test_cifar_unknown_name(cifar10_root: Path) -> None:
    with pytest.raises(ValueError, match="cifar10"):
        cifar("cifar20", cifar10_root, train=True)


def test_get_datasets_cifar(cifar10_root: Path) -> None:
    train, test, info = get_datasets("cifar10", str(cifar10_root))
    assert info == DatasetInfo(
        "cifar10", 3, 10, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    )
    assert len(train) == 5 * N_PER_BATCH and len(test) == N_PER_BATCH
    assert train.augment and not test.augment


# -- MNIST-5k -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_split() -> tuple:
    return mnist5k(seed=0)


def test_mnist5k_shapes(mnist_split: tuple) -> None:
    train, test = mnist_split
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert set(y_train.tolist()) == set(range(10))
    assert set(y_test.tolist()) == set(range(10))
    assert torch.bincount(torch.cat([y_train, y_test])).tolist() == [500] * 10


def test_mnist5k_normalized(mnist_split: tuple) -> None:
    x = mnist_split[0].tensors[0]
    assert abs(x.mean().item()) < 0.1
    assert abs(x.std().item() - 1) < 0.1
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_mnist5k_seeded(mnist_split: tuple) -> None:
    train, test = mnist_split
    again_train, again_test = mnist5k(seed=0)
    assert torch.equal(train.tensors[0], again_train.tensors[0])
    assert torch.equal(test.tensors[1], again_test.tensors[1])
    other_train, _ = mnist5k(seed=1)
    assert not torch.equal(train.tensors[0], other_train.tensors[0])


def test_mnist5k_returns_independent_copies() -> None:
    train, _ = mnist5k(seed=5)
    before = train.tensors[0].clone()
    train.tensors[0].fill_(123.0)
    again, _ = mnist5k(seed=5)
    assert torch.equal(again.tensors[0], before)


def test_mnist5k_n_train() -> None:
    train, test = mnist5k(seed=0, n_train=4500)
    assert len(train) == 4500 and len(test) == 500
    with pytest.raises(ValueError):
        mnist5k(n_train=5000)


def test_get_datasets_mnist() -> None:
    train, test, info = get_datasets("mnist5k", seed=3)
    assert info.name == "mnist5k" and info.in_channels == 1 and info.num_classes == 10
    assert info.input_size == (28, 28)
    assert len(train) == 4000 and len(test) == 1000
    image, label = train[0]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64


def test_dataset_info_frozen() -> None:
    info = get_datasets("mnist5k")[2]
    with pytest.raises(AttributeError):
        info.num_classes = 3  # type: ignore[misc]


# -- get_datasets errors ------------------------------------------------------------------


def test_list_datasets() -> None:
    assert list_datasets() == ["mnist5k", "fashion-mnist", "cifar10", "cifar100", "imagenet"]


def test_get_datasets_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        get_datasets("not-a-dataset")
    assert "'not-a-dataset'" in str(info.value)
    for name in list_datasets():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name,layout", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_get_datasets_cifar_requires_data_dir(name: str, layout: str) -> None:
    with pytest.raises(ValueError, match="--data-dir") as info:
        get_datasets(name)
    assert layout in str(info.value)


def test_get_datasets_cifar_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        get_datasets("cifar100", str(tmp_path / "absent"))
