"""Tests for LoRITa over-parameterization (trp.methods.lorita) and collapsing back."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import trp
from trp.core.layers import select_layers
from trp.methods.lorita import (
    Composed,
    collapse,
    effective_bias,
    effective_weight,
    is_overparameterized,
    overparameterize,
)
from trp.models import create_model

# (model name, in_channels, input shape) for the three architectures used here.
MODELS = {
    "resnet20": (3, (2, 3, 16, 16)),
    "mlp": (1, (2, 1, 28, 28)),
    "vit_tiny": (1, (2, 1, 28, 28)),
}


def build(name: str) -> nn.Module:
    return create_model(name, in_channels=MODELS[name][0], num_classes=10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb(model: nn.Module, scale: float = 0.2) -> None:
    """Make every factor non-trivial so that exactness tests mean something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Composed):
                for f in m.factors:
                    rms = f.weight.norm() / f.weight.numel() ** 0.5
                    f.weight.add_(scale * rms * torch.randn_like(f.weight))
                    if f.bias is not None:
                        f.bias.normal_(0, 0.1)


def wrap(layer: nn.Module, factor: int) -> Composed:
    composed = overparameterize(nn.Sequential(layer), factor, layers=["0"])[0]
    assert isinstance(composed, Composed)
    return composed


# --------------------------------------------------------------------------- exactness

@st.composite
def conv_configs(draw):
    stride = draw(st.sampled_from([1, 2, (1, 2), (2, 1), 3]))
    pads = [0, 1, 2, (0, 1), (2, 1), "valid"]
    if stride == 1:
        pads.append("same")
    return dict(
        in_channels=draw(st.integers(1, 4)),
        out_channels=draw(st.integers(1, 6)),
        kernel_size=draw(st.sampled_from([1, 2, 3, (1, 3), (3, 2), (5, 1)])),
        stride=stride,
        padding=draw(st.sampled_from(pads)),
        dilation=draw(st.sampled_from([1, 2, (1, 2)])),
        bias=draw(st.booleans()),
    )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(max_examples=25, deadline=None)
@given(cfg=conv_configs(), factor=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_conv_collapse_exact(cfg: dict, factor: int, seed: int) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg)
    composed = wrap(conv, factor)
    assert len(composed.factors) == factor
    perturb(nn.Sequential(composed))
    x = torch.randn(2, cfg["in_channels"], 11, 10)
    dense = collapse(nn.Sequential(composed))[0]
    assert type(dense) is nn.Conv2d
    assert dense.weight.shape == conv.weight.shape
    assert (dense.bias is None) == (conv.bias is None)
    for attr in ("stride", "padding", "dilation", "padding_mode", "groups"):
        assert getattr(dense, attr) == getattr(conv, attr)
    with torch.no_grad():
        assert rel_err(dense(x), composed(x)) <= 1e-4


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_conv_padding_modes(mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode=mode)
    composed = wrap(conv, 2)
    perturb(nn.Sequential(composed))
    dense = collapse(nn.Sequential(composed))[0]
    assert dense.padding_mode == mode
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(dense(x), composed(x)) <= 1e-4


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_linear_collapse_exact(factor: int, bias: bool, shape: tuple[int, int]) -> None:
    torch.manual_seed(factor)
    lin = nn.Linear(*shape, bias=bias)
    composed = wrap(lin, factor)
    perturb(nn.Sequential(composed))
    # Structure: first in→out, the others out→out; bias only on the last.
    assert composed.factors[0].weight.shape == (shape[1], shape[0])
    for f in composed.factors[1:]:
        assert f.weight.shape == (shape[1], shape[1])
    assert [f.bias is not None for f in composed.factors] == [False] * (factor - 1) + [bias]
    dense = collapse(nn.Sequential(composed))[0]
    assert type(dense) is nn.Linear and dense.weight.shape == lin.weight.shape
    x = torch.randn(3, 4, shape[0])  # extra leading dimension, as in a transformer
    with torch.no_grad():
        assert rel_err(dense(x), composed(x)) <= 1e-4
        ws = [f.weight.double() for f in composed.factors]
        prod = ws[0]
        for w in ws[1:]:
            prod = w @ prod
        assert torch.allclose(effective_weight(composed).double(), prod, rtol=1e-5, atol=1e-6)
        assert effective_bias(composed) is composed.factors[-1].bias


def test_collapse_keeps_dtype_float64() -> None:
    lin = nn.Linear(4, 3).double()
    composed = wrap(lin, 3)
    dense = collapse(nn.Sequential(composed))[0]
    assert dense.weight.dtype == torch.float64
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(dense(x), composed(x)) <= 1e-12


