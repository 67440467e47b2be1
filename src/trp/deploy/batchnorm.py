"""Re-estimate BatchNorm running statistics of a (decomposed) model on training data.

Splitting a layer changes the distribution of its output slightly; the BatchNorm after it
still normalizes with the statistics of the dense layer. Re-estimating the running mean
and variance (forward passes only: no gradient, no weight changes) often recovers much of
the accuracy lost by an aggressive split. Results that use it should say so: it reads
training data after decomposition, unlike the paper's "no fine-tuning" numbers.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor] | Tensor], max_batches: int,
                          device: torch.device | str | None = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on ``max_batches`` batches.

    Returns the number of batches used. ``model`` is changed in place and left in eval mode.
    Raises ValueError when the model has no BatchNorm or no batch was seen.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the model has no BatchNorm layer whose statistics could be re-estimated")
    if device is None:
        device = next(model.parameters()).device
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
    model.eval()
    for m in norms:
        m.train()
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    if used == 0:
        raise ValueError("no batch to re-estimate BatchNorm statistics on: the data loader is empty")
    return used
