"""Tests for torchvision models in trp.models: creation by name, first-conv swap, local weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchvision.models import MobileNetV2, ResNet

import trp
from trp.models import (
    CifarResNet,
    create_model,
    list_models,
    list_torchvision_models,
    load_pretrained,
)
from trp.models.torchvision_models import classifier_name, replace_first_conv
from trp.core.schemes import LowRank


def _model(num_classes: int = 5, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=num_classes, **kwargs).eval()


def _same_weights(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip)
    )


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# -- creation -------------------------------------------------------------------------------


def test_list_torchvision_models() -> None:
    names = list_torchvision_models()
    assert names == sorted(names)
    assert {"resnet18", "resnet50", "mobilenet_v2", "vgg16"} <= set(names)
    assert not any(n.startswith(("fasterrcnn", "fcn_", "quantized", "raft", "r3d")) for n in names)
    assert "resnet18" not in list_models()  # trp's own registry is unchanged
    assert "resnet20" in list_models()


def test_resnet18_forward(x: torch.Tensor) -> None:
    model = create_model("resnet18", in_channels=3, num_classes=5)
    assert isinstance(model, ResNet)
    assert model.fc.out_features == 5
    assert model.eval()(x).shape == (2, 5)


def test_prefixed_name(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    a = create_model("torchvision.resnet18", num_classes=4).eval()
    torch.manual_seed(0)
    b = create_model("resnet18", num_classes=4).eval()
    assert isinstance(a, ResNet) and _same_weights(a, b)
    assert torch.equal(a(x), b(x))


def test_trp_names_take_precedence() -> None:
    assert isinstance(create_model("resnet20"), CifarResNet)
    with pytest.raises(ValueError, match="torchvision.resnet20"):
        create_model("torchvision.resnet20")


def test_resnet_in_channels_1() -> None:
    model = create_model("resnet18", in_channels=1, num_classes=3).eval()
    reference = create_model("resnet18", num_classes=3)
    assert model.conv1.in_channels == 1
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(model.conv1, attr) == getattr(reference.conv1, attr)
    assert model.conv1.bias is None
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_generic_first_conv_replaced() -> None:
    model = create_model("mobilenet_v2", in_channels=4, num_classes=7).eval()
    assert isinstance(model, MobileNetV2)
    assert model.features[0][0].in_channels == 4
    assert model(torch.randn(1, 4, 32, 32)).shape == (1, 7)


def test_replace_first_conv_noop_and_bad_groups() -> None:
    conv = nn.Conv2d(4, 8, 3, groups=2)
    model = nn.Sequential(conv, nn.ReLU())
    assert replace_first_conv(model, 4)[0] is conv
    with pytest.raises(ValueError, match="groups=2"):
        replace_first_conv(model, 3)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="resnet19") as info:
        create_model("resnet19")
    message = str(info.value)
    assert "list_torchvision_models()" in message
    for name in list_models():
        assert name in message


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        create_model("resnet18", in_channels=-1)


def test_classifier_name() -> None:
    assert classifier_name(create_model("resnet18")) == "fc"
    assert classifier_name(create_model("mobilenet_v2")) == "classifier.1"
    assert classifier_name(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1))) == "1"


# -- load_pretrained ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_round_trip(tmp_path: Path, x: torch.Tensor, suffix: str) -> None:
    source = _model(seed=0)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    target = _model(seed=1)
    assert not torch.equal(source(x), target(x))
    assert load_pretrained(target, path) is target
    assert _same_weights(source, target)
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
    ],
    ids=["ddp", "state_dict", "model+ddp"],
)
def test_wrapped_files(tmp_path: Path, x: torch.Tensor, wrap) -> None:
    source = _model(seed=0)
    path = tmp_path / "checkpoint.pth"
    torch.save(wrap(source.state_dict()), path)
    target = load_pretrained(_model(seed=1), str(path))
    assert torch.equal(source(x), target(x))


def test_missing_num_batches_tracked_is_fine(tmp_path: Path, x: torch.Tensor) -> None:
    source = _model(seed=0)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "w.safetensors"))
    target = load_pretrained(_model(seed=1), tmp_path / "w.safetensors")
    assert torch.equal(source(x), target(x))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained(_model(), path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 definitely not weights" * 50)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not a weights file") as info:
        load_pretrained(model, path)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "content", [[1, 2, 3], {}, {"fc.weight": "text"}], ids=["list", "empty", "non-tensor"]
)
def test_not_a_state_dict(tmp_path: Path, content: object) -> None:
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a weights file"):
        load_pretrained(_model(), path)


def test_pickled_module_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save(_model(), path)
    with pytest.raises(ValueError, match="not a weights file"):
        load_pretrained(_model(), path)


def test_classifier_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "in1k.pth"
    torch.save(_model(num_classes=1000).state_dict(), path)
    model = _model(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatch") as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert "fc.weight (file (1000, 512), model (5, 512))" in message
    assert "1000 classes in the file but the model has 5" in message
    assert "skip_classifier=True" in message
    # Nothing was loaded.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="skip_classifier"):
        load_pretrained(model, path, strict=False)


def test_skip_classifier(tmp_path: Path) -> None:
    source = _model(num_classes=1000, seed=0)
    path = tmp_path / "in1k.safetensors"
    save_file(source.state_dict(), str(path))
    target = _model(num_classes=5, seed=1)
    fc_before = (target.fc.weight.clone(), target.fc.bias.clone())
    load_pretrained(target, path, skip_classifier=True)
    assert torch.equal(target.fc.weight, fc_before[0]) and torch.equal(target.fc.bias, fc_before[1])
    assert _same_weights(source, target, skip=("fc.",))  # everything but the classifier
    features = nn.Sequential(*list(source.children())[:-1])
    features_t = nn.Sequential(*list(target.children())[:-1])
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(features(x), features_t(x))


def test_skip_classifier_keeps_matching_classifier(tmp_path: Path, x: torch.Tensor) -> None:
    source = _model(seed=0)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    target = load_pretrained(_model(seed=1), path, skip_classifier=True)
    assert torch.equal(source(x), target(x))


def test_first_conv_channels_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "rgb.pth"
    torch.save(_model().state_dict(), path)
    with pytest.raises(ValueError, match="takes 3 input channels in the file but 1 in the model"):
        load_pretrained(_model(in_channels=1), path)


def test_missing_and_unexpected_keys(tmp_path: Path, x: torch.Tensor) -> None:
    source = _model(seed=0)
    state = source.state_dict()
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = _model(seed=1)
    with pytest.raises(ValueError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert "layer4.1.bn2.running_var" in message and "extra.weight" in message
    assert "strict=False" in message
    var_before = model.layer4[1].bn2.running_var.clone()
    load_pretrained(model, path, strict=False)
    assert torch.equal(model.layer4[1].bn2.running_var, var_before)
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_nothing_matches(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="no key of the file matches"):
        load_pretrained(_model(), path, strict=False)


# -- decomposition of a torchvision model --------------------------------------------------


def _truncate(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """``weight`` with its channel-scheme matrix view ``N × (C·kh·kw)`` truncated to ``rank``."""
    u, s, vh = torch.linalg.svd(weight.double().flatten(1), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape).to(weight.dtype)


def test_decompose_resnet18_layers_match_truncated_svd() -> None:
    dense = _model(num_classes=10)
    names = ["layer1.0.conv1", "layer3.0.conv1", "layer4.1.conv2"]
    report = trp.decompose_with_report(
        dense, "channel", trp.Energy(0.9), layers=names, input_shape=(1, 3, 64, 64)
    )
    factorized = {r.name: r for r in report.factorized}
    assert sorted(factorized) == sorted(names)
    for name in names:
        conv = dense.get_submodule(name)
        low = report.model.get_submodule(name)
        assert isinstance(low, LowRank)
        s = torch.linalg.svdvals(conv.weight.detach().double().flatten(1))
        energy = s.square().cumsum(0) / s.square().sum()
        assert low.rank == factorized[name].rank == int((energy < 0.9).sum()) + 1
        assert 0.5 * s.numel() < low.rank < s.numel()
        h = torch.randn(2, conv.in_channels, 16, 16)
        expected = F.conv2d(h, _truncate(conv.weight.detach(), low.rank), conv.bias, conv.stride, conv.padding)
        with torch.no_grad():
            got = low(h)
            dense_out = conv(h)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, dense_out, atol=1e-2)  # truncation did change the layer


def test_decompose_low_rank_resnet18_is_exact(x: torch.Tensor) -> None:
    dense = _model(num_classes=10)
    with torch.no_grad():  # make every target conv exactly rank 8 in the channel view
        for name, module in dense.named_modules():
            if isinstance(module, nn.Conv2d) and name != "conv1" and module.kernel_size == (3, 3):
                module.weight.copy_(_truncate(module.weight, 8))
    decomposed = trp.decompose(dense, "channel", trp.Energy(0.999999), input_shape=(1, 3, 64, 64))
    lows = {n: m for n, m in decomposed.named_modules() if isinstance(m, LowRank)}
    assert len(lows) == 16 and all(m.rank == 8 for m in lows.values())  # every 3×3 conv...
    assert "conv1" not in lows and isinstance(decomposed.fc, nn.Linear)  # ...but stem and classifier
    assert trp.count_macs(decomposed, (1, 3, 64, 64)) < 0.5 * trp.count_macs(dense, (1, 3, 64, 64))
    with torch.no_grad():
        expected, got = dense(x), decomposed(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-3)
