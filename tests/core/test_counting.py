"""MAC and parameter counting against hand formulas and torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
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
    with torch.no_grad():
        feat = nn.Sequential(*layers)(torch.zeros(1, c, h, w)).shape[1]
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
