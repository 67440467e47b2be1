"""BatchNorm statistics re-estimated on calibration data after a calibrated split.

A split layer's output keeps the directions its data use, but loses the discarded variance and
mean; the BatchNorm after it still normalises with the dense layer's running statistics, so the
next nonlinearity sees shifted, shrunken activations. Re-estimating every BatchNorm's running
mean and variance on the calibration inputs (forward passes with only the BatchNorms in train
mode, a cumulative average over the batches; no gradient, no weight changes) removes that
mismatch. Under ``torch.distributed`` each rank estimates on its share and the per-rank averages
are averaged (weighted by the samples each rank saw), so every rank ends with the same statistics:
those one process would compute on all the ranks' batches.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .inputs import ModelInputs

__all__ = ["batchnorms", "reestimate_batchnorm"]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (the ones a re-estimation can change)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Sequence[ModelInputs]) -> int:
    """Replace the running statistics of every BatchNorm of ``model`` by those of ``batches``; the number changed.

    Other modules stay in eval mode during the passes (dropout off); every module is left in the
    mode it came in, and each BatchNorm keeps its momentum.
    """
    norms = batchnorms(model)
    if not norms or not batches:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum) for m in norms]
    samples = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch
            m.train()
        for inputs in batches:
            inputs(model)
            samples += inputs.batch_size
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    _combine_across_ranks(norms, samples)
    return len(norms)


def _combine_across_ranks(norms: Sequence[nn.modules.batchnorm._BatchNorm], samples: int) -> None:
    """Average the per-rank statistics weighted by each rank's samples: for equal batches, the cumulative
    average one process computes over all the ranks' batches (no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for m in norms:
        c = m.running_mean.numel()
        packed = torch.cat([m.running_mean.double() * samples, m.running_var.double() * samples,
                            torch.tensor([float(samples)], dtype=torch.float64, device=m.running_mean.device)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        n = float(packed[-1].clamp_min(1))
        m.running_mean.copy_((packed[:c] / n).to(m.running_mean))
        m.running_var.copy_((packed[c:2 * c] / n).to(m.running_var))
