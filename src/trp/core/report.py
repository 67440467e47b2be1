"""What :func:`trp.decompose_with_report` returns: the split model and what happened to each layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .counting import MacCount
from .fidelity import Fidelity

__all__ = ["LayerReport", "Decomposition"]


@dataclass
class LayerReport:
    """What happened to one selected layer."""

    name: str
    scheme: str
    status: str  # "factorized", "dense" (no MAC saving) or "skipped"
    rank: Optional[int] = None
    max_rank: Optional[int] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    reason: str = ""


@dataclass
class Decomposition:
    """A decomposed model and the per-layer report."""

    model: nn.Module
    layers: list[LayerReport] = field(default_factory=list)
    #: whole-model and per-layer MACs before / after (when inputs were given)
    macs_before: Optional[MacCount] = None
    macs_after: Optional[MacCount] = None
    #: what trp changed around the split layers (e.g. a fused fast path disabled), one line each
    notes: list[str] = field(default_factory=list)
    #: how close the split model stays to the dense one (with calibration data or example inputs)
    fidelity: Optional[Fidelity] = None
    #: whether the split was calibrated on data (``calibration=``)
    calibrated: bool = False

    @property
    def factorized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "factorized"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]

    def __repr__(self) -> str:
        dense = sum(r.status == "dense" for r in self.layers)
        macs = ""
        if self.macs_before is not None and self.macs_after is not None:
            macs = (f", MACs {self.macs_before.total:,} -> {self.macs_after.total:,} "
                    f"({self.macs_before.total / max(self.macs_after.total, 1):.2f}x fewer)")
        return (f"Decomposition({len(self.factorized)} factorized, {dense} dense, {len(self.skipped)} skipped"
                f"{macs}{', ' + str(len(self.notes)) + ' note(s)' if self.notes else ''})")
