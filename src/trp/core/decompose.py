"""Split selected layers of a model into two thin layers by truncated SVD."""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from torch import Tensor, nn

from .allocation import LayerSpectrum, WholeModelCriterion, check_round_to, round_rank
from .counting import count_macs, probe_forward
from .criteria import Criterion, Energy
from .layers import LayerSelector, select_layers, set_module
from .schemes import LowRank, get_scheme, scheme_for
from .svd import checked_svd

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

    @property
    def factorized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "factorized"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]


def trace_sizes(
    model: nn.Module, modules: Sequence[nn.Module], input_shape: Sequence[int]
) -> dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]]:
    """Per-sample ``(out_hw, in_hw)`` of each module for one forward pass at ``input_shape``.

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

    probe_forward(model, input_shape, {m: hook for m in modules})
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
    round_to: int = 1,
) -> Decomposition:
    """Like :func:`decompose`, also returning what happened to each selected layer."""
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
    new = copy.deepcopy(model)
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
    if whole and criterion.needs_input_shape and input_shape is None:
        raise ValueError(f"{criterion!r} counts the model's MACs: pass input_shape=(1, C, H, W)")
    sizes = trace_sizes(new, [m for _, m in targets], input_shape) if input_shape else {}
    if whole:
        criterion.prepare(model, scheme, layers, input_shape)

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
            LayerSpectrum(name, svd[1], sch.macs(module, None, out_hw, in_hw),
                          functools.partial(sch.macs, module, out_hw=out_hw, in_hw=in_hw))
            for name, module, sch, svd, out_hw, in_hw in counted
        ]
        fixed = 0
        if input_shape is not None:
            fixed = count_macs(new, input_shape, convs_only=convs_only) - sum(sp.dense_macs for sp in spectra)
        ranks = criterion.allocate(spectra, fixed)
        # With convs_only, linears are outside the budget: they keep full rank (stay dense).
        counted_names = {sp.name for sp in spectra}
        ranks.update({e[0]: int(e[3][1].shape[-1]) for e in entries if e[0] not in counted_names})
    else:
        ranks = {}
        for name, module, sch, svd, out_hw, in_hw in entries:
            rank = _kept_rank(criterion, svd[1])
            if round_to > 1:
                rank = round_rank(rank, round_to, int(svd[1].shape[-1]),
                                  functools.partial(sch.macs, module, out_hw=out_hw, in_hw=in_hw),
                                  sch.macs(module, None, out_hw, in_hw))
            ranks[name] = rank

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
    round_to: int = 1,
) -> nn.Module:
    """A copy of ``model`` with each selected layer whose MACs would drop split in two.

    ``scheme`` is ``"channel"``, ``"spatial"`` or ``"decouple"`` for convs; Linear layers are split
    ``in→r→out`` under any scheme. ``criterion`` (default ``Energy(0.9)``) picks each
    layer's rank from its spectrum, or, for a whole-model criterion such as
    ``TargetSpeedup(3.0)`` (:mod:`trp.core.allocation`), all ranks at once. ``layers`` is None (see :mod:`trp.core.layers`), a list of
    module names, or a predicate ``(name, module) -> bool``. ``input_shape`` makes the
    MAC comparison exact (it matters for the spatial scheme); without it costs are per
    output pixel. ``round_to=k`` rounds a per-layer criterion's ranks up to multiples of ``k``
    where that keeps the split cheaper than the dense layer (whole-model criteria take their own
    ``round_to``). The input model is not modified.
    """
    return decompose_with_report(model, scheme, criterion, layers, input_shape, round_to).model


def fit_criterion(
    model: nn.Module,
    scheme: str,
    make_criterion: Callable[[float], RankCriterion],
    budget: int,
    input_shape: Sequence[int],
    convs_only: bool = False,
    lo: float = 0.0,
    hi: float = 1.0,
    steps: int = 14,
) -> tuple[float, nn.Module]:
    """The largest ``t`` in ``(lo, hi)`` (by bisection) whose ``make_criterion(t)`` split has MACs <= ``budget``.

    For a criterion that keeps more as ``t`` grows (``Energy``, ``Ratio``). Returns ``t`` and
    the decomposed model; when even ``t`` near ``lo`` misses the budget, that smallest split.
    """
    best: Optional[tuple[float, nn.Module]] = None
    low, high = lo, hi
    for _ in range(steps):
        t = (low + high) / 2
        compact = decompose(model, scheme, make_criterion(t), input_shape=input_shape)
        if count_macs(compact, input_shape, convs_only=convs_only) <= budget:
            best, low = (t, compact), t
        else:
            high = t
    if best is None:  # even the smallest ranks miss the budget: return those
        t = lo + (hi - lo) * 1e-6
        return t, decompose(model, scheme, make_criterion(t), input_shape=input_shape)
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
