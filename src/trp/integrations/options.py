"""What the training callbacks share: their TRP settings, and the split model saved at the end."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from ..core.decompose import RankCriterion
from ..core.schemes import get_scheme
from ..deploy.io import save
from ..methods.trained_rank import TRP
from ..methods.trp_config import TRPConfig

__all__ = ["TRPOptions", "missing_extra"]

# The callbacks' positional arguments, in their historical order.
POSITIONAL = ("scheme", "energy", "period", "nuclear_weight", "layers", "final_criterion", "save_path", "input_shape")


def missing_extra(module: str, extra: str, err: ImportError) -> ImportError:
    """The ImportError a callback module raises when its framework is not installed."""
    return ImportError(
        f"{module} needs the optional dependency it plugs into ({err.name or err}): "
        f"install it with `pip install 'trp[{extra}]'`"
    )


@dataclass
class TRPOptions:
    """The :class:`trp.TRPConfig` of a callback, plus how to split and save the model at the end."""

    config: TRPConfig = field(default_factory=TRPConfig)
    final_criterion: Optional[RankCriterion] = None  # default: the config's target, else Value(0.05) (TRP.decompose)
    save_path: Union[str, os.PathLike, None] = None

    def __post_init__(self) -> None:
        # The checks of TRP itself, at construction rather than when training starts.
        get_scheme(self.config.scheme)
        if self.final_criterion is not None and not callable(self.final_criterion):
            raise ValueError(f"final_criterion must be a rank criterion such as trp.Value(0.05), got {self.final_criterion!r}")

    @classmethod
    def from_arguments(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> "TRPOptions":
        """The options of ``TRPCallback(*args, **kwargs)``: ``config=`` a TRPConfig, any of its fields
        (``criterion=``, ``energy=``, ``period=``, ...) by name, ``final_criterion=``, ``save_path=``."""
        if len(args) > len(POSITIONAL):
            raise TypeError(f"TRPCallback takes at most {len(POSITIONAL)} positional arguments ({', '.join(POSITIONAL)})")
        given = dict(zip(POSITIONAL, args))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise TypeError(f"TRPCallback got {', '.join(twice)} both by position and by name")
        given.update(kwargs)
        config = given.pop("config", None) or TRPConfig()
        final, save_path = given.pop("final_criterion", None), given.pop("save_path", None)
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(TRPConfig)})
        if unknown:
            raise TypeError(f"TRPCallback got unknown setting(s) {', '.join(unknown)}: use the fields of trp.TRPConfig")
        return cls(config.replace(**given) if given else config, final, save_path)

    def make(self, model: nn.Module) -> TRP:
        """A TRP for ``model`` (sharded over torch.distributed ranks when initialized)."""
        return TRP.from_config(model, self.config)

    def split(self, pruner: TRP, write: bool) -> nn.Module:
        """The split model; written to ``save_path`` (with :func:`trp.save`) when ``write``."""
        shape = self.config.input_shape
        compact = pruner.decompose(self.final_criterion, input_shape=tuple(shape) if shape else None)
        if write and self.save_path is not None:
            save(compact, self.save_path)
        return compact
