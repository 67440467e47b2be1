"""TRP(criterion=...) takes the criteria trp.decompose takes, and TRP.from_config the same settings (issue 21)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import trp
from trp.core._util import eval_mode, seeded_inputs

SHAPE = (1, 3, 8, 8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 16), nn.Linear(16, 4))


@pytest.mark.parametrize("criterion, expected", [
    (trp.FixedRank(3), {"2": 3, "4": 3, "7": 3}),
    (lambda sigma: 2, {"2": 2, "4": 2, "7": 2}),  # any callable sigma -> rank
    (trp.LayerRanks({"4": 5}), {"2": 8, "4": 5, "7": 16}),  # needs no input shape; unnamed layers stay full rank
    (trp.Global(drop=0.0), {"2": 8, "4": 16, "7": 16}),
])
def test_per_layer_and_whole_model_criteria(criterion, expected) -> None:
    model = _model()
    pruner = trp.TRP(model, criterion=criterion, period=2)
    pruner.project()
    assert pruner.ranks == expected
    for name, r in expected.items():
        w = model.get_submodule(name).weight.detach().flatten(1)
        assert torch.linalg.matrix_rank(w).item() <= r


def test_from_config_equals_the_arguments() -> None:
    cfg = trp.TRPConfig(criterion=trp.TargetMACs(2), period=3, nuclear_weight=1e-3, warmup=4, energy=0.95,
                        input_shape=SHAPE)
    a, b = _model(), _model()
    pa = trp.TRP.from_config(a, cfg)
    pb = trp.TRP(b, criterion=trp.TargetMACs(2), period=3, nuclear_weight=1e-3, warmup=4, input_shape=SHAPE,
                 warmup_criterion=trp.Energy(0.95))
    assert (pa.period, pa.nuclear_weight, pa.warmup, pa.input_shape) == (pb.period, pb.nuclear_weight, pb.warmup, pb.input_shape)
    assert pa.warmup_criterion.e == 0.95 and pa.target is cfg.criterion
    pa.project(final=True), pb.project(final=True)
    assert pa.ranks == pb.ranks
    plain = trp.TRP.from_config(_model(), trp.TRPConfig())
    assert isinstance(plain.criterion, trp.Energy) and plain.criterion.e == 0.9 and plain.period == 20
    assert plain.target is None and plain.nuclear_weight == 3e-4


def test_the_old_positional_energy_still_means_energy() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pruner = trp.TRP(_model(), "channel", 0.7, 2)
    assert [w.category for w in record] == [DeprecationWarning]
    assert record[0].filename == __file__  # the warning points at the caller
    assert isinstance(pruner.criterion, trp.Energy) and pruner.criterion.e == 0.7 and pruner.period == 2


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(criterion="energy:0.9"), TypeError, "rank criterion"),
    (dict(criterion=trp.TargetMACs(2)), ValueError, "input_shape"),
    (dict(criterion=trp.Energy(0.9), warmup=3), ValueError, "warmup counts iterations.*needs a whole-model criterion"),
    (dict(criterion=trp.TargetMACs(2), input_shape=SHAPE, warmup_criterion=trp.TargetMACs(3)), TypeError,
     "warmup_criterion"),
])
def test_bad_criteria(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        trp.TRP(_model(), **kwargs)


def test_shared_helpers() -> None:
    model = _model().train()
    model[2].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[2].training and model[4].training  # each module's own flag back
    x = seeded_inputs(model, (2, 3, 4, 4), seed=3)
    state = torch.random.get_rng_state()
    assert torch.equal(x, seeded_inputs(model, (2, 3, 4, 4), seed=3)) and x.dtype == torch.float32
    assert torch.equal(state, torch.random.get_rng_state())  # the global random state is untouched
