"""TRP's ramp: a MAC target's reduction grows over the iterations after the warm-up (cubic schedule)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import trp
from trp.models import create_model

SHAPE = (1, 1, 28, 28)


def _resnet20(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet20", in_channels=1, num_classes=10)


def _macs_at(pruner: trp.TRP, model: torch.nn.Module) -> float:
    """The MAC reduction of the model split at the ranks of the last projection."""
    compact = trp.decompose(model, pruner.scheme, trp.LayerRanks(dict(pruner.ranks)), layers=pruner.layer_names,
                            input_shape=SHAPE)
    return trp.count_macs(model, SHAPE) / trp.count_macs(compact, SHAPE)


@settings(max_examples=25, deadline=None)
@given(x=st.floats(1.01, 50.0), f=st.floats(0.0, 1.0))
def test_partway_cuts_that_fraction_of_the_macs_removed(x: float, f: float) -> None:
    step = trp.TargetMACs(x, convs_only=True, round_to=2).partway(f)
    removed, all_removed = 1 - 1 / step.x, 1 - 1 / x
    assert removed == pytest.approx(f * all_removed, abs=1e-8)
    assert step.x > 1 and step.convs_only and step.round_to == 2
    assert trp.TargetMACs(x).partway(1.0).x == pytest.approx(x)


@pytest.mark.parametrize("f", [-0.1, 1.5, float("nan")])
def test_partway_refuses_a_fraction_outside_0_1(f: float) -> None:
    with pytest.raises(ValueError, match="fraction must be"):
        trp.TargetMACs(3).partway(f)


def test_the_reduction_grows_along_the_cubic_ramp_then_holds_the_target() -> None:
    model = _resnet20(1)
    pruner = trp.TRP(model, "spatial", criterion=trp.TargetMACs(3), period=1, nuclear_weight=0.0,
                     input_shape=SHAPE, warmup=2, ramp=8)
    seen = []
    for it in range(1, 13):
        pruner.step()  # period 1: a projection at every iteration
        seen.append((it, pruner.target_now(), _macs_at(pruner, model)))
    assert all(c is pruner.criterion for it, c, _ in seen if it >= 10)  # warm-up 2 + ramp 8
    for it, criterion, reduction in seen:
        if 2 <= it < 10:
            p = (it - 2) / 8
            assert 1 - 1 / criterion.x == pytest.approx((1 - (1 - p) ** 3) * (1 - 1 / 3), abs=1e-8)
        if it >= 10:
            assert 3.0 <= reduction <= 3.0 * 1.03
    ramp = [r for it, _, r in seen if 2 <= it <= 10]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))  # the budget tightens at every projection
    assert ramp[0] < 1.5  # it starts near no reduction, not at the target


def test_the_final_projection_takes_the_whole_target_even_during_the_ramp() -> None:
    model = _resnet20(2)
    pruner = trp.TRP(model, "channel", criterion=trp.TargetMACs(4), period=2, nuclear_weight=0.0,
                     input_shape=SHAPE, ramp=100)
    pruner.step(), pruner.step()
    early = dict(pruner.ranks)
    assert _macs_at(pruner, model) < 1.5
    pruner.project(final=True)
    assert pruner.ranks == pruner.allocated != early
    assert 4.0 <= trp.count_macs(model, SHAPE) / trp.count_macs(pruner.decompose(), SHAPE) <= 4.0 * 1.03


def test_a_resumed_ramp_continues_where_it_stopped() -> None:
    model = _resnet20(3)
    twin = copy.deepcopy(model)
    kw = dict(criterion=trp.TargetMACs(3), period=1, nuclear_weight=0.0, input_shape=SHAPE, ramp=6)
    full, part = trp.TRP(model, "channel", **kw), trp.TRP(twin, "channel", **kw)
    for _ in range(3):
        full.step(), part.step()
    resumed = trp.TRP(twin, "channel", **kw)
    resumed.load_state_dict(part.state_dict())
    for _ in range(2):
        full.step(), resumed.step()
    assert resumed.iteration == full.iteration == 5
    assert resumed.ranks == full.ranks
    assert repr(resumed.target_now()) == repr(full.target_now())


def test_ramp_needs_a_target_that_can_go_partway() -> None:
    latency_like = trp.LayerRanks({"conv1": 1})  # a whole-model criterion without partway
    with pytest.raises(ValueError, match="has no partway"):
        trp.TRP(_resnet20(), criterion=latency_like, input_shape=SHAPE, ramp=5)
    with pytest.raises(ValueError, match="ramp counts iterations"):
        trp.TRP(_resnet20(), criterion=trp.Energy(0.9), ramp=5)


def test_from_config_passes_the_ramp() -> None:
    cfg = trp.TRPConfig(criterion=trp.TargetMACs(2), input_shape=SHAPE, ramp=40)
    assert trp.TRP.from_config(_resnet20(), cfg).ramp == 40
    with pytest.raises(ValueError, match="ramp must be"):
        trp.TRPConfig(ramp=-3)
