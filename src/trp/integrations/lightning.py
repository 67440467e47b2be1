"""Trained Rank Pruning in a Lightning 2.x ``Trainer``: one callback.

::

    from trp.integrations.lightning import TRPCallback
    trainer = L.Trainer(callbacks=[TRPCallback(criterion=trp.Energy(0.9), period=20, save_path="split.safetensors")])

Hooks: the sub-gradient is added in ``on_before_optimizer_step`` (Lightning calls it after
backward, after AMP's unscaling and once per optimizer step under gradient accumulation,
and before gradient clipping; ``on_after_backward`` would see fp16-scaled gradients and run
once per micro-batch); the projection schedule advances in ``on_train_batch_end`` after each
optimizer step. Under a DDP strategy the gradients are already averaged then, and each rank
computes its share of the SVDs (see :class:`trp.TRP`). The callback's state (iteration,
sub-gradients) is saved in Lightning checkpoints; at the end of ``fit`` the model is split
(``final_criterion``) and, when ``save_path`` is set, written by the global-zero rank with
:func:`trp.save`.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..methods.trained_rank import TRP
from .options import TRPOptions, missing_extra

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised with the import blocked
    raise missing_extra("trp.integrations.lightning", "lightning", err) from err

__all__ = ["TRPCallback"]


class TRPCallback(pl.Callback):
    """Train the LightningModule low-rank with :class:`trp.TRP`; split (and save) it when fit ends.

    Settings: ``config=`` a :class:`trp.TRPConfig`, or any of its fields by name (``criterion=``
    any criterion :func:`trp.decompose` takes, a target such as ``trp.TargetMACs(3)`` included,
    which then needs ``input_shape=``; ``energy=``, ``period=``, ``nuclear_weight=``, ``layers=``, ...;
    the first eight may also be given by position, in the order ``scheme, energy, period,
    nuclear_weight, layers, final_criterion, save_path, input_shape``), ``final_criterion=`` (the
    split at the end; default the target, else ``Value(0.05)``) and ``save_path=``.

    ``pruner`` is the TRP (set when fit starts), ``compact`` the split model (set when fit ends).
    """

    def __init__(self, *args: Any, **settings: Any) -> None:
        super().__init__()
        self.options = TRPOptions.from_arguments(args, settings)
        self.pruner: Optional[TRP] = None
        self.compact: Optional[nn.Module] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._stepped = False

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.pruner is None:
            self.pruner = self.options.make(pl_module)
        if self._pending_state is not None:
            self.pruner.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        assert self.pruner is not None
        self.pruner.regularize()
        self._stepped = True

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._stepped:  # an optimizer step happened in this batch (not a mere accumulation)
            assert self.pruner is not None
            self.pruner.step()
            self._stepped = False

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        assert self.pruner is not None
        self.compact = self.options.split(self.pruner, write=trainer.is_global_zero)

    def state_dict(self) -> dict[str, Any]:
        if self.pruner is not None:
            return self.pruner.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.pruner is not None:
            self.pruner.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict
