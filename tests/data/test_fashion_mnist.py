"""Fashion-MNIST from IDX files: written by the tests (plain and gzipped), and the real Debian files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from conftest import FASHION_N_TEST as N_TEST
from conftest import FASHION_N_TRAIN as N_TRAIN
from conftest import idx_bytes as _idx
from conftest import make_fake_fashion_mnist as write_fashion
from trp.data import (
    FASHION_MNIST_DEBIAN_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist,
    fashion_mnist_files,
    get_datasets,
    list_datasets,
)

def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    return image * FASHION_MNIST_STD[0] + FASHION_MNIST_MEAN[0]


@pytest.mark.parametrize("gz", [False, True])
def test_reads_pixels_and_labels_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion(tmp_path, gz)
    train, test, info = get_datasets("fashion-mnist", str(tmp_path))
    assert (info.in_channels, info.num_classes, info.input_size) == (1, 10, (28, 28))
    assert len(train) == N_TRAIN and len(test) == N_TEST
    for i in (0, 5, N_TEST - 1):
        image, label = test[i]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][i]).float() / 255
        assert torch.allclose(_unnormalize(image)[0], expected, atol=1e-5)
        assert label == int(arrays["t10k-labels-idx1-ubyte"][i])
    assert train.targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(train.data, torch.from_numpy(arrays["train-images-idx3-ubyte"]))


def test_gzipped_and_plain_give_the_same_data(tmp_path: Path) -> None:
    write_fashion(tmp_path / "plain", gz=False, seed=3)
    write_fashion(tmp_path / "gz", gz=True, seed=3)
    a = fashion_mnist(tmp_path / "plain", train=True)
    b = fashion_mnist(tmp_path / "gz", train=True)
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)


def test_torchvision_layout_is_found(tmp_path: Path) -> None:
    write_fashion(tmp_path / "FashionMNIST" / "raw", gz=True)
    files = fashion_mnist_files(tmp_path)
    assert all(p.parent == tmp_path / "FashionMNIST" / "raw" for p in files.values())
    assert len(fashion_mnist(tmp_path, train=False)) == N_TEST


def test_augmentation_crop_without_flip_by_default(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=False)
    types = lambda ds: [type(t) for t in ds.transform.transforms]  # noqa: E731
    train, test, _ = get_datasets("fashion-mnist", str(tmp_path))
    assert transforms.RandomCrop in types(train)
    assert transforms.RandomHorizontalFlip not in types(train)
    assert types(test) == [transforms.ToTensor, transforms.Normalize]
    flipped, _, _ = get_datasets("fashion-mnist", str(tmp_path), hflip=True)
    assert transforms.RandomHorizontalFlip in types(flipped)
    # The crop moves pixels but keeps the image size; the test split is deterministic.
    torch.manual_seed(0)
    crops = {tuple(train[0][0].flatten()[:200].tolist()) for _ in range(8)}
    assert len(crops) > 1 and train[0][0].shape == (1, 28, 28)
    assert torch.equal(test[1][0], test[1][0])


def test_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*never downloaded"):
        get_datasets("fashion-mnist", str(tmp_path / "nowhere"))
    write_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        fashion_mnist(tmp_path, train=False)


def test_corrupt_or_mismatched_files_are_value_errors(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(N_TRAIN - 1, dtype=np.uint8)))
    with pytest.raises(ValueError, match="24 images but .* 23 labels"):
        fashion_mnist(tmp_path, train=True)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x05garbage")
    with pytest.raises(ValueError, match="not a valid IDX file"):
        fashion_mnist(tmp_path, train=True)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.full(N_TEST, 12, dtype=np.uint8)))
    with pytest.raises(ValueError, match="outside the 10 classes"):
        fashion_mnist(tmp_path, train=False)


def test_registered_and_holdout_is_the_last_examples(tmp_path: Path) -> None:
    from trp.app.engine import holdout_split

    assert "fashion-mnist" in list_datasets()
    arrays = write_fashion(tmp_path, gz=True)
    train, _, _ = get_datasets("fashion-mnist", str(tmp_path))
    fit, held = holdout_split(train, 5)
    assert len(fit) == N_TRAIN - 5 and len(held) == 5
    assert [held[i][1] for i in range(5)] == arrays["train-labels-idx1-ubyte"][-5:].tolist()


def test_the_real_debian_files() -> None:
    if not Path(FASHION_MNIST_DEBIAN_DIR, "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("the real Fashion-MNIST files are absent: apt-get install dataset-fashion-mnist")
    train, test, _ = get_datasets("fashion-mnist")  # no --data-dir: the Debian folder
    assert len(train) == 60_000 and len(test) == 10_000
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    # The normalization constants are the training set's own statistics.
    pixels = train.data.float() / 255
    assert abs(pixels.mean().item() - FASHION_MNIST_MEAN[0]) < 1e-3
    assert abs(pixels.std().item() - FASHION_MNIST_STD[0]) < 1e-3
