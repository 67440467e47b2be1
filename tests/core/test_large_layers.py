"""Large layers: only the top of the spectrum is computed when the criterion needs no more (issue 11, defect 11)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import trp
import trp.core.decompose
import trp.core.svd
from trp.core.svd import top_svd
from trp.core.topspectra import padded_spectrum

sys.path.insert(0, str(Path(__file__).parents[1]))
from _decaying import decaying_linear as _layer  # noqa: E402


@pytest.fixture
def small_full_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat matrices with more than 32 singular values as large, so tests stay fast."""
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 32)


def _model() -> nn.Sequential:
    return nn.Sequential(_layer(), nn.ReLU(), nn.Linear(160, 10))


@pytest.mark.parametrize("criterion", [trp.FixedRank(9), trp.Value(0.2), trp.Energy(0.9), trp.Energy(0.95)])
def test_truncated_split_matches_the_full_svd(small_full_limit: None, criterion: trp.Criterion,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    calls = []
    real = trp.core.svd.checked_svd
    monkeypatch.setattr(trp.core.svd, "checked_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = trp.decompose_with_report(model, criterion=criterion, layers=["0"])
    assert not calls  # no full SVD was needed
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 10**9)
    exact = trp.decompose_with_report(model, criterion=criterion, layers=["0"])
    got, want = fast.layers[0], exact.layers[0]
    assert (got.rank, got.max_rank, got.status) == (want.rank, want.max_rank, "factorized")
    x = torch.randn(16, 300)
    # the split is the exact rank-r truncation up to the randomized SVD's accuracy...
    diff = (fast.model[0](x) - exact.model[0](x)).norm() / exact.model[0](x).norm()
    assert diff < 1e-2
    # ...and approximates the dense layer as well as it does
    dense = model[0](x)
    err = (fast.model[0](x) - dense).norm() / dense.norm()
    err_exact = (exact.model[0](x) - dense).norm() / dense.norm()
    assert abs(err - err_exact) < 1e-3


def test_top_svd_grows_until_enough_and_keeps_the_global_random_state(small_full_limit: None) -> None:
    w = _layer().weight.detach()
    state = torch.get_rng_state()
    seen = []
    u, s, vh = top_svd(w, "w", lambda top: seen.append(top.numel()) or top.numel() >= 20, start=5)
    assert seen == [5, 10, 20] and s.shape == (20,) and u.shape == (160, 20) and vh.shape == (20, 300)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(s, torch.linalg.svdvals(w)[:20], rtol=1e-4, atol=1e-6)
    u2, s2, vh2 = top_svd(w, "w", lambda top: top.numel() >= 20, start=5)
    assert torch.equal(s, s2) and torch.equal(u, u2)  # repeatable


def test_top_svd_falls_back_to_full(small_full_limit: None) -> None:
    w = _layer().weight.detach()
    u, s, vh = top_svd(w, "w", lambda top: False)
    assert s.shape == (160,)
    with pytest.raises(ValueError, match="NaN or Inf"):
        top_svd(torch.full((64, 64), float("nan")), "w", lambda top: True)


def test_progress_per_layer() -> None:
    seen = []
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    trp.decompose_with_report(model, criterion=trp.FixedRank(2), on_layer=lambda *a: seen.append(a))
    assert seen == [("0", 1, 2), ("1", 2, 2)]


# -- whole-model criteria: only the leading values the allocation needs (core.topspectra) ------------

def _deep_model() -> nn.Sequential:
    return nn.Sequential(_layer(160, 300, seed=1), nn.ReLU(), _layer(200, 160, seed=2), nn.ReLU(),
                         _layer(120, 200, seed=3), nn.ReLU(), nn.Linear(120, 10))


def _count_full_svds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the shape of every full SVD computed from now on."""
    shapes: list[tuple[int, ...]] = []
    real = trp.core.svd.checked_svd
    monkeypatch.setattr(trp.core.svd, "checked_svd", lambda m, *a, **k: shapes.append(tuple(m.shape)) or real(m, *a, **k))
    return shapes


@pytest.mark.parametrize("criterion", [
    trp.TargetMACs(3), trp.TargetMACs(5), trp.TargetMACs(8), trp.TargetMACs(4, round_to=8),
    trp.LayerRanks({"0": 12, "2": 30, "4": 7}), trp.Global(drop=0.85), trp.Global(mac_reduction=4),
])
def test_whole_model_ranks_from_leading_values_match_the_full_svd(
        criterion: trp.WholeModelCriterion, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _deep_model(), torch.randn(8, 300)
    layers = ["0", "2", "4"]
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 10**9)
    exact = trp.decompose_with_report(model, criterion=criterion, layers=layers, input_shape=(1, 300))
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 32)  # every layer here counts as large
    full_svds = _count_full_svds(monkeypatch)
    seen = []
    fast = trp.decompose_with_report(model, criterion=criterion, layers=layers, input_shape=(1, 300),
                                     on_layer=lambda *a: seen.append(a))
    assert [(r.name, r.rank, r.status) for r in fast.layers] == [(r.name, r.rank, r.status) for r in exact.layers]
    assert all(r.status == "factorized" for r in fast.layers)
    assert fast.macs_after.total == exact.macs_after.total
    target = getattr(criterion, "x", None) or getattr(criterion, "mac_reduction", None) or 1.0
    assert fast.macs_before.total / fast.macs_after.total >= target
    # a full SVD only where the values the allocation needs pass a third of the spectrum
    step = getattr(criterion, "round_to", 1 if isinstance(criterion, trp.Global) else 0)
    assert full_svds == [tuple(model[int(r.name)].weight.shape) for r in fast.layers if r.rank + step > r.max_rank // 3]
    assert len(full_svds) < 3
    assert sorted(a[0] for a in seen) == layers and [a[1:] for a in seen] == [(1, 3), (2, 3), (3, 3)]
    # the split model equals the exact truncation up to the randomized SVD's accuracy
    torch.testing.assert_close(fast.model(x), exact.model(x), rtol=1e-3, atol=1e-4)


def test_a_target_near_full_rank_falls_back_to_the_full_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """TargetMACs(1.2) keeps most of each spectrum: beyond a third, the full SVD is cheaper."""
    model = _deep_model()
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 10**9)
    exact = trp.decompose_with_report(model, criterion=trp.TargetMACs(1.2), layers=["0", "2", "4"],
                                      input_shape=(1, 300))
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 32)
    full_svds = _count_full_svds(monkeypatch)
    fast = trp.decompose_with_report(model, criterion=trp.TargetMACs(1.2), layers=["0", "2", "4"],
                                     input_shape=(1, 300))
    assert [r.rank for r in fast.layers] == [r.rank for r in exact.layers]
    assert full_svds  # at least one layer needed most of its spectrum


def test_a_dense_layer_under_a_loose_target_needs_only_its_break_even_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose whole spectrum is flat goes back to dense exactly as with the full SVD."""
    gen = torch.Generator().manual_seed(5)
    flat = nn.Linear(300, 160)
    with torch.no_grad():
        flat.weight.copy_(torch.linalg.qr(torch.randn(300, 160, generator=gen)).Q.T)  # all singular values 1
    model = nn.Sequential(flat, nn.ReLU(), _layer(200, 160, seed=2), nn.ReLU(), nn.Linear(200, 10))
    results = []
    for limit in (10**9, 32):
        monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", limit)
        report = trp.decompose_with_report(model, criterion=trp.TargetMACs(1.3), layers=["0", "2"],
                                           input_shape=(1, 300))
        results.append([(r.name, r.rank, r.status) for r in report.layers])
    assert results[0] == results[1]


@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=20), st.integers(0, 30), st.floats(1e-30, 1e30))
def test_padded_spectrum_keeps_the_energy_and_the_order(values: list[float], extra: int, scale: float) -> None:
    top = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    rest = [v * 0.999 for v in sorted(values)[:1]] * extra  # a tail no larger than the last known value
    total = float(top.square().sum()) + sum(v * v for v in rest)
    padded = padded_spectrum(top * scale, scale, total, len(values) + extra)
    assert padded.shape == (len(values) + extra,) and padded.dtype == torch.float64
    assert torch.all(padded[1:] <= padded[:-1])
    torch.testing.assert_close(padded[: len(values)], top * scale)
    assert math.isclose(float((padded / scale).square().sum()), total, rel_tol=1e-9)
