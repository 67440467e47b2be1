"""Whole-model rank criteria: choose every layer's rank at once, from all spectra and MAC costs.

A per-layer criterion (:class:`trp.Energy`, ...) sees one spectrum at a time. The
criteria here see every selected layer together, as :class:`LayerSpectrum` records,
and return a rank per layer; :func:`trp.decompose` accepts both kinds.

- :class:`TargetMACs` ``(x)``: the model's MACs drop by at least ``x`` (and barely more: a MAC
  reduction of ``x``, not measured time), keeping as much spectral energy as possible.
  ``TargetSpeedup`` is its deprecated former name (the same class; it warns once).
- :class:`Global` ``(drop=p | mac_reduction=x)``: LoRITa's global selection: each layer's
  singular values divided by its largest, pooled over layers, the smallest fraction dropped.
- :class:`LayerRanks` ``({name: rank})``: ranks given by hand or by a search.

Spectra of batched matrix views (the decouple scheme: one matrix per filter) are pooled
per rank index: ``σ_i = sqrt(Σ_filters σ_{f,i}²)``, since one rank serves every filter.
"""

from __future__ import annotations

import inspect
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ._util import WARNED, check_number, warn_deprecated
from .inputs import ModelInputs

__all__ = [
    "LayerSpectrum", "layer_worth", "WholeModelCriterion", "TargetMACs", "Global", "LayerRanks", "pooled_spectrum",
    "check_round_to", "round_rank", "break_even_rank",
]


@dataclass
class LayerSpectrum:
    """One selected layer as a whole-model criterion sees it.

    ``macs(r)`` is the factorized layer's MACs at rank ``r``; the layer stays dense (and
    costs ``dense_macs``) when that is not lower.
    """

    name: str
    sigma: Tensor  # descending, shape (k,) or (..., k) for batched views
    dense_macs: int
    macs: Callable[[int], int]
    #: None: the spectrum is compared across layers as fractions of the layer's own energy (plain
    #: SVD). A number: the squared values times ``scale`` are already comparable across layers
    #: (calibrated errors weighted by their effect on the model's output, :mod:`trp.core.calibration`).
    scale: Optional[float] = None

    @property
    def max_rank(self) -> int:
        return int(self.sigma.shape[-1])

    def cost(self, rank: int) -> int:
        """MACs of the layer when the criterion gives it ``rank``."""
        return min(self.macs(rank), self.dense_macs)


def layer_worth(layer: LayerSpectrum) -> Tensor:
    """What each rank index of ``layer`` is worth, comparable across layers (float64, shape ``(k,)``).

    The share of the layer's energy (plain spectra), or the squared value times ``layer.scale``
    (calibrated spectra: the output error the index removes, weighted by its effect on the model output).
    """
    energy = pooled_spectrum(layer.sigma).square()
    if layer.scale is not None:
        return energy * float(layer.scale)
    total = energy.sum()
    return energy / total if total > 0 else torch.zeros_like(energy)


def pooled_spectrum(sigma: Tensor, keep: int = 0) -> Tensor:
    """Pool a batch of spectra ``(..., k)`` per index: root of the summed squares.

    The first ``keep`` dimensions are kept (e.g. ``keep=1`` for a stack of layers), so the
    result has shape ``sigma.shape[:keep] + (k,)``, in float64.
    """
    sigma = sigma.detach().double()
    if sigma.ndim == keep + 1:
        return sigma
    return sigma.square().flatten(keep, -2).sum(keep).sqrt()


