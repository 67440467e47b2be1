"""trp.core.attention / safety / layers: attention rebuilt exactly, unsafe layers left dense, checks raise."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torchvision
from torch import nn

import trp
from trp.core.attention import SplitMultiheadAttention
from trp.core.layers import select_layers
from trp.core.schemes import LowRank


# --- nn.MultiheadAttention ----------------------------------------------------------------
@pytest.mark.parametrize("batch_first, bias, bias_kv, zero_attn, kdim",
                         list(itertools.product([False, True], [True, False], [False, True], [False, True], [None, 6])))
def test_split_attention_equals_multihead_attention(batch_first, bias, bias_kv, zero_attn, kdim) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim, vdim=kdim,
                                batch_first=batch_first).eval()
    split = SplitMultiheadAttention(mha).eval()
    L, S, N, kd = 5, 7, 3, kdim or 8
    q = torch.randn((N, L, 8) if batch_first else (L, N, 8))
    k = torch.randn((N, S, kd) if batch_first else (S, N, kd))
    v = torch.randn_like(k)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    float_mask = torch.randn(L, S)
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)
    cases = [{}, {"key_padding_mask": kpm}, {"attn_mask": float_mask, "need_weights": False},
             {"attn_mask": causal, "key_padding_mask": kpm, "average_attn_weights": False},
             {"attn_mask": causal, "is_causal": True}, {"attn_mask": float_mask.expand(N * 2, L, S)}]
    with torch.no_grad():
        for kwargs in cases:
            want, got = mha(q, k, v, **kwargs), split(q, k, v, **kwargs)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            assert (got[1] is None) == (want[1] is None)
            if want[1] is not None:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_split_attention_unbatched_and_causal_hint() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    split = SplitMultiheadAttention(mha)
    x = torch.randn(5, 8)
    with torch.no_grad():
        for a, b in zip(mha(x, x, x), split(x, x, x)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="is_causal"):
        split(x, x, x, is_causal=True)


def _truncated_reference(model: nn.Module, split_model: nn.Module) -> nn.Module:
    """``model`` with each split layer's weight set to the product of its two thin layers."""
    import copy

    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, low in split_model.named_modules():
        if not isinstance(low, LowRank):
            continue
        weight = (low.second.weight @ low.first.weight).detach()
        parent, _, child = name.rpartition(".")
        with torch.no_grad():
            if child in ("q_proj", "k_proj", "v_proj") and isinstance(modules.get(parent), nn.MultiheadAttention):
                e = weight.shape[0]
                i = ("q_proj", "k_proj", "v_proj").index(child)
                modules[parent].in_proj_weight[i * e:(i + 1) * e].copy_(weight)
            else:
                modules[name].weight.copy_(weight)
    return ref


def test_torchvision_vit_splits_and_matches_truncated_weights() -> None:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=5).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_()  # torchvision zero-initializes it
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = trp.decompose_with_report(model, "channel", trp.FixedRank(4), example_inputs=x)
    names = {r.name for r in result.factorized}
    assert {"encoder.layers.encoder_layer_0.self_attention.q_proj", "encoder.layers.encoder_layer_1.mlp.0",
            "encoder.layers.encoder_layer_0.self_attention.out_proj"} <= names
    assert "conv_proj" not in names and "heads.head" not in names
    assert isinstance(result.model.encoder.layers[0].self_attention, SplitMultiheadAttention)
    ref = _truncated_reference(model, result.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_nn_transformer_splits_and_matches_truncated_weights() -> None:
    torch.manual_seed(0)
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32,
                           batch_first=True).eval()
    src, tgt = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    result = trp.decompose_with_report(model, "channel", trp.FixedRank(3), example_inputs=(src, tgt))
    assert len(result.factorized) >= 10 and not result.skipped
    ref = _truncated_reference(model, result.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model(src, tgt), ref(src, tgt), rtol=1e-4, atol=1e-5)


def test_attention_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1),
                             nn.Linear(16, 3))

    model = make().eval()
    x = torch.randn(2, 5, 16)
    compact = trp.decompose(model, "channel", trp.FixedRank(2), example_inputs=x)
    trp.save(compact, tmp_path / "m.safetensors")
    loaded = trp.load(tmp_path / "m.safetensors", make()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compact(x))


def test_unsplit_attention_is_restored() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16), nn.Linear(8, 2))
    compact = trp.decompose(model, "channel", trp.FixedRank(2), layers=["0"])
    assert isinstance(compact[1].self_attn, nn.MultiheadAttention)


# --- parents reading child.weight, shared and tied layers ------------------------------------
class ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.fc.weight) + self.out(x)


