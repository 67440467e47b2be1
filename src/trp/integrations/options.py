"""What the training callbacks share: their TRP settings, and the split model saved at the end."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

from ..core.criteria import Value
from ..core.decompose import RankCriterion
from ..core.layers import LayerSelector
from ..deploy.io import save
from ..methods.trained_rank import TRP

__all__ = ["TRPOptions", "missing_extra"]


def missing_extra(module: str, extra: str, err: ImportError) -> ImportError:
    """The ImportError a callback module raises when its framework is not installed."""
    return ImportError(
        f"{module} needs the optional dependency it plugs into ({err.name or err}): "
        f"install it with `pip install 'trp[{extra}]'`"
    )


@dataclass
class TRPOptions:
    """The :class:`trp.TRP` settings of a callback, plus how to split and save the model at the end."""

    scheme: str = "channel"
    energy: float = 0.9
    period: Optional[int] = 20
    nuclear_weight: float = 3e-4
    layers: LayerSelector = None
    final_criterion: Optional[RankCriterion] = None  # default Value(0.05), as TRP.decompose
    save_path: Union[str, os.PathLike, None] = None
    input_shape: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        # The checks of TRP itself, at construction rather than when training starts.
        TRP(nn.Linear(2, 2), self.scheme, self.energy, self.period, self.nuclear_weight, layers=lambda n, m: True,
            shard=False)
        if self.final_criterion is not None and not callable(self.final_criterion):
            raise ValueError(f"final_criterion must be a rank criterion such as trp.Value(0.05), got {self.final_criterion!r}")

    def make(self, model: nn.Module) -> TRP:
        """A TRP for ``model`` (sharded over torch.distributed ranks when initialized)."""
        return TRP(model, self.scheme, self.energy, self.period, self.nuclear_weight, layers=self.layers)

    def split(self, pruner: TRP, write: bool) -> nn.Module:
        """The split model; written to ``save_path`` (with :func:`trp.save`) when ``write``."""
        criterion = Value(0.05) if self.final_criterion is None else self.final_criterion
        compact = pruner.decompose(criterion, input_shape=tuple(self.input_shape) if self.input_shape else None)
        if write and self.save_path is not None:
            save(compact, self.save_path)
        return compact
