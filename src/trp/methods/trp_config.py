"""``TRPConfig``: the settings of a TRP run and their defaults, in one place.

:class:`trp.TRP`, the Lightning and Hugging Face callbacks, and the ``trp train`` options and
config file all read their defaults from here::

    cfg = trp.TRPConfig(criterion=trp.TargetMACs(3), period=10, input_shape=(1, 3, 32, 32))
    pruner = trp.TRP.from_config(model, cfg)

``criterion`` is any criterion :func:`trp.decompose` accepts; None means ``Energy(energy)``.
With a whole-model criterion (a target), ``energy`` is also the criterion of the projections of
the first ``warmup`` iterations; over the ``ramp`` iterations after them the target's reduction
grows from none to all of it (a criterion with ``partway``, such as ``TargetMACs``). Importing
this module does not import torch (the command line reads the defaults for its ``--help``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..core._util import check_fraction, check_int, check_number, is_whole_model

if TYPE_CHECKING:
    from ..core.layers import LayerSelector

__all__ = ["TRPConfig", "resolve_criteria"]


@dataclass
class TRPConfig:
    """The settings of :class:`trp.TRP` (see the module docstring); the field defaults are the library's."""

    scheme: str = "channel"
    criterion: Any = None  # a rank criterion (per layer or whole model); None: Energy(energy)
    energy: float = 0.9
    period: Optional[int] = 20  # None: no projection (nuclear-norm-only training)
    nuclear_weight: float = 3e-4
    subgradient_period: Optional[int] = None  # None: the period (20 when period is None)
    warmup: int = 0  # iterations of Energy(energy) projections before a whole-model criterion takes over
    ramp: int = 0  # iterations after the warm-up over which a target's reduction grows from none to all of it
    layers: "LayerSelector" = None
    exclude: Sequence[str] = field(default_factory=tuple)
    shard: Any = None  # None (auto), True, False or a torch.distributed ProcessGroup
    input_shape: Optional[Sequence[int]] = None  # for a whole-model criterion's MAC counts

    def __post_init__(self) -> None:
        check_fraction("energy", self.energy)
        check_int("period", self.period, 1, none_means="for no projection")
        check_number("nuclear_weight", self.nuclear_weight, 0.0, high_open=True, what="a finite number >= 0")
        check_int("subgradient_period", self.subgradient_period, 1, none_means="for the period")
        check_int("warmup", self.warmup, 0, what="a number of iterations >= 0")
        check_int("ramp", self.ramp, 0, what="a number of iterations >= 0")
        if self.criterion is not None and not (callable(self.criterion) or is_whole_model(self.criterion)):
            raise ValueError(f"criterion must be a rank criterion such as trp.Energy(0.9) or trp.TargetMACs(3), "
                             f"got {self.criterion!r}")

    def resolved_criterion(self) -> Any:
        """The criterion TRP trains with: ``criterion``, or ``Energy(energy)``."""
        from ..core.criteria import Energy

        return Energy(self.energy) if self.criterion is None else self.criterion

    def replace(self, **changes: Any) -> "TRPConfig":
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)


DEFAULTS = TRPConfig()


def resolve_criteria(criterion: Any, energy: Optional[float], target: Any, warmup_criterion: Any) -> tuple[Any, Any]:
    """``(criterion, warmup_criterion)`` of :class:`trp.TRP` from its arguments, the deprecated ``energy=`` /
    ``target=`` included (one DeprecationWarning, pointing at the caller of ``TRP``)."""
    from ..core.criteria import Energy

    if isinstance(criterion, (int, float)) and not isinstance(criterion, bool):  # the old third positional: energy
        if energy is not None:
            raise TypeError("TRP got energy twice (the third positional argument and energy=)")
        energy, criterion = criterion, None
    deprecated = [name for name, value in (("energy=", energy), ("target=", target)) if value is not None]
    if deprecated and criterion is not None:
        raise ValueError(f"give criterion=... or the deprecated {' and '.join(deprecated)}, not both")
    if deprecated:
        warnings.warn(
            f"TRP({', '.join(d + '...' for d in deprecated)}) is deprecated: pass criterion=trp.Energy(e), or "
            "criterion=the target (trp.TargetMACs(x), ...) with warmup_criterion=trp.Energy(e)",
            DeprecationWarning, stacklevel=3)
    if energy is not None:
        check_fraction("energy", energy)
    if target is not None:
        if not is_whole_model(target):
            raise TypeError(f"target must be a whole-model criterion such as trp.TargetMACs(3) (with an "
                            f"allocate(layers, fixed_macs) method), got {target!r}")
        criterion = target
        if warmup_criterion is None and energy is not None:
            warmup_criterion = Energy(energy)
    elif energy is not None:
        criterion = Energy(energy)
    if criterion is None:
        criterion = DEFAULTS.resolved_criterion()
    if not (is_whole_model(criterion) or callable(criterion)):
        raise TypeError(f"criterion must be a rank criterion such as trp.Energy(0.9) or a whole-model criterion "
                        f"such as trp.TargetMACs(3), got {criterion!r}")
    warm = Energy(DEFAULTS.energy) if warmup_criterion is None else warmup_criterion
    if is_whole_model(warm) or not callable(warm):
        raise TypeError(f"warmup_criterion must be a per-layer criterion such as trp.Energy(0.9), got {warm!r}")
    return criterion, warm
