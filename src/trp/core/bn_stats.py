"""BatchNorm statistics re-estimated on calibration data after a calibrated split.

A split layer's output keeps the directions its data use, but loses the discarded variance and
mean; the BatchNorm after it still normalises with the dense layer's running statistics, so the
next nonlinearity sees shifted, shrunken activations. Re-estimating every BatchNorm's running
mean and variance on the calibration inputs (forward passes with only the BatchNorms in train
mode, a cumulative average over the batches; no gradient, no weight changes) removes that
mismatch. It is kept only where it measures better: when held-out calibration batches exist,
:func:`refit_batchnorm` compares the split model's relative output error to the dense model on
them with the re-estimated and with the trained statistics, and keeps the lower (calibration
data unlike the data the model sees, e.g. a few photographs for an ImageNet model, can make the
re-estimated statistics worse). Under ``torch.distributed`` each rank estimates on its share and the per-rank averages
are averaged (weighted by the samples each rank saw), so every rank ends with the same statistics:
those one process would compute on all the ranks' batches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .inputs import ModelInputs

__all__ = ["batchnorms", "reestimate_batchnorm", "output_error", "refit_batchnorm"]


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


@torch.no_grad()
def output_error(dense: nn.Module, split: nn.Module, batches: Sequence[ModelInputs]) -> float:
    """``‖split(x) − dense(x)‖² / ‖dense(x)‖²`` summed over ``batches`` (eval mode; summed across ranks
    under ``torch.distributed``); nan when the models return no tensor."""
    from .fidelity import main_output

    num = den = 0.0
    modes = [(m, m.training) for m in list(dense.modules()) + list(split.modules())]
    try:
        dense.eval()
        split.eval()
        for inputs in batches:
            a, _ = main_output(inputs(dense))
            b, _ = main_output(inputs(split))
            if a is None or b is None:
                return float("nan")
            num += float((b.double() - a.double()).square().sum())
            den += float(a.double().square().sum())
    finally:
        for m, mode in modes:
            m.training = mode
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sums = torch.tensor([num, den], dtype=torch.float64)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        num, den = float(sums[0]), float(sums[1])
    return num / den if den > 0 else float("nan")


def refit_batchnorm(dense: nn.Module, split: nn.Module, fit: Sequence[ModelInputs],
                    held: Optional[Sequence[ModelInputs]]) -> Optional[str]:
    """Re-estimate ``split``'s BatchNorm statistics on ``fit``; with ``held`` batches, keep them only if the
    relative output error to ``dense`` on ``held`` drops. A sentence for the report (None: no BatchNorm)."""
    norms = batchnorms(split)
    if not norms:
        return None
    trained = _snapshot(norms)
    before = output_error(dense, split, held) if held else float("nan")
    changed = reestimate_batchnorm(split, fit)
    samples = sum(b.batch_size for b in fit)
    if not held:
        return (f"running statistics of {changed} BatchNorm layer(s) re-estimated on the {samples} calibration "
                "samples (no held-out batch to compare on; calibration_batchnorm=False keeps the trained ones)")
    after = output_error(dense, split, held)
    if after < before or (after == after and before != before):
        return (f"running statistics of {changed} BatchNorm layer(s) re-estimated on the {samples} calibration "
                f"samples: relative output error on the held-out batches {after:.3g} against {before:.3g} with the "
                "trained ones (forward passes, no weight changed; calibration_batchnorm=False keeps the trained ones)")
    _restore(trained)
    return (f"BatchNorm statistics kept as trained: re-estimating them on the {samples} calibration samples "
            f"measured worse on the held-out batches (relative output error {after:.3g} against {before:.3g})")


def _snapshot(norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    return [(m, [b.detach().clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if b is not None]) for m in norms]


def _restore(saved: list[tuple[nn.Module, list[torch.Tensor]]]) -> None:
    with torch.no_grad():
        for m, values in saved:
            for buf, value in zip([b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                                   if b is not None], values):
                buf.copy_(value)
