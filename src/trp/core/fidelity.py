"""How close a split model stays to its dense original, and whether it has collapsed.

:func:`measure_fidelity` compares the two models' main outputs (a tensor; for a dict-like or
Hugging Face output its ``logits``, ``sentence_embedding``, ``pooler_output`` or
``last_hidden_state``, else the first tensor) on the same inputs, with one headline figure:

- ``top-1 agreement`` for classifiers (an output named ``logits``, or a plain ``(batch, classes)``
  tensor whose rows are not unit vectors): how often the argmax over the last dimension agrees;
- ``mean cosine`` for embeddings (``sentence_embedding``/``pooler_output``/``last_hidden_state``,
  or rows of unit length): the cosine between the two models' vectors, averaged;
- ``relative error`` otherwise: ``‖split − dense‖ / ‖dense‖``.

It also measures the *spread*: how much the split model's output varies across inputs,
relative to the dense model's (``‖S − mean S‖ / ‖D − mean D‖`` over the samples of a batch). A
split whose output no longer depends on its input (spread ~0: every image the same class) has
*collapsed*; so has a classifier whose agreement is near chance. :func:`warn_fidelity` warns
(:class:`FidelityWarning`) with the figure and what to try when the split collapsed or lost most
of its fidelity (agreement or cosine under 0.5, relative error over 0.5, on at least 8 samples).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Fidelity", "FidelityWarning", "main_output", "compare_outputs", "measure_fidelity", "warn_fidelity",
           "output_spread", "COLLAPSE_SPREAD"]

#: a split whose spread across inputs is below this fraction of the dense model's has collapsed
COLLAPSE_SPREAD = 1e-3
#: the fewest samples on which a low figure counts as lost fidelity (a collapse counts on two)
MIN_SAMPLES = 8
_NAMES = ("logits", "sentence_embedding", "pooler_output", "last_hidden_state", "embeddings")


class FidelityWarning(UserWarning):
    """The split model has collapsed or lost most of its fidelity to the dense model."""


def main_output(output: Any) -> tuple[Optional[Tensor], str]:
    """``(tensor, name)``: the output a fidelity figure is computed on (see the module docstring)."""
    if isinstance(output, Tensor):
        return output, ""
    getter: Callable[[str], Any]
    if isinstance(output, dict) or hasattr(output, "keys"):
        getter = lambda k: output.get(k) if hasattr(output, "get") else None  # noqa: E731
        for name in _NAMES:
            value = getter(name)
            if isinstance(value, Tensor):
                return value, name
        for value in output.values():
            found, name = main_output(value)
            if found is not None:
                return found, name
        return None, ""
    if isinstance(output, (tuple, list)):
        for value in output:
            found, name = main_output(value)
            if found is not None:
                return found, name
    return None, ""


def _metric(output: Tensor, name: str) -> str:
    if name == "logits":
        return "top-1 agreement"
    if name:
        return "mean cosine"
    if output.ndim == 2 and output.shape[-1] >= 2 and output.is_floating_point():
        norms = output.double().norm(dim=-1)
        if bool(((norms - 1).abs() < 1e-3).all()):
            return "mean cosine"
        return "top-1 agreement"
    return "relative error"


def output_spread(x: Tensor) -> float:
    """``‖x − mean over samples‖`` (the first dimension is the samples)."""
    x = x.detach().double().flatten(1)
    return float((x - x.mean(0, keepdim=True)).norm())


@dataclass
class Fidelity:
    """The split model against the dense one on ``samples`` inputs."""

    metric: str  # "top-1 agreement", "mean cosine" or "relative error"
    value: float
    spread: float  # split spread across inputs / dense spread (nan with one sample)
    samples: int
    held_out: bool  # inputs not used to calibrate
    classes: Optional[int] = None
    split_classes: Optional[int] = None  # distinct classes the split model predicts
    dense_classes: Optional[int] = None
    source: str = ""  # "held-out calibration", "calibration" or "example"

    @property
    def collapsed(self) -> bool:
        """The split model's output barely depends on its input, or its agreement is near chance."""
        if math.isfinite(self.spread) and self.spread < COLLAPSE_SPREAD:
            return True
        if self.metric == "top-1 agreement" and self.classes and self.classes >= 3 and self.samples >= 16:
            if self.split_classes == 1 and (self.dense_classes or 0) >= 3:
                return True
            return self.value <= 1.5 / self.classes
        return False

    @property
    def lost(self) -> bool:
        """Most of the fidelity is gone (agreement or cosine below 0.5, relative error above 0.5).

        Said on at least ``MIN_SAMPLES`` samples only (a figure on fewer is reported, not judged)."""
        if self.samples < MIN_SAMPLES:
            return False
        if self.metric == "relative error":
            return not self.value <= 0.5
        return not self.value >= 0.5

    @property
    def ok(self) -> bool:
        return not (self.collapsed or self.lost)

    def figure(self) -> str:
        """The headline figure, e.g. ``top-1 agreement 97.0%``."""
        if self.metric == "top-1 agreement":
            return f"top-1 agreement {100 * self.value:.1f}%"
        return f"{self.metric} {self.value:.3f}"

    def describe(self) -> str:
        """One line: the figure, the spread and on what it was measured."""
        spread = f", spread across inputs {self.spread:.2g}x the dense model's" if math.isfinite(self.spread) else ""
        where = self.source
        state = " - COLLAPSED" if self.collapsed else (" - lost most fidelity" if self.lost else "")
        return (f"fidelity to the dense model: {self.figure()}{spread} on {self.samples} "
                f"{where + ' ' if where else ''}sample(s){state}")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "spread": self.spread, "samples": self.samples,
                "held_out": self.held_out, "source": self.source, "collapsed": self.collapsed, "lost": self.lost}


