"""trp.core.decompose: which layers are split, exactness, reports and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import trp
from trp import Energy, FixedRank, Value
from trp.core.schemes import SCHEMES, LowRank, scheme_for

CONV_SCHEMES = ["channel", "spatial"]


class SmallCNN(nn.Module):
    """stem (3×3) → conv1 (3×3, stride 2) → conv2 (3×3, non-square pad) → pw (1×1) → fc1 → fc2."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        kw = dict(dtype=dtype)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False, **kw)
        self.bn = nn.BatchNorm2d(8, **kw)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, **kw)
        self.conv2 = nn.Conv2d(16, 16, (3, 5), padding=(1, 2), bias=False, **kw)
        self.pw = nn.Conv2d(16, 16, 1, **kw)
        self.fc1 = nn.Linear(16, 32, **kw)
        self.fc2 = nn.Linear(32, 10, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.pw(x).mean((-2, -1))
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """CIFAR-style: stem, two stages, a 1×1 downsample shortcut, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2))
        self.linear = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.linear(x.mean((-2, -1)))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g, dtype=buf.dtype) + 0.5)
            elif name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=buf.dtype) * 0.1)
    return model.eval()


def _truncated(weight: torch.Tensor, scheme, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(scheme.to_matrix(weight.detach().double()), full_matrices=False)
    return scheme.from_matrix((u[:, :r] * s[:r]) @ vh[:r], weight.shape).to(weight.dtype)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the input model is left alone ----------------------------------------------------
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_returns_new_model_and_leaves_input_untouched(scheme: str) -> None:
    model = _seeded(SmallCNN())
    before = _snapshot(model)
    structure = repr(model)
    new = trp.decompose(model, scheme, FixedRank(2))
    assert new is not model
    assert repr(model) == structure
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc1, nn.Linear)
    assert isinstance(new.conv1, LowRank) and isinstance(new.fc1, LowRank)
    assert all(p.data_ptr() != q.data_ptr() for p in new.parameters() for q in model.parameters())


# --- exactness ------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("criterion", [FixedRank(2), Energy(0.7), Value(2.5)], ids=repr)
def test_per_layer_and_whole_model_exactness(scheme: str, criterion) -> None:
    model = _seeded(SmallCNN(torch.float64))
    result = trp.decompose_with_report(model, scheme, criterion)
    new = result.model
    assert [r.name for r in result.layers] == ["conv1", "conv2", "pw", "fc1"]
    assert len(result.factorized) >= 3
    expected = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    for entry in result.factorized:
        dense = model.get_submodule(entry.name)
        low = new.get_submodule(entry.name)
        sch = scheme_for(dense, scheme)
        assert entry.scheme == sch.name and low.scheme == sch.name
        assert low.rank == entry.rank
        s = torch.linalg.svdvals(sch.to_matrix(dense.weight.detach()))
        assert entry.rank == criterion(s) and entry.max_rank == s.numel()
        truncated = copy.deepcopy(dense)
        with torch.no_grad():
            truncated.weight.copy_(_truncated(dense.weight, sch, entry.rank))
            expected.get_submodule(entry.name).weight.copy_(truncated.weight)
        if isinstance(dense, nn.Conv2d):
            x = torch.randn(2, dense.in_channels, 9, 11, generator=g, dtype=torch.float64)
        else:
            x = torch.randn(2, dense.in_features, generator=g, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(low(x), truncated(x), rtol=0, atol=1e-10)
    # Layers not selected are carried over unchanged.
    for name in ("stem", "bn", "fc2"):
        a, b = model.get_submodule(name).state_dict(), new.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected(x), rtol=0, atol=1e-10)


def test_float32_model_stays_float32_and_close() -> None:
    model = _seeded(SmallCNN())
    new = trp.decompose(model, "channel", Energy(1.0), layers=["conv2"])
    # conv2 at full rank 16 would not save MACs: still dense.
    assert isinstance(new.conv2, nn.Conv2d)
    new = trp.decompose(model, "spatial", FixedRank(3), layers=["conv2"])
    assert all(p.dtype == torch.float32 for p in new.parameters())
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.conv2.weight.copy_(_truncated(model.conv2.weight, SCHEMES["spatial"], 3))
        x = torch.randn(2, 3, 12, 12)
        torch.testing.assert_close(new(x), ref(x), rtol=1e-4, atol=1e-5)


# --- layer selection ------------------------------------------------------------------
def test_default_selection_on_cifar_like_net() -> None:
    model = _seeded(TinyResNet())
    result = trp.decompose_with_report(model, "channel", FixedRank(1))
    names = [r.name for r in result.layers]
    paper = ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"]
    assert names == paper[:3] + ["layer2.0.conv2", "layer2.0.shortcut.0"]
    new = result.model
    assert isinstance(new.conv1, nn.Conv2d)  # stem
    assert isinstance(new.layer2[0].shortcut[0], LowRank)  # 1×1 downsample: two 1×1 convs
    assert isinstance(new.linear, nn.Linear)  # classifier
    assert all(isinstance(new.get_submodule(n), LowRank) for n in names)
    # The paper's selection leaves the 1×1 downsample dense.
    result = trp.decompose_with_report(model, "channel", FixedRank(1), layers="paper")
    assert [r.name for r in result.layers] == paper
    assert isinstance(result.model.layer2[0].shortcut[0], nn.Conv2d)
    # Already factorized layers are not picked again: nothing is left to decompose.
    with pytest.raises(ValueError, match="nothing to decompose"):
        trp.decompose(new, "channel", FixedRank(1))


def test_default_selection_keeps_last_linear_only() -> None:
    result = trp.decompose_with_report(_seeded(SmallCNN()), "channel", FixedRank(1))
    assert [r.name for r in result.layers] == ["conv1", "conv2", "pw", "fc1"]
    result = trp.decompose_with_report(_seeded(SmallCNN()), "channel", FixedRank(1), layers="paper")
    assert [r.name for r in result.layers] == ["conv1", "conv2", "fc1"]


def test_layers_as_names() -> None:
    model = _seeded(SmallCNN())
    result = trp.decompose_with_report(model, "channel", FixedRank(2), layers=["conv2", "stem", "fc2"])
    assert [r.name for r in result.layers] == ["conv2", "stem", "fc2"]
    new = result.model
    assert isinstance(new.conv2, LowRank) and isinstance(new.fc2, LowRank)
    # stem: 3→8, rank 2 costs 2·(27+8) = 70 < 216 MACs per pixel: factorized too.
    assert isinstance(new.stem, LowRank)
    assert isinstance(new.conv1, nn.Conv2d) and isinstance(new.fc1, nn.Linear)


def test_layers_as_predicate() -> None:
    model = _seeded(SmallCNN())
    seen = []

    def pick(name: str, module: nn.Module) -> bool:
        seen.append(name)
        return isinstance(module, nn.Linear)

    new = trp.decompose(model, "spatial", FixedRank(2), layers=pick)
    assert seen == ["stem", "conv1", "conv2", "pw", "fc1", "fc2"]
    assert isinstance(new.fc1, LowRank) and isinstance(new.fc2, LowRank)
    assert new.fc1.scheme == "linear"
    assert all(isinstance(getattr(new, n), nn.Conv2d) for n in ("stem", "conv1", "conv2", "pw"))


def test_depthwise_skipped_grouped_split_per_group() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped
        nn.Conv2d(8, 16, 3, padding=1),
    )
    with pytest.warns(UserWarning, match=r"(?s)left 1 selected layer\(s\) dense.*depthwise"):
        result = trp.decompose_with_report(model, "channel", FixedRank(2))
    assert [(r.name, r.status) for r in result.layers] == [
        ("1", "skipped"), ("2", "factorized"), ("3", "factorized")
    ]
    assert "groups=8" in result.skipped[0].reason
    assert result.model[1].groups == 8
    assert torch.equal(result.model[1].weight, model[1].weight)
    low = result.model[2]
    assert (low.first.groups, low.first.out_channels, low.second.groups) == (2, 4, 2)
    assert isinstance(result.model[3], LowRank)
    # spatial and decouple refuse grouped convs, naming the scheme.
    with pytest.warns(UserWarning, match=r"only the channel scheme splits it"):
        result = trp.decompose_with_report(model, "spatial", FixedRank(2))
    assert [r.status for r in result.layers] == ["skipped", "skipped", "factorized"]


def test_no_warning_without_skipped_layers() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trp.decompose(_seeded(SmallCNN()), "channel", FixedRank(2))


def test_layer_without_mac_saving_stays_dense() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(8, 8), nn.Linear(8, 2))
    _seeded(model)
    result = trp.decompose_with_report(model, "channel", Energy(1.0), layers=["1", "2"])
    for entry in result.layers:
        assert entry.status == "dense"
        assert entry.rank == entry.max_rank
        assert entry.macs_after == entry.macs_before
        assert "would not reduce MACs" in entry.reason
    # channel: rank 4 costs 4·(36+4) = 160 ≥ 144; linear: rank 8 costs 8·16 = 128 ≥ 64.
    assert result.layers[0].macs_before == 4 * 4 * 9
    assert result.layers[1].macs_before == 64
    assert isinstance(result.model[1], nn.Conv2d) and isinstance(result.model[2], nn.Linear)
    assert result.factorized == []
    # At equal cost the layer also stays dense (MACs must strictly drop).
    equal = trp.decompose_with_report(model, "channel", FixedRank(4), layers=["2"])
    assert equal.layers[0].macs_after == equal.layers[0].macs_before == 64
    assert equal.layers[0].status == "dense"


# --- errors ---------------------------------------------------------------------------
def test_unknown_scheme() -> None:
    with pytest.raises(ValueError, match=r"(?s)tucker.*channel.*decouple.*spatial"):
        trp.decompose(_seeded(SmallCNN()), "tucker")


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.Conv2d(3, 8, 3)), nn.Sequential(nn.BatchNorm2d(3)),
     nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(10))],
    ids=["one-conv", "batchnorm", "stem-1x1-classifier"],
)
def test_nothing_to_decompose(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="nothing to decompose"):
        trp.decompose(model, layers="paper")


def test_nothing_to_decompose_when_all_selected_are_grouped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ValueError, match=r"nothing to decompose.*depthwise"):
        trp.decompose(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_names_layer(bad: float) -> None:
    model = _seeded(SmallCNN())
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"'conv2'.*NaN or Inf"):
        trp.decompose(model)


def test_unknown_or_wrong_layer_names() -> None:
    model = _seeded(SmallCNN())
    with pytest.raises(ValueError, match="'conv9' not found"):
        trp.decompose(model, layers=["conv9"])
    with pytest.raises(ValueError, match="'bn' is a BatchNorm2d"):
        trp.decompose(model, layers=["bn"])
    with pytest.raises(ValueError, match="a string names a selection"):
        trp.decompose(model, layers="conv1")


def test_bad_criterion() -> None:
    model = _seeded(SmallCNN())
    with pytest.raises(ValueError, match="criterion"):
        trp.decompose(model, criterion=0.9)
    with pytest.raises(ValueError, match=r"returned rank 0 for layer 'conv1'"):
        trp.decompose(model, criterion=lambda s: 0)
    # A plain callable works as a criterion.
    new = trp.decompose(model, criterion=lambda s: 2)
    assert new.conv1.rank == 2 and new.fc1.rank == 2


def test_svd_falls_back_to_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _seeded(SmallCNN())
    reference = trp.decompose(model, "channel", FixedRank(3))
    original = torch.linalg.svd
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise RuntimeError("linalg.svd: The algorithm failed to converge")
        return original(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    new = trp.decompose(model, "channel", FixedRank(3))
    assert calls == [torch.float32, torch.float64] * 4
    assert all(p.dtype == torch.float32 for p in new.parameters())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(new(x), reference(x), rtol=1e-4, atol=1e-5)


def test_svd_failing_twice_raises_svd_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(a, *args, **kwargs):
        raise RuntimeError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(trp.SVDError, match=r"'conv1'.*float32.*float64"):
        trp.decompose(_seeded(SmallCNN()))
    assert issubclass(trp.SVDError, RuntimeError)


# --- MAC accounting -------------------------------------------------------------------
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_count_macs_drops(scheme: str) -> None:
    model = _seeded(TinyResNet())
    shape = (1, 3, 16, 16)
    new = trp.decompose(model, scheme, FixedRank(2))
    assert trp.count_macs(new, shape) < trp.count_macs(model, shape)
    assert trp.count_macs(new, shape, convs_only=True) < trp.count_macs(model, shape, convs_only=True)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("criterion", [FixedRank(2), FixedRank(6), Energy(0.95)], ids=repr)
def test_report_macs_add_up_with_input_shape(scheme: str, criterion) -> None:
    model = _seeded(SmallCNN())
    shape = (1, 3, 14, 10)
    layers = ["stem", "conv1", "conv2", "fc1", "fc2"]
    result = trp.decompose_with_report(model, scheme, criterion, layers=layers, input_shape=shape)
    per_layer_before = trp.layer_macs(model, shape)
    per_layer_after = trp.layer_macs(result.model, shape)
    for entry in result.layers:
        assert entry.macs_before == per_layer_before[entry.name]
        if entry.status == "factorized":
            assert entry.macs_after < entry.macs_before
            assert entry.macs_after == per_layer_after[f"{entry.name}.first"] + per_layer_after[f"{entry.name}.second"]
        else:
            assert entry.macs_after == entry.macs_before == per_layer_after[entry.name]
    saved = sum(e.macs_before - e.macs_after for e in result.layers)
    assert trp.count_macs(result.model, shape) == trp.count_macs(model, shape) - saved


def test_input_shape_decides_spatial_scheme() -> None:
    # The spatial first layer runs on an (H_out × W_in) map. Without padding and with a wide
    # kernel W_in > W_out: the per-output-pixel estimate says "factorize" at rank 12, the
    # exact count at the real input size says "dense".
    conv = nn.Conv2d(8, 8, (3, 5))
    model = _seeded(nn.Sequential(nn.Conv2d(3, 8, 1), conv))
    sch = SCHEMES["spatial"]
    nominal = trp.decompose_with_report(model, "spatial", FixedRank(12), layers=["1"])
    assert nominal.layers[0].macs_before == 8 * 8 * 15
    assert nominal.layers[0].macs_after == 12 * (8 * 3 + 8 * 5) < 8 * 8 * 15
    assert nominal.layers[0].status == "factorized"
    exact = trp.decompose_with_report(model, "spatial", FixedRank(12), layers=["1"], input_shape=(1, 3, 8, 9))
    assert exact.layers[0].macs_before == trp.count_macs(conv, (1, 8, 8, 9)) == 8 * 8 * 15 * 6 * 5
    assert exact.layers[0].macs_after == exact.layers[0].macs_before  # dense: reported at its cost
    assert sch.macs(conv, 12, (6, 5), (8, 9)) == 12 * (8 * 3 * 6 * 9 + 8 * 5 * 6 * 5) > 28800
    assert exact.layers[0].status == "dense" and isinstance(exact.model[1], nn.Conv2d)
    smaller = trp.decompose_with_report(model, "spatial", FixedRank(11), layers=["1"], input_shape=(1, 3, 8, 9))
    assert smaller.layers[0].status == "factorized"
    assert smaller.layers[0].macs_after == 11 * 2496


def test_linear_tokens_with_input_shape() -> None:
    model = _seeded(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 4)))
    shape = (1, 5, 16)
    result = trp.decompose_with_report(model, "channel", FixedRank(2), input_shape=shape)
    assert [r.name for r in result.layers] == ["0", "2"]
    assert result.layers[0].macs_before == 5 * 16 * 32
    assert result.layers[0].macs_after == 5 * 2 * (16 + 32)
    saved = sum(e.macs_before - e.macs_after for e in result.layers)
    assert trp.count_macs(result.model, shape) == trp.count_macs(model, shape) - saved


# --- decouple (one matrix view per output filter) ---------------------------------------
def test_decouple_equals_per_filter_truncation() -> None:
    model = _seeded(SmallCNN()).double()
    report = trp.decompose_with_report(model, "decouple", FixedRank(3), input_shape=(1, 3, 12, 12))
    compact = report.model
    factorized = [r for r in report.layers if r.status == "factorized"]
    assert factorized and all(r.rank == 3 for r in factorized)
    reference = _snapshot(model)
    assert {r.scheme for r in factorized} == {"decouple", "linear"}
    for r in factorized:
        scheme = scheme_for(model.get_submodule(r.name), "decouple")
        w = model.get_submodule(r.name).weight.detach()
        u, s, vh = torch.linalg.svd(scheme.to_matrix(w), full_matrices=False)
        reference[r.name + ".weight"] = scheme.from_matrix((u[..., :3] * s[..., None, :3]) @ vh[..., :3, :], w.shape)
    dense = _seeded(SmallCNN()).double()
    dense.load_state_dict(reference)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), dense(x), rtol=0, atol=1e-10)
    assert trp.count_macs(compact, (1, 3, 12, 12)) == sum(
        r.macs_after for r in report.layers if r.macs_after is not None
    ) + trp.count_macs(model, (1, 3, 12, 12)) - sum(r.macs_before for r in report.layers if r.macs_before)


def test_decouple_rank_is_the_largest_over_filters() -> None:
    conv = nn.Conv2d(4, 3, 3, padding=1, bias=False)
    with torch.no_grad():  # filter 0 has rank 1, filter 1 rank 2, filter 2 rank 3 (C × 9 views)
        conv.weight.zero_()
        for i in range(3):
            for k in range(i + 1):
                conv.weight[i] += torch.randn(4, 1, 1) * torch.randn(1, 3, 3)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), conv)
    report = trp.decompose_with_report(model, "decouple", Value(1e-6), layers=["1"], input_shape=(1, 4, 8, 8))
    assert report.layers[0].rank == 3
    report = trp.decompose_with_report(model, "decouple", Value(1e-6), layers=["1"])
    assert report.layers[0].max_rank == 4
