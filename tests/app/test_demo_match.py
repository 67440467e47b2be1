"""The demo's MAC-based split matched to a measured speedup (on a fake machine: no wall-clock values)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import trp
from trp.app.demo import match_measured_speedup
from trp.models import create_model

sys.path.insert(0, str(Path(__file__).parents[1]))
from _fake_hardware import FakeHardware  # noqa: E402


@pytest.mark.parametrize("overhead", [0.0, 2e5])
def test_the_mac_based_split_lands_on_the_measured_speedup(overhead):
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10).eval()
    shape = (1, 1, 28, 28)
    hw = FakeHardware(overhead=overhead)
    with hw.running():
        y, split = match_measured_speedup(model, "spatial", 2.0, shape, "eager", 2, rounds=6, timer=hw)
        folded = trp.fold_batchnorm(model)
        measured = trp.compare_latency(folded, trp.fold_batchnorm(split), torch.randn(2, 1, 28, 28), "eager",
                                       timer=hw).speedup
    assert measured == pytest.approx(2.0, rel=0.03)
    # each split layer call costs `overhead` on this machine, so the MAC reduction needed grows with it
    mac = trp.count_macs(model, shape) / trp.count_macs(split, shape)
    assert mac == pytest.approx(y, rel=0.02)
    assert (y > 2.05) == (overhead > 0)
