"""Rank criteria on hand-made spectra (SPEC §1.2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trp
from trp import Energy, FixedRank, Ratio, Value, parse_criterion

S4211 = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1: total 22


# --- energy ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "e, rank",
    [
        (0.5, 1),  # 16/22 = 0.727 >= 0.5
        (16 / 22, 1),  # exactly the first prefix
        (0.73, 2),
        (0.8, 2),  # 20/22 = 0.909
        (0.9, 2),
        (20 / 22, 2),  # exactly on the boundary of the second prefix
        (0.91, 3),  # 21/22 = 0.9545
        (0.96, 4),
        (1.0, 4),
    ],
)
def test_energy_by_hand(e: float, rank: int) -> None:
    assert Energy(e)(S4211) == rank


@pytest.mark.parametrize("e, rank", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4), (0.25001, 2), (0.75001, 4)])
def test_energy_exact_boundaries_equal_spectrum(e: float, rank: int) -> None:
    # Equal singular values: prefix energies are exactly 1/4, 2/4, 3/4, 1 (the criterion
    # allows a 1e-6 rounding slack, so "just above" means beyond it).
    assert Energy(e)(torch.ones(4)) == rank


def test_energy_one_keeps_everything_nonzero() -> None:
    assert Energy(1.0)(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25])) == 5
    # Exactly-zero tail values carry no energy: energy 1 is already reached before them.
    assert Energy(1.0)(torch.tensor([3.0, 2.0, 0.0, 0.0])) == 2


def test_energy_rank_at_least_one() -> None:
    assert Energy(1e-9)(S4211) == 1
    assert Energy(0.5)(torch.tensor([5.0])) == 1


def test_energy_float64_and_half_inputs() -> None:
    assert Energy(0.8)(S4211.double()) == 2
    assert Energy(0.8)(S4211.half()) == 2


def _energy_rank_reference(sigma: list[float], e: float) -> int:
    sq = [s * s for s in sigma]
    total = sum(sq)
    acc = 0.0
    for i, v in enumerate(sq, start=1):
        acc += v
        if acc / total >= e:
            return i
    return len(sigma)


spectra = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12).map(lambda v: sorted(v, reverse=True))


@settings(max_examples=60, deadline=None)
@given(spectra, st.floats(0.01, 1.0))
def test_energy_matches_reference(sigma: list[float], e: float) -> None:
    sq = torch.tensor(sigma, dtype=torch.float64).square()
    frac = (sq.cumsum(0) / sq.sum()).tolist()
    # Skip draws where a prefix lies within rounding of e (either answer would be right).
    if any(abs(f - e) < 1e-5 for f in frac):
        return
    r = Energy(e)(torch.tensor(sigma))
    assert r == _energy_rank_reference(sigma, e)
    assert 1 <= r <= len(sigma)


# --- value ----------------------------------------------------------------------------
def test_value_counts_at_or_above_threshold() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])
    assert Value(1.0)(s) == 4  # the ">=" includes values equal to t
    assert Value(1.5)(s) == 2
    assert Value(0.0)(s) == 5
    assert Value(0.5)(s) == 5
    assert Value(0.51)(s) == 4
    assert Value(4.0)(s) == 1


def test_value_everything_below_gives_rank_one() -> None:
    assert Value(10.0)(torch.tensor([4.0, 2.0, 1.0])) == 1
    assert Value(0.05)(torch.zeros(6)) == 1


@settings(max_examples=40, deadline=None)
@given(spectra, st.floats(0.0, 120.0))
def test_value_matches_count(sigma: list[float], t: float) -> None:
    s = torch.tensor(sigma, dtype=torch.float32)
    expected = max(1, sum(1 for v in s.tolist() if v >= torch.tensor(t, dtype=torch.float32).item()))
    assert Value(t)(s) == expected


# --- ratio ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "p, k, rank",
    [(0.5, 5, 3), (0.5, 4, 2), (0.2, 5, 1), (0.01, 5, 1), (1.0, 7, 7), (0.3, 10, 3), (0.7, 10, 7), (0.34, 3, 2),
     (0.1, 30, 3), (1 / 3, 9, 3)],
)
def test_ratio_ceil(p: float, k: int, rank: int) -> None:
    assert Ratio(p)(torch.linspace(10, 1, k)) == rank


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(1, 100))
def test_ratio_percent_is_ceil(k: int, percent: int) -> None:
    # p = percent/100; rank is ceil(percent * k / 100) computed exactly in integers.
    expected = max(1, -(-percent * k // 100))
    assert Ratio(percent / 100)(torch.ones(k)) == expected


# --- fixed rank -----------------------------------------------------------------------
def test_fixed_rank_capped_at_length() -> None:
    assert FixedRank(2)(S4211) == 2
    assert FixedRank(4)(S4211) == 4
    assert FixedRank(100)(S4211) == 4
    assert FixedRank(1)(torch.tensor([0.0, 0.0])) == 1


# --- batched --------------------------------------------------------------------------
CRITERIA = [Energy(0.8), Energy(1.0), Value(0.7), Ratio(0.5), FixedRank(3), FixedRank(50)]


@pytest.mark.parametrize("crit", CRITERIA, ids=repr)
def test_batched_ranks_equal_per_row(crit: trp.Criterion) -> None:
    g = torch.Generator().manual_seed(0)
    sigma = torch.rand(7, 6, generator=g).sort(dim=-1, descending=True).values
    sigma[3] = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0])
    r = crit.ranks(sigma)
    assert r.shape == (7,) and r.dtype == torch.long
    assert r.tolist() == [crit(row) for row in sigma]
    # Extra leading dims are kept.
    r3 = crit.ranks(sigma.reshape(7, 1, 6).expand(7, 2, 6))
    assert r3.shape == (7, 2)
    assert torch.equal(r3, r[:, None].expand(7, 2))


def test_call_rejects_non_1d_and_empty() -> None:
    with pytest.raises(ValueError, match="1-D"):
        Energy(0.9)(torch.ones(2, 3))
    with pytest.raises(ValueError, match="empty"):
        Energy(0.9)(torch.ones(0))
    with pytest.raises(ValueError, match="empty"):
        Value(0.1).ranks(torch.ones(3, 0))


# --- argument checks ------------------------------------------------------------------
@pytest.mark.parametrize("e", [0.0, -0.1, 1.0001, 2, math.nan, math.inf, "0.9", None])
def test_energy_bad_argument(e) -> None:
    with pytest.raises(ValueError, match=r"\be\b"):
        Energy(e)


@pytest.mark.parametrize("t", [-0.001, -1, math.nan, math.inf, "0.1", None])
def test_value_bad_argument(t) -> None:
    with pytest.raises(ValueError, match=r"\bt\b"):
        Value(t)


@pytest.mark.parametrize("p", [0.0, -0.5, 1.5, math.nan, "0.5", None])
def test_ratio_bad_argument(p) -> None:
    with pytest.raises(ValueError, match=r"\bp\b"):
        Ratio(p)


@pytest.mark.parametrize("k", [0, -3, 2.0, 1.5, True, "4", None])
def test_fixed_rank_bad_argument(k) -> None:
    with pytest.raises(ValueError, match=r"\bk\b"):
        FixedRank(k)


def test_valid_edge_arguments() -> None:
    assert Energy(1).e == 1.0
    assert Value(0).t == 0.0
    assert Ratio(1).p == 1.0
    assert FixedRank(1).k == 1


# --- parsing --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, cls, attr, value",
    [
        ("energy:0.9", Energy, "e", 0.9),
        ("value:0.05", Value, "t", 0.05),
        ("ratio:0.5", Ratio, "p", 0.5),
        ("rank:8", FixedRank, "k", 8),
        (" Energy : 0.8 ", Energy, "e", 0.8),
        ("VALUE:0", Value, "t", 0.0),
        ("energy:1", Energy, "e", 1.0),
    ],
)
def test_parse_criterion_forms(text: str, cls, attr: str, value) -> None:
    crit = parse_criterion(text)
    assert type(crit) is cls
    assert getattr(crit, attr) == value


@pytest.mark.parametrize("crit", CRITERIA, ids=repr)
def test_spec_round_trips(crit: trp.Criterion) -> None:
    again = parse_criterion(crit.spec())
    assert type(again) is type(crit) and repr(again) == repr(crit)
    assert again(S4211) == crit(S4211)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("energy", "not understood"),
        ("0.9", "not understood"),
        ("", "not understood"),
        ("entropy:0.9", "not understood"),
        ("energy:abc", "not a number"),
        ("value:", "not a number"),
        ("rank:2.5", "integer"),
        ("rank:x", "integer"),
        ("energy:1.5", r"\be\b"),
        ("energy:nan", r"\be\b"),
        ("value:-1", r"\bt\b"),
        ("value:nan", r"\bt\b"),
        ("ratio:0", r"\bp\b"),
        ("rank:0", r"\bk\b"),
    ],
)
def test_parse_criterion_errors(text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_criterion(text)
