"""Tests for the MLP and the small ViT in the model registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import trp
from trp.core.layers import select_layers
from trp.models import MLP, VisionTransformer, create_model, list_models
from trp.models.vit import Attention

NAMES = ["mlp", "vit_tiny"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered() -> None:
    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name: str, in_channels: int, size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, num_classes=num_classes)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_explicit_sizes() -> None:
    from trp.models import mlp, vit_tiny

    assert mlp(in_channels=3, input_size=(28, 20))(torch.randn(2, 3, 28, 20)).shape == (2, 10)
    assert vit_tiny(in_channels=1, image_size=16)(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    vit = vit_tiny(in_channels=3, image_size=28, patch_size=7)
    assert vit(torch.randn(1, 3, 28, 28)).shape == (1, 10)
    # Defaults follow the library's datasets: MNIST 28×28 (patch 7), CIFAR 32×32 (patch 4).
    assert (vit_tiny(in_channels=1).image_size, vit_tiny(in_channels=1).patch_size) == (28, 7)
    assert (vit_tiny(in_channels=3).image_size, vit_tiny(in_channels=3).patch_size) == (32, 4)
    assert create_model("mlp", in_channels=3).input_size == (32, 32)


def test_param_budgets() -> None:
    m = create_model("mlp", in_channels=1, num_classes=10)
    assert isinstance(m, MLP)
    assert n_params(m) == (784 * 500 + 500) + (500 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    for c in (1, 3):
        for k in (10, 100):
            vit = create_model("vit_tiny", in_channels=c, num_classes=k)
            assert isinstance(vit, VisionTransformer)
            assert n_params(vit) < 150_000


def test_vit_default_selection() -> None:
    vit = create_model("vit_tiny", in_channels=1)
    names = [n for n, _ in select_layers(vit)[0]]
    expected = [f"blocks.{i}.{layer}" for i in range(4)
                for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names == expected
    assert "head" not in names and "patch_embed" not in names


def test_mlp_default_selection() -> None:
    names = [n for n, _ in select_layers(create_model("mlp", in_channels=1))[0]]
    assert names == ["features.fc1", "features.fc2", "features.fc3"]


def test_attention_matches_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).split(16, dim=-1)
    heads = lambda t: t.reshape(2, 5, 4, 4).transpose(1, 2)  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    ref = attn.proj((w @ heads(v)).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def _make_low_rank(model: nn.Module, rank: int) -> None:
    """Project every default-selected weight onto rank ``rank``."""
    with torch.no_grad():
        for _, m in select_layers(model)[0]:
            w = m.weight.flatten(1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            m.weight.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(m.weight.shape))


@pytest.mark.parametrize("name,rank", [("mlp", 20), ("vit_tiny", 8)])
def test_decompose_close_to_dense(name: str, rank: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10).eval()
    _make_low_rank(model, rank)
    rep = trp.decompose_with_report(model, "channel", trp.Energy(0.999), input_shape=(1, 1, 28, 28))
    assert len(rep.factorized) == len(select_layers(model)[0])
    assert all(r.rank <= rank for r in rep.factorized)
    assert trp.count_params(rep.model) < trp.count_params(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        dense, low = model(x), rep.model.eval()(x)
    assert ((low - dense).norm() / dense.norm()).item() < 1e-3


def test_wrong_size_raises() -> None:
    vit = create_model("vit_tiny", in_channels=1)
    with pytest.raises(ValueError, match="28×28.*image_size=32"):
        vit(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="square"):
        vit(torch.randn(1, 1, 28, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(1, 10, image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        Attention(10, 4)
    with pytest.raises(ValueError, match="input_size"):
        create_model("mlp", in_channels=1)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="positive"):
        MLP(1, 10, (28, 28), hidden=(0,))


def test_vit_trains() -> None:
    torch.manual_seed(0)
    vit = create_model("vit_tiny", in_channels=1)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.AdamW(vit.parameters(), lr=3e-3)
    first = None
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(vit(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.8 * first
