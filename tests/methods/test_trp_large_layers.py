"""TRP projections of large layers use only the leading singular triplets they keep (issue 11, defect 11).

Layers count as large above ``trp.core.svd.FULL_SVD_MAX`` singular values; the tests lower that
threshold so that layers small enough to compare with the full SVD take the truncated path.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
import trp.core.svd
import trp.methods.trp_steps

sys.path.insert(0, str(Path(__file__).parents[1]))
from _decaying import decaying_linear as _layer  # noqa: E402


def _model() -> nn.Sequential:
    # two layers of one shape (projected as one group), one of another, one small head
    return nn.Sequential(_layer(160, 300, 1), nn.ReLU(), _layer(160, 160, 2), nn.ReLU(), _layer(160, 160, 3),
                         nn.ReLU(), _layer(120, 160, 4), nn.ReLU(), nn.Linear(120, 10))


LAYERS = ["0", "2", "4", "6"]


def _spy_full_svds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    real = trp.core.svd.checked_svd
    spy = lambda m, *a, **k: shapes.append(tuple(m.shape)) or real(m, *a, **k)  # noqa: E731
    monkeypatch.setattr(trp.core.svd, "checked_svd", spy)
    monkeypatch.setattr(trp.methods.trp_steps, "checked_svd", spy)
    return shapes


def _project_both(monkeypatch: pytest.MonkeyPatch, make, final: bool = False, times: int = 1):
    """(full-SVD pruner, truncated pruner, full SVD shapes of the truncated run) after ``times`` projections."""
    runs = []
    for limit in (10**9, 32):
        monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", limit)
        model = _model()
        pruner = make(model)
        shapes = _spy_full_svds(monkeypatch) if limit == 32 else []
        for _ in range(times):
            pruner.project(final=final)
        runs.append((pruner, shapes))
    (exact, _), (fast, shapes) = runs
    return exact, fast, shapes


def _assert_same_projection(exact: trp.TRP, fast: trp.TRP) -> None:
    assert fast.ranks == exact.ranks
    for name in LAYERS:
        w_fast, w_exact = fast._params[name].detach(), exact._params[name].detach()
        # equal up to float32 rounding (relative to the weight; single entries can be tiny): measured
        # 2e-5 on one CPU, 1e-2 and more for a wrong rank or subspace
        assert (w_fast - w_exact).norm() <= 1e-4 * w_exact.norm()
        g_fast, g_exact = fast._subgrad[name], exact._subgrad[name]
        assert (g_fast - g_exact).norm() <= 1e-4 * g_exact.norm()
        # the projected weight really has the kept rank
        assert int(torch.linalg.matrix_rank(w_fast.detach(), rtol=1e-4)) == fast.ranks[name]


@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_energy_projection_of_large_layers_equals_the_full_svd(monkeypatch: pytest.MonkeyPatch, energy: float) -> None:
    make = lambda m: trp.TRP(m, energy=energy, period=5, layers=LAYERS)  # noqa: E731
    exact, fast, shapes = _project_both(monkeypatch, make, times=2)
    _assert_same_projection(exact, fast)


def test_energy_projection_needs_no_full_svd_when_the_kept_rank_is_small(monkeypatch: pytest.MonkeyPatch) -> None:
    make = lambda m: trp.TRP(m, energy=0.5, period=5, layers=LAYERS)  # noqa: E731
    exact, fast, shapes = _project_both(monkeypatch, make)
    assert all(r <= 160 // 3 for r in fast.ranks.values())
    assert shapes == []


def test_energy_projection_goes_straight_to_the_full_svd_after_a_high_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 32)
    model = _model()
    pruner = trp.TRP(model, energy=0.999, period=5, layers=["0"])
    pruner.project()
    assert pruner.ranks["0"] > 160 // 3
    tops = []
    real = trp.core.svd.top_svd
    monkeypatch.setattr(trp.core.svd, "top_svd", lambda *a, **k: tops.append(1) or real(*a, **k))
    pruner.project()
    assert tops == []  # no randomized attempts that would be thrown away


@pytest.mark.parametrize("target", [trp.TargetMACs(4), trp.TargetMACs(6, round_to=4),
                                    trp.LayerRanks({"0": 10, "2": 20, "4": 5, "6": 12})])
def test_target_projection_of_large_layers_equals_the_full_svd(monkeypatch: pytest.MonkeyPatch,
                                                                target: trp.WholeModelCriterion) -> None:
    make = lambda m: trp.TRP(m, period=5, layers=LAYERS, target=copy.deepcopy(target), input_shape=(1, 300))  # noqa: E731
    exact, fast, shapes = _project_both(monkeypatch, make, final=True)
    _assert_same_projection(exact, fast)
    assert fast.allocated == exact.allocated
    # only layers whose rank needs more than a third of their spectrum were fully decomposed
    assert len(shapes) < len(LAYERS)
