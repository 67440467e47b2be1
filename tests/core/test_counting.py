"""MAC and parameter counting against hand formulas and torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
import torchvision
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import trp


class Reused(nn.Module):
    """A block applied twice: its MACs count twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


def _hand_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 16×16 -> 8×8
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, (3, 1), padding=(1, 0), groups=4, bias=False),  # grouped, 8×8
        Reused(),  # 4→4 3×3 twice at 8×8
        nn.MaxPool2d(2),  # 4×4
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def test_hand_formula() -> None:
    model = _hand_net()
    per = trp.layer_macs(model, (1, 3, 16, 16))
    expected = {
        "0": 8 * 8 * 8 * 3 * 3 * 3,
        "3": 4 * 8 * 8 * (8 // 4) * 3 * 1,
        "4.conv": 2 * 4 * 8 * 8 * 4 * 3 * 3,
        "7": 64 * 10,
    }
    assert per == expected
    assert trp.count_macs(model, (1, 3, 16, 16)) == sum(expected.values())
    assert trp.count_macs(model, (1, 3, 16, 16), convs_only=True) == sum(expected.values()) - 640
    # The batch dimension multiplies everything.
    assert trp.count_macs(model, (3, 3, 16, 16)) == 3 * sum(expected.values())


def test_linear_on_tokens() -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))
    assert trp.count_macs(model, (2, 7, 6)) == 2 * 7 * (6 * 12 + 12 * 5)
    assert trp.count_macs(model, (1, 6)) == 6 * 12 + 12 * 5
    assert trp.count_macs(model, (1, 7, 6), convs_only=True) == 0


@st.composite
def conv_linear_nets(draw):
    layers: list[nn.Module] = []
    c = draw(st.integers(1, 6))
    h = draw(st.integers(8, 14))
    w = draw(st.integers(8, 14))
    cin = c
    for _ in range(draw(st.integers(1, 3))):
        cout = draw(st.integers(1, 8))
        k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        stride = draw(st.integers(1, 2))
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0 and cout % g == 0]))
        layers.append(nn.Conv2d(cin, cout, k, stride=stride, padding=draw(st.integers(0, 1)), groups=groups,
                                bias=draw(st.booleans())))
        layers.append(nn.ReLU())
        cin = cout
    layers.append(nn.Flatten())
    try:
        with torch.no_grad():
            feat = nn.Sequential(*layers)(torch.zeros(1, c, h, w)).shape[1]
    except RuntimeError:  # a kernel larger than the (padded) input it meets
        assume(False)
    layers.append(nn.Linear(feat, draw(st.integers(1, 10)), bias=draw(st.booleans())))
    batch = draw(st.integers(1, 3))
    return nn.Sequential(*layers), (batch, c, h, w)


@settings(max_examples=30, deadline=None)
@given(conv_linear_nets())
def test_against_flop_counter(case) -> None:
    model, shape = case
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(shape))
    flops = counter.get_flop_counts()["Global"]
    conv_flops = sum(v for op, v in flops.items() if "convolution" in str(op))
    assert 2 * trp.count_macs(model, shape) == counter.get_total_flops()
    assert 2 * trp.count_macs(model, shape, convs_only=True) == conv_flops


def test_low_rank_model_against_flop_counter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, (3, 5), stride=2),
                          nn.Flatten(), nn.LazyLinear(32), nn.Linear(32, 4))
    shape = (2, 3, 15, 17)
    model(torch.zeros(shape))  # materialize the lazy linear
    for scheme in ("channel", "spatial"):
        new = trp.decompose(model, scheme, trp.FixedRank(2), layers=["1", "2", "4"])
        assert sum(isinstance(m, trp.LowRank) for m in new.modules()) == 3
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            new(torch.zeros(shape))
        assert 2 * trp.count_macs(new, shape) == counter.get_total_flops()


# --- parameters -----------------------------------------------------------------------
def test_count_params() -> None:
    model = _hand_net()
    assert trp.count_params(model) == sum(p.numel() for p in model.parameters())
    # Buffers (running stats) are not parameters.
    assert trp.count_params(nn.BatchNorm2d(8)) == 16
    assert trp.count_params(nn.Conv2d(3, 8, 3)) == 8 * 27 + 8


def test_shared_parameters_counted_once() -> None:
    a = nn.Linear(10, 10)
    b = nn.Linear(10, 10, bias=False)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, nn.ReLU(), b, a)  # `a` also registered twice
    assert trp.count_params(model) == 110
    # Both uses of `a` and the tied `b` are still separate calls for MACs.
    assert trp.count_macs(model, (1, 10)) == 300


# --- side effects of the probe --------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_mode_restored(training: bool) -> None:
    model = _hand_net().train(training)
    trp.count_macs(model, (1, 3, 16, 16))
    assert all(m.training == training for m in model.modules())


def test_mixed_modes_restored() -> None:
    model = _hand_net().train()
    model[1].eval()  # e.g. frozen batch norm while the rest trains
    trp.count_macs(model, (1, 3, 16, 16))
    assert model.training and model[0].training
    assert not model[1].training


def test_probe_does_not_touch_state_or_grads() -> None:
    model = _hand_net().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trp.count_macs(model, (2, 3, 16, 16))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_probe_uses_model_dtype() -> None:
    model = _hand_net().double()
    assert trp.count_macs(model, (1, 3, 16, 16)) == trp.count_macs(_hand_net(), (1, 3, 16, 16))
    assert trp.count_macs(nn.Sequential(nn.ReLU()), (1, 3)) == 0


