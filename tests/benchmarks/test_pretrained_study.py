"""benchmarks/pretrained.py's study on a tiny model: targets reached, distillation recovers agreement."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrained.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("pretrained_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=False)  # no bias: the predicted class depends on the input
    nn.init.normal_(layer.weight, std=(2 / n_in) ** 0.5)
    return layer


def _task(study):
    torch.manual_seed(0)
    teacher = nn.Sequential(_linear(16, 64), nn.ReLU(), _linear(64, 64), nn.ReLU(),
                            _linear(64, 64), nn.ReLU(), _linear(64, 8)).eval()
    inputs = torch.randn(640, 16)
    return study.Task("tiny", teacher, inputs[:512], inputs[512:], study.kl_loss, study.class_scores,
                      "top1_agreement", inputs[:1], lr=3e-3, batch_size=32, period=5)


def test_study_reaches_each_target_and_distillation_beats_the_plain_split(study):
    rows = study.run_task(_task(study), reductions=(1.5, 2.0), steps=120, log=lambda _: None)
    original = rows[0]
    assert original.method == "original" and original.scores["top1_agreement"] == 1.0
    by = {(r.method, r.target): r for r in rows[1:]}
    assert set(by) == {(m, t) for m in study.METHODS for t in (1.5, 2.0)}
    for (method, target), row in by.items():
        assert row.mac_reduction == pytest.approx(original.macs / row.macs)
        assert target * 0.98 <= row.mac_reduction <= target * 1.1, (method, target, row.mac_reduction)
        assert 0.0 <= row.scores["top1_agreement"] <= row.scores["top5_agreement"] <= 1.0
        assert row.steps == (0 if method == "split" else 120)
    for target in (1.5, 2.0):
        split = by["split", target].scores["top1_agreement"]
        assert split < 0.8  # a random MLP is not low rank: the split alone changes many predictions
        for method in ("trp+distill", "split+distill"):
            assert by[method, target].scores["top1_agreement"] > split + 0.1, (method, target)


def test_unknown_method_is_refused(study):
    with pytest.raises(ValueError, match="unknown methods"):
        study.run_task(_task(study), methods=("split", "prune"), log=lambda _: None)


def test_scores_of_identical_outputs_are_perfect_and_losses_zero(study):
    logits = torch.randn(20, 10)
    assert study.class_scores(logits, logits) == {"top1_agreement": 1.0, "top5_agreement": 1.0}
    assert study.kl_loss(logits, logits).abs().item() < 1e-6
    emb = nn.functional.normalize(torch.randn(20, 8), dim=-1)
    scores = study.embedding_scores(emb, emb)
    assert scores["cosine"] == pytest.approx(1.0) and scores["nn_agreement"] == 1.0
    assert study.cosine_loss(emb, -emb).item() == pytest.approx(2.0)


def test_fortunes_keeps_prose_entries_once(study, tmp_path):
    (tmp_path / "jokes").write_text("A short one.\n%\nThis is a prose fortune of a sensible length, kept.\n%\n"
                                    "  ___ \n |_|_| |_| ascii art, mostly not letters: ###### ##### ####\n%\n"
                                    "This is a prose fortune   of a sensible\nlength, kept.\n")
    (tmp_path / "jokes.dat").write_bytes(b"\x00\x01")
    assert study.fortunes(tmp_path) == ["This is a prose fortune of a sensible length, kept."]


def test_packed_tokens_feed_ids_and_mask_to_the_encoder(study):
    seen = {}

    class Encoder(nn.Module):
        def forward(self, input_ids, attention_mask):
            seen.update(ids=input_ids, mask=attention_mask)
            return input_ids.float().sum(dim=-1, keepdim=True)

    packed = torch.tensor([[[101, 30521, 102, 0], [1, 1, 1, 0]]], dtype=torch.int32)
    out = study.PackedTokens(Encoder())(study._trim(packed))
    assert seen["ids"].dtype == torch.long and seen["ids"].tolist() == [[101, 30521, 102]]
    assert seen["mask"].tolist() == [[1, 1, 1]] and out.item() == 101 + 30521 + 102
