"""Large layers: only the top of the spectrum is computed when the criterion needs no more (issue 11, defect 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trp
import trp.core.decompose
import trp.core.svd
from trp.core.svd import top_svd


def _layer(m: int = 160, n: int = 300, seed: int = 0) -> nn.Linear:
    """A Linear whose weight has a decaying spectrum, like a trained layer."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_((u * torch.logspace(0, -3, k)) @ v.T)
    return layer


@pytest.fixture
def small_full_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat matrices with more than 32 singular values as large, so tests stay fast."""
    monkeypatch.setattr(trp.core.svd, "FULL_SVD_MAX", 32)
    monkeypatch.setattr(trp.core.decompose, "FULL_SVD_MAX", 32)


def _model() -> nn.Sequential:
    return nn.Sequential(_layer(), nn.ReLU(), nn.Linear(160, 10))


@pytest.mark.parametrize("criterion", [trp.FixedRank(9), trp.Value(0.2), trp.Energy(0.9), trp.Energy(0.95)])
def test_truncated_split_matches_the_full_svd(small_full_limit: None, criterion: trp.Criterion,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    calls = []
    real = trp.core.svd.checked_svd
    for module in (trp.core.svd, trp.core.decompose):
        monkeypatch.setattr(module, "checked_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = trp.decompose_with_report(model, criterion=criterion, layers=["0"])
    assert not calls  # no full SVD was needed
    monkeypatch.setattr(trp.core.decompose, "FULL_SVD_MAX", 10**9)
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
