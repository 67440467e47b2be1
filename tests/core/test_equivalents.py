"""Issue 19: layers trp does not know, through standard forms (trp.core.equivalents)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trp
from trp.core.equivalents import _REGISTRY, standard_form
from trp.core.schemes import LowRank
from trp.core.targets import split_reason
from trp.deploy.fold import fold_batchnorm_with_report

sys.path.insert(0, str(Path(__file__).parents[1]))
from _bn import randomize_bn  # noqa: E402


class Conv2dStaticSamePadding(nn.Conv2d):
    """Like efficientnet_lite_pytorch's: TF "same" padding for a fixed image size, then the conv."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=32, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        ih = iw = image_size
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = -(-ih // sh), -(-iw // sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        self.pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)

    def forward(self, x):
        x = F.pad(x, self.pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def lite_net() -> nn.Module:
    """A small third-party-style net built only from Conv2dStaticSamePadding (stride 2: pads (0, 1))."""
    def block(cin, cout, k, s, groups=1):
        return [Conv2dStaticSamePadding(cin, cout, k, s, bias=False, groups=groups), nn.BatchNorm2d(cout), nn.ReLU6()]

    return nn.Sequential(
        *block(3, 32, 3, 2), *block(32, 64, 3, 1), *block(64, 64, 3, 2, groups=64), *block(64, 96, 3, 1),
        *block(96, 128, 3, 2), *block(128, 128, 1, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def test_static_same_padding_is_recognised_by_behaviour():
    layer = Conv2dStaticSamePadding(8, 8, 3, 2)
    assert layer.pads == (0, 1, 0, 1)  # asymmetric, as TF "same" with stride 2
    std = standard_form(layer)
    assert std is not None and isinstance(std.pre[0], nn.ZeroPad2d) and std.pre[0].padding == (0, 1, 0, 1)
    assert type(std.core) is nn.Conv2d and std.core.weight is layer.weight
    assert split_reason(layer) is None


def test_third_party_static_same_padding_model_splits_folds_and_exports(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(lite_net()).eval()
    x = torch.randn(2, 3, 32, 32)
    report = trp.decompose_with_report(model, "channel", trp.Ratio(0.3), input_shape=(2, 3, 32, 32))
    split = report.model
    lows = {n: m for n, m in split.named_modules() if isinstance(m, LowRank)}
    assert {"3", "9", "12", "15"} <= set(lows), report.layers
    assert isinstance(lows["12"].pad, nn.ZeroPad2d) and lows["12"].pad.padding == (0, 1, 0, 1)
    # full rank: the split equals the dense model in eval + no_grad and inference_mode
    full = trp.decompose(model, "channel", trp.Ratio(1.0), layers=list(lows), input_shape=(2, 3, 32, 32))
    with torch.no_grad():
        dense = model(x)
        torch.testing.assert_close(full(x), dense, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(full(x), dense, rtol=1e-4, atol=1e-5)
    # every BatchNorm folds: the dense model's and the split model's
    for net in (model, split):
        folded = fold_batchnorm_with_report(net)
        assert not folded.kept, folded.kept
        with torch.no_grad():
            torch.testing.assert_close(folded.model(x), net(x), rtol=1e-4, atol=1e-5)
    result = trp.export_onnx(split, tmp_path / "split.onnx", x)  # checked against PyTorch in ONNX Runtime
    assert result is not None and (tmp_path / "split.onnx").exists()
    # counting sees the plain convs
    assert trp.count_macs(split, input_shape=(1, 3, 32, 32)) < trp.count_macs(model, input_shape=(1, 3, 32, 32))


class Doubled(nn.Conv2d):
    """A conv whose forward trp cannot recognise: it doubles the output."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_register_layer_and_its_numeric_check():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), Doubled(16, 32, 3), nn.ReLU(), Doubled(32, 32, 3), nn.Flatten(),
                          nn.Linear(32 * 26 * 26, 4))
    with pytest.raises(ValueError, match=r"nothing to decompose.*trp\.register_layer\(MyConv, to_standard="):
        trp.decompose(model, "channel", trp.Ratio(0.3), layers=["1", "3"], input_shape=(1, 3, 32, 32))
    try:
        trp.register_layer(Doubled, to_standard=lambda m: trp.plain_layer(m))  # wrong: forgets the factor 2
        with pytest.raises(ValueError, match=r"standard form of Doubled .*differs"):
            trp.decompose(model, "channel", trp.Ratio(0.3), layers=["1", "3"], input_shape=(1, 3, 32, 32))

        def doubled(m):
            plain = trp.plain_layer(m)
            plain.weight = nn.Parameter(2 * m.weight.detach())
            plain.bias = nn.Parameter(2 * m.bias.detach())
            return plain

        trp.register_layer(Doubled, to_standard=doubled)
        # decompose checks each split layer against the registered form with the truncated weight
        split = trp.decompose(model, "channel", trp.Ratio(0.3), layers=["1", "3"], input_shape=(1, 3, 32, 32))
        assert isinstance(split[1], LowRank) and isinstance(split[3], LowRank)
        x = torch.randn(1, 3, 32, 32)
        layer = split[1]
        h = model[0](x)
        u, s, vh = torch.linalg.svd((2 * model[1].weight.detach()).reshape(32, -1), full_matrices=False)
        r = layer.rank
        w = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(model[1].weight.shape)
        with torch.no_grad():
            torch.testing.assert_close(layer(h), F.conv2d(h, w, 2 * model[1].bias), rtol=1e-4, atol=1e-4)
    finally:
        _REGISTRY.pop(Doubled, None)


def test_register_layer_refuses_non_layers():
    with pytest.raises(TypeError, match="subclass of nn.Linear"):
        trp.register_layer(nn.ReLU, to_standard=lambda m: m)


def test_trp_trains_static_same_padding_layers_and_decompose_splits_them():
    torch.manual_seed(0)
    model = randomize_bn(lite_net()).eval()
    pruner = trp.TRP(model, energy=0.6)
    assert {"3", "9", "12", "15"} <= set(pruner.layer_names)
    pruner.project()  # the stored weights are what the standard form applies: projected in place
    x = torch.randn(2, 3, 32, 32)
    split = trp.decompose(model, criterion=lambda s: max(1, int((s >= 1e-4 * s[0]).sum())),
                          layers=pruner.layer_names, input_shape=(2, 3, 32, 32))
    assert all(isinstance(split.get_submodule(n), LowRank) for n in ("3", "9", "12"))
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x), rtol=1e-4, atol=1e-5)


def test_dynamic_same_padding_is_recognised_by_behaviour():
    class Conv2dDynamicSamePadding(nn.Conv2d):
        def forward(self, x):
            ih, iw = x.shape[-2:]
            kh, kw = self.weight.shape[-2:]
            sh, sw = self.stride
            oh, ow = -(-ih // sh), -(-iw // sw)
            ph = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
            pw = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), Conv2dDynamicSamePadding(16, 32, 3, 2), nn.ReLU(),
                          Conv2dDynamicSamePadding(32, 32, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 4)).eval()
    # the split pads like the layer, at any input size
    split = trp.decompose(model, "channel", trp.Ratio(0.3), layers=["1", "3"], input_shape=(1, 3, 19, 19))
    assert isinstance(split[1], LowRank) and type(split[1].pad).__name__ == "SamePad"
    for size in (19, 24):
        assert split(torch.randn(1, 3, size, size)).shape == (1, 4)
