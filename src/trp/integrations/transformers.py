"""Trained Rank Pruning in a Hugging Face ``Trainer``: one callback.

::

    from trp.integrations.transformers import TRPCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TRPCallback(criterion=trp.Energy(0.9), period=20)])

Hooks: the ``Trainer`` offers no event between backward and gradient clipping, so the
sub-gradient is added in ``on_pre_optimizer_step``: after backward (and DDP's averaging),
after fp16 unscaling, after clipping (``max_grad_norm`` clips the loss gradient only; the
nuclear term ``λ·U Vᵀ`` is added unclipped) and before ``optimizer.step()``, once per
optimizer step under gradient accumulation. The projection schedule advances in
``on_optimizer_step``. The TRP state is written as ``trp_state.pt`` into each
``checkpoint-N`` folder and read back when training resumes from one. At the end of
training the model is split (``final_criterion``) into :attr:`TRPCallback.compact` and,
when ``save_path`` is set, written by the main process with :func:`trp.save`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..deploy.io import atomic_write
from ..methods.trained_rank import TRP
from .options import TRPOptions, missing_extra

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # pragma: no cover - exercised with the import blocked
    raise missing_extra("trp.integrations.transformers", "transformers", err) from err

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    raise ImportError(
        "trp.integrations.transformers needs a transformers whose TrainerCallback has on_pre_optimizer_step "
        "(the hook after backward and before the optimizer step): upgrade with `pip install -U 'trp[transformers]'`"
    )

__all__ = ["TRPCallback", "STATE_FILE"]

STATE_FILE = "trp_state.pt"


class TRPCallback(TrainerCallback):
    """Train the Trainer's model low-rank with :class:`trp.TRP`; split (and save) it when training ends.

    Settings: ``config=`` a :class:`trp.TRPConfig`, or any of its fields by name (``criterion=``
    any criterion :func:`trp.decompose` takes, a target such as ``trp.TargetMACs(3)`` included,
    which then needs ``input_shape=``; ``energy=``, ``period=``, ``nuclear_weight=``, ``layers=``, ...;
    the first eight may also be given by position, in the order ``scheme, energy, period,
    nuclear_weight, layers, final_criterion, save_path, input_shape``), ``final_criterion=`` (the
    split at the end; default the target, else ``Value(0.05)``) and ``save_path=``.

    ``pruner`` is the TRP (set when training begins), ``compact`` the split model (set when it ends).
    """

    def __init__(self, *args: Any, **settings: Any) -> None:
        self.options = TRPOptions.from_arguments(args, settings)
        self.pruner: Optional[TRP] = None
        self.compact: Optional[nn.Module] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("TRPCallback needs the Trainer's model; the Trainer passed none")
        self.pruner = self.options.make(model)
        if state.global_step > 0:  # resumed from checkpoint-<global_step>
            path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {path} is missing: the checkpoint was not "
                    "written with TRPCallback; start from scratch or from a checkpoint that has it"
                )
            device = next(model.parameters()).device
            self.pruner.load_state_dict(torch.load(path, map_location=device, weights_only=True))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.pruner is not None
        self.pruner.regularize()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.pruner is not None
        self.pruner.step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruner is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        with atomic_write(folder / STATE_FILE) as tmp:
            torch.save(self.pruner.state_dict(), tmp)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.pruner is not None
        self.compact = self.options.split(self.pruner, write=state.is_world_process_zero)
