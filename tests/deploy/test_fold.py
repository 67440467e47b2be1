"""BatchNorm folding: exact against the unfolded model in eval mode, only where provably safe."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trp
from trp.deploy.fold import fold_batchnorm_with_report
from trp.models import create_model, resnet20

from _bn import randomize_bn  # noqa: E402

RTOL = 1e-5


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("scheme", [None, "channel", "spatial", "decouple"])
def test_resnet20_folds_every_batchnorm_exactly(scheme):
    torch.manual_seed(0)
    dense = randomize_bn(resnet20())
    model = dense if scheme is None else trp.decompose(dense, scheme, trp.Energy(0.7))
    model.eval()
    report = fold_batchnorm_with_report(model)
    assert report.kept == [] and len(report.folded) == 19 and n_bn(report.model) == 0
    if scheme is not None:  # the BN after a split layer went into its second layer
        assert ("layer1.0.bn1", "layer1.0.conv1.second") in report.folded
        assert isinstance(report.model.layer1[0].conv1, trp.LowRank)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_error(report.model(x), model(x)) < RTOL


@pytest.mark.parametrize("name, folded", [("resnet18", 20), ("mobilenet_v2", 52)])
def test_torchvision_models_fold_exactly(name, folded):
    torch.manual_seed(0)
    model = randomize_bn(create_model(name)).eval()
    report = fold_batchnorm_with_report(model)
    assert len(report.folded) == folded and report.kept == []
    if name == "mobilenet_v2":  # depthwise (grouped) convs fold too
        layer = dict(report.folded)["features.2.conv.1.1"]
        assert report.model.get_submodule(layer).groups > 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(report.model(x), model(x)) < RTOL


def test_linear_then_batchnorm1d_folds():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))).eval()
    split = trp.decompose(model, criterion=trp.FixedRank(3), layers=["0"])
    for m in (model, split):
        report = fold_batchnorm_with_report(m)
        assert [bn for bn, _ in report.folded] == ["1"] and report.kept == []
        x = torch.randn(5, 8)
        with torch.no_grad():
            assert rel_error(report.model(x), m(x)) < RTOL
    assert fold_batchnorm_with_report(split).folded == [("1", "0.second")]


class _Residual(nn.Module):
    """conv -> bn whose conv output is also added to the result: the BN cannot go into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU()
        self.bn_after_act = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn_after_act(self.act(self.bn(y) + y))


def test_batchnorm_not_provably_after_a_conv_stays_with_a_reason():
    model = randomize_bn(_Residual()).eval()
    with pytest.warns(UserWarning, match="left 2 BatchNorm"):
        folded = trp.fold_batchnorm(model)
    report = fold_batchnorm_with_report(model)
    reasons = dict(report.kept)
    assert report.folded == []
    assert "also used elsewhere" in reasons["bn"]
    assert "not a Conv2d" in reasons["bn_after_act"]
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) < RTOL


class _Untraceable(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it, its blocks it can."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.block(x)
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


def test_untraceable_model_folds_inside_traceable_parts_and_says_why_not_elsewhere():
    model = randomize_bn(_Untraceable()).eval()
    report = fold_batchnorm_with_report(model)
    assert report.folded == [("block.1", "block.0")]
    (name, reason), = report.kept
    assert name == "bn" and "torch.fx could not trace" in reason
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_error(report.model(x), model(x)) < RTOL


def test_training_mode_model_gives_an_eval_only_copy_and_is_untouched():
    model = randomize_bn(resnet20()).train()
    before = copy.deepcopy(model.state_dict())
    folded = trp.fold_batchnorm(model)
    assert not folded.training and all(not m.training for m in folded.modules())
    with pytest.raises(RuntimeError, match="inference-only"):
        folded.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        copy.deepcopy(folded).train()
    folded.eval()  # allowed
    # the input keeps its mode, its BatchNorms and its weights
    assert model.training and n_bn(model) == 19
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_error(folded(x), model.eval()(x)) < RTOL


def test_batchnorm_without_running_stats_stays():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    report = fold_batchnorm_with_report(model)
    assert report.folded == [] and "running statistics" in report.kept[0][1]


def test_shared_conv_is_not_folded():
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3))
    report = fold_batchnorm_with_report(randomize_bn(model).eval())
    assert report.folded == [] and len(report.kept) == 2


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        trp.fold_batchnorm(lambda x: x)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 4), mult=st.integers(1, 3), k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 3),
    groups_all=st.booleans(), bias=st.booleans(), affine=st.booleans(), dilation=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_fold_matches_for_any_conv(cin, mult, k, stride, groups_all, bias, affine, dilation, seed):
    torch.manual_seed(seed)
    groups = cin if groups_all else 1
    cout = cin * mult
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, dilation=dilation, groups=groups, bias=bias)
    model = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(cout, affine=affine)), seed).eval()
    report = fold_batchnorm_with_report(model)
    assert report.folded == [("1", "0")]
    x = torch.randn(2, cin, 11, 12)
    with torch.no_grad():
        assert rel_error(report.model(x), model(x)) < RTOL


def test_timm_batchnorm_act_and_same_padding_conv_fold():
    """timm's BatchNormAct2d folds its BatchNorm and keeps its activation; Conv2dSame takes a BatchNorm
    like a plain conv; a weight-standardized conv (StdConv2d) does not."""
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        layers.Conv2dSame(3, 8, 3, stride=2), layers.BatchNormAct2d(8, act_layer=nn.ReLU),
        layers.StdConv2d(8, 8, 3), nn.BatchNorm2d(8),
    )).eval()
    x = torch.randn(2, 3, 9, 9)
    report = fold_batchnorm_with_report(model)
    assert report.folded == [("1", "0")]
    assert [n for n, _ in report.kept] == ["3"] and "is not a Conv2d" in report.kept[0][1]
    assert isinstance(report.model[1], nn.Sequential) and isinstance(report.model[1][1], nn.ReLU)
    with torch.no_grad():
        assert rel_error(report.model(x), model(x)) < RTOL
