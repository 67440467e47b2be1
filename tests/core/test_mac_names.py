"""The MAC-based names say MAC reduction (issue 21); the former "speedup" names warn once and work the same."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import trp
from trp.core import _util
from trp.core.allocation import LayerSpectrum


def _fresh(*names: str) -> None:
    """Forget that these deprecated names warned (each warns once per process)."""
    for name in names:
        _util.WARNED.discard(name)


def _deprecations(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def _layers() -> list[LayerSpectrum]:
    return [LayerSpectrum("a", torch.tensor([4.0, 2.0, 1.0, 0.5]), 40, lambda r: 8 * r),
            LayerSpectrum("b", torch.tensor([3.0, 3.0, 0.1, 0.1]), 20, lambda r: 4 * r)]


def test_target_speedup_is_target_macs_and_warns_once() -> None:
    _fresh("trp.TargetSpeedup")
    allocation = importlib.import_module("trp.core.allocation")
    seen: list[object] = []
    messages = _deprecations(lambda: seen.extend([allocation.TargetSpeedup, allocation.TargetSpeedup]))
    assert len(messages) == 1 and "trp.TargetMACs" in messages[0]
    assert seen == [trp.TargetMACs, trp.TargetMACs]
    old, new = allocation.TargetSpeedup(2.0), trp.TargetMACs(2.0)
    assert isinstance(old, trp.TargetMACs) and isinstance(new, allocation.TargetSpeedup)
    assert old.allocate(_layers(), 0) == new.allocate(_layers(), 0)
    assert repr(old) == "TargetMACs(2)" and old.spec() == "macs:2"


def test_the_package_name_warns_once_too() -> None:
    _fresh("trp.TargetSpeedup")
    vars(trp).pop("TargetSpeedup", None)  # the package keeps a public name once looked up
    messages = _deprecations(lambda: (trp.TargetSpeedup, trp.TargetSpeedup))
    assert len(messages) == 1
    assert trp.TargetSpeedup is trp.TargetMACs and "TargetMACs" in trp.__all__ and "TargetSpeedup" in trp.__all__


@pytest.mark.parametrize("text", ["macs:3", "macs:2.5:convs", "global-macs:3", "global-macs:1.5:convs"])
def test_mac_criteria_round_trip_through_parse_and_spec(text: str) -> None:
    criterion = trp.parse_criterion(text)
    assert criterion.spec() == text
    assert trp.parse_criterion(criterion.spec()).spec() == text


@pytest.mark.parametrize("old, new", [("speedup:3", "macs:3"), ("speedup:2:convs", "macs:2:convs"),
                                      ("global-speedup:3", "global-macs:3")])
def test_old_criterion_strings_warn_once_and_parse_the_same(old: str, new: str) -> None:
    kind = old.partition(":")[0]
    _fresh(f"the criterion {kind}:X")
    parsed: list[object] = []
    messages = _deprecations(lambda: parsed.extend([trp.parse_criterion(old), trp.parse_criterion(old)]))
    assert len(messages) == 1 and f"{new.partition(':')[0]}:X" in messages[0]
    assert [c.spec() for c in parsed] == [new, new]
    assert parsed[0].allocate(_layers(), 0) == trp.parse_criterion(new).allocate(_layers(), 0)


def test_global_speedup_keyword_warns_once_and_means_mac_reduction() -> None:
    _fresh("Global(speedup=x)", "Global.speedup")
    made: list[trp.Global] = []
    messages = _deprecations(lambda: made.extend([trp.Global(speedup=1.5), trp.Global(speedup=1.5)]))
    assert len(messages) == 1 and "mac_reduction" in messages[0]
    new = trp.Global(mac_reduction=1.5)
    assert made[0].mac_reduction == 1.5 and made[0].spec() == new.spec() == "global-macs:1.5"
    assert made[0].allocate(_layers(), 0) == new.allocate(_layers(), 0)
    assert len(_deprecations(lambda: (new.speedup, new.speedup))) == 1
    with pytest.raises(ValueError, match="not both"):
        trp.Global(mac_reduction=2.0, speedup=3.0)


def test_old_and_new_names_split_a_model_alike() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = trp.decompose(model, criterion=trp.parse_criterion("speedup:1.5"), layers="all", input_shape=(1, 16))
    new = trp.decompose(model, criterion=trp.TargetMACs(1.5), layers="all", input_shape=(1, 16))
    assert trp.count_macs(old, (1, 16)) == trp.count_macs(new, (1, 16))


def test_search_target_speedup_keyword_warns_once() -> None:
    from trp.methods.search import iterative_rank_search

    _fresh("iterative_rank_search(target_speedup=x)")
    for _ in range(2):  # the value is checked after the name: both calls fail on it, one warning in all
        messages = _deprecations(lambda: pytest.raises(ValueError, iterative_rank_search, nn.Linear(2, 2), "channel",
                                                       [], target_speedup=0.5))
    assert messages == []  # the second call: already warned
    _fresh("iterative_rank_search(target_speedup=x)")
    messages = _deprecations(lambda: pytest.raises(ValueError, iterative_rank_search, nn.Linear(2, 2), "channel", [],
                                                   target_speedup=0.5))
    assert len(messages) == 1 and "mac_reduction" in messages[0]
