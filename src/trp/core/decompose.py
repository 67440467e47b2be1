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

The record types live in :mod:`trp.core.report`, the per-layer planning helpers (sizes, MAC
costs, kept ranks) in :mod:`trp.core.planning`, the checks of the split in :mod:`trp.core.verify`
and the recipes a saved split model replays in :mod:`trp.core.recipe`; their public names are
importable from here as before. :func:`decompose_with_report` stays one function: its three
passes (spectra, ranks, split and check) share their intermediate state, which is why this module
is a little over 450 lines.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ._util import is_whole_model
from .allocation import LayerSpectrum, check_round_to, prepare_criterion, round_rank
from .attention import convert_attention, restore_attention
from .bn_stats import refit_batchnorm
from .calibration import (DEFAULT_SAMPLES, CalibratedFactors, collect_statistics, forward_groups, layer_factors,
                          output_gains, read_batches, refuse_scheme)
from .counting import count_macs, mac_breakdown
from .criteria import Energy
from .equivalents import check_standard, standard_form
from .fidelity import compare_outputs, measure_fidelity, warn_fidelity
from .inputs import ExampleInputs, inputs_given, model_inputs
from .layers import LayerSelector, set_module, summarize_skipped
from .planning import (LayerProgress, RankCriterion, _as_example, _discarded, _kept_rank, _layer_costs,
                       trace_sizes)
from .recipe import apply_recipe, check_recipe, convert_recipe_attention, recipe_of
from .report import Decomposition, LayerReport
from .safety import record_layer_inputs, split_targets
from .schemes import LowRank, get_scheme, scheme_for
from .targets import effective_weight
from .topspectra import LayerMatrix, allocate_leading, leading_svd
from .verify import (VERIFY_MAX_ELEMENTS, _check, _fast_path_attention, _runs_in_train_mode, _unshare,
                     _verification_inputs, _verification_shape)
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
    "RankCriterion",
    "VERIFY_MAX_ELEMENTS",
]

_log = logging.getLogger("trp.decompose")


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
    whole = is_whole_model(criterion)
    if not (callable(criterion) or whole):
        raise ValueError(f"criterion must be a rank criterion such as trp.Energy(0.9), got {criterion!r}")
    check_round_to(round_to)
    if round_to > 1 and whole:
        raise ValueError(
            f"round_to applies to per-layer criteria; a whole-model criterion keeps its budget only when it "
            f"rounds itself: pass round_to={round_to} to the criterion (e.g. TargetMACs(x, round_to={round_to}))"
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
    if whole and getattr(criterion, "needs_input_shape", True) and inputs is None:
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
        given = inputs.materialized(model) if example_inputs is not None and inputs is not None else None
        prepare_criterion(criterion, model, scheme, layers, input_shape, given)
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
        note = refit_batchnorm(dense_model, new, calib.fit, calib.held if calib.held_out else None)
        if note:
            report.notes.append(note)
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


_WEIGHTINGS = ("sensitivity", "absolute", "normalized")
_GAIN_ROUNDS = 2
_GAIN_TRUNCATE = False  # True: re-measure gains with the truncation error itself (measured worse on MiniLM: 0.872 vs 0.881)


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
    ``TargetMACs(3.0)`` (:mod:`trp.core.allocation`), all ranks at once. ``layers`` is None
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
    outputs lose some variance and mean, and kept if the held-out calibration batches measure a
    lower output error with them; ``calibration_batchnorm=False`` keeps the trained statistics.
    The report's notes say which happened.
    """
    return decompose_with_report(model, scheme, criterion, layers, input_shape, exclude=exclude,
                                 example_inputs=example_inputs, round_to=round_to, calibration=calibration,
                                 calibration_samples=calibration_samples,
                                 calibration_weighting=calibration_weighting,
                                 calibration_sequential=calibration_sequential,
                                 calibration_batchnorm=calibration_batchnorm).model


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


