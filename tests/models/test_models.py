"""Tests for the model registry and the CIFAR ResNets."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from trp.models import (
    CifarResNet,
    ShortcutA,
    create_model,
    list_models,
    register_model,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)

RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnets_registered() -> None:
    assert set(RESNET_DEPTHS) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape_rgb_32(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_output_shape_gray_28(name: str) -> None:
    model = create_model(name, in_channels=1, num_classes=10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("size", [8, 9, 15, 40])
def test_other_input_sizes(size: int) -> None:
    assert resnet20()(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_resnet20_param_count() -> None:
    assert n_params(create_model("resnet20", num_classes=10)) == 269_722


def test_known_param_counts() -> None:
    # Well-known sizes (Table 6 of He et al. 2016): 0.46M, 0.66M, 0.85M, 1.7M.
    assert round(n_params(resnet32()) / 1e6, 2) == 0.46
    assert round(n_params(resnet44()) / 1e6, 2) == 0.66
    assert round(n_params(resnet56()) / 1e6, 2) == 0.85
    assert round(n_params(resnet110()) / 1e6, 1) == 1.7


@pytest.mark.parametrize("name,depth", sorted(RESNET_DEPTHS.items()))
def test_depth_gives_conv_count(name: str, depth: int) -> None:
    model = create_model(name)
    n = (depth - 2) // 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 6 * n + 1
    assert len(convs) + len(linears) == depth  # weighted layers
    assert all(c.bias is None for c in convs)


def test_module_names_readable() -> None:
    names = {n for n, _ in resnet20().named_modules()}
    for expected in ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2",
                     "layer2.0.shortcut", "layer3.2.conv2", "fc"]:
        assert expected in names


@pytest.mark.parametrize("name", sorted(RESNET_DEPTHS))
def test_shortcuts_parameter_free(name: str) -> None:
    model = create_model(name)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # first block of stages 2 and 3
    for module in model.modules():
        if hasattr(module, "shortcut"):
            assert list(module.shortcut.parameters()) == []
            assert list(module.shortcut.buffers()) == []


def test_shortcut_a_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 9, 9)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 5, 5)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_init() -> None:
    model = resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)
    # Kaiming fan_out for the 64->64 3x3 convs: std = sqrt(2 / (64 * 9)).
    w = model.layer3[1].conv1.weight
    assert abs(w.std().item() - (2 / (64 * 9)) ** 0.5) < 0.005


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="resnet20") as info:
        create_model("resnet21")
    assert "resnet21" in str(info.value)
    for name in list_models():
        assert name in str(info.value)


def test_bad_depth_raises() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_register_model() -> None:
    name = "_test_tiny_model"

    @register_model(name)
    def tiny(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert name in list_models()
        assert create_model(name, num_classes=4)(torch.randn(2, 1, 4, 4)).shape == (2, 4)
        with pytest.raises(ValueError, match="already registered"):
            register_model(name)(lambda **kw: nn.Identity())
    finally:
        from trp.models import _REGISTRY

        _REGISTRY.pop(name, None)


def test_deepcopy_pickle_and_state_dict_roundtrip() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=7).eval()
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)

    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), expected)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored(x), expected)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = create_model("resnet20", in_channels=1, num_classes=7)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.eval()(x), expected)
