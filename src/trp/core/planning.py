"""Planning a split: per-layer sizes and MAC costs, and the ranks a criterion keeps.

Helpers of :func:`trp.decompose_with_report`'s first two passes (spectra and costs, then ranks).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

from torch import Tensor, nn

from .allocation import LayerSpectrum, WholeModelCriterion
from .calibration import CalibratedFactors
from .counting import MacCount, probe_forward, splittable_kind
from .criteria import Criterion
from .inputs import ExampleInputs, ModelInputs, model_inputs
from .targets import layer_kind

__all__ = ["RankCriterion", "LayerProgress", "trace_sizes"]


RankCriterion = Union[Criterion, WholeModelCriterion, Callable[[Tensor], int]]


LayerProgress = Callable[[str, int, int], None]


def trace_sizes(
    model: nn.Module,
    modules: Sequence[nn.Module],
    input_shape: Optional[Sequence[int]] = None,
    example_inputs: Optional[ExampleInputs] = None,
) -> dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]]:
    """Per-sample ``(out_hw, in_hw)`` of each module for one forward pass on the given inputs
    (``input_shape`` zeros, or ``example_inputs``: a tensor, a tuple of inputs or a dict of keyword inputs).

    For a Linear, ``out_hw`` is ``(positions, 1)``: how many vectors it is applied to; for a
    Conv1d, ``(1, length)``.
    """
    sizes: dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module in sizes:
            return
        x = inputs[0]
        kind = layer_kind(module)
        if kind == "conv2d":
            sizes[module] = ((output.shape[-2], output.shape[-1]), (x.shape[-2], x.shape[-1]))
        elif kind == "conv1d":
            sizes[module] = ((1, output.shape[-1]), (1, x.shape[-1]))
        else:
            n_out = module.weight.shape[1] if kind == "hf_conv1d" else module.out_features
            batch = x.shape[0] if x.ndim > 1 else 1
            positions = output.numel() // (n_out * batch)
            sizes[module] = ((positions, 1), (positions, 1))

    probe_forward(model, model_inputs(model, input_shape, example_inputs), {m: hook for m in modules})
    return sizes


def _kept_rank(criterion: RankCriterion, sigma: Tensor) -> int:
    """The criterion's rank; for a batch of spectra (decouple), the largest over the batch."""
    if sigma.ndim == 1:
        return int(criterion(sigma))
    if isinstance(criterion, Criterion):
        return int(criterion.ranks(sigma).max())
    return max(int(criterion(row)) for row in sigma.reshape(-1, sigma.shape[-1]))


def _layer_costs(sch, module: nn.Module, out_hw, in_hw, counted: Optional[MacCount], name: str, inputs):
    """``(dense MACs, MACs at rank r)`` of a target for one forward pass on the inputs.

    The scheme gives per-sample costs of one call; they are scaled to what the layer
    really costs in the pass (batch, and every call of a layer used twice) from the
    per-layer figures (a layer that did not run costs nothing); a layer of a kind those do
    not cover is scaled by the batch size.
    """
    per_sample = sch.macs(module, None, out_hw, in_hw)
    if counted is None:
        return per_sample, functools.partial(sch.macs, module, out_hw=out_hw, in_hw=in_hw)
    total = counted.layers.get(name)
    if total is None:
        # A layer the hooks cover but never saw did not run (e.g. an auxiliary head in eval): free.
        total = 0 if splittable_kind(module) is not None else per_sample * inputs.batch_size

    def macs(rank: int) -> int:
        return sch.macs(module, rank, out_hw, in_hw) * total // max(per_sample, 1)

    return total, macs


def _discarded(calibrated: dict[str, CalibratedFactors], ranks: dict[str, int], spectra: Sequence[LayerSpectrum]
               ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per ungrouped layer, the output directions its rank discards and their eigenvalues (a layer kept
    whole: its last quarter), for :func:`~trp.core.calibration.output_gains`."""
    out = {}
    for spectrum in spectra:
        cal = calibrated[spectrum.name]
        if cal.lam.shape[0] != 1:
            continue
        r = int(cal.lam.shape[-1])
        start = int(ranks.get(spectrum.name, r))
        if start >= r:
            start = max(0, r - max(1, r // 4))
        mean = cal.mean_output[0] if cal.mean_output is not None else None
        out[spectrum.name] = (cal.output_basis(r, start)[0], cal.lam[0, start:r], mean)
    return out


def _as_example(inputs: ModelInputs, n: int) -> Any:
    """The first ``n`` samples of a batch in a form ``example_inputs`` takes."""
    from .inputs import first_samples as _slice

    part = _slice(inputs, min(n, inputs.batch_size))
    if part.kwargs and not part.args:
        return dict(part.kwargs)
    if part.kwargs:
        raise ValueError("calibration batches mixing positional and keyword inputs need example_inputs= too")
    return part.args[0] if len(part.args) == 1 else tuple(part.args)
