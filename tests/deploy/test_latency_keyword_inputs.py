"""Timing and TargetLatency on models fed keyword inputs (token ids + attention mask), as transformers are (issue 17)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import trp
from trp.core.inputs import ModelInputs, at_batch
from trp.deploy.latency import as_inputs
from trp.deploy.profile import profile_layers

sys.path.insert(0, str(Path(__file__).parents[1]))
from _fake_hardware import FakeHardware  # noqa: E402

TOKENS = 12


class TokenNet(nn.Module):
    """An encoder-shaped toy: embedding, four same-width Linear layers on every token, masked mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 48)
        self.body = nn.ModuleList(nn.Linear(48, 48) for _ in range(4))
        self.head = nn.Linear(48, 6)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids)
        for layer in self.body:
            h = torch.relu(layer(h)) + h
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def _tokens(batch: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, TOKENS, dtype=torch.long)
    mask[0, 8:] = 0
    return {"input_ids": torch.randint(0, 50, (batch, TOKENS), generator=g), "attention_mask": mask}


def test_at_batch_repeats_or_cuts_the_batched_tensors_only() -> None:
    x, table = torch.arange(6).reshape(3, 2), torch.ones(4)
    grown = at_batch(ModelInputs((x,), {"t": table}), 7)
    assert grown.args[0].tolist() == [x[i % 3].tolist() for i in range(7)]
    assert grown.kwargs["t"] is table  # not batched: left alone
    assert at_batch(ModelInputs((x,)), 2).args[0].tolist() == [[0, 1], [2, 3]]


def test_as_inputs_reads_every_form_and_names_a_bad_one() -> None:
    t = torch.zeros(2, 3)
    assert as_inputs(t).args == (t,)
    assert as_inputs([t, t]).args == (t, t)
    assert as_inputs({"x": t}).kwargs == {"x": t}
    for bad in ([], {"x": 1}, "x", 3):
        with pytest.raises(TypeError, match="example_inputs must be"):
            as_inputs(bad)


def test_simplest_is_the_inverse_of_as_inputs() -> None:
    t, u = torch.zeros(2, 3), torch.ones(2)
    assert as_inputs(t).simplest() is t
    assert as_inputs([t, u]).simplest() == (t, u)
    assert as_inputs({"x": t, "mask": u}).simplest() == {"x": t, "mask": u}
    both = ModelInputs((t,), {"mask": u})
    assert both.simplest() is both and as_inputs(both.simplest()) is both
    for form in (t, (t, u), {"x": t}):
        again = as_inputs(as_inputs(form).simplest())
        assert again.args == as_inputs(form).args and again.kwargs == as_inputs(form).kwargs


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_a_model_fed_keyword_inputs_is_timed(runtime: str) -> None:
    model = TokenNet().eval()
    result = trp.measure_latency(model, _tokens(), runtime=runtime, repeats=2, warmup=1)
    assert result.batch_size == 3 and len(result.samples) == 2 and all(s > 0 for s in result.samples)
    compact = trp.decompose(model, "channel", trp.FixedRank(8), layers=["body.*"], example_inputs=_tokens())
    comparison = trp.compare_latency(model, compact, _tokens(), runtime=runtime, repeats=2, warmup=1)
    assert len(comparison.ratios) == 2 and comparison.speedup > 0


def test_onnxruntime_refuses_positional_and_keyword_tensors_together() -> None:
    class Two(nn.Module):
        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return a + b

    t = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="either positional or keyword tensors"):
        trp.measure_latency(Two(), ModelInputs((t,), {"b": t}), runtime="onnxruntime", repeats=1, warmup=0)
    assert trp.measure_latency(Two(), ModelInputs((t,), {"b": t}), runtime="eager", repeats=1, warmup=0).batch_size == 1


def test_profile_layers_records_each_layer_at_its_input_from_keyword_inputs(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=100.0)
    with hw.running():
        table = profile_layers(TokenNet().eval(), _tokens(), "channel", "eager", layers=["body.*"], repeats=1,
                               warmup=0, timer=hw)
    assert sorted(table.layers) == [f"body.{i}" for i in range(4)]
    assert table.batch_size == 3 and table.layers["body.0"].input_shape == (3, TOKENS, 48)
    # fake time of a dense Linear over 3 x 12 tokens: its MACs + the fake's cost per layer call (an identity: 0)
    assert table.layers["body.0"].dense - table.layers["body.0"].overhead == pytest.approx(3 * TOKENS * 48 * 48 + 100)


@pytest.mark.parametrize("batch", [1, 4])
def test_decompose_toward_a_latency_target_with_keyword_example_inputs(tmp_path, monkeypatch, batch: int) -> None:
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    hw = FakeHardware(overhead=50.0)
    model = TokenNet().eval()
    with hw.running():
        crit = trp.TargetLatency(1.5, runtime="eager", batch_size=batch, timer=hw, repeats=1, warmup=0, tolerance=0.1)
        report = trp.decompose_with_report(model, "channel", crit, layers=["body.*"], example_inputs=_tokens())
    assert crit.table is not None and crit.table.batch_size == batch  # timed at the criterion's batch
    assert abs(crit.measured / 1.5 - 1) <= crit.tolerance
    assert {r.name for r in report.factorized} <= {f"body.{i}" for i in range(4)} and report.factorized
    with torch.no_grad():  # the split model still runs on the keyword inputs, close to the dense one
        dense, split = model(**_tokens()), report.model(**_tokens())
    assert split.shape == dense.shape and math.isfinite(float(split.abs().sum()))


def test_without_inputs_the_latency_target_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="input_shape=.*or example_inputs"):
        trp.decompose(TokenNet(), "channel", trp.TargetLatency(1.5), layers=["body.*"])
