"""trp.core.targets / schemes: each exact handler against the dense layer, at full and truncated rank."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trp
from trp.core.schemes import LowRank, scheme_for
from trp.core.targets import dense_forward, effective_weight, split_reason

timm_conv_same = pytest.importorskip("timm.layers.conv2d_same")
timm_std = pytest.importorskip("timm.layers.std_conv")
hf_utils = pytest.importorskip("transformers.pytorch_utils")


def _split(module: nn.Module, rank: int | None, scheme: str = "channel") -> tuple[LowRank, torch.Tensor]:
    """``module`` split at ``rank`` (None: full rank) and the truncated effective weight."""
    sch = scheme_for(module, scheme)
    u, s, vh = torch.linalg.svd(sch.to_matrix(effective_weight(module).detach().double()), full_matrices=False)
    r = s.shape[-1] if rank is None else rank
    return sch.factorize(module, u, s, vh, r), sch.truncated(u, s, vh, r, module.weight.shape).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check_exact(module: nn.Module, x: torch.Tensor, rank: int, scheme: str = "channel") -> None:
    module.eval()
    with torch.no_grad():
        full, _ = _split(module, None, scheme)
        assert _rel(full(x), module(x)) < 1e-5
        low, weight = _split(module, rank, scheme)
        expected = dense_forward(module, x, weight)
        assert low(x).shape == expected.shape
        assert _rel(low(x), expected) < 1e-5
        assert _rel(low(x), module(x)) > 1e-4  # a real truncation


def test_hf_conv1d_is_a_transposed_linear() -> None:
    torch.manual_seed(0)
    layer = hf_utils.Conv1D(12, 10)  # nf (out) = 12, nx (in) = 10, weight (10, 12)
    assert split_reason(layer) is None
    _check_exact(layer, torch.randn(2, 5, 10), 3)
    low, _ = _split(layer, 3)
    assert isinstance(low.first, nn.Linear) and (low.first.in_features, low.second.out_features) == (10, 12)


def test_conv1d_channel() -> None:
    torch.manual_seed(0)
    layer = nn.Conv1d(6, 8, 5, stride=2, padding=2, dilation=1)
    _check_exact(layer, torch.randn(2, 6, 17), 3)
    low, _ = _split(layer, 3)
    assert isinstance(low.first, nn.Conv1d) and low.second.kernel_size == (1,)
    assert "only the channel scheme" in split_reason(layer, "spatial")


@pytest.mark.parametrize("size", [8, 9, 13])
def test_timm_conv2d_same_pads_at_run_time(size: int) -> None:
    torch.manual_seed(0)
    layer = timm_conv_same.Conv2dSame(4, 8, 3, stride=2)
    x = torch.randn(2, 4, size, size)
    _check_exact(layer, x, 2)
    low, _ = _split(layer, 2)
    assert low.pad is not None and low(x).shape == layer(x).shape


@pytest.mark.parametrize("cls", ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"])
def test_timm_weight_standardization_split_on_effective_weight(cls: str) -> None:
    torch.manual_seed(0)
    layer = getattr(timm_std, cls)(6, 8, 3, stride=2)
    if hasattr(layer, "gain"):
        with torch.no_grad():
            layer.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 9, 9)
    _check_exact(layer, x, 2)
    # The split computes the standardized conv: plain convs, no re-standardization.
    low, _ = _split(layer, None)
    assert type(low.first) is nn.Conv2d


@pytest.mark.parametrize("groups, cin, cout", [(2, 8, 8), (4, 8, 12), (3, 6, 9)])
def test_grouped_conv_split_per_group(groups: int, cin: int, cout: int) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    _check_exact(layer, torch.randn(2, cin, 7, 7), 1)
    low, _ = _split(layer, 2)
    assert (low.first.groups, low.first.out_channels, low.second.groups, low.second.kernel_size) == (
        groups, 2 * groups, groups, (1, 1))


def test_one_by_one_conv_splits_into_two_one_by_one() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 12, 1)
    _check_exact(layer, torch.randn(2, 16, 5, 5), 3)
    low, _ = _split(layer, 3)
    assert low.first.kernel_size == low.second.kernel_size == (1, 1)


@st.composite
def conv_geometry(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(2, 4))
    cout = groups * draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = draw(st.integers(7, 11))
    rank = draw(st.integers(1, min(cout // groups, cin // groups * kernel[0] * kernel[1])))
    return groups, cin, cout, kernel, stride, dilation, padding, size, rank, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(conv_geometry())
def test_channel_scheme_over_conv_geometry(case) -> None:
    groups, cin, cout, kernel, stride, dilation, padding, size, rank, bias = case
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias).double()
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    sch = scheme_for(layer, "channel")
    u, s, vh = torch.linalg.svd(sch.to_matrix(layer.weight.detach()), full_matrices=False)
    low = sch.factorize(layer, u, s, vh, rank)
    with torch.no_grad():
        expected = dense_forward(layer, x, sch.truncated(u, s, vh, rank, layer.weight.shape))
        torch.testing.assert_close(low(x), expected, rtol=1e-9, atol=1e-9)
        full = sch.factorize(layer, u, s, vh, s.shape[-1])
        torch.testing.assert_close(full(x), layer(x), rtol=1e-9, atol=1e-9)


def test_depthwise_skipped_with_reason() -> None:
    reason = split_reason(nn.Conv2d(8, 8, 3, groups=8))
    assert "depthwise" in reason and "saves MACs" in reason
    assert "depthwise" in split_reason(nn.Conv2d(8, 16, 3, groups=8))  # channel multiplier 2


class OwnForwardConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.flip(-1), bias)


class PlainSubclass(nn.Linear):
    pass


def test_subclasses_with_own_forward_skipped() -> None:
    assert "forward of its own" in split_reason(OwnForwardConv(4, 4, 3))
    assert "forward of its own" in split_reason(OwnConvForward(4, 4, 3))
    assert split_reason(PlainSubclass(4, 4)) is None
    assert split_reason(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)) is None
    model = nn.Sequential(nn.Conv2d(3, 8, 3), OwnForwardConv(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.zeros(1, 3, 12, 12))
    with pytest.warns(UserWarning, match="forward of its own"):
        result = trp.decompose_with_report(model, "channel", trp.FixedRank(1), input_shape=(1, 3, 12, 12))
    assert [(r.name, r.status) for r in result.layers] == [("1", "skipped"), ("2", "factorized")]
    assert type(result.model[1]) is OwnForwardConv


def test_timm_same_and_std_models_decompose_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), timm_conv_same.Conv2dSame(8, 16, 3, stride=2), nn.ReLU(),
        timm_std.StdConv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
    ).eval()
    x = torch.randn(2, 3, 15, 15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = trp.decompose_with_report(model, "channel", trp.FixedRank(3), example_inputs=x)
    assert [r.status for r in result.layers] == ["factorized"] * 3
    # Against the dense model with the truncated effective weights.
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), timm_conv_same.Conv2dSame(8, 16, 3, stride=2), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(16, 16, 1)).eval()
    ref.load_state_dict(model.state_dict())
    for i in (1, 3, 5):
        _, weight = _split(model[i], 3)
        with torch.no_grad():
            ref[i].weight.copy_(weight)
    with torch.no_grad():
        assert _rel(result.model(x), ref(x)) < 1e-5