def test_whole_model_as_target() -> None:
    lin = nn.Linear(6, 4)
    composed = overparameterize(lin, 2, layers=[""])
    assert isinstance(composed, Composed)
    assert isinstance(collapse(composed), nn.Linear)


# --------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("factor", [2, 3])
def test_collapse_restores_structure_and_function(name: str, factor: int) -> None:
    torch.manual_seed(0)
    model = build(name)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    over = overparameterize(model, factor)
    # The input model is untouched.
    assert not is_overparameterized(model)
    assert all(torch.equal(before_sd[k], v) for k, v in model.state_dict().items())
    assert is_overparameterized(over)
    targets = [n for n, _ in select_layers(model)[0]]
    assert [n for n, m in over.named_modules() if isinstance(m, Composed)] == targets
    perturb(over)
    over.eval()
    over_sd = {k: v.clone() for k, v in over.state_dict().items()}
    col = collapse(over)
    assert all(torch.equal(over_sd[k], v) for k, v in over.state_dict().items())
    assert not is_overparameterized(col)
    # Exactly the original architecture.
    assert [(n, type(m)) for n, m in col.named_modules()] == [
        (n, type(m)) for n, m in model.named_modules()
    ]
    assert {k: v.shape for k, v in col.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert list(col.state_dict()) == list(model.state_dict())
    # The same function.
    x = torch.randn(MODELS[name][1])
    with torch.no_grad():
        assert rel_err(col(x), over(x)) <= 1e-4


def test_resnet_conv_factor_geometry() -> None:
    model = overparameterize(build("resnet20"), 3)
    c = model.layer2[0].conv1
    assert isinstance(c, Composed) and c.layer_type is nn.Conv2d
    first, *rest = c.factors
    assert first.weight.shape == (32, 16, 3, 3) and first.stride == (2, 2) and first.bias is None
    assert all(f.weight.shape == (32, 32, 1, 1) and f.stride == (1, 1) for f in rest)
    assert all(f.padding == (0, 0) for f in rest)
    # The first conv and the classifier are not over-parameterized by default.
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc, nn.Linear)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("factor", [2, 3])
def test_initial_scale(name: str, factor: int) -> None:
    torch.manual_seed(1)
    model = build(name)
    over = overparameterize(model, factor)
    originals = dict(model.named_modules())
    x = torch.randn(16, *MODELS[name][1][1:])
    with torch.no_grad():
        for n, m in over.named_modules():
            if isinstance(m, Composed):
                w0 = originals[n].weight
                assert abs(effective_weight(m).norm() / w0.norm() - 1) < 1e-4
                # An orthogonal rotation of the original output: the same norm on any input.
                first = m.factors[0]
                xin = torch.randn(4, first.in_channels, 9, 9) if isinstance(first, nn.Conv2d) \
                    else torch.randn(4, first.in_features)
                lin_part = originals[n](xin) - (0 if originals[n].bias is None else
                                               originals[n].bias.reshape(-1, *[1] * (xin.ndim - 2)))
                bias = m.factors[-1].bias
                over_part = m(xin) - (0 if bias is None else bias.reshape(-1, *[1] * (xin.ndim - 2)))
                assert abs(over_part.norm() / lin_part.norm() - 1) < 1e-4
    # Output scale, in training mode (how training starts: batch-norm uses batch statistics).
    # One init's output std is noisy (two plain inits differ by up to ~2x), so average over seeds.
    log_ratios = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = build(name)
        over = overparameterize(model, factor)
        with torch.no_grad():
            log_ratios.append(math.log(over.train()(x).std() / model.train()(x).std()))
    assert max(abs(r) for r in log_ratios) < math.log(2.5)
    assert abs(sum(log_ratios) / len(log_ratios)) < math.log(1.5)


def test_initial_singular_values_preserved() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(12, 8)
    composed = wrap(lin, 3)
    with torch.no_grad():
        s0 = torch.linalg.svdvals(lin.weight)
        s1 = torch.linalg.svdvals(effective_weight(composed))
        assert torch.allclose(s0, s1, rtol=1e-4, atol=1e-6)
        x = torch.randn(5, 12)
        assert not torch.allclose(composed(x), lin(x))  # rotated, not a copy
        assert torch.allclose(composed.factors[-1].bias, lin.bias)


