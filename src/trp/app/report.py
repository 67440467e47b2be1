"""Before/after comparison of a model and its decomposition, and plain-text tables.

MACs follow :mod:`trp.core.counting` (one multiply-add = 1). The MAC reduction is MACs before /
MACs after (SPEC §1.4; the paper calls it "speedup", but it is not measured time), reported for
convs only (the paper's count) and for the whole model (the full count: every matmul, conv and
attention product), whose MACs are split into those counted in layers trp can split and
everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from ..core.counting import count_macs, count_params, mac_breakdown

__all__ = ["CompressionSummary", "summarize", "markdown_table"]


@dataclass(frozen=True)
class CompressionSummary:
    """MACs and parameters of a model before and after decomposition."""

    conv_macs_before: int
    conv_macs_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    #: of ``macs_before`` / ``macs_after``: MACs counted in layers trp can split (the rest is everything else)
    layer_macs_before: Optional[int] = None
    layer_macs_after: Optional[int] = None

    @property
    def conv_mac_reduction(self) -> float:
        """Conv MACs before / after (1.0 for a model without convs)."""
        if self.conv_macs_before == 0:
            return 1.0
        return self.conv_macs_before / max(self.conv_macs_after, 1)

    @property
    def mac_reduction(self) -> float:
        """All MACs (convs and linears) before / after."""
        return self.macs_before / max(self.macs_after, 1)

    @property
    def param_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)


def summarize(original: nn.Module, compact: nn.Module, input_shape: Sequence[int]) -> CompressionSummary:
    """Count MACs (per ``input_shape``) and parameters of both models."""
    before, after = mac_breakdown(original, input_shape), mac_breakdown(compact, input_shape)
    return CompressionSummary(
        conv_macs_before=count_macs(original, input_shape, convs_only=True),
        conv_macs_after=count_macs(compact, input_shape, convs_only=True),
        macs_before=before.total,
        macs_after=after.total,
        params_before=count_params(original),
        params_after=count_params(compact),
        layer_macs_before=before.in_layers,
        layer_macs_after=after.in_layers,
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` inside cells escaped)."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(headers), "|" + "|".join("---" for _ in headers) + "|"]
    lines += [line(r) for r in rows]
    return "\n".join(lines)
