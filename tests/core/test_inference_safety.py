"""Issue 19: a split model must run under inference (eval + no_grad / inference_mode), where
PyTorch's fused fast paths read weights directly, and come back in the mode it came in."""

import copy

import pytest
import torch
from torch import nn

import trp
from trp.core.schemes import LowRank


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 3)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.enc(x))


def truncated_dense(dense: nn.Module, split: nn.Module) -> nn.Module:
    """``dense`` with each Linear that ``split`` factorized given the product of its two factors."""
    ref = copy.deepcopy(dense)
    for name, m in split.named_modules():
        if isinstance(m, LowRank) and isinstance(m.first, nn.Linear):
            layer = ref.get_submodule(name)
            with torch.no_grad():
                layer.weight.copy_(m.second.weight @ m.first.weight)
    return ref


@pytest.mark.parametrize("training", [True, False])
def test_transformer_encoder_split_runs_in_inference(training):
    torch.manual_seed(0)
    model = Encoder().train(training)
    report = trp.decompose_with_report(model, "channel", trp.TargetMACs(1.5), input_shape=(2, 16, 256))
    split = report.model
    assert report.factorized, "the feed-forward linears must be split"
    assert split.training == training and all(m.training == training for m in split.modules())
    ref = truncated_dense(model, split).eval()
    split.eval()
    x = torch.randn(2, 16, 256)
    with torch.no_grad():
        expected = ref(x)  # the dense model on its fused fast path
        got = split(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        got = split(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the report states that the fused fast path is off where the layer was split
    assert any("fast path" in note for note in report.notes)


class ReadsWeightInEval(nn.Module):
    """A layer that, like a fused fast path, reads a child's weight only in eval + no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        if not self.training and not torch.is_grad_enabled():
            h = torch.relu(torch.nn.functional.linear(x, getattr(self.inner, "weight"), getattr(self.inner, "bias")))
        else:
            h = torch.relu(self.inner(x))
        return self.out(h)


def test_inference_only_weight_read_leaves_layer_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), ReadsWeightInEval(), nn.Linear(4, 4)).train()
    report = trp.decompose_with_report(model, "channel", trp.Ratio(0.1), layers="all", input_shape=(3, 32))
    by_name = {r.name: r for r in report.layers}
    assert by_name["1.inner"].status == "skipped"
    assert "directly" in by_name["1.inner"].reason
    split = report.model.eval()
    with torch.no_grad():
        split(torch.randn(3, 32))
    with torch.inference_mode():
        split(torch.randn(3, 32))
    assert report.model is split


def test_skipped_layers_summarised_one_line_per_reason(caplog):
    import logging
    import warnings

    import torchvision

    model = torchvision.models.mobilenet_v2()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="trp.decompose"):
        warnings.simplefilter("always")
        report = trp.decompose_with_report(model, "channel", trp.Energy(0.9))
    messages = [str(w.message) for w in caught if "left" in str(w.message)]
    assert len(messages) == 1 and len(messages[0]) < 600
    lines = messages[0].splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith("17 × features.1.conv.0.0, ")
    assert "(14 more)" in lines[1] and "depthwise" in lines[1]
    assert len(report.skipped) == 17  # the full list stays in the report ...
    assert sum("left dense" in r.message for r in caplog.records) == 17  # ... and at DEBUG level
    text = repr(report)
    assert text.startswith("Decomposition(") and "17 skipped" in text and len(text) < 200


def test_result_reprs_are_summaries():
    from trp.deploy.latency import LatencyComparison, LatencyResult

    dense = LatencyResult([0.002] * 500, "eager", "cpu", 1, 1)
    compact = LatencyResult([0.001] * 500, "eager", "cpu", 1, 1)
    comparison = LatencyComparison(dense, compact, [2.0] * 500)
    for obj in (dense, comparison):
        assert len(repr(obj)) < 300 and "0.002, 0.002" not in repr(obj)
    assert "2.00x" in repr(comparison)
    assert "MACs" in repr(trp.mac_breakdown(nn.Linear(4, 4), input_shape=(1, 4)))


class CachesInForward(nn.Module):
    """A module that caches a tensor on its first call (as some position-embedding modules do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)
        self.cache = None

    def forward(self, x):
        if self.cache is None or torch.is_inference_mode_enabled():
            self.cache = torch.ones(32)
        return self.out(torch.relu(self.fc(x)) * self.cache)


def test_split_model_trains_after_the_inference_mode_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), CachesInForward())
    split = trp.decompose(model, "channel", trp.Ratio(0.1), layers="all", input_shape=(3, 32))
    assert split.training
    split(torch.randn(3, 32)).sum().backward()  # no "inference tensors cannot be saved for backward"