@pytest.mark.parametrize("name", ["resnet20", "mlp"])
def test_gradients_reach_every_factor(name: str) -> None:
    torch.manual_seed(0)
    over = overparameterize(build(name), 2)
    x = torch.randn(MODELS[name][1])
    nn.functional.cross_entropy(over(x), torch.tensor([1, 2])).backward()
    for n, m in over.named_modules():
        if isinstance(m, Composed):
            for i, f in enumerate(m.factors):
                for p in f.parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}.factors.{i}"


def test_short_training_reduces_loss() -> None:
    torch.manual_seed(0)
    over = overparameterize(build("mlp"), 2)
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(over.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(over(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # Training keeps it collapsible.
    with torch.no_grad():
        assert rel_err(collapse(over)(x), over(x)) <= 1e-4


@pytest.mark.parametrize("factor", [2, 3])
def test_state_dict_roundtrip(factor: int) -> None:
    torch.manual_seed(0)
    over = overparameterize(build("resnet20"), factor)
    perturb(over)
    sd = over.state_dict()
    assert "layer1.0.conv1.factors.0.weight" in sd
    assert f"layer1.0.conv1.factors.{factor - 1}.weight" in sd
    assert "layer1.0.conv1.weight" not in sd
    torch.manual_seed(123)  # a different random init
    fresh = overparameterize(build("resnet20"), factor)
    fresh.load_state_dict(sd)  # strict
    over.eval(), fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), over(x))
    # Deepcopy and pickling keep working.
    assert torch.equal(copy.deepcopy(fresh)(x), over(x))


# --------------------------------------------------------------------------- selection

def test_layers_by_name_and_predicate() -> None:
    model = build("mlp")
    one = overparameterize(model, 2, layers=["features.fc2"])
    assert [n for n, m in one.named_modules() if isinstance(m, Composed)] == ["features.fc2"]
    every = overparameterize(model, 2, layers=lambda n, m: isinstance(m, nn.Linear))
    names = [n for n, m in every.named_modules() if isinstance(m, Composed)]
    assert names == ["features.fc1", "features.fc2", "features.fc3", "classifier"]
    x = torch.randn(2, 1, 28, 28)
    col = collapse(every)
    with torch.no_grad():
        assert rel_err(col(x), every(x)) <= 1e-4


def test_grouped_conv_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 6, 3))
    with pytest.warns(UserWarning, match="groups=2"):
        over = overparameterize(model, 2, layers=["0", "1"])
    assert isinstance(over[0], nn.Conv2d) and isinstance(over[1], Composed)


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("factor", [1, 0, -2, 2.0, 2.5, True, "2", None])
def test_bad_factor(factor: object) -> None:
    with pytest.raises(ValueError, match="factor"):
        overparameterize(build("mlp"), factor)  # type: ignore[arg-type]


def test_nothing_selected() -> None:
    with pytest.raises(ValueError, match="nothing to over-parameterize"):
        overparameterize(build("mlp"), 2, layers=lambda n, m: False)
    with pytest.raises(ValueError, match="nothing to over-parameterize"):
        overparameterize(nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), 2)  # only the classifier
    with pytest.raises(ValueError, match="not found"):
        overparameterize(build("mlp"), 2, layers=["nope"])


def test_nothing_to_collapse() -> None:
    with pytest.raises(ValueError, match="nothing to collapse.*overparameterize"):
        collapse(build("mlp"))


def test_double_overparameterization() -> None:
    over = overparameterize(build("mlp"), 2)
    with pytest.raises(ValueError, match="already over-parameterized"):
        overparameterize(over, 2)


def test_effective_weight_needs_composed() -> None:
    with pytest.raises(ValueError, match="Composed"):
        effective_weight(nn.Linear(2, 2))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- then decompose

def test_collapsed_model_decomposes() -> None:
    """A collapsed model whose products have rank out/2 is split exactly at Ratio(0.5)."""
    torch.manual_seed(0)
    over = overparameterize(build("mlp"), 2)
    perturb(over)
    with torch.no_grad():
        for m in over.modules():
            if isinstance(m, Composed):
                k = m.factors[1].weight.shape[1] // 2
                m.factors[1].weight[:, k:] = 0  # product rank <= out/2
    col = collapse(over)
    rep = trp.decompose_with_report(col, "channel", trp.Ratio(0.5), input_shape=(1, 1, 28, 28))
    got = {r.name: (r.status, r.rank) for r in rep.layers}
    assert got == {
        "features.fc1": ("factorized", 250),
        "features.fc2": ("factorized", 150),
        "features.fc3": ("factorized", 50),
    }
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(rep.model(x), over(x)) <= 1e-4
    small = trp.decompose(collapse(over), "channel", trp.Ratio(0.5), input_shape=(1, 1, 28, 28))
    assert trp.count_params(small) < trp.count_params(col)
