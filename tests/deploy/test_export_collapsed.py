"""export_onnx does not pass a collapsed model (output independent of its input) as a clean export (issue 17)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import trp
from trp.core.fidelity import FidelityWarning

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_collapsed_model_is_flagged(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.zero_()  # the output no longer depends on the input
    with pytest.warns(FidelityWarning, match="does not depend on its input"):
        result = trp.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 6))
    assert result.collapsed and result.input_sensitivity == 0.0
    assert "WARNING: the model has collapsed" in result.summary()


def test_healthy_model_is_not_flagged(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FidelityWarning)
        result = trp.export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 6))
    assert not result.collapsed and result.input_sensitivity > 1e-3
    assert "WARNING" not in result.summary()
