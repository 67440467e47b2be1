"""The published TRP numbers (SPEC §1.5) as data, for tables that compare with the paper.

Accuracies are top-1 / top-5 in %, the paper's "speedups" are conv MAC reductions (it counts convs
only). No fine-tuning after decomposition. Where the paper's figure is only approximate
(ImageNet ResNet-18), ``top1`` is None and ``note`` says what is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PaperResult", "PAPER_RESULTS", "paper_results", "find_paper_result"]


@dataclass(frozen=True)
class PaperResult:
    """One published result: a method (``label``) on a model and dataset."""

    dataset: str
    model: str
    label: str
    top1: Optional[float]
    mac_reduction: float
    top5: Optional[float] = None
    baseline_top1: Optional[float] = None
    note: str = ""


_R18_NOTE = "approximate: about 4.2 points below the baseline's ~69.6"
_R18_CLASSIC_NOTE = "approximate: about 6.5–6.8 points below the baseline's ~69.6"

PAPER_RESULTS: tuple[PaperResult, ...] = (
    # CIFAR-10 (SPEC §1.5 table)
    PaperResult("cifar10", "resnet20", "baseline", 91.74, 1.0, baseline_top1=91.74),
    PaperResult("cifar10", "resnet20", "TRP1+Nu", 90.50, 2.17, baseline_top1=91.74),
    PaperResult("cifar10", "resnet20", "TRP2+Nu", 90.62, 2.84, baseline_top1=91.74),
    PaperResult("cifar10", "resnet20", "TRP-decouple+Nu", 90.88, 2.04, baseline_top1=91.74),
    PaperResult("cifar10", "resnet32", "baseline", 92.26, 1.0, baseline_top1=92.26),
    PaperResult("cifar10", "resnet32", "TRP1+Nu", 91.40, 2.2, baseline_top1=92.26),
    PaperResult("cifar10", "resnet32", "TRP2+Nu", 91.39, 3.4, baseline_top1=92.26),
    PaperResult("cifar10", "resnet56", "baseline", 93.14, 1.0, baseline_top1=93.14),
    PaperResult("cifar10", "resnet56", "TRP1+Nu", 92.77, 2.31, baseline_top1=93.14),
    # ImageNet ResNet-50
    PaperResult("imagenet", "resnet50", "baseline", 75.90, 1.0, top5=92.80, baseline_top1=75.90),
    PaperResult("imagenet", "resnet50", "TRP1+Nu", 72.69, 2.23, top5=91.41, baseline_top1=75.90),
    PaperResult("imagenet", "resnet50", "TRP1+Nu", 74.06, 1.80, top5=92.07, baseline_top1=75.90),
    # ImageNet ResNet-18: the source gives approximate figures only
    PaperResult("imagenet", "resnet18", "baseline", None, 1.0, note="approximate: about 69.6 top-1"),
    PaperResult("imagenet", "resnet18", "TRP1", None, 1.81, note=_R18_NOTE),
    PaperResult("imagenet", "resnet18", "TRP1+Nu", None, 2.23, note=_R18_NOTE),
    PaperResult("imagenet", "resnet18", "TRP2+Nu", None, 3.18, note=_R18_NOTE),
    PaperResult("imagenet", "resnet18", "Zhang et al. (channel)", None, 1.41, note=_R18_CLASSIC_NOTE),
    PaperResult("imagenet", "resnet18", "Jaderberg et al. (spatial)", None, 2.00, note=_R18_CLASSIC_NOTE),
)


def paper_results(
    dataset: Optional[str] = None, model: Optional[str] = None, label: Optional[str] = None
) -> list[PaperResult]:
    """The published results matching every given field (None matches anything)."""
    return [
        r for r in PAPER_RESULTS
        if (dataset is None or r.dataset == dataset)
        and (model is None or r.model == model)
        and (label is None or r.label == label)
    ]


def find_paper_result(
    dataset: str, model: str, label: str, mac_reduction: Optional[float] = None, fallback_dataset: Optional[str] = "cifar10"
) -> Optional[PaperResult]:
    """The published result for ``label`` on ``model``, or None.

    Results on ``dataset`` come first; when the paper has none for this model on
    ``dataset``, those on ``fallback_dataset`` are used (check ``result.dataset``). Among
    several matches (ResNet-50 has two TRP1+Nu points) the one nearest ``mac_reduction`` wins.
    """
    found = paper_results(dataset, model, label)
    if not found and fallback_dataset and fallback_dataset != dataset and not paper_results(dataset, model):
        found = paper_results(fallback_dataset, model, label)
    if not found:
        return None
    if mac_reduction is None:
        return found[0]
    return min(found, key=lambda r: abs(r.mac_reduction - mac_reduction))