class ReadsWeightHidden(nn.Module):
    """Reads the weight in a way no source scan sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, getattr(self.fc, "wei" + "ght")) + self.out(x)


def _net(block: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), block, nn.Linear(16, 2))


def test_parent_reading_weight_is_left_dense_by_source_scan() -> None:
    model = _net(ReadsWeight())
    with pytest.warns(UserWarning, match=r"reads self\.fc\.weight"):
        result = trp.decompose_with_report(model, "channel", trp.FixedRank(2))
    status = {r.name: r.status for r in result.layers}
    assert status["1.fc"] == "skipped" and status["1.out"] == "factorized"
    x = torch.randn(3, 16)
    result.model(x)  # runs


def test_trp_trains_only_layers_decompose_splits() -> None:
    """TRP applies decompose's safety net (one selection): a layer whose weight a parent reads is
    not trained low rank, and every layer it trains is split afterwards."""
    model = _net(ReadsWeight())
    with pytest.warns(UserWarning, match=r"TRP leaves these selected layers alone: 1\.fc .*reads self\.fc\.weight"):
        pruner = trp.TRP(model, energy=0.5)
    assert pruner.layer_names == ["0", "1.out"]
    result = trp.decompose_with_report(model, "channel", trp.FixedRank(2), layers=pruner.layer_names)
    assert [r.name for r in result.factorized] == ["0", "1.out"] and not result.skipped


def test_trp_trains_attention_projections_decompose_converts() -> None:
    """nn.MultiheadAttention reads out_proj.weight, and nn.TransformerEncoderLayer its linears' weights
    on its fast path; decompose converts the attention first, so TRP trains them too."""
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 2))
    pruner = trp.TRP(model, energy=0.5)
    assert pruner.layer_names == ["0", "1.self_attn.out_proj", "1.linear1", "1.linear2"]
    result = trp.decompose_with_report(model, "channel", trp.FixedRank(2), layers=pruner.layer_names)
    assert {r.name for r in result.factorized} == set(pruner.layer_names) and not result.skipped


def test_parent_reading_weight_found_by_running_example_inputs() -> None:
    torch.manual_seed(0)
    model = _net(ReadsWeightHidden())
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="found running the example inputs"):
        result = trp.decompose_with_report(model, "channel", trp.FixedRank(2), example_inputs=x)
    status = {r.name: r.status for r in result.layers}
    assert status == {"0": "factorized", "1.fc": "skipped", "1.out": "factorized"}
    assert isinstance(result.model[1].fc, nn.Linear)
    result.model(x)


def test_broken_split_raises_naming_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    from trp.core.schemes import LinearScheme

    original = LinearScheme._load_factors

    def corrupt(self, low, module, a, b):
        original(self, low, module, a, b)
        low.second.weight.mul_(1.5)

    monkeypatch.setattr(LinearScheme, "_load_factors", corrupt)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    with pytest.raises(RuntimeError, match=r"layer '0'.*differs"):
        trp.decompose(model, "channel", trp.FixedRank(2), example_inputs=torch.randn(3, 16))
    # Without example inputs but with input_shape, random inputs of that shape check it too.
    with pytest.raises(RuntimeError, match="layer '0'"):
        trp.decompose(model, "channel", trp.FixedRank(2), input_shape=(3, 16))


class TypeSwitch(nn.Module):
    """Returns another shape when its layer is no longer a Linear: the whole-model check sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if type(self.fc) is nn.Linear else y[:, :8]


def test_output_structure_change_raises() -> None:
    model = nn.Sequential(nn.Linear(16, 16), TypeSwitch())
    with pytest.raises(RuntimeError, match=r"output 0: shape \(3, 8\) after the split"):
        trp.decompose(model, "channel", trp.FixedRank(2), layers=["1.fc"], example_inputs=torch.randn(3, 16))


def test_shared_module_and_tied_weight_skipped() -> None:
    shared = nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(16, 16), shared, nn.ReLU(), shared, nn.Linear(16, 16), nn.Linear(16, 2))
    model[5].weight = nn.Parameter(torch.randn(2, 16))
    tied = nn.Linear(16, 16)
    tied.weight = model[4].weight
    model.append(tied)
    model.append(nn.Linear(16, 2))
    targets, skipped = select_layers(model, "all")
    reasons = dict(skipped)
    assert "used at 2 places (1, 3)" in reasons["1"]
    assert "tied to" in reasons["4"] and "tied to" in reasons["6"]
    assert [n for n, _ in targets] == ["0", "5", "7"]


# --- selection --------------------------------------------------------------------------------
def test_globs_exclude_and_named_selections() -> None:
    model = torchvision.models.resnet18(num_classes=4)
    names = [n for n, _ in select_layers(model, ["layer1.*.conv1", "fc"])[0]]
    assert names == ["layer1.0.conv1", "layer1.1.conv1", "fc"]
    default = [n for n, _ in select_layers(model)[0]]
    paper = [n for n, _ in select_layers(model, "paper")[0]]
    assert "conv1" not in default and "fc" not in default
    assert "layer2.0.downsample.0" in default and "layer2.0.downsample.0" not in paper
    assert set(paper) < set(default)
    excluded = [n for n, _ in select_layers(model, exclude=["*.downsample.*", "layer4.*"])[0]]
    assert excluded == [n for n in default if "downsample" not in n and not n.startswith("layer4")]
    with pytest.raises(ValueError, match="matches no splittable layer"):
        select_layers(model, ["nothing.*"])
    with pytest.raises(ValueError, match="exclude pattern"):
        select_layers(model, exclude=["nothing.*"])
    with pytest.raises(ValueError, match="a string names a selection"):
        select_layers(model, "layer1.*")
