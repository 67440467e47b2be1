"""TRP's factored last epochs: layers trained as their rank-r factors stay at rank r, with no jump, and split losslessly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import trp
from trp.core.schemes import scheme_for
from trp.methods.factored import Factors, is_factored
from trp.models import create_model

SHAPE = (1, 1, 28, 28)


def _resnet20(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet20", in_channels=1, num_classes=10)


def _steps(model: torch.nn.Module, pruner: trp.TRP, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # built now: the factors, once factored
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, *SHAPE[1:], generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
        pruner.step()


def _ranks(pruner: trp.TRP) -> dict[str, int]:
    """Each target layer's numerical rank in its scheme's matrix view (the largest over a batched view)."""
    out = {}
    for n in pruner.layer_names:
        module = pruner.model.get_submodule(n)
        s = torch.linalg.svdvals(scheme_for(module, pruner.scheme).to_matrix(module.weight.detach().double()))
        out[n] = int((s > s[..., :1] * 1e-6).sum(-1).max())
    return out


def _output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("scheme", ["channel", "spatial", "decouple"])
def test_factored_layers_train_at_their_ranks_and_split_losslessly(scheme: str) -> None:
    model = _resnet20(1)
    pruner = trp.TRP(model, scheme, criterion=trp.TargetMACs(3), period=2, nuclear_weight=3e-4, input_shape=SHAPE)
    _steps(model, pruner, 4)
    x = torch.randn(5, *SHAPE[1:])
    pruner.project(final=True)
    projected = _output(model, x)
    pruner.factorize(project=False)
    assert all(is_factored(model.get_submodule(n)) for n in pruner.layer_names)
    torch.testing.assert_close(_output(model, x), projected, rtol=1e-4, atol=1e-4)  # no jump
    before = {n: model.get_submodule(n).weight.detach().clone() for n in pruner.layer_names}
    iteration = pruner.iteration
    _steps(model, pruner, 6, seed=1)  # period 2: three projections would have happened
    assert pruner.iteration == iteration + 6
    assert _ranks(pruner) == pruner.ranks  # exactly at the trained ranks, though no projection ran ...
    assert all(not torch.allclose(model.get_submodule(n).weight, before[n]) for n in pruner.layer_names)  # ... and trained
    trained = _output(model, x)
    compact_while_factored = pruner.decompose()
    pruner.merge()
    assert not any(is_factored(m) for m in model.modules())
    assert all(type(model.get_submodule(n)) is torch.nn.Conv2d for n in pruner.layer_names)
    torch.testing.assert_close(_output(model, x), trained, rtol=1e-5, atol=1e-5)
    compact = pruner.decompose()
    for split in (compact, compact_while_factored):
        torch.testing.assert_close(_output(split, x), trained, rtol=1e-4, atol=1e-4)
        assert 3.0 <= trp.count_macs(model, SHAPE) / trp.count_macs(split, SHAPE) <= 3.0 * 1.03


def test_factorize_projects_first_and_a_factored_state_resumes() -> None:
    model, twin = _resnet20(2), _resnet20(2)
    kw = dict(criterion=trp.TargetMACs(2.5), period=3, nuclear_weight=0.0, input_shape=SHAPE)
    pruner = trp.TRP(model, "channel", **kw)
    _steps(model, pruner, 2)  # no projection yet (period 3)
    assert pruner.ranks == {}
    pruner.factorize()  # the final projection first: the target's ranks
    assert pruner.ranks == pruner.allocated and _ranks(pruner) == pruner.ranks
    _steps(model, pruner, 2, seed=3)
    state, weights = pruner.state_dict(), copy.deepcopy(model.state_dict())
    assert state["factored"] is True and any(k.endswith("parametrizations.weight.original0") for k in weights)
    resumed = trp.TRP(twin, "channel", **kw)
    resumed.load_state_dict(state)  # factors the fresh model's layers at the saved ranks ...
    twin.load_state_dict(weights)  # ... so that the factors load
    assert resumed.factored and resumed.ranks == pruner.ranks
    x = torch.randn(3, *SHAPE[1:])
    torch.testing.assert_close(_output(twin, x), _output(model, x), rtol=0, atol=0)


def test_factored_misuse_is_one_clear_error() -> None:
    pruner = trp.TRP(_resnet20(), "channel", criterion=trp.TargetMACs(2), period=2, input_shape=SHAPE)
    with pytest.raises(ValueError, match="no rank yet"):
        pruner.factorize(project=False)
    plain_state = pruner.state_dict()
    pruner.factorize()
    with pytest.raises(ValueError, match="factored already"):
        pruner.factorize()
    with pytest.raises(ValueError, match="saved before its layers were factored"):
        pruner.load_state_dict(plain_state)
    with pytest.raises(ValueError, match="rank >= 1"):
        Factors(scheme_for(torch.nn.Linear(3, 3), "channel"), torch.Size([3, 3]), 0)
