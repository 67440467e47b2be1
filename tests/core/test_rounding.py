"""Rank rounding: ``round_to`` on TargetMACs and on decompose, and the criterion registration hook."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trp
from trp.core.allocation import LayerSpectrum, TargetMACs, round_rank
from trp.core.criteria import parse_criterion, register_criterion


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


SHAPE = (1, 3, 12, 12)


def _layers(rng: torch.Generator, n: int) -> list[LayerSpectrum]:
    out = []
    for i in range(n):
        k = int(torch.randint(4, 40, (1,), generator=rng))
        sigma = torch.rand(k, generator=rng).sort(descending=True).values
        per = int(torch.randint(10, 200, (1,), generator=rng))
        dense = per * k * k // 3
        out.append(LayerSpectrum(f"l{i}", sigma, dense, lambda r, per=per: per * r))
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), k=st.sampled_from([1, 2, 4, 8]),
       x=st.floats(1.05, 3.0))
def test_target_speedup_rounded_ranks_are_multiples_and_meet_the_budget(seed, n, k, x):
    layers = _layers(torch.Generator().manual_seed(seed), n)
    fixed = 100
    crit = TargetMACs(x, round_to=k)
    try:
        ranks = crit.allocate(layers, fixed)
    except ValueError as err:
        assert "cannot be reached" in str(err)
        return
    for layer in layers:
        r = ranks[layer.name]
        assert r % k == 0 or r == layer.max_rank
    total = fixed + sum(layer.cost(ranks[layer.name]) for layer in layers)
    dense = fixed + sum(layer.dense_macs for layer in layers)
    assert total <= dense / x


def test_round_to_one_is_the_unrounded_criterion():
    model = _net()
    a = trp.decompose_with_report(model, "channel", TargetMACs(2.0), input_shape=SHAPE)
    b = trp.decompose_with_report(model, "channel", TargetMACs(2.0, round_to=1), input_shape=SHAPE)
    assert [r.rank for r in a.layers] == [r.rank for r in b.layers]


def test_decompose_rounds_per_layer_ranks_and_stays_exact():
    model = _net()
    plain = trp.decompose_with_report(model, "channel", trp.FixedRank(3), input_shape=SHAPE)
    rounded = trp.decompose_with_report(model, "channel", trp.FixedRank(3), input_shape=SHAPE, round_to=4)
    for p, r in zip(plain.layers, rounded.layers):
        assert r.rank == 4 and p.rank == 3
    # the split with rank 4 equals the dense layer truncated at rank 4
    full = trp.decompose(model, "channel", trp.FixedRank(4), input_shape=SHAPE)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(rounded.model(x), full(x))


def test_rounding_never_makes_a_split_cost_the_dense_macs():
    # rank 5 of a 16-wide layer is cheaper than dense; rank 8 is not: keep 5
    assert round_rank(5, 8, 16, cost=lambda r: 20 * r, dense_cost=150) == 5
    assert round_rank(5, 8, 16, cost=lambda r: 10 * r, dense_cost=150) == 8
    assert round_rank(15, 8, 16) == 16


def test_whole_model_criteria_take_their_own_round_to():
    with pytest.raises(ValueError, match="pass round_to=4 to the criterion"):
        trp.decompose(_net(), "channel", TargetMACs(2.0), input_shape=SHAPE, round_to=4)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="round_to"):
            TargetMACs(2.0, round_to=bad)


def test_registered_criterion_kinds_parse_and_builtins_are_protected():
    with pytest.raises(ValueError, match="built in"):
        register_criterion("energy", float, "energy:E")
    register_criterion("test-kind", lambda v: trp.FixedRank(int(v) * 2), "test-kind:N")
    assert parse_criterion("test-kind:3").k == 6
    with pytest.raises(ValueError, match="test-kind:N"):
        parse_criterion("nope:1")