def prepare_criterion(criterion: Any, model: nn.Module, scheme: str, layers: Any,
                      input_shape: Optional[Sequence[int]], example_inputs: Optional[ModelInputs] = None) -> None:
    """Call a whole-model criterion's ``prepare`` (if it has one) with the model about to be split.

    A ``prepare`` written before ``example_inputs`` was passed (four parameters) is called without
    it, with a DeprecationWarning (once per class) asking for the parameter.
    """
    prepare = getattr(criterion, "prepare", None)
    if not callable(prepare):
        return
    if _takes_keyword(prepare, "example_inputs"):
        prepare(model, scheme, layers, input_shape, example_inputs=example_inputs)
        return
    name = f"{type(criterion).__qualname__}.prepare"
    if name not in WARNED:
        WARNED.add(name)
        warnings.warn(f"{name}(model, scheme, layers, input_shape) is deprecated: add the parameter "
                      "example_inputs=None (the caller's example inputs, or None when only input_shape was given)",
                      DeprecationWarning, stacklevel=3)
    prepare(model, scheme, layers, input_shape)


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume the current form
        return True
    return any(p.name == name and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in params)


class WholeModelCriterion(ABC):
    """Base class: :meth:`allocate` maps all layers' spectra to one rank per layer."""

    #: whether :meth:`allocate` needs real MAC counts (``decompose(..., input_shape=...)`` or ``example_inputs``)
    needs_input_shape: bool = False

    def prepare(self, model: nn.Module, scheme: str, layers: Any, input_shape: Optional[Sequence[int]],
                example_inputs: Optional[ModelInputs] = None) -> None:
        """Called by :func:`trp.decompose` with the model about to be split, before :meth:`allocate`.

        ``example_inputs`` are the caller's example inputs (None when only ``input_shape`` was given).
        A criterion that must measure the model (e.g. its latency) does so here; by default nothing.
        """

    @abstractmethod
    def allocate(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> dict[str, int]:
        """Rank per layer name; ``fixed_macs`` are the MACs of everything not in ``layers``."""

    @abstractmethod
    def spec(self) -> str:
        """The criterion as a CLI string, e.g. ``macs:3``."""

    def leading_needed(self, layer: LayerSpectrum, rank: int) -> Optional[int]:
        """How many leading singular values of ``layer`` must be exact for :meth:`allocate`'s ``rank``
        to be its choice, whatever the rest of the spectrum; None (the default): all of them.

        A criterion that answers lets :func:`trp.decompose` compute only the top of a large
        layer's spectrum (the rest stands in as equal values carrying the remaining energy).
        """
        return None

    def leading_bound(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> Optional[dict[str, int]]:
        """Per layer, the most leading singular values :meth:`leading_needed` can ask for; None: unknown."""
        return None

    def __call__(self, sigma: Tensor) -> int:
        raise TypeError(f"{self!r} chooses ranks for the whole model; pass it to trp.decompose")


def break_even_rank(layer: LayerSpectrum) -> int:
    """The smallest rank at which the split costs at least the dense layer (``max_rank + 1`` if none)."""
    lo, hi = 1, layer.max_rank + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if layer.macs(mid) >= layer.dense_macs:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _total(layers: Sequence[LayerSpectrum], ranks: Sequence[int], fixed: int) -> int:
    return fixed + sum(layer.cost(r) for layer, r in zip(layers, ranks))


def _dense_total(layers: Sequence[LayerSpectrum], fixed: int) -> int:
    return fixed + sum(layer.dense_macs for layer in layers)


def _unreachable(what: str, layers: Sequence[LayerSpectrum], fixed: int, k: int = 1) -> ValueError:
    dense = _dense_total(layers, fixed)
    lowest = _total(layers, [min(k, layer.max_rank) for layer in layers], fixed)
    outside = fixed / dense if dense else 0.0
    return ValueError(
        f"{what} cannot be reached: rank {k} in every selected layer gives only {dense / max(lowest, 1):.2f}x "
        f"fewer MACs, because {outside:.0%} of the model's {dense:,} MACs are outside the selected layers "
        "(layers not selected, e.g. the first conv and the last linear by default; layers trp cannot "
        "split; attention matmuls and other products outside layers), and those stay; "
        "lower the target or select more layers with layers=..."
    )


class TargetMACs(WholeModelCriterion):
    """Ranks that cut the model's MACs by at least ``x``, keeping the most spectral energy.

    The MAC reduction is of the whole model by the full count (:func:`trp.count_macs`:
    every matmul, conv and attention product); what lies outside the selected layers is a
    fixed cost the reduction has to carry.

    Each layer's squared singular values are taken as fractions of the layer's energy;
    singular values are kept best energy-per-MAC first while the model fits the budget
    ``MACs(dense) / x`` (the greedy solution of "keep the most energy within the MAC
    budget"), so the MACs land just under the budget even when the weights are exactly
    low rank. ``convs_only`` counts conv
    MACs only, as the paper does. ``round_to=k`` keeps ranks that are multiples of ``k``
    (or a layer's full rank), which runtimes often run faster. Needs
    ``decompose(..., input_shape=...)`` or ``example_inputs``.
    """

    needs_input_shape = True

    def __init__(self, x: float, convs_only: bool = False, round_to: int = 1) -> None:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 1.0:
            raise ValueError(f"TargetMACs: x must be a number > 1 (a MAC reduction factor), got {x!r}")
        self.x = float(x)
        self.convs_only = convs_only
        self.round_to = check_round_to(round_to)

    def partway(self, fraction: float) -> "TargetMACs":
        """The target ``fraction`` of the way from no reduction to ``x``: the MACs cut grow linearly.

        The budget keeps ``1 - fraction·(1 - 1/x)`` of the dense MACs (``fraction`` 1: this target;
        0: the dense count, the least reduction a criterion can ask for). TRP's ``ramp`` uses it.
        """
        check_number("fraction", fraction, 0.0, 1.0)
        kept = 1.0 - fraction * (1.0 - 1.0 / self.x)
        return TargetMACs(max(1.0 / kept, 1.0 + 1e-9), self.convs_only, self.round_to)

    def allocate(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> dict[str, int]:
        dense = _dense_total(layers, fixed_macs)
        budget = dense / self.x
        k = self.round_to
        ranks = [min(k, layer.max_rank) for layer in layers]
        total = _total(layers, ranks, fixed_macs)
        if total > budget:
            raise _unreachable(f"TargetMACs({self.x:g})", layers, fixed_macs, k)
        # Every block of k singular values beyond the first block of each layer is an item worth its
        # share of the layer's energy per MAC; take items best first while they fit. Within a layer the
        # worth never rises with the index, so each layer keeps a prefix; ties (exact zeros of
        # an already low-rank weight) are taken in index order, so the budget is filled.
        items = []
        for li, layer in enumerate(layers):
            share = layer_worth(layer).tolist()
            per_rank = max(layer.macs(2) - layer.macs(1), 1)
            for start in range(ranks[li], len(share), k):
                stop = min(start + k, len(share))
                items.append((-sum(share[start:stop]) / ((stop - start) * per_rank), start, li, stop))
        items.sort()
        closed: set[int] = set()
        for _, _, li, stop in items:
            if li in closed:
                continue
            layer = layers[li]
            step = layer.cost(stop) - layer.cost(ranks[li])
            if total + step <= budget:
                ranks[li] = stop
                total += step
            else:
                closed.add(li)  # its later items cannot be taken without this one
        return {layer.name: r for layer, r in zip(layers, ranks)}

    def leading_needed(self, layer: LayerSpectrum, rank: int) -> Optional[int]:
        # Layers keep prefixes; a layer below full rank was stopped by the item after its rank,
        # one at full rank took the item that crossed its break-even rank (later items cost
        # nothing). Tail items rank behind those, so only the values up to them matter.
        k, m = self.round_to, layer.max_rank
        if rank < m:
            return min(rank + k, m)
        return min(-(-break_even_rank(layer) // k) * k, m)

    def leading_bound(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> Optional[dict[str, int]]:
        budget = _dense_total(layers, fixed_macs) / self.x
        k = self.round_to
        floor = [layer.cost(min(k, layer.max_rank)) for layer in layers]
        if fixed_macs + sum(floor) > budget:
            return None  # unreachable: allocate says so
        bounds = {}
        for layer, own in zip(layers, floor):
            room = budget - (fixed_macs + sum(floor) - own)
            lo, hi = min(k, layer.max_rank), layer.max_rank  # the largest affordable rank
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if layer.cost(mid) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            # No allocation gives the layer more than rank lo; below full rank it needs lo + k values.
            bounds[layer.name] = self.leading_needed(layer, lo) if lo == layer.max_rank else min(lo + k, layer.max_rank)
        return bounds

    def spec(self) -> str:
        return f"macs:{self.x:g}" + (":convs" if self.convs_only else "")

    def __repr__(self) -> str:
        extra = (", convs_only=True" if self.convs_only else "") + (f", round_to={self.round_to}" if self.round_to > 1 else "")
        return f"TargetMACs({self.x:g}{extra})"


def check_round_to(k: Any) -> int:
    """``k`` when it is a valid rank multiple (an integer >= 1), else ValueError."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"round_to must be an integer >= 1 (ranks become multiples of it), got {k!r}")
    return k


def round_rank(rank: int, k: int, max_rank: int, cost: Optional[Callable[[int], int]] = None,
               dense_cost: Optional[int] = None) -> int:
    """``rank`` rounded up to a multiple of ``k`` (at most ``max_rank``), unless that costs the dense MACs or more."""
    rounded = min(max_rank, -(-rank // k) * k)
    if cost is not None and dense_cost is not None and cost(rounded) >= dense_cost and cost(rank) < dense_cost:
        return rank
    return rounded


class Global(WholeModelCriterion):
    """LoRITa's global selection: drop the smallest fraction of all normalized singular values.

    Each layer's spectrum is divided by its largest value; the pooled values below the
    ``drop`` quantile are removed (every layer keeps at least one). Alternatively give
    ``mac_reduction=x``: the smallest ``drop`` whose MACs are at least ``x`` times lower (needs
    ``decompose(..., input_shape=...)``; ``speedup=x`` is its deprecated name).
    """

    def __init__(self, drop: Optional[float] = None, mac_reduction: Optional[float] = None, convs_only: bool = False,
                 *, speedup: Optional[float] = None) -> None:
        if speedup is not None:
            warn_deprecated("Global(speedup=x)", "Global(mac_reduction=x)")
            if mac_reduction is not None:
                raise ValueError("Global: give mac_reduction (speedup is its deprecated name), not both")
            mac_reduction = speedup
        if (drop is None) == (mac_reduction is None):
            raise ValueError("Global: give exactly one of drop (a fraction in [0, 1)) or mac_reduction (> 1)")
        if drop is not None and not (isinstance(drop, (int, float)) and 0.0 <= drop < 1.0):
            raise ValueError(f"Global: drop must lie in [0, 1), got {drop!r}")
        if mac_reduction is not None and not (isinstance(mac_reduction, (int, float)) and math.isfinite(mac_reduction)
                                              and mac_reduction > 1.0):
            raise ValueError(f"Global: mac_reduction must be a number > 1 (a MAC reduction factor), got {mac_reduction!r}")
        self.drop = drop
        self.mac_reduction = mac_reduction
        self.convs_only = convs_only
        self.needs_input_shape = mac_reduction is not None

    @property
    def speedup(self) -> Optional[float]:
        """Deprecated name of :attr:`mac_reduction`."""
        warn_deprecated("Global.speedup", "Global.mac_reduction")
        return self.mac_reduction

    @staticmethod
    def _drop_order(normalized: list[Tensor]) -> list[int]:
        """Layer index of each pooled value, smallest value first (ties: highest index first)."""
        order = sorted((float(v), -i, li) for li, s in enumerate(normalized) for i, v in enumerate(s.tolist()))
        return [li for _, _, li in order]

    @staticmethod
    def _ranks(normalized: list[Tensor], order: list[int], n_drop: int) -> list[int]:
        """Ranks after dropping the ``n_drop`` first values of ``order``."""
        dropped = [0] * len(normalized)
        for li in order[:max(n_drop, 0)]:
            dropped[li] += 1
        return [max(1, s.numel() - d) for s, d in zip(normalized, dropped)]

    def allocate(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> dict[str, int]:
        normalized = []
        for layer in layers:
            s = pooled_spectrum(layer.sigma)
            if layer.scale is not None:  # calibrated: values already comparable across layers
                normalized.append(s * math.sqrt(float(layer.scale)))
            else:
                normalized.append(s / s[0] if s[0] > 0 else torch.zeros_like(s))
        total = sum(s.numel() for s in normalized)
        order = self._drop_order(normalized)
        if self.drop is not None:
            ranks = self._ranks(normalized, order, int(math.floor(self.drop * total + 1e-9)))
        else:
            budget = _dense_total(layers, fixed_macs) / self.mac_reduction
            lowest = _total(layers, [1] * len(layers), fixed_macs)
            if lowest > budget:
                raise _unreachable(f"Global(mac_reduction={self.mac_reduction:g})", layers, fixed_macs)
            # Bisect over the number of dropped values: the fewest that meets the budget.
            lo, hi = 0, total  # dropping everything (hi) leaves rank 1 per layer, which fits
            while lo < hi:
                mid = (lo + hi) // 2
                if _total(layers, self._ranks(normalized, order, mid), fixed_macs) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            ranks = self._ranks(normalized, order, lo)
        return {layer.name: r for layer, r in zip(layers, ranks)}

    def leading_needed(self, layer: LayerSpectrum, rank: int) -> Optional[int]:
        # A layer that dropped a known value dropped its whole unknown tail too: the smallest value
        # kept anywhere is at least that dropped value, which bounds the tail. Known values are
        # exact, so the same values drop whatever the tail holds (and the budget search agrees).
        return min(rank + 1, layer.max_rank)

    def leading_bound(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> Optional[dict[str, int]]:
        return {layer.name: layer.max_rank for layer in layers}  # any layer may keep everything

    def spec(self) -> str:
        if self.drop is not None:
            return f"global:{self.drop:g}"
        return f"global-macs:{self.mac_reduction:g}" + (":convs" if self.convs_only else "")

    def __repr__(self) -> str:
        arg = f"drop={self.drop:g}" if self.drop is not None else f"mac_reduction={self.mac_reduction:g}"
        return f"Global({arg})"


class LayerRanks(WholeModelCriterion):
    """Fixed ranks by layer name; selected layers not named stay dense."""

    def __init__(self, ranks: Mapping[str, int]) -> None:
        for name, r in ranks.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"LayerRanks: rank of {name!r} must be an integer >= 1, got {r!r}")
        self.ranks = dict(ranks)

    def allocate(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> dict[str, int]:
        known = {layer.name for layer in layers}
        unknown = sorted(set(self.ranks) - known)
        if unknown:
            raise ValueError(
                f"LayerRanks names layer(s) that are not selected for decomposition: {', '.join(unknown)}; "
                f"selected: {', '.join(sorted(known))}"
            )
        return {layer.name: min(self.ranks[layer.name], layer.max_rank) for layer in layers if layer.name in self.ranks}

    def leading_needed(self, layer: LayerSpectrum, rank: int) -> Optional[int]:
        return rank  # the ranks do not depend on the spectrum

    def leading_bound(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> Optional[dict[str, int]]:
        return {layer.name: min(self.ranks.get(layer.name, 1), layer.max_rank) for layer in layers}

    def spec(self) -> str:
        return "ranks:" + ",".join(f"{n}={r}" for n, r in self.ranks.items())

    def __repr__(self) -> str:
        return f"LayerRanks({self.ranks!r})"


def __getattr__(name: str) -> Any:
    """``TargetSpeedup``: the deprecated name of :class:`TargetMACs` (the same class), warning once."""
    if name == "TargetSpeedup":
        warn_deprecated("trp.TargetSpeedup", "trp.TargetMACs")
        return TargetMACs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
