"""The one refresh flow of issue 21 trains bit for bit as the four refresh paths before it, and resumes their checkpoints.

``_trp_before_21.py`` is the TRP module as it was before the refactor (kept as the reference).
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trp
import trp.core.svd

sys.path.insert(0, str(Path(__file__).parent))
import _trp_before_21 as before  # noqa: E402

SHAPE = (1, 3, 8, 8)


class Net(nn.Module):
    def __init__(self, wide: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16, wide)
        self.fc2 = nn.Linear(wide, wide)
        self.head = nn.Linear(wide, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.b(torch.relu(self.a(x))))
        x = torch.relu(self.c(x)).mean((-2, -1))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _pair(wide: int = 12) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = Net(wide)
    torch.manual_seed(0)
    return a, Net(wide)


def _train(model: nn.Module, pruner, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(4, *SHAPE[1:], generator=g), torch.randint(0, 4, (4,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
        pruner.step()


def _same(old_model, new_model, old, new) -> None:
    for (k, a), b in zip(old_model.state_dict().items(), new_model.state_dict().values()):
        assert torch.equal(a, b), k
    assert old.ranks == new.ranks
    assert old._subgrad.keys() == new._subgrad.keys()
    for k in old._subgrad:
        assert torch.equal(old._subgrad[k], new._subgrad[k]), k


@pytest.mark.parametrize("scheme", ["channel", "spatial", "decouple"])
@pytest.mark.parametrize("period, sub", [(2, None), (None, 3)])
def test_energy_training_is_unchanged(scheme: str, period, sub) -> None:
    m_old, m_new = _pair()
    old = before.TRP(m_old, scheme, energy=0.8, period=period, nuclear_weight=1e-2, subgradient_period=sub)
    new = trp.TRP(m_new, scheme, criterion=trp.Energy(0.8), period=period, nuclear_weight=1e-2, subgradient_period=sub)
    _train(m_old, old, 7)
    _train(m_new, new, 7)
    old.project(), new.project()
    _same(m_old, m_new, old, new)


def test_large_layers_train_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 8)  # fc1/fc2 (rank 40) count as large
    m_old, m_new = _pair(wide=40)
    old = before.TRP(m_old, energy=0.7, period=2, nuclear_weight=1e-2)
    new = trp.TRP(m_new, criterion=trp.Energy(0.7), period=2, nuclear_weight=1e-2)
    _train(m_old, old, 7)
    _train(m_new, new, 7)
    _same(m_old, m_new, old, new)


@pytest.mark.parametrize("large", [False, True])
def test_target_training_is_unchanged(monkeypatch: pytest.MonkeyPatch, large: bool) -> None:
    if large:
        monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 8)
    m_old, m_new = _pair(wide=40 if large else 12)
    old = before.TRP(m_old, energy=0.95, period=2, nuclear_weight=1e-2, target=trp.TargetMACs(2.5),
                     input_shape=SHAPE, warmup=3)
    new = trp.TRP(m_new, criterion=trp.TargetMACs(2.5), period=2, nuclear_weight=1e-2, input_shape=SHAPE, warmup=3,
                  warmup_criterion=trp.Energy(0.95))
    _train(m_old, old, 7)
    _train(m_new, new, 7)
    old.project(final=True), new.project(final=True)
    _same(m_old, m_new, old, new)
    assert old.allocated == new.allocated


@pytest.mark.parametrize("target", [None, "speedup"])
def test_checkpoints_of_the_old_code_resume(target) -> None:
    kw = dict(target=trp.TargetMACs(3), input_shape=SHAPE) if target else {}
    m_old, m_new = _pair()
    old = before.TRP(m_old, period=2, nuclear_weight=1e-2, **kw)
    _train(m_old, old, 5)
    buf = io.BytesIO()
    torch.save({"trp": old.state_dict()}, buf)  # as app.engine writes checkpoint.pt
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["trp"]
    m_new.load_state_dict(m_old.state_dict())
    crit = dict(criterion=trp.TargetMACs(3), input_shape=SHAPE) if target else {}
    new = trp.TRP(m_new, period=2, nuclear_weight=1e-2, **crit)
    new.load_state_dict(state)
    assert new.iteration == 5 and new.ranks == old.ranks
    _train(m_old, old, 4, seed=1)
    _train(m_new, new, 4, seed=1)
    _same(m_old, m_new, old, new)
    # and the other way round: a new checkpoint loads into the old code (rolling back stays possible)
    back = before.TRP(Net(), period=2, nuclear_weight=1e-2, **kw)
    back.load_state_dict(new.state_dict())
    assert back.iteration == 9


def test_the_deprecated_arguments_still_work_and_warn_once() -> None:
    m_old, m_new = _pair()
    with pytest.warns(DeprecationWarning, match="energy=") as record:
        new = trp.TRP(m_new, "channel", energy=0.8, period=2, nuclear_weight=1e-2)
        new.project()
        new.step()
    assert len([w for w in record if issubclass(w.category, DeprecationWarning)]) == 1  # at construction only
    m_new.load_state_dict(m_old.state_dict())
    new.iteration, new.ranks, new._subgrad = 0, {}, {}
    old = before.TRP(m_old, "channel", energy=0.8, period=2, nuclear_weight=1e-2)
    _train(m_old, old, 5), _train(m_new, new, 5)
    _same(m_old, m_new, old, new)
    assert isinstance(new.criterion, trp.Energy) and new.criterion.e == 0.8
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trp.TRP(Net(), energy=0.95, target=trp.TargetMACs(2), input_shape=SHAPE, warmup=2)
    assert len(record) == 1 and "target=" in str(record[0].message) and record[0].category is DeprecationWarning
    assert t.warmup_criterion.e == 0.95
    assert t.target is t.criterion and isinstance(t.criterion, trp.TargetMACs)
    with pytest.raises(ValueError, match="not both"):
        trp.TRP(Net(), criterion=trp.Energy(0.9), energy=0.8)
