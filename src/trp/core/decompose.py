"""Split selected layers of a model into two thin layers by truncated SVD."""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from torch import Tensor, nn

from .allocation import LayerSpectrum, WholeModelCriterion
from .counting import MacCount, count_macs, mac_breakdown, probe_forward
from .criteria import Criterion, Energy
from .inputs import ExampleInputs, inputs_given, model_inputs
from .layers import LayerSelector, select_layers, set_module
from .schemes import LowRank, get_scheme, scheme_for
from .svd import checked_svd
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
]

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

    @property
    def factorized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "factorized"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]


def trace_sizes(
    model: nn.Module,
    modules: Sequence[nn.Module],
    input_shape: Optional[Sequence[int]] = None,
    *,
    example_inputs: Optional[ExampleInputs] = None,
) -> dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]]:
    """Per-sample ``(out_hw, in_hw)`` of each module for one forward pass on the given inputs.

    For a Linear, ``out_hw`` is ``(positions, 1)``: how many vectors it is applied to.
    """
    sizes: dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            sizes[module] = ((output.shape[-2], output.shape[-1]), (x.shape[-2], x.shape[-1]))
        else:
            batch = x.shape[0] if x.ndim > 1 else 1
            positions = output.numel() // (module.out_features * batch)
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


def decompose_with_report(
    model: nn.Module,
    scheme: str = "channel",
    criterion: Optional[RankCriterion] = None,
    layers: LayerSelector = None,
    input_shape: Optional[Sequence[int]] = None,
    *,
    example_inputs: Optional[ExampleInputs] = None,
) -> Decomposition:
    """Like :func:`decompose`, also returning what happened to each selected layer.

    With inputs, the report also holds the MACs before and after (:class:`~trp.core.counting.MacCount`).
    """
    get_scheme(scheme)  # unknown scheme -> ValueError before any work
    criterion = Energy(0.9) if criterion is None else criterion
    if not callable(criterion):
        raise ValueError(f"criterion must be a rank criterion such as trp.Energy(0.9), got {criterion!r}")
    has_inputs = inputs_given(input_shape, example_inputs)
    new = copy.deepcopy(unwrap(model))
    inputs = model_inputs(new, input_shape, example_inputs) if has_inputs else None
    targets, skipped = select_layers(new, layers)
    report = Decomposition(new)
    for name, reason in skipped:
        report.layers.append(LayerReport(name, scheme, "skipped", reason=reason))
    if not targets:
        what = "the default selection (convs except the first and 1×1, linears except the last)" \
            if layers is None else "`layers`"
        raise ValueError(
            f"nothing to decompose: {what} matched no factorizable Conv2d/Linear layer"
            + (f" ({len(skipped)} skipped: {skipped[0][1]})" if skipped else "")
            + ". Pass layers=[names] or a predicate to choose layers explicitly."
        )
    whole = isinstance(criterion, WholeModelCriterion)
    if whole and criterion.needs_input_shape and inputs is None:
        raise ValueError(
            f"{criterion!r} counts the model's MACs: pass input_shape=(1, C, H, W) or example_inputs"
        )
    sizes = trace_sizes(new, [m for _, m in targets], inputs) if inputs is not None else {}
    if inputs is not None:
        report.macs_before = mac_breakdown(new, inputs)

    # Pass 1: spectra and MAC costs of every target.
    entries = []
    for name, module in targets:
        sch = scheme_for(module, scheme)
        u, s, vh = checked_svd(sch.to_matrix(module.weight.detach()), f"layer {name!r}")
        out_hw, in_hw = sizes.get(module) or sch.nominal_sizes(module)
        entries.append((name, module, sch, (u, s, vh), out_hw, in_hw))

    # Pass 2: ranks, per layer or for the whole model at once.
    if whole:
        convs_only = getattr(criterion, "convs_only", False)
        counted = [e for e in entries if not (convs_only and not isinstance(e[1], nn.Conv2d))]
        spectra = [
            LayerSpectrum(name, svd[1], *_layer_costs(sch, module, out_hw, in_hw, report.macs_before, name, inputs))
            for name, module, sch, svd, out_hw, in_hw in counted
        ]
        fixed = 0
        if report.macs_before is not None:
            # Budgets are of the whole model: everything outside the counted layers is fixed.
            before = report.macs_before
            whole_count = before.total if not convs_only else sum(
                c for n, c in before.layers.items() if isinstance(new.get_submodule(n), nn.Conv2d))
            fixed = whole_count - sum(sp.dense_macs for sp in spectra)
        ranks = criterion.allocate(spectra, fixed)
        # With convs_only, linears are outside the budget: they keep full rank (stay dense).
        counted_names = {sp.name for sp in spectra}
        ranks.update({e[0]: int(e[3][1].shape[-1]) for e in entries if e[0] not in counted_names})
    else:
        ranks = {name: _kept_rank(criterion, svd[1]) for name, _, _, svd, _, _ in entries}

    # Pass 3: factorize where MACs drop.
    for name, module, sch, (u, s, vh), out_hw, in_hw in entries:
        max_rank = s.shape[-1]
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
        if after < before:
            set_module(new, name, sch.factorize(module, u, s, vh, rank))
            entry.status = "factorized"
        else:
            entry.reason = f"rank {rank}/{max_rank} would not reduce MACs"
            entry.macs_after = before
        report.layers.append(entry)

    if inputs is not None:
        report.macs_after = mac_breakdown(new, inputs)
    if skipped:
        warnings.warn(
            f"trp.decompose left {len(skipped)} selected layer(s) dense: "
            + "; ".join(f"{n} ({r})" for n, r in skipped),
            stacklevel=2,
        )
    return report