def compare_outputs(dense: Sequence[Any], split: Sequence[Any], held_out: bool, metric: Optional[str] = None,
                    source: str = "") -> Optional[Fidelity]:
    """The fidelity of ``split`` outputs to ``dense`` ones (one entry per batch); None without a usable output."""
    total = weight = 0.0
    spreads_d = spreads_s = 0.0
    n = 0
    classes = None
    dense_pred: set[int] = set()
    split_pred: set[int] = set()
    kind = metric
    for d_out, s_out in zip(dense, split):
        d, name = main_output(d_out)
        s, _ = main_output(s_out)
        if d is None or s is None or d.shape != s.shape or not d.is_floating_point():
            return None
        d, s = d.detach().double(), s.detach().double()
        kind = kind or _metric(d, name)
        b = d.shape[0] if d.ndim > 0 else 1
        n += b
        if d.ndim >= 2 and b >= 2:
            spreads_d += output_spread(d) ** 2
            spreads_s += output_spread(s) ** 2
        if kind == "top-1 agreement":
            dp, sp = d.argmax(-1), s.argmax(-1)
            total += float((dp == sp).double().sum())
            weight += dp.numel()
            classes = d.shape[-1]
            dense_pred.update(dp.flatten().tolist())
            split_pred.update(sp.flatten().tolist())
        elif kind == "mean cosine":
            cos = torch.nn.functional.cosine_similarity(d, s, dim=-1)
            total += float(cos.sum())
            weight += cos.numel()
        else:
            total += float((s - d).square().sum())
            weight += float(d.square().sum())
    if n == 0 or weight == 0:
        return None
    value = math.sqrt(total / weight) if kind == "relative error" else total / weight
    spread = math.sqrt(spreads_s / spreads_d) if spreads_d > 0 else float("nan")
    return Fidelity(kind, value, spread, n, held_out, classes,
                    len(split_pred) if classes else None, len(dense_pred) if classes else None, source)


def measure_fidelity(dense: nn.Module, split: nn.Module, batches: Sequence[Any], held_out: bool,
                     metric: Optional[str] = None, source: str = "") -> Optional[Fidelity]:
    """Run both models (eval, no grad) on ``batches`` (:class:`~trp.core.inputs.ModelInputs`) and compare."""
    outs: list[list[Any]] = [[], []]
    for i, model in enumerate((dense, split)):
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                for inputs in batches:
                    outs[i].append(inputs(model))
        finally:
            for m, mode in modes:
                m.training = mode
    return compare_outputs(outs[0], outs[1], held_out, metric, source)


def warn_fidelity(fidelity: Optional[Fidelity], calibrated: bool, stacklevel: int = 3) -> None:
    """Warn when the split collapsed or lost most of its fidelity: the figure and what to try."""
    if fidelity is None or fidelity.ok:
        return
    tries = ("a smaller reduction, more calibration data, or fine-tuning the split model" if calibrated else
             "calibration=batches of real inputs (a data-aware split), a smaller reduction, or fine-tuning")
    if fidelity.collapsed:
        head = "the split model has collapsed (its output barely depends on its input or agrees with the dense " \
               "model at chance level)"
    else:
        head = "the split model has lost most of its fidelity to the dense model"
    warnings.warn(f"trp.decompose: {head}; {fidelity.describe()}. Try {tries}.", FidelityWarning,
                  stacklevel=stacklevel)
