"""Split selected layers of a model into two thin layers by truncated SVD.

``nn.MultiheadAttention`` is first rebuilt from separate projection layers
(:mod:`trp.core.attention`); layers whose weight a parent reads directly stay dense
(:mod:`trp.core.safety`). Given example inputs (or ``input_shape``), the result is checked once
before it is returned: a split that is not exact is an error naming the layer. The whole split
model is run in eval mode under ``torch.no_grad()`` and ``torch.inference_mode()`` (where
PyTorch's fused fast paths read weights directly) and in the mode it came in; it is returned in
that mode. An ``nn.TransformerEncoderLayer`` with a split layer keeps its attention converted,
which turns its fused fast path off (stated in ``Decomposition.notes``). Layers with
more than ``trp.core.svd.FULL_SVD_MAX`` singular values get only the leading ones their rank
needs (:mod:`trp.core.topspectra`); ``on_layer`` reports progress per layer.

Why this module is long (~800 lines, with the calibrated split and the inference checks): the three passes of :func:`decompose_with_report` (spectra,
ranks, split and check) share their intermediate state, and the recipe functions sit beside the
code that writes what they replay; issue 21 moves the recipe functions to ``core/recipe.py``.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .allocation import LayerSpectrum, WholeModelCriterion, check_round_to, round_rank
from .attention import SplitMultiheadAttention, convert_attention, restore_attention
from .equivalents import check_standard, standard_form
from .bn_stats import reestimate_batchnorm
from .calibration import (DEFAULT_SAMPLES, CalibratedFactors, collect_statistics, forward_groups, layer_factors,
                          output_gains,
                          read_batches, refuse_scheme)
from .fidelity import Fidelity, compare_outputs, measure_fidelity, warn_fidelity
from .counting import MacCount, count_macs, mac_breakdown, probe_forward, splittable_kind
from .criteria import Criterion, Energy
from .inputs import ExampleInputs, ModelInputs, inputs_given, model_inputs
from .layers import LayerSelector, set_module, summarize_skipped
from .safety import check_layer, check_outputs, record_layer_inputs, run_model, split_targets
from .schemes import SCHEMES, LowRank, SplitLayerAccess, get_scheme, scheme_for
from .topspectra import LayerMatrix, allocate_leading, leading_svd
from .targets import effective_weight, is_candidate, layer_kind, split_reason
from .wrappers import unwrap

__all__ = [
    "LayerReport",
    "Decomposition",
    "decompose",
    "decompose_with_report",
    "fit_criterion",
    "trace_sizes",
    "recipe_of",
    "apply_recipe",
    "check_recipe",
    "convert_recipe_attention",
]

_log = logging.getLogger("trp.decompose")

RankCriterion = Union[Criterion, WholeModelCriterion, Callable[[Tensor], int]]


@dataclass
class LayerReport:
    """What happened to one selected layer."""

    name: str
    scheme: str
    status: str  # "factorized", "dense" (no MAC saving) or "skipped"
    rank: Optional[int] = None
    max_rank: Optional[int] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    reason: str = ""


@dataclass
class Decomposition:
    """A decomposed model and the per-layer report."""

    model: nn.Module
    layers: list[LayerReport] = field(default_factory=list)
    #: whole-model and per-layer MACs before / after (when inputs were given)
    macs_before: Optional[MacCount] = None
    macs_after: Optional[MacCount] = None
    #: what trp changed around the split layers (e.g. a fused fast path disabled), one line each
    notes: list[str] = field(default_factory=list)
    #: how close the split model stays to the dense one (with calibration data or example inputs)
    fidelity: Optional[Fidelity] = None
    #: whether the split was calibrated on data (``calibration=``)
    calibrated: bool = False

    @property
    def factorized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "factorized"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]

    def __repr__(self) -> str:
        dense = sum(r.status == "dense" for r in self.layers)
        macs = ""
        if self.macs_before is not None and self.macs_after is not None:
            macs = (f", MACs {self.macs_before.total:,} -> {self.macs_after.total:,} "
                    f"({self.macs_before.total / max(self.macs_after.total, 1):.2f}x fewer)")
        return (f"Decomposition({len(self.factorized)} factorized, {dense} dense, {len(self.skipped)} skipped"
                f"{macs}{', ' + str(len(self.notes)) + ' note(s)' if self.notes else ''})")


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


LayerProgress = Callable[[str, int, int], None]


# The split is verified on a real forward pass (random inputs): at most this many input elements. A larger
# declared input_shape (a file may declare 4096×4096) is checked at a smaller spatial size, keeping the
# aspect ratio, so verification never costs more than an ImageNet image (3×224×224) does.
VERIFY_MAX_ELEMENTS = 3 * 224 * 224


def _verification_shape(input_shape: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """``input_shape`` within :data:`VERIFY_MAX_ELEMENTS` (batch 1, spatial dimensions scaled down) and
    whether it was reduced."""
    shape = tuple(int(d) for d in input_shape)
    if math.prod(shape) <= VERIFY_MAX_ELEMENTS:
        return shape, False
    shape = (1, *shape[1:])
    if len(shape) >= 3 and math.prod(shape) > VERIFY_MAX_ELEMENTS:
        lead, spatial = shape[:2], shape[2:]
        scale = (VERIFY_MAX_ELEMENTS / math.prod(shape)) ** (1 / len(spatial))
        shape = (*lead, *(max(1, min(d, int(d * scale))) for d in spatial))
    return shape, True


def _verification_inputs(model: nn.Module, input_shape: Optional[Sequence[int]], example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    if input_shape is None:
        return None
    shape, _ = _verification_shape(input_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def decompose_with_report(
    model: nn.Module,
    scheme: str = "channel",
    criterion: Optional[RankCriterion] = None,
    layers: LayerSelector = None,
    input_shape: Optional[Sequence[int]] = None,
    *,
    on_layer: Optional[LayerProgress] = None,
    exclude: Sequence[str] = (),
    example_inputs: Optional[ExampleInputs] = None,
    round_to: int = 1,
    calibration: Optional[Iterable[Any]] = None,
    calibration_samples: int = DEFAULT_SAMPLES,
    calibration_weighting: str = "sensitivity",
    calibration_sequential: bool = False,
    calibration_batchnorm: bool = True,
) -> Decomposition:
    """Like :func:`decompose`, also returning what happened to each selected layer.

    ``on_layer(name, done, total)`` is called as each layer's spectrum is computed (progress).
    With inputs, the report also holds the MACs before and after (:class:`~trp.core.counting.MacCount`),
    and the split model's fidelity to the dense one (:class:`~trp.core.fidelity.Fidelity`).
    """
    get_scheme(scheme)  # unknown scheme -> ValueError before any work
    criterion = Energy(0.9) if criterion is None else criterion
    if not callable(criterion):
        raise ValueError(f"criterion must be a rank criterion such as trp.Energy(0.9), got {criterion!r}")
    check_round_to(round_to)
    if round_to > 1 and isinstance(criterion, WholeModelCriterion):
        raise ValueError(
            f"round_to applies to per-layer criteria; a whole-model criterion keeps its budget only when it "
            f"rounds itself: pass round_to={round_to} to the criterion (e.g. TargetSpeedup(x, round_to={round_to}))"
        )
    if calibration_weighting not in _WEIGHTINGS:
        raise ValueError(f"calibration_weighting must be one of {', '.join(_WEIGHTINGS)}, got {calibration_weighting!r}")
    inputs_given(input_shape, example_inputs)
    dense_model = unwrap(model)
    # The copy shares the dense parameters until the end (a layer split meanwhile never needs its own
    # copy of the dense weight: memory); whatever still shares them then is cloned (_unshare).
    new = copy.deepcopy(dense_model, {id(p): p for p in dense_model.parameters()})
    dense_storages = {p.untyped_storage().data_ptr() for p in dense_model.parameters()
                      if not nn.parameter.is_lazy(p) and p.numel()}
    calib = read_batches(new, calibration, calibration_samples) if calibration is not None else None
    if calib is not None and input_shape is None and example_inputs is None:
        example_inputs = _as_example(calib.fit[0], 8)  # MACs and the exactness check run on real inputs
    has_inputs = inputs_given(input_shape, example_inputs)
    inputs = model_inputs(new, input_shape, example_inputs) if has_inputs else None
    converted = convert_attention(new)
    targets, skipped = split_targets(new, layers, exclude, scheme)
    report = Decomposition(new)
    for name, reason in skipped:
        report.layers.append(LayerReport(name, scheme, "skipped", reason=reason))
    if not targets:
        what = "the default selection (every layer but the first conv and the last linear)" \
            if layers is None else f"layers={layers!r}"
        raise ValueError(
            f"nothing to decompose: {what} matched no layer that can be split exactly"
            + (f" ({len(skipped)} skipped: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
            + ". Pass layers=[names or glob patterns] or a predicate to choose layers explicitly; for a layer "
            "class trp does not know (a subclass with a forward of its own), register what it computes once: "
            "trp.register_layer(MyConv, to_standard=lambda m: nn.Sequential(nn.ZeroPad2d(pads), trp.plain_layer(m)))."
        )
    whole = isinstance(criterion, WholeModelCriterion)
    if whole and criterion.needs_input_shape and inputs is None:
        raise ValueError(
            f"{criterion!r} counts the model's MACs: pass input_shape=(1, C, H, W) or example_inputs"
        )
    sizes = trace_sizes(new, [m for _, m in targets], inputs) if inputs is not None else {}
    if inputs is not None:
        report.macs_before = mac_breakdown(new, inputs)
    check_inputs = _verification_inputs(new, input_shape, example_inputs)
    if check_inputs is not None:
        try:
            dense_output, layer_inputs = record_layer_inputs(new, dict(targets), check_inputs)
        except Exception as err:  # noqa: BLE001
            if example_inputs is not None or not _verification_shape(input_shape)[1]:  # type: ignore[arg-type]
                raise
            warnings.warn(f"trp.decompose: the model does not run at the reduced size "
                          f"{tuple(check_inputs.shape)} used to verify a split of the declared input "
                          f"{tuple(input_shape)} ({type(err).__name__}); the split is not verified on a forward "
                          "pass: pass example_inputs to verify it", stacklevel=2)
            check_inputs = None
        if check_inputs is not None:
            train_runs = new.training and _runs_in_train_mode(new, check_inputs)
            for name, module in targets:  # layers split through their standard form: check it on their input
                if name in layer_inputs and standard_form(module) is not None:
                    check_standard(module, layer_inputs[name], name)
    if whole:
        criterion.prepare(model, scheme, layers, input_shape)
    calibrated: dict[str, CalibratedFactors] = {}
    gains: dict[str, float] = {}
    if calib is not None:
        report.calibrated = True
        refuse_scheme([(name, module, scheme_for(module, scheme)) for name, module in targets])
        stats = collect_statistics(new, dict(targets), calib.fit)
        for name, module in targets:
            # A layer with a bias: centred statistics, the bias takes the mean of what a rank discards.
            calibrated[name] = layer_factors(scheme_for(module, scheme).to_matrix(effective_weight(module).detach()),
                                             stats.pop(name), centred=module.bias is not None)
        if whole and calibration_weighting == "sensitivity":
            gains = output_gains(new, dict(targets), calib.fit[0])

    # Pass 1: spectra and MAC costs of every target.
    # Large layers get only the top of their spectrum: under a per-layer criterion as much as it
    # needs (core.svd.top_svd), under a whole-model criterion as much as the allocation needs
    # (core.topspectra), so there the SVDs wait for pass 2.
    entries, rank_spectra = [], {}
    done = 0

    def progress(name: str) -> None:
        nonlocal done
        done += 1
        if on_layer is not None:
            on_layer(name, done, len(targets))

    for name, module in targets:
        sch = scheme_for(module, scheme)
        out_hw, in_hw = sizes.get(module) or sch.nominal_sizes(module)
        svd = None
        if name in calibrated:
            svd = calibrated[name]
            if not whole:
                progress(name)
        elif not whole:
            svd, for_rank = leading_svd(criterion, sch.to_matrix(effective_weight(module).detach()), f"layer {name!r}")
            if for_rank is not None:
                rank_spectra[name] = for_rank
            progress(name)
        entries.append([name, module, sch, svd, out_hw, in_hw])

    # Pass 2: ranks, per layer or for the whole model at once.
    if whole:
        convs_only = getattr(criterion, "convs_only", False)
        counted = [e for e in entries if not (convs_only and not isinstance(e[1], nn.Conv2d))]
        if calibrated:
            matrices = [
                LayerSpectrum(name, calibrated[name].spectrum,
                              *_layer_costs(sch, module, out_hw, in_hw, report.macs_before, name, inputs),
                              scale=None if calibration_weighting == "normalized" else gains.get(name, 1.0))
                for name, module, sch, _, out_hw, in_hw in counted
            ]
        else:
            matrices = [
                LayerMatrix(name, sch.to_matrix(effective_weight(module).detach()),
                            *_layer_costs(sch, module, out_hw, in_hw, report.macs_before, name, inputs))
                for name, module, sch, _, out_hw, in_hw in counted
            ]
        fixed = 0
        if report.macs_before is not None:
            # Budgets are of the whole model: everything outside the counted layers is fixed.
            before = report.macs_before
            whole_count = before.total if not convs_only else sum(
                c for n, c in before.layers.items() if isinstance(new.get_submodule(n), nn.Conv2d))
            fixed = whole_count - sum(m.dense_macs for m in matrices)
        if calibrated:
            ranks = criterion.allocate(matrices, fixed)
            if calibration_weighting == "sensitivity":
                # Weigh each layer by its effect on the output along what its rank discards; reallocate.
                for _ in range(_GAIN_ROUNDS):
                    gains = output_gains(new, dict(targets), calib.fit[0], truncate=_GAIN_TRUNCATE,
                                         directions=_discarded(calibrated, ranks, matrices))
                    for m in matrices:
                        m.scale = gains.get(m.name, m.scale)
                    ranks = criterion.allocate(matrices, fixed)
            for m in matrices:
                progress(m.name)
        else:
            svds, ranks = allocate_leading(criterion, matrices, fixed, on_svd=progress)
            for entry in entries:
                entry[3] = svds.get(entry[0])
        # With convs_only, linears are outside the budget: they keep full rank (stay dense, no SVD).
        counted_names = {m.name for m in matrices}
        for name, module, sch, *_ in entries:
            if name not in counted_names:
                ranks[name] = sch.max_rank(module)
                progress(name)
    else:
        ranks = {}
        for name, module, sch, svd, out_hw, in_hw in entries:
            spectrum = svd.spectrum if isinstance(svd, CalibratedFactors) else rank_spectra.get(name, svd[1])
            rank = _kept_rank(criterion, spectrum)
            if round_to > 1:
                rank = round_rank(rank, round_to, int(spectrum.shape[-1]),
                                  functools.partial(sch.macs, module, out_hw=out_hw, in_hw=in_hw),
                                  sch.macs(module, None, out_hw, in_hw))
            ranks[name] = rank

    # Pass 3: factorize where MACs drop.
    split: dict[str, tuple] = {}  # name: (dense layer, truncated weight, report entry[, bias of the split])
    group_of: dict[str, list[str]] = {}
    if calibration_sequential and calibrated:
        # Sequential: ranks stay as allocated; each layer (group of layers reading the same input) is
        # re-calibrated, in forward order, on the inputs the already-split layers before it produce.
        groups = forward_groups(new, dict(targets), calib.fit[0])
        rank_of = {n: i for i, g in enumerate(groups) for n in g}
        entries.sort(key=lambda e: rank_of.get(e[0], len(groups)))
        group_of = {n: g for g in groups for n in g}
    refit: set[str] = set()
    for name, module, sch, svd, out_hw, in_hw in entries:
        if name in group_of and name not in refit:
            group = [n for n in group_of[name] if n in calibrated and n in ranks]
            refit.update(group_of[name])
            mods = {n: new.get_submodule(n) for n in group}
            if mods:
                stats = collect_statistics(new, mods, calib.fit, stop_after=mods[group[-1]])
                for n, m in mods.items():
                    calibrated[n] = layer_factors(scheme_for(m, scheme).to_matrix(effective_weight(m).detach()),
                                                  stats.pop(n), centred=m.bias is not None)
                del stats
        if name in calibrated:
            svd = calibrated[name]
        cal = svd if isinstance(svd, CalibratedFactors) else None
        u, s, vh = svd if svd is not None and cal is None else (None, None, None)
        max_rank = sch.max_rank(module)
        before = sch.macs(module, None, out_hw, in_hw)
        if name not in ranks:
            report.layers.append(LayerReport(name, sch.name, "dense", None, max_rank, before, before,
                                             reason=f"{criterion!r} gives it no rank"))
            continue
        rank = ranks[name]
        if not 1 <= rank <= max_rank:
            raise ValueError(f"criterion {criterion!r} returned rank {rank} for layer {name!r} (1..{max_rank})")
        after = sch.macs(module, rank, out_hw, in_hw)
        entry = LayerReport(name, sch.name, "dense", rank, max_rank, before, after)
        if after < before and cal is not None:
            a, b = cal.factors(rank)
            low = sch.build(module, rank)
            shift = cal.bias_shift(rank)
            with torch.no_grad():
                sch._load_factors(low, module, a, b)
                if shift is not None:
                    low.second.bias.add_(shift.to(low.second.bias))
            set_module(new, name, low)
            entry.status = "factorized"
            if check_inputs is not None:
                dtype = module.weight.dtype  # the check's truncated weight in the layer's dtype (memory)
                split[name] = (module, sch.from_matrix(a.to(dtype) @ b.to(dtype), module.weight.shape), entry,
                               None if shift is None else module.bias.detach() + shift.to(module.bias))
            del a, b
        elif after < before:
            if s is None or rank > s.shape[-1]:  # the truncated spectra were chosen to hold every split rank
                raise RuntimeError(f"trp.decompose: layer {name!r} got rank {rank} beyond the "
                                   f"{0 if s is None else s.shape[-1]} singular values computed; please report this")
            set_module(new, name, sch.factorize(module, u, s, vh, rank))
            entry.status = "factorized"
            if check_inputs is not None:
                split[name] = (module, sch.truncated(u, s, vh, rank, module.weight.shape), entry)
        else:
            entry.reason = f"rank {rank}/{max_rank} would not reduce MACs"
            entry.macs_after = before
        report.layers.append(entry)

    if group_of:  # the report in the model's order, as without sequential calibration
        order = {n: i for i, (n, _) in enumerate(targets)}
        report.layers.sort(key=lambda r: order.get(r.name, -1))
    calibrated.clear()
    entries.clear()
    keep = {a for a in converted.originals
            if any(isinstance(m, LowRank) for m in new.get_submodule(a).modules())}
    keep |= _fast_path_attention(new, converted, report)
    restore_attention(new, converted, keep)
    check_output = None
    if check_inputs is not None:
        check_output = _check(new, split, layer_inputs, dense_output, check_inputs, train_runs)
    if calib is not None and calibration_batchnorm and report.factorized:
        changed = reestimate_batchnorm(new, calib.fit)
        if changed:
            report.notes.append(
                f"running statistics of {changed} BatchNorm layer(s) re-estimated on the {calib.samples} calibration "
                "samples (forward passes, no weight changed; calibration_batchnorm=False keeps the trained ones)")
    if inputs is not None:
        report.macs_after = mac_breakdown(new, inputs)
    if calib is not None:
        source = "held-out calibration" if calib.held_out else "calibration"
        report.fidelity = measure_fidelity(dense_model, new, calib.held, calib.held_out, source=source)
    elif example_inputs is not None and check_output is not None:
        report.fidelity = compare_outputs([dense_output], [check_output], False, source="example")

    skipped = [(r.name, r.reason) for r in report.layers if r.status == "skipped"]
    if skipped:
        for n, r in skipped:
            _log.debug("left dense: %s (%s)", n, r)
        warnings.warn(
            f"trp.decompose left {len(skipped)} selected layer(s) dense (all of them: Decomposition.skipped, or "
            "DEBUG logging of 'trp.decompose'):\n  " + "\n  ".join(summarize_skipped(skipped)),
            stacklevel=2,
        )
    warn_fidelity(report.fidelity, report.calibrated)
    _unshare(new, dense_storages)
    return report


def _unshare(model: nn.Module, storages: set[int]) -> None:
    """Give ``model`` its own copy of every parameter whose memory is in ``storages`` (the input model's),
    keeping parameters tied where they were tied."""
    clones: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is None or nn.parameter.is_lazy(p) or not p.numel() \
                        or p.untyped_storage().data_ptr() not in storages:
                    continue
                if id(p) not in clones:
                    clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[key] = clones[id(p)]


def _fast_path_attention(new: nn.Module, converted, report: "Decomposition") -> set[str]:
    """Attention modules to keep converted because their ``nn.TransformerEncoderLayer`` has a split layer.

    The encoder layer's fused fast path (eval mode, no autograd) reads ``linear1.weight`` and
    ``linear2.weight`` directly; with its attention a :class:`SplitMultiheadAttention` (no packed
    ``in_proj`` weight) PyTorch takes the regular path, which calls every layer. Stated in the report.
    """
    keep: set[str] = set()
    for name, layer in new.named_modules():
        if not isinstance(layer, nn.TransformerEncoderLayer):
            continue
        attn = f"{name}.self_attn" if name else "self_attn"
        if attn not in converted.originals:
            continue
        split = [n for n, m in layer.named_children() if isinstance(m, LowRank)]
        if split:
            keep.add(attn)
            report.notes.append(
                f"{name or 'the model'} (nn.TransformerEncoderLayer): fused inference fast path disabled "
                f"({', '.join(split)} split; its self_attn kept as trp's SplitMultiheadAttention, which "
                "computes the same function without the packed weights the fast path reads)")
    return keep


def _snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


def _runs_in_train_mode(model: nn.Module, example_inputs: Any) -> bool:
    """Whether the dense model runs on the inputs in train mode (not, e.g., BatchNorm on one value)."""
    buffers = _snapshot_buffers(model)
    try:
        run_model(model, example_inputs)
        return True
    except Exception:  # noqa: BLE001 - then the split model is not run in train mode either
        return False
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


def _drop_inference_tensors(model: nn.Module) -> None:
    """Replace tensors a module cached during the ``torch.inference_mode()`` run by ordinary copies
    (an inference tensor cannot be saved for backward in a later training step)."""
    for m in model.modules():
        for key, buf in list(m._buffers.items()):
            if buf is not None and buf.is_inference():
                m._buffers[key] = buf.clone()
        for key, value in list(vars(m).items()):
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) and value.is_inference():
                m.__dict__[key] = value.clone()


def _check_modes(model: nn.Module, came_in_training: bool):
    """``(label, set-up)`` of each mode the split model is run in before it is returned."""
    import contextlib

    modes = []
    if came_in_training:
        modes.append(("train mode (the mode it came in)", False, contextlib.nullcontext))
    modes.append(("eval mode under torch.no_grad()", True, torch.no_grad))
    modes.append(("eval mode under torch.inference_mode()", True, torch.inference_mode))
    return modes


_WEIGHTINGS = ("sensitivity", "absolute", "normalized")
_GAIN_ROUNDS = 2
_GAIN_TRUNCATE = False  # True: re-measure gains with the truncation error itself (measured worse on MiniLM: 0.872 vs 0.881)


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
    from .calibration import _slice

    part = _slice(inputs, min(n, inputs.batch_size))
    if part.kwargs and not part.args:
        return dict(part.kwargs)
    if part.kwargs:
        raise ValueError("calibration batches mixing positional and keyword inputs need example_inputs= too")
    return part.args[0] if len(part.args) == 1 else tuple(part.args)


def _check(
    new: nn.Module,
    split: dict[str, tuple[nn.Module, Tensor, "LayerReport"]],
    layer_inputs: dict[str, Tensor],
    dense_output: Any,
    example_inputs: Any,
    train_runs: bool = False,
) -> Any:
    """Check the split model (see the module docstring); leave dense the layers a parent reads.

    The whole split model runs in eval mode under ``torch.no_grad()`` and under
    ``torch.inference_mode()`` (where PyTorch's fused fast paths read weights directly), and in
    train mode when it came in train mode (``train_runs``: the dense model runs so); BatchNorm
    statistics are restored after, and every module is left in the mode it came in.
    """
    for name, (dense, weight, _, *bias) in split.items():
        if name not in layer_inputs:
            continue  # not reached by the example inputs
        problem = check_layer(name, dense, new.get_submodule(name), layer_inputs[name], weight,
                              bias[0] if bias else None)
        if problem:
            raise RuntimeError(f"trp.decompose: {problem}. No model is returned; leave the layer dense "
                               f"with exclude=[{name!r}] and report the model's layer type.")
    by_id = {id(new.get_submodule(n)): n for n in split}
    came_in_training = new.training and train_runs
    output = None
    while True:
        modes = [(m, m.training) for m in new.modules()]
        buffers = _snapshot_buffers(new)
        label = ""
        try:
            # Every mode the model may be used in: PyTorch's fused fast paths (eval, no autograd)
            # read weights that the regular path only reaches by calling the layers.
            for label, evaluate, context in _check_modes(new, came_in_training):
                if evaluate:
                    new.eval()
                with context():
                    result = run_model(new, example_inputs)
                if evaluate and output is None:
                    output = result
        except SplitLayerAccess as err:
            name = by_id.get(id(err.module))
            if name is None:
                raise
            dense, _, entry, *_ = split.pop(name)
            set_module(new, name, dense)
            entry.status, entry.macs_after = "skipped", entry.macs_before
            entry.reason = (f"code around the layer reads its .{err.attribute} directly (found running the "
                            f"example inputs in {label}); left dense")
            output = None
            continue
        except Exception as err:
            raise RuntimeError(
                f"trp.decompose: the split model fails on the example inputs in {label} "
                f"({type(err).__name__}: {err}) "
                f"although each split layer matches its dense layer; split layers: {sorted(split)[:5]}... "
                "Pass exclude=[patterns] to leave the layers around the failure dense."
            ) from err
        finally:
            for m, mode in modes:
                m.training = mode
            with torch.no_grad():
                for buf, saved in buffers:  # a train-mode run updates BatchNorm statistics
                    buf.copy_(saved)
            _drop_inference_tensors(new)
        break
    problem = check_outputs(dense_output, output)
    if problem:
        raise RuntimeError(f"trp.decompose: {problem}; no model is returned (split layers: {sorted(split)[:5]}...)")
    return output


def decompose(
    model: nn.Module,
    scheme: str = "channel",
    criterion: Optional[RankCriterion] = None,
    layers: LayerSelector = None,
    input_shape: Optional[Sequence[int]] = None,
    *,
    exclude: Sequence[str] = (),
    example_inputs: Optional[ExampleInputs] = None,
    round_to: int = 1,
    calibration: Optional[Iterable[Any]] = None,
    calibration_samples: int = DEFAULT_SAMPLES,
    calibration_weighting: str = "sensitivity",
    calibration_sequential: bool = False,
    calibration_batchnorm: bool = True,
) -> nn.Module:
    """A copy of ``model`` with each selected layer whose MACs would drop split in two.

    ``scheme`` is ``"channel"``, ``"spatial"`` or ``"decouple"`` for convs; Linear layers are split
    ``in→r→out`` under any scheme. ``criterion`` (default ``Energy(0.9)``) picks each
    layer's rank from its spectrum, or, for a whole-model criterion such as
    ``TargetSpeedup(3.0)`` (:mod:`trp.core.allocation`), all ranks at once. ``layers`` is None
    (every layer but the first conv and the last linear), ``"paper"``, ``"all"``, a list of module
    names or glob patterns, or a predicate ``(name, module) -> bool``; ``exclude`` holds glob
    patterns of layers to leave dense (see :mod:`trp.core.layers`). ``input_shape`` makes the
    MAC comparison exact (it matters for the spatial scheme); without it costs are per
    output pixel. With ``example_inputs`` (a tensor, a tuple of inputs or a dict of keyword
    inputs) or ``input_shape`` (random inputs of that shape), the split model is checked
    against the dense one before it is returned; a split that is not exact raises
    RuntimeError naming the layer. ``round_to=k`` rounds a per-layer criterion's ranks up to
    multiples of ``k`` where that keeps the split cheaper than the dense layer (whole-model
    criteria take their own ``round_to``). The input model is not modified; a
    DistributedDataParallel, DataParallel or ``torch.compile`` wrapper is removed (the result is
    the plain model inside).

    ``calibration`` (an iterable of model inputs, each in a form ``example_inputs`` takes, e.g.
    a list of image batches or of ``{"input_ids": ..., "attention_mask": ...}`` dicts) makes the
    split data-aware (:mod:`trp.core.calibration`; channel and linear views only): each layer
    keeps the directions its outputs use on that data, and ranks are chosen by the output error
    they add (``Energy(e)`` keeps the fraction ``e`` of each layer's output energy; whole-model
    criteria compare layers by the error they add weighted by its measured effect on the model
    output, ``calibration_weighting="sensitivity"``; ``"absolute"``: unweighted; ``"normalized"``:
    as fractions of each layer's energy). At most ``calibration_samples`` samples (batch rows)
    are used for the statistics; further batches (or the last one) are held out, and the split
    model's fidelity to the dense one on them is reported (a :class:`~trp.core.fidelity.FidelityWarning`
    when it collapsed or lost most of its fidelity; likewise on ``example_inputs`` without calibration).
    With ``calibration_sequential=True`` the ranks are chosen as above, then each layer (or group of
    layers reading the same input, e.g. query/key/value) is re-calibrated in forward order on the
    inputs the already-split layers before it produce (one partial forward pass of the
    calibration data per group: costlier, for models of benchmark size).
    With calibration data, every BatchNorm's running mean and variance are then re-estimated on
    it (:mod:`trp.core.bn_stats`: forward passes only, no weight changes), since the split layers'
    outputs lose some variance and mean; ``calibration_batchnorm=False`` keeps the trained
    statistics. The report's notes say when this happened.
    """
    return decompose_with_report(model, scheme, criterion, layers, input_shape, exclude=exclude,
                                 example_inputs=example_inputs, round_to=round_to, calibration=calibration,
                                 calibration_samples=calibration_samples,
                                 calibration_weighting=calibration_weighting,
                                 calibration_sequential=calibration_sequential,
                                 calibration_batchnorm=calibration_batchnorm).model


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


def fit_criterion(
    model: nn.Module,
    scheme: str,
    make_criterion: Callable[[float], RankCriterion],
    budget: int,
    input_shape: Optional[Sequence[int]] = None,
    convs_only: bool = False,
    lo: float = 0.0,
    hi: float = 1.0,
    steps: int = 14,
    layers: LayerSelector = None,
    exclude: Sequence[str] = (),
    *,
    example_inputs: Optional[ExampleInputs] = None,
) -> tuple[float, nn.Module]:
    """The largest ``t`` in ``(lo, hi)`` (by bisection) whose ``make_criterion(t)`` split has MACs <= ``budget``.

    For a criterion that keeps more as ``t`` grows (``Energy``, ``Ratio``). Returns ``t`` and
    the decomposed model; when even ``t`` near ``lo`` misses the budget, that smallest split.
    MACs are counted on ``input_shape`` or ``example_inputs``.
    """
    model = unwrap(model)
    inputs = model_inputs(model, input_shape, example_inputs)
    best: Optional[tuple[float, nn.Module]] = None
    low, high = lo, hi
    for _ in range(steps):
        t = (low + high) / 2
        compact = decompose(model, scheme, make_criterion(t), layers, input_shape, exclude=exclude,
                            example_inputs=example_inputs)
        if count_macs(compact, inputs, convs_only=convs_only) <= budget:
            best, low = (t, compact), t
        else:
            high = t
    if best is None:  # even the smallest ranks miss the budget: return those
        t = lo + (hi - lo) * 1e-6
        return t, decompose(model, scheme, make_criterion(t), layers, input_shape, exclude=exclude,
                            example_inputs=example_inputs)
    return best


def recipe_of(model: nn.Module) -> dict[str, dict[str, object]]:
    """``{layer name: {"scheme": ..., "rank": ...}}`` for every factorized layer of ``model``."""
    return {
        name: {"scheme": m.scheme, "rank": int(m.rank)}
        for name, m in model.named_modules()
        if isinstance(m, LowRank)
    }


def convert_recipe_attention(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Rebuild (in place) each ``nn.MultiheadAttention`` whose projections ``recipe`` splits, as decompose does."""
    modules = dict(model.named_modules())
    attention = {str(name).rpartition(".")[0] for name in recipe} & {
        n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    if attention:  # split projections live in the attention module decompose builds
        for name in attention:
            set_module(model, name, SplitMultiheadAttention(modules[name]))
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_recipe(model: nn.Module, recipe: dict[str, Any], source: object = "recipe") -> None:
    """Check every entry of ``recipe`` against ``model`` without building anything.

    Each layer must exist and be one trp splits, each entry a mapping with a known
    ``scheme`` and an integer ``rank`` between 1 and the layer's maximum rank under it.
    """
    convert_recipe_attention(model, recipe)
    modules = dict(model.named_modules())
    for name, entry in recipe.items():
        field = f"recipe[{_short(name)}]"
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"{source}: {field} splits a layer this model lacks: build the same architecture "
                "(model name, input channels, classes) the file was saved from"
            )
        if not is_candidate(module):
            raise ValueError(f"{source}: {field} splits a {type(module).__name__}, which trp does not split")
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: {field} must be a mapping {{scheme, rank}}, got {_short(entry)}")
        unknown = sorted(str(k) for k in entry if k not in ("scheme", "rank"))
        if unknown:
            raise ValueError(f"{source}: {field} has unknown key(s) {_short(unknown)}; known: rank, scheme")
        scheme = entry.get("scheme")
        if not isinstance(scheme, str):
            raise ValueError(f"{source}: {field}.scheme must be a scheme name, got {_short(scheme)}")
        if scheme not in SCHEMES and scheme != "linear":  # a Linear layer's entry says "linear"
            raise ValueError(f"{source}: {field}.scheme: unknown scheme {_short(scheme)}: trp writes linear, "
                             f"{', '.join(sorted(SCHEMES))}; the file is corrupt or crafted")
        reason = split_reason(module, scheme)
        if reason is not None:
            raise ValueError(f"{source}: {field} splits a layer trp does not split with scheme {scheme!r}: {reason}")
        try:
            sch = scheme_for(module, scheme)
        except ValueError as err:
            raise ValueError(f"{source}: {field}.scheme: {err}") from None
        rank = entry.get("rank")
        max_rank = sch.max_rank(module)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(
                f"{source}: {field}.rank must be an integer from 1 to {max_rank} (the layer's maximum "
                f"rank under scheme {scheme!r}), got {_short(rank)}"
            )


def apply_recipe(model: nn.Module, recipe: dict[str, Any], source: object = "recipe") -> nn.Module:
    """Give ``model`` (in place) the factorized structure ``recipe`` describes; weights unset.

    The whole recipe is checked first (:func:`check_recipe`; ``source`` names it in errors).
    """
    check_recipe(model, recipe, source)  # also rebuilds the attention modules the recipe splits
    modules = dict(model.named_modules())
    for name, entry in recipe.items():
        set_module(model, name, scheme_for(modules[name], entry["scheme"]).build(modules[name], entry["rank"]))
    return model
