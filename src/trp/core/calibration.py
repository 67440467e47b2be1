"""Calibrated (data-aware) truncation: keep what a layer's outputs use on real inputs (SPEC §6).

For a layer ``y = W x`` (bias excluded) fed inputs ``X`` (one column per position: a token, an
output pixel's im2col patch), the rank-``k`` weight minimising ``‖(W − W_k) X‖_F`` is

    ``W_k = U_k U_kᵀ W``,  ``U_k`` the top-``k`` eigenvectors of ``Σ_y = W (X Xᵀ) Wᵀ``

(``Σ_y`` is the uncentred output second moment; its eigenvalues ``λ`` are the squared singular
values of ``W X``, and the ``λ`` a rank drops sum to exactly the squared output error it adds on
the calibration data). It splits into two layers directly: first ``U_kᵀ W`` (for a conv, ``k``
filters of shape ``C×kh×kw`` with the original stride/padding/dilation), then ``U_k`` (a 1×1
conv, or a Linear ``k→out``, carrying the bias). Grouped convs get one ``Σ_y`` per group (their
per-group matrix views). No Cholesky and no inverse: dead channels and fewer samples than
inputs leave ``Σ_y`` singular, which only means some ``λ`` are zero.

Statistics are collected by forward hooks in float64, streaming: one ``d×d`` matrix per layer
(per group), never the activations, with ``d`` the smaller of the output side (``out`` features,
``N/g`` channels) and the input side (``in`` features, ``C/g·kh·kw``). From the input side
``C = X Xᵀ``, the eigenpairs of ``Σ_y`` come without forming it: with ``C = V D Vᵀ`` and
``T = V D^½``, ``Σ_y = (W T)(W T)ᵀ`` has the nonzero eigenvalues ``Λ`` of ``G = (W T)ᵀ (W T)``
(``eigh(G) = Q Λ Qᵀ``) and eigenvectors ``U = W T Q Λ^-½``; ``W T`` is formed in row blocks, so
a ``4096×11008`` layer needs a few ``4096²`` float64 matrices at most.

Schemes: ``channel`` (and ``linear``, the per-group view of grouped convs and Conv1d) only.
``spatial`` and ``decouple`` are refused with ``calibration=``: their matrix views
(``(C·kh)×(N·kw)``, and ``C×(kh·kw)`` per filter) are not ``output × input``; the output error of a
truncated view is ``Σ vec(ΔW)ᵀ (X Xᵀ) vec(ΔW)`` with the full im2col second moment, which does
not factor over the view's rows and columns (inputs at different kernel offsets are correlated),
so the weighted low-rank problem has no eigen-decomposition solution.

Under ``torch.distributed`` each rank collects the statistics of its own calibration batches
and they are summed (all-reduce) before any eigen-decomposition, so every rank splits alike.

The closed form per layer (statistics to factors) is :mod:`trp.core.calibration_factors`, the
measured output gains :mod:`trp.core.calibration_gains`; this module reads the calibration
batches and collects the statistics, and its public names include theirs as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibration_factors import CalibratedFactors, Statistics, calibrated_factors, effective_matrix, layer_factors
from .calibration_gains import output_gains
from .inputs import ModelInputs, first_samples as _slice, model_inputs
from .schemes import DecoupleScheme, Scheme, SpatialScheme
from .targets import layer_kind, pad_same, same_padding

__all__ = [
    "DEFAULT_SAMPLES",
    "CalibrationData",
    "CalibratedFactors",
    "read_batches",
    "refuse_scheme",
    "collect_statistics",
    "forward_groups",
    "calibrated_factors",
    "layer_dims",
    "layer_factors",
    "output_gains",
    "Statistics",
    "effective_matrix",
]

#: default bound on the samples (batch rows: images, sequences) used for the statistics
DEFAULT_SAMPLES = 512
_ROWS = 2048  # row block for the input-side products


@dataclass
class CalibrationData:
    """Calibration batches read from the user's iterable: ``fit`` for statistics, ``held`` for the fidelity check.

    ``held_out`` is False when the data were too few to hold any out (the check then reuses ``fit``).
    """

    fit: list[ModelInputs]
    held: list[ModelInputs]
    held_out: bool
    samples: int


def read_batches(model: nn.Module, batches: Iterable[Any], samples: int = DEFAULT_SAMPLES,
                 held_samples: Optional[int] = None) -> CalibrationData:
    """Read up to ``samples`` samples for statistics and then up to ``held_samples`` more held out.

    Each batch is model inputs in any form ``example_inputs`` takes (a tensor, a tuple of
    positional inputs, a dict of keyword inputs). ``held_samples`` defaults to a quarter of
    ``samples`` (at least 8, at most 128). When the iterable ends before any sample is held out,
    the last of two or more batches is held out instead; a single batch serves both (not held out).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"calibration_samples must be an integer >= 1, got {samples!r}")
    if isinstance(batches, (Tensor, dict)):
        raise TypeError("calibration= takes an iterable of batches (e.g. a list of input tensors or of dicts "
                        "of keyword inputs), not a single batch: wrap it in a list")
    held_samples = min(128, max(8, samples // 4)) if held_samples is None else held_samples
    fit: list[ModelInputs] = []
    held: list[ModelInputs] = []
    n_fit = n_held = 0
    for batch in batches:
        inputs = model_inputs(model, example_inputs=batch)
        b = inputs.batch_size
        if n_fit < samples:
            take = min(b, samples - n_fit)
            fit.append(_slice(inputs, take) if take < b else inputs)
            n_fit += take
            if take < b and held_samples > 0:  # the rest of this batch starts the held-out set
                rest = ModelInputs(*_rest(inputs, take))
                if rest.batch_size > held_samples:
                    rest = _slice(rest, held_samples)
                held.append(rest)
                n_held += rest.batch_size
        elif n_held < held_samples:
            take = min(b, held_samples - n_held)
            held.append(_slice(inputs, take) if take < b else inputs)
            n_held += take
        if n_fit >= samples and n_held >= held_samples:
            break
    if not fit:
        raise ValueError("calibration= gave no batch: pass a non-empty iterable of model inputs")
    held_out = bool(held)
    if not held:
        if len(fit) >= 2:
            held = [fit.pop()]
            n_fit -= held[0].batch_size
            held_out = True
        else:
            held = list(fit)
            held_out = False
    return CalibrationData(fit, held, held_out, n_fit)


def _rest(inputs: ModelInputs, n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    b = inputs.batch_size

    def cut(v: Any) -> Any:
        return v[n:] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v

    return tuple(cut(v) for v in inputs.args), {k: cut(v) for k, v in inputs.kwargs.items()}


def refuse_scheme(targets: Sequence[tuple[str, nn.Module, Scheme]]) -> None:
    """ValueError when a target would be split by a scheme that has no calibrated form."""
    for name, _, sch in targets:
        if isinstance(sch, SpatialScheme):
            raise ValueError(
                f"calibration= is not available for the spatial scheme (layer {name!r}): its (C·kh)×(N·kw) view "
                "is not output × input, so the output error weights it with the full im2col second moment, a "
                "weighted low-rank problem with no closed form; use scheme='channel'")
        if isinstance(sch, DecoupleScheme):
            raise ValueError(
                f"calibration= is not available for the decouple scheme (layer {name!r}): each filter's C×(kh·kw) "
                "view is weighted by the full im2col second moment, which does not factor over its rows and "
                "columns, so no eigen-decomposition gives the best split; use scheme='channel'")


def layer_dims(module: nn.Module) -> tuple[int, int, int]:
    """``(groups, output side, input side)`` per group of a splittable layer's matrix view."""
    kind = layer_kind(module)
    if kind == "linear":
        return 1, module.out_features, module.in_features
    if kind == "hf_conv1d":
        n_in, n_out = module.weight.shape
        return 1, n_out, n_in
    n, cg, *kernel = module.weight.shape
    g = module.groups
    return g, n // g, cg * math.prod(kernel)


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """im2col of a conv's input: ``(B, C·kh·kw, positions)``, channels outermost (the weight's order)."""
    one_d = layer_kind(module) == "conv1d"
    if one_d:
        x = x.unsqueeze(-2)
    kernel = tuple(module.kernel_size)
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    padding = module.padding
    if one_d:
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    if same_padding(module):
        x, padding = pad_same(x, kernel, stride, dilation), 0
    elif module.padding_mode != "zeros":
        pads = list(module._reversed_padding_repeated_twice) + ([0, 0] if one_d else [])
        x, padding = F.pad(x, pads, mode=module.padding_mode), 0
    elif isinstance(padding, str):
        pads: list[int] = []
        if padding == "same":
            for k, d in reversed(list(zip(kernel, dilation))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        padding = 0
    elif one_d:
        padding = (0, *padding)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


class _Collector:
    """Forward hook summing one layer's second moment (per group) in float64."""

    def __init__(self, module: nn.Module, side: str) -> None:
        self.module = module
        self.kind = layer_kind(module)
        self.groups, out_d, in_d = layer_dims(module)
        self.side = side if side != "auto" else ("input" if in_d < out_d else "output")
        d = in_d if self.side == "input" else out_d
        self.stat = torch.zeros(self.groups, d, d, dtype=torch.float64, device=module.weight.device)
        self.total = torch.zeros(self.groups, d, dtype=torch.float64, device=module.weight.device)
        self.positions = torch.zeros((), dtype=torch.float64, device=module.weight.device)

    mask: Optional[Tensor] = None  # (B, T) attention mask of the current batch: padding left out

    def _rows(self, t: Tensor) -> Tensor:
        """The positions of a Linear's input or output ``(..., F)`` as rows, padding positions dropped."""
        mask = self.mask
        if mask is not None and t.ndim == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
            return t[mask]
        return t.reshape(-1, t.shape[-1])

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        with torch.no_grad():
            g = self.groups
            if self.side == "output":
                y = output.detach()
                bias = module.bias
                if self.kind in ("linear", "hf_conv1d"):
                    y = self._rows(y)
                    if bias is not None:
                        y = y - bias
                    cols = y.double().T.unsqueeze(0)  # (1, out, T)
                else:
                    if bias is not None:
                        y = y - bias.view(-1, *([1] * (y.ndim - 2)))
                    y = y.flatten(2).double()  # (B, N, P)
                    cols = y.reshape(y.shape[0], g, -1, y.shape[-1]).permute(1, 2, 0, 3).flatten(2)
            else:
                x = args[0].detach()
                if self.kind in ("linear", "hf_conv1d"):
                    cols = self._rows(x).double().T.unsqueeze(0)
                else:
                    p = _patches(module, x).double()  # (B, C·kk, P)
                    cols = p.reshape(p.shape[0], g, -1, p.shape[-1]).permute(1, 2, 0, 3).flatten(2)
            self.stat.baddbmm_(cols, cols.mT)  # in place: no d×d temporary
            self.total += cols.sum(-1)
            self.positions += cols.shape[-1]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layers of interest have run."""


def collect_statistics(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[ModelInputs],
                       side: str = "auto", stop_after: Optional[nn.Module] = None) -> dict[str, "Statistics"]:
    """Each layer's :class:`Statistics` on ``batches``: summed second moment ``(g, d, d)`` and sum ``(g, d)``.

    ``side`` is ``"auto"`` (the smaller of input and output), ``"input"`` or ``"output"``. The
    model runs in eval mode without gradients; positions a batch's integer ``attention_mask``
    keyword marks as padding (0) are left out of Linear layers' statistics; under an initialised ``torch.distributed`` group
    the statistics are summed over ranks. With ``stop_after`` (a module), each forward pass ends
    as soon as that module has run (nothing after it is needed: sequential calibration).
    """
    if side not in ("auto", "input", "output"):
        raise ValueError(f"side must be 'auto', 'input' or 'output', got {side!r}")
    collectors = {name: _Collector(m, side) for name, m in modules.items()}
    handles = [m.register_forward_hook(collectors[n]) for n, m in modules.items()]
    if stop_after is not None:
        def stop(*_: Any) -> None:
            raise _Stop

        handles.append(stop_after.register_forward_hook(stop))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for inputs in batches:
                mask = _padding_mask(inputs)
                for c in collectors.values():
                    c.mask = mask
                try:
                    inputs(model)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for c in collectors.values():
            for t in (c.stat, c.total, c.positions):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {name: Statistics(c.side, c.stat, c.total, float(c.positions)) for name, c in collectors.items()}


def forward_groups(model: nn.Module, modules: dict[str, nn.Module], inputs: ModelInputs) -> list[list[str]]:
    """The layers in the order a forward pass first calls them, grouped where consecutive layers read
    the same input tensor (e.g. an attention's query, key and value projections): the units of
    sequential calibration. Layers the pass does not reach come last, one group each."""
    order: list[str] = []
    seen_input: dict[str, int] = {}
    keep: list[Tensor] = []  # the inputs stay referenced during the pass: their ids are not reused
    handles = []
    for name, m in modules.items():
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            if name not in seen_input:
                order.append(name)
                x = args[0] if args else None
                seen_input[name] = id(x) if isinstance(x, Tensor) else -len(order)
                if isinstance(x, Tensor):
                    keep.append(x)
        handles.append(m.register_forward_hook(hook))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            inputs(model)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    keep.clear()
    groups: list[list[str]] = []
    for name in order:
        if groups and seen_input[groups[-1][-1]] == seen_input[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    groups += [[n] for n in modules if n not in seen_input]
    return groups


def _padding_mask(inputs: ModelInputs) -> Optional[Tensor]:
    """The batch's ``attention_mask`` keyword ``(B, T)`` as booleans (token models), else None."""
    mask = inputs.kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2 and not mask.is_floating_point():
        return mask.bool()
    return None