# --- the full count: everything FlopCounterMode sees, attention included ------------------
class SelfAttention(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


def _attention_macs(b: int, heads: int, length: int, d: int) -> int:
    """Scores and weighted values: two (L×dh)·(dh×L) products per head."""
    return 2 * b * heads * length * length * (d // heads)


def test_multihead_attention_counted_in_full() -> None:
    # The fused fast path (eval, no grad) hides everything from FlopCounterMode: counted unfused.
    b, length, d, heads = 2, 16, 32, 4
    model = SelfAttention(d, heads)
    projections = b * length * 4 * d * d  # q, k, v and out
    head = b * length * d * 3
    count = trp.mac_breakdown(model, (b, length, d))
    assert count.total == projections + _attention_macs(b, heads, length, d) + head
    assert count.total == trp.count_macs(model, (b, length, d))
    # Only the head is a module called as a module; the rest is "everything else".
    assert count.layers == {"head": head}
    assert count.in_layers == head and count.other == count.total - head
    assert "counted in layers trp can split" in count.describe()
    assert torch.backends.mha.get_fastpath_enabled()  # the switch is restored


def test_transformer_encoder_counted() -> None:
    b, length, d, heads, ff = 2, 8, 16, 2, 24
    layer = nn.TransformerEncoderLayer(d, heads, ff, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    per_layer = b * length * (4 * d * d + 2 * d * ff) + _attention_macs(b, heads, length, d)
    assert trp.count_macs(model, (b, length, d)) == 2 * per_layer


def test_functional_products_counted() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 6))
            self.fc = nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.linear(x, self.w)  # no module: missed by hooks, seen by the full count
            scores = torch.einsum("bld,bmd->blm", h, h)
            return self.fc(scores @ h)

    b, length = 3, 5
    count = trp.mac_breakdown(Functional(), (b, length, 6))
    expected_other = b * length * 6 * 12 + 2 * b * length * length * 12
    assert count.layers == {"fc": b * length * 12 * 4}
    assert count.other == expected_other


def test_cpu_flash_attention_counted() -> None:
    class Sdpa(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, q, q)

    assert trp.count_macs(Sdpa(), (2, 3, 10, 8)) == _attention_macs(2, 3, 10, 24)


def test_plain_cnn_full_count_is_conv_plus_linear() -> None:
    # Batch norm, pooling, activations and residual additions count nothing.
    model = torchvision.models.resnet18(num_classes=10)
    shape = (1, 3, 32, 32)
    assert trp.count_macs(model, shape) == sum(trp.layer_macs(model, shape).values())
    assert trp.mac_breakdown(model, shape).other == 0


# --- example inputs ------------------------------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


class Tokens(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(input_ids)) * attention_mask[..., None]


def test_example_inputs_forms() -> None:
    model = _hand_net()
    x = torch.randn(2, 3, 16, 16)
    by_shape = trp.count_macs(model, (2, 3, 16, 16))
    assert trp.count_macs(model, example_inputs=x) == by_shape
    assert trp.count_macs(model, example_inputs=(x,)) == by_shape
    assert trp.layer_macs(model, example_inputs=[x]) == trp.layer_macs(model, (2, 3, 16, 16))
    two = TwoInputs()
    assert trp.count_macs(two, example_inputs=(torch.randn(3, 6), torch.randn(3, 4))) == 3 * (6 * 8 + 4 * 8)
    assert trp.count_macs(two, example_inputs={"x": torch.randn(3, 6), "y": torch.randn(3, 4)}) == 3 * 80


def test_token_ids_are_probed_as_given() -> None:
    ids = torch.randint(0, 50, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = Tokens().double()  # float inputs would take the model's dtype; ids stay integers
    assert trp.count_macs(model, example_inputs=inputs) == 2 * 7 * 16 * 8
    with pytest.raises(RuntimeError):  # float zeros are no token ids: why example_inputs exist
        trp.count_macs(nn.Sequential(nn.Embedding(50, 4)), (2, 7))


def test_float_inputs_take_model_dtype() -> None:
    model = _hand_net().double()
    assert trp.count_macs(model, example_inputs=torch.randn(1, 3, 16, 16)) == trp.count_macs(model, (1, 3, 16, 16))


def test_bad_inputs() -> None:
    model = _hand_net()
    with pytest.raises(ValueError, match="either input_shape or example_inputs"):
        trp.count_macs(model, (1, 3, 16, 16), example_inputs=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="input_shape=.*or example_inputs"):
        trp.count_macs(model)
    with pytest.raises(ValueError, match="pass tensors as example_inputs"):
        trp.count_macs(model, torch.zeros(1, 3, 16, 16))
    with pytest.raises(TypeError, match="example_inputs must be"):
        trp.count_macs(model, example_inputs=3)
    with pytest.raises(ValueError, match="holds no tensor"):
        trp.count_macs(model, example_inputs={"flag": True})


def test_bert_from_small_config_probed_and_counted() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config)
    b, length, d = 2, 16, 32
    ids = torch.randint(0, 100, (b, length))
    count = trp.mac_breakdown(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    per_layer = b * length * (4 * d * d + 2 * d * 64)
    pooler = b * d * d
    assert count.in_layers == 2 * per_layer + pooler
    assert count.other == 2 * _attention_macs(b, 4, length, d)


def test_gpt2_conv1d_counted_as_layers() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config)
    b, length, d = 2, 16, 32
    count = trp.mac_breakdown(model, example_inputs={"input_ids": torch.randint(0, 100, (b, length))})
    assert count.layers["h.0.attn.c_attn"] == b * length * d * 3 * d
    assert count.in_layers == 2 * b * length * 12 * d * d
    assert count.other == 2 * _attention_macs(b, 4, length, d)