def decompose(
    model: nn.Module,
    scheme: str = "channel",
    criterion: Optional[RankCriterion] = None,
    layers: LayerSelector = None,
    input_shape: Optional[Sequence[int]] = None,
    *,
    example_inputs: Optional[ExampleInputs] = None,
) -> nn.Module:
    """A copy of ``model`` with each selected layer whose MACs would drop split in two.

    ``scheme`` is ``"channel"``, ``"spatial"`` or ``"decouple"`` for convs; Linear layers are split
    ``in→r→out`` under any scheme. ``criterion`` (default ``Energy(0.9)``) picks each
    layer's rank from its spectrum, or, for a whole-model criterion such as
    ``TargetSpeedup(3.0)`` (:mod:`trp.core.allocation`), all ranks at once. ``layers`` is None (see :mod:`trp.core.layers`), a list of
    module names, or a predicate ``(name, module) -> bool``. ``input_shape`` (float zeros)
    or ``example_inputs`` (a tensor, a tuple of tensors, or a dict of tensors such as
    ``{"input_ids": ids}``) make the MAC comparison exact (it matters for the spatial
    scheme); without them costs are per output pixel. The input model is not modified; a
    DistributedDataParallel, DataParallel or ``torch.compile`` wrapper is removed (the
    result is the plain model inside, decomposed).
    """
    return decompose_with_report(model, scheme, criterion, layers, input_shape, example_inputs=example_inputs).model


def _layer_costs(sch, module: nn.Module, out_hw, in_hw, counted: Optional[MacCount], name: str, inputs):
    """``(dense MACs, MACs at rank r)`` of a target for one forward pass on the inputs.

    The scheme gives per-sample costs of one call; they are scaled to what the layer
    really costs in the pass (batch, and every call of a layer used twice) from the
    per-layer figures; a layer those do not cover is scaled by the batch size.
    """
    per_sample = sch.macs(module, None, out_hw, in_hw)
    if counted is None:
        return per_sample, functools.partial(sch.macs, module, out_hw=out_hw, in_hw=in_hw)
    total = counted.layers.get(name)
    if total is None:
        total = per_sample * inputs.batch_size

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
        compact = decompose(model, scheme, make_criterion(t), input_shape=inputs)
        if count_macs(compact, inputs, convs_only=convs_only) <= budget:
            best, low = (t, compact), t
        else:
            high = t
    if best is None:  # even the smallest ranks miss the budget: return those
        t = lo + (hi - lo) * 1e-6
        return t, decompose(model, scheme, make_criterion(t), input_shape=inputs)
    return best


def recipe_of(model: nn.Module) -> dict[str, dict[str, object]]:
    """``{layer name: {"scheme": ..., "rank": ...}}`` for every factorized layer of ``model``."""
    return {
        name: {"scheme": m.scheme, "rank": int(m.rank)}
        for name, m in model.named_modules()
        if isinstance(m, LowRank)
    }


def apply_recipe(model: nn.Module, recipe: dict[str, dict[str, object]]) -> nn.Module:
    """Give ``model`` (in place) the factorized structure ``recipe`` describes; weights unset."""
    modules = dict(model.named_modules())
    for name, entry in recipe.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"the recipe splits layer {name!r}, which this model lacks: build the same "
                "architecture (model name, input channels, classes) the checkpoint was saved from"
            )
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"the recipe splits layer {name!r}, but it is a {type(module).__name__}")
        rank = entry.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"the recipe gives layer {name!r} an invalid rank {rank!r}")
        sch = scheme_for(module, str(entry.get("scheme")))
        set_module(model, name, sch.build(module, rank))
    return model
