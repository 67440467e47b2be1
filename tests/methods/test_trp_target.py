"""TRP toward a whole-model target: projections at the allocated ranks, same sub-gradient, same split."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import trp
from trp.core.allocation import LayerSpectrum, WholeModelCriterion
from trp.core.schemes import scheme_for
from trp.models import create_model

SHAPE = (1, 1, 28, 28)


def _resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet20", in_channels=1, num_classes=10)


def _train(model: nn.Module, pruner: trp.TRP, steps: int, seed: int = 0, lr: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, *SHAPE[1:], generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
        pruner.step()


def _matrix(pruner: trp.TRP, name: str, weight: torch.Tensor) -> torch.Tensor:
    return scheme_for(pruner.model.get_submodule(name), pruner.scheme).to_matrix(weight.detach().double())


def _numerical_rank(m: torch.Tensor, rel: float = 1e-5) -> int:
    s = torch.linalg.svdvals(m)
    return int((s > s[..., :1] * rel).sum(-1).max())


def _reduction(model: nn.Module, compact: nn.Module) -> float:
    return trp.count_macs(model, SHAPE) / trp.count_macs(compact, SHAPE)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_resnet20_lands_on_3x_with_exactly_the_allocated_ranks(scheme: str) -> None:
    model = _resnet20()
    pruner = trp.TRP(model, scheme, period=4, nuclear_weight=3e-4, target=trp.TargetMACs(3), input_shape=SHAPE)
    _train(model, pruner, 7)  # one projection at step 4, then 3 plain steps
    before = {n: model.get_submodule(n).weight.detach().clone() for n in pruner.layer_names}
    _train(model, pruner, 1, seed=1)  # step 8: projection
    assert pruner.ranks == pruner.allocated and set(pruner.ranks) == set(pruner.layer_names)
    for name in pruner.layer_names:
        w = model.get_submodule(name).weight
        assert _numerical_rank(_matrix(pruner, name, w)) == pruner.ranks[name]
        assert pruner.ranks[name] < _matrix(pruner, name, before[name]).shape[-1]  # a real truncation
    # The split of the projected model lands on the target and computes the same function.
    compact = pruner.decompose()
    assert 3.0 <= _reduction(model, compact) <= 3.0 * 1.03
    model.eval()
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(x), model(x), rtol=1e-4, atol=1e-4)
    # Even after more SGD steps off the projection, the default split (the same criterion) meets the target.
    _train(model, pruner, 3, seed=2)
    assert 3.0 <= _reduction(model, pruner.decompose()) <= 3.0 * 1.03


def test_projection_ranks_are_the_allocation_of_the_weights_it_saw() -> None:
    model = _resnet20(1)
    pruner = trp.TRP(model, "channel", period=1000, nuclear_weight=0.0, target=trp.TargetMACs(2.5), input_shape=SHAPE)
    spectra = {n: torch.linalg.svdvals(_matrix(pruner, n, model.get_submodule(n).weight)) for n in pruner.layer_names}
    # Allocate directly with the criterion and layer costs from trp.decompose's own bookkeeping.
    report = trp.decompose_with_report(model, "channel", trp.TargetMACs(2.5), input_shape=SHAPE)
    expected = {r.name: r.rank for r in report.layers}
    assert pruner.allocate(spectra) == expected
    pruner.project()
    assert pruner.ranks == expected
    for name, r in expected.items():
        assert _numerical_rank(_matrix(pruner, name, model.get_submodule(name).weight)) == r


def test_subgradient_acts_on_the_allocated_ranks() -> None:
    model = _resnet20(2).double()
    lam = 0.1
    pruner = trp.TRP(model, "channel", period=5, nuclear_weight=lam, target=trp.TargetMACs(3), input_shape=SHAPE)
    # Before any projection, the first regularize() already uses the allocation of the current weights.
    for n in pruner.layer_names:
        model.get_submodule(n).weight.grad = torch.zeros_like(model.get_submodule(n).weight)
    pruner.regularize()
    assert pruner.ranks == {}  # nothing projected yet
    for name in pruner.layer_names:
        w = model.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(_matrix(pruner, name, w), full_matrices=False)
        r = pruner.allocated[name]
        expected = u[:, :r] @ vh[:r]
        torch.testing.assert_close(_matrix(pruner, name, w.grad) / lam, expected, rtol=0, atol=1e-9)
    # After a projection: U_r V_rᵀ with the projection's ranks.
    pruner.project()
    for n in pruner.layer_names:
        model.get_submodule(n).weight.grad.zero_()
    pruner.regularize()
    for name in pruner.layer_names:
        g = torch.linalg.svdvals(_matrix(pruner, name, model.get_submodule(name).weight.grad) / lam)
        r = pruner.ranks[name]
        torch.testing.assert_close(g[:r], torch.ones(r, dtype=g.dtype), rtol=0, atol=1e-8)
        assert r == len(g) or float(g[r:].abs().max()) < 1e-8


def test_warmup_projects_by_energy_then_by_the_target() -> None:
    model = _resnet20(3)
    energy_twin = copy.deepcopy(model)
    pruner = trp.TRP(model, "channel", energy=0.95, period=2, nuclear_weight=0.0,
                     target=trp.TargetMACs(4), input_shape=SHAPE, warmup=4)
    reference = trp.TRP(energy_twin, "channel", energy=0.95, period=2, nuclear_weight=0.0)
    pruner.step(), reference.step()
    pruner.step(), reference.step()  # iteration 2 < warmup: energy projection
    assert pruner.ranks == reference.ranks
    for n in pruner.layer_names:
        assert torch.equal(model.get_submodule(n).weight, energy_twin.get_submodule(n).weight)
    warm_ranks = dict(pruner.ranks)
    pruner.project(final=True)  # the final projection uses the target even inside the warm-up
    assert pruner.ranks == pruner.allocated != warm_ranks
    pruner.allocated = {}
    pruner.step()
    pruner.step()  # iteration 4: the target takes over
    assert pruner.ranks == pruner.allocated
    assert 4.0 <= _reduction(model, pruner.decompose()) <= 4.0 * 1.03


def test_example_inputs_and_input_shape_agree() -> None:
    a, b = _resnet20(4), _resnet20(4)
    pa = trp.TRP(a, period=3, target=trp.TargetMACs(2), input_shape=SHAPE)
    pb = trp.TRP(b, period=3, target=trp.TargetMACs(2), example_inputs=torch.randn(5, *SHAPE[1:]))
    assert pb.input_shape == SHAPE
    pa.project(), pb.project()
    assert pa.ranks == pb.ranks


class _Halve:
    """A duck-typed whole-model criterion (not a WholeModelCriterion subclass): half of every layer's rank."""

    convs_only = False

    def allocate(self, layers: list[LayerSpectrum], fixed_macs: int) -> dict[str, int]:
        assert fixed_macs > 0 and all(layer.cost(1) <= layer.dense_macs for layer in layers)
        return {layer.name: max(1, layer.max_rank // 2) for layer in layers}

    def spec(self) -> str:
        return "halve"

    def __call__(self, sigma: torch.Tensor) -> int:
        raise TypeError("whole model")


def test_any_whole_model_criterion_plugs_in() -> None:
    model = _resnet20(5)
    pruner = trp.TRP(model, "channel", period=2, target=_Halve(), input_shape=SHAPE)
    pruner.project()
    assert all(pruner.ranks[n] == model.get_submodule(n).weight.shape[0] // 2 for n in pruner.layer_names)
    # Global(mac_reduction=x), the LoRITa allocation, too.
    model2 = _resnet20(5)
    glob = trp.TRP(model2, "channel", period=2, target=trp.Global(mac_reduction=2), input_shape=SHAPE)
    glob.project()
    assert _reduction(model2, glob.decompose()) >= 2.0


class _HalveOnly:
    """The least a whole-model criterion needs: ``allocate`` alone (no ``__call__``, ``spec``, bounds)."""

    def allocate(self, layers: list[LayerSpectrum], fixed_macs: int) -> dict[str, int]:
        return {layer.name: max(1, layer.max_rank // 2) for layer in layers}


@pytest.mark.parametrize("criterion", [_Halve(), _HalveOnly()], ids=["with-call", "allocate-only"])
def test_decompose_takes_the_duck_typed_criteria_trp_takes(criterion) -> None:
    model = _resnet20(6).eval()
    report = trp.decompose_with_report(model, "channel", criterion=criterion, input_shape=SHAPE)
    chosen = {r.name: r.rank for r in report.layers if r.rank is not None}
    assert len(chosen) == 18 and all(rank == model.get_submodule(n).weight.shape[0] // 2 for n, rank in chosen.items())
    assert report.macs_after.total < report.macs_before.total
    # without input sizes there is no MAC count for a whole-model criterion to plan with
    with pytest.raises(ValueError, match="counts the model's MACs"):
        trp.decompose(model, "channel", criterion=criterion)


def test_a_duck_typed_criterion_on_large_layers_gets_full_spectra(monkeypatch) -> None:
    import trp.core.svd
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 4)  # every layer counts as large
    model = _resnet20(7)
    pruner = trp.TRP(model, "channel", period=2, criterion=_HalveOnly(), input_shape=SHAPE)
    pruner.project()
    assert all(pruner.ranks[n] == model.get_submodule(n).weight.shape[0] // 2 for n in pruner.layer_names)


def test_convs_only_target_leaves_linears_full_rank() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.Linear(16, 4))
    pruner = trp.TRP(model, "channel", period=2, target=trp.TargetMACs(2, convs_only=True), input_shape=(1, 3, 8, 8))
    pruner.project()
    assert pruner.ranks["5"] == 16  # the linear: outside the conv budget
    compact = pruner.decompose()
    conv = lambda m: trp.count_macs(m, (1, 3, 8, 8), convs_only=True)  # noqa: E731
    assert 2.0 <= conv(model) / conv(compact) <= 2.0 * 1.05


def test_state_dict_keeps_the_target() -> None:
    model = _resnet20(6)
    pruner = trp.TRP(model, "channel", period=3, nuclear_weight=1e-3, target=trp.TargetMACs(3), input_shape=SHAPE)
    _train(model, pruner, 4)
    buf = io.BytesIO()
    torch.save(pruner.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["target"] == "macs:3"
    twin_model = copy.deepcopy(model)
    twin = trp.TRP(twin_model, "channel", period=3, nuclear_weight=1e-3, target=trp.TargetMACs(3), input_shape=SHAPE)
    twin.load_state_dict(state)
    assert twin.ranks == pruner.ranks and twin.iteration == 4
    _train(model, pruner, 3, seed=9)
    _train(twin_model, twin, 3, seed=9)
    for (k, a), b in zip(model.state_dict().items(), twin_model.state_dict().values()):
        assert torch.equal(a, b), k
    for wrong in (trp.TRP(_resnet20(), period=3, target=trp.TargetMACs(2), input_shape=SHAPE),
                  trp.TRP(_resnet20(), period=3)):
        with pytest.raises(ValueError, match="target 'macs:3'"):
            wrong.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(target=trp.TargetMACs(3)), ValueError, "input_shape"),
        (dict(target=trp.TargetMACs(3), input_shape=SHAPE, period=None), ValueError, "period"),
        (dict(target=trp.Energy(0.9), input_shape=SHAPE), TypeError, "whole-model criterion"),
        (dict(target=trp.TargetMACs(3), input_shape=SHAPE, warmup=-1), ValueError, "warmup"),
        (dict(warmup=10), ValueError, "warmup counts iterations.*needs a whole-model criterion"),
        (dict(ramp=10), ValueError, "ramp counts iterations.*needs a whole-model criterion"),
        (dict(target=trp.TargetMACs(3), input_shape=SHAPE, ramp=-1), ValueError, "ramp must be"),
    ],
)
def test_bad_target_arguments(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        trp.TRP(_resnet20(), **kwargs)


def test_unreachable_target_fails_at_the_projection_with_the_reason() -> None:
    pruner = trp.TRP(_resnet20(), period=3, target=trp.TargetMACs(500), input_shape=SHAPE)
    with pytest.raises(ValueError, match="cannot be reached"):
        pruner.project()


@settings(max_examples=10, deadline=None)
@given(x=st.floats(1.3, 4.0), channels=st.sampled_from([4, 6, 8]), scheme=st.sampled_from(["channel", "spatial"]))
def test_any_target_lands_within_the_budget(x: float, channels: int, scheme: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2 * channels, 3))
    shape = (1, 2, 12, 12)
    try:
        pruner = trp.TRP(model, scheme, period=2, target=trp.TargetMACs(x), input_shape=shape)
        pruner.project()
    except ValueError as err:  # a target beyond rank 1 everywhere must say so
        assert "cannot be reached" in str(err)
        return
    compact = pruner.decompose()
    assert trp.count_macs(model, shape) / trp.count_macs(compact, shape) >= x * (1 - 1e-9)
    for name in pruner.layer_names:
        assert _numerical_rank(_matrix(pruner, name, model.get_submodule(name).weight), 1e-6) <= pruner.ranks[name]
    with torch.no_grad():
        xin = torch.randn(2, *shape[1:])
        torch.testing.assert_close(compact.eval()(xin), model.eval()(xin), rtol=1e-4, atol=1e-4)


class _Recording(_Halve, WholeModelCriterion):
    """A whole-model criterion whose prepare records what it was given."""

    def __init__(self) -> None:
        self.seen: list = []

    def prepare(self, model, scheme, layers, input_shape, example_inputs=None) -> None:
        self.seen.append((scheme, input_shape, example_inputs))


class _OldPrepare(_Halve, WholeModelCriterion):
    """A criterion written before prepare received example inputs (four parameters)."""

    def __init__(self) -> None:
        self.calls = 0

    def prepare(self, model, scheme, layers, input_shape) -> None:
        self.calls += 1


def test_prepare_gets_the_example_inputs_and_an_old_prepare_still_works() -> None:
    from trp.core._util import WARNED

    x = torch.randn(2, *SHAPE[1:])
    new = _Recording()
    trp.decompose(_resnet20(6), "channel", new, example_inputs=x)
    trp.decompose(_resnet20(6), "channel", new, input_shape=SHAPE)
    trp.TRP(_resnet20(6), "channel", criterion=new, period=2, input_shape=SHAPE).project()
    (s1, _, given), (_, shape2, none1), (_, shape3, none2) = new.seen
    assert s1 == "channel" and torch.equal(given.args[0], x)
    assert tuple(shape2) == tuple(shape3) == SHAPE and none1 is None and none2 is None  # only a shape: no inputs
    WARNED.discard("_OldPrepare.prepare")
    old = _OldPrepare()
    with pytest.warns(DeprecationWarning, match=r"_OldPrepare.prepare\(model, scheme, layers, input_shape\) is "
                                                "deprecated: add the parameter example_inputs=None"):
        trp.decompose(_resnet20(6), "channel", old, example_inputs=x)
    trp.TRP(_resnet20(6), "channel", criterion=old, period=2, input_shape=SHAPE).project()
    assert old.calls == 2
