"""BatchNorm statistics re-estimated on the calibration data after a calibrated split (trp.core.bn_stats)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trp
from trp.core.bn_stats import reestimate_batchnorm
from trp.core.inputs import ModelInputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _batches(n: int = 4, b: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, 8, 8, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0
            for _ in range(n)]


def test_statistics_are_the_average_over_the_batches_and_modes_are_restored() -> None:
    bn = nn.BatchNorm2d(3, momentum=0.3)
    model = nn.Sequential(nn.Dropout(0.9), bn).train()  # dropout would change the statistics if it ran
    batches = _batches()
    assert reestimate_batchnorm(model, [ModelInputs((x,), {}) for x in batches]) == 1
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])
    vars_ = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, vars_.mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and model.training and model[0].training and bn.training


def test_no_batchnorm_or_no_batches_changes_nothing() -> None:
    assert reestimate_batchnorm(nn.Sequential(nn.Linear(3, 3)), [ModelInputs((torch.randn(2, 3),), {})]) == 0
    bn = nn.BatchNorm1d(3)
    assert reestimate_batchnorm(bn, []) == 0 and torch.equal(bn.running_var, torch.ones(3))


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()


def test_calibrated_split_normalises_its_batchnorm_outputs_again() -> None:
    """After the split, each BatchNorm's outputs on the calibration data have mean β and variance γ² again."""
    model = _conv_bn()
    with torch.no_grad():  # trained-looking statistics: those of the dense model on the data
        reestimate_batchnorm(model, [ModelInputs((x,), {}) for x in _batches()])
    batches = _batches()
    rep = trp.decompose_with_report(model, criterion=trp.FixedRank(3), layers=["3", "6"], calibration=batches,
                                    calibration_samples=48)
    kept = trp.decompose(model, criterion=trp.FixedRank(3), layers=["3", "6"], calibration=batches,
                         calibration_samples=48, calibration_batchnorm=False)
    assert any("BatchNorm" in note for note in rep.notes)
    for i in (4, 7):  # the BatchNorms after the split convs
        assert torch.equal(kept[i].running_var, model[i].running_var)  # off: the trained statistics stay
        assert not torch.equal(rep.model[i].running_var, model[i].running_var)
        seen: list[torch.Tensor] = []
        handle = rep.model[i].register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            for x in batches[:3]:  # the 48 calibration samples
                rep.model(x)
        handle.remove()
        out = torch.cat(seen)
        # (a later BatchNorm's inputs were normalised with batch statistics during the passes: close, not exact)
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), rep.model[i].bias.detach(), atol=5e-3, rtol=0)
        torch.testing.assert_close(out.std(dim=(0, 2, 3)), rep.model[i].weight.detach().abs(), rtol=0.05, atol=1e-3)
        seen.clear()
        handle = kept[i].register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            for x in batches[:3]:
                kept(x)
        handle.remove()
        off = torch.cat(seen).std(dim=(0, 2, 3)) / rep.model[i].weight.detach().abs()
        assert float(off.min()) < 0.9  # without it the split's outputs are visibly shrunk


def test_statistics_that_measure_worse_on_held_out_batches_are_not_kept() -> None:
    """Calibration batches unlike the held-out ones (here: 5x brighter) would give worse statistics: kept as trained."""
    model = _conv_bn()
    normal = _batches(6)
    with torch.no_grad():
        for i in (3, 6):  # rank-6 weights: a rank-12 split of them is exact, only the statistics can differ
            w = model[i].weight
            w.copy_((torch.randn(w.shape[0], 6) @ torch.randn(6, w[0].numel())).view_as(w) / 10)
        reestimate_batchnorm(model, [ModelInputs((x,), {}) for x in normal])
    odd = [x * 5 for x in normal[:3]] + normal[3:]  # 48 samples to fit on, then the held-out normal ones
    rep = trp.decompose_with_report(model, criterion=trp.FixedRank(12), layers=["3", "6"], calibration=odd,
                                    calibration_samples=48)
    assert any(note.startswith("BatchNorm statistics kept as trained") for note in rep.notes), rep.notes
    for i in (1, 4, 7):
        assert torch.equal(rep.model[i].running_mean, model[i].running_mean)
        assert torch.equal(rep.model[i].running_var, model[i].running_var)
