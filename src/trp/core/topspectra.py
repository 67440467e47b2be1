"""Only the leading singular values of large layers, as many as a rank criterion needs.

:func:`leading_svd`: a per-layer criterion (:class:`FixedRank`, :class:`Value`, :class:`Energy`)
looks at the top of one spectrum, grown until it decides the rank; Energy's total is
``||W||_F²``.

:func:`allocate_leading`: whole-model ranks.
A whole-model criterion that says which leading values decide its ranks
(:meth:`~trp.core.allocation.WholeModelCriterion.leading_needed`: :class:`TargetMACs`,
:class:`Global`, :class:`LayerRanks`; others get full SVDs)
sees, for a large layer, its top ``q`` singular values followed by equal values carrying the
rest of the layer's energy: the energy is ``||W||_F²`` (no SVD needed), so the known values'
shares are exact. ``q`` starts small and doubles for each layer whose rank needs more, up to
the criterion's bound (from a sixteenth of the spectrum); a ``q`` past a third of the spectrum gets the full SVD
(:func:`trp.core.svd.top_svd`). The ranks equal those from the full spectra.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import svd as _svd
from .allocation import LayerSpectrum, WholeModelCriterion
from .criteria import Energy, FixedRank, Value

__all__ = ["LayerMatrix", "padded_spectrum", "allocate_leading", "leading_svd"]

SVD = tuple[Tensor, Tensor, Tensor]
log = logging.getLogger(__name__)


def _top_needs(criterion: object, matrix: Tensor) -> Optional[tuple[int, Callable[[Tensor], bool], Callable[[Tensor], Tensor]]]:
    """For a criterion that needs only the top of a spectrum: ``(start, enough, for_rank)``, else None.

    ``enough(top)`` says whether the top singular values decide the rank; ``for_rank(top)`` is
    the spectrum to give the criterion (for Energy, the top plus one value standing for the rest).
    """
    if isinstance(criterion, FixedRank):
        return criterion.k, lambda top: top.numel() >= criterion.k, lambda top: top
    if isinstance(criterion, Value):
        return 64, lambda top: bool(top[-1] < criterion.t), lambda top: top
    if isinstance(criterion, Energy):
        scale, total = _svd.scaled_energy(matrix)  # the squared Frobenius norm of matrix / scale

        def with_rest(top: Tensor) -> Tensor:
            top = top.double() / scale
            rest = torch.tensor(total - float(top.square().sum()), dtype=torch.float64).clamp_min(0).sqrt()
            return torch.cat([top, rest.to(top.device).reshape(1)])

        return 64, lambda top: criterion(with_rest(top)) <= top.numel(), with_rest
    return None


def leading_svd(criterion: object, matrix: Tensor, what: str, start: Optional[int] = None) -> tuple[SVD, Optional[Tensor]]:
    """The SVD a layer needs under a per-layer ``criterion`` and, when truncated, the spectrum to choose its rank from.

    Matrices whose smaller side is above ``trp.core.svd.FULL_SVD_MAX`` get only the leading
    triplets the criterion needs, starting from ``start`` of them (default: the criterion's own
    guess); everything else, and a criterion of another kind, gets the full SVD (second value None).
    """
    needs = _top_needs(criterion, matrix)
    if needs is None or matrix.ndim != 2 or min(matrix.shape) <= _svd.FULL_SVD_MAX:
        return _svd.checked_svd(matrix, what), None
    first, enough, for_rank = needs
    u, s, vh = _svd.top_svd(matrix, what, enough, start=first if start is None else max(1, start))
    log.debug("%s: %d of %d singular values", what, s.shape[-1], min(matrix.shape))
    if s.shape[-1] == min(matrix.shape):  # fell back to the full SVD
        return (u, s, vh), None
    return (u, s, vh), for_rank(s)


@dataclass
class LayerMatrix:
    """One layer for :func:`allocate_leading`: its matrix view and MAC costs (as in ``LayerSpectrum``)."""

    name: str
    matrix: Tensor  # (m, n), or (..., m, n) for batched views (those always get the full SVD)
    dense_macs: int
    macs: Callable[[int], int]

    @property
    def max_rank(self) -> int:
        return int(min(self.matrix.shape[-2:]))


def padded_spectrum(top: Tensor, scale: float, total: float, max_rank: int) -> Tensor:
    """The ``top`` singular values, then equal values carrying the rest of the energy, in float64.

    ``total`` is ``||W / scale||_F²`` (:func:`trp.core.svd.scaled_energy`); the result has
    ``max_rank`` values, descending, and its squares sum to ``scale² · total``.
    """
    known = top.detach().double() / scale
    missing = max_rank - known.numel()
    if missing <= 0:
        return known * scale
    rest = max(total - float(known.square().sum()), 0.0)
    fill = min(math.sqrt(rest / missing), float(known[-1])) if known.numel() else math.sqrt(rest / missing)
    return torch.cat([known, known.new_full((missing,), fill)]) * scale


def allocate_leading(
    criterion: WholeModelCriterion,
    layers: Sequence[LayerMatrix],
    fixed_macs: int,
    *,
    full_max: Optional[int] = None,
    on_svd: Optional[Callable[[str], None]] = None,
    known: Optional[dict[str, SVD]] = None,
) -> tuple[dict[str, SVD], dict[str, int]]:
    """``(svds, ranks)``: each layer's SVD (full, or its leading part) and the criterion's ranks.

    Layers whose smaller side is at most ``full_max`` (default ``trp.core.svd.FULL_SVD_MAX``),
    batched views, and every layer of a criterion that does not implement ``leading_bound``
    get the full SVD; ``known`` gives full SVDs already computed (by name). ``on_svd(name)`` is
    called after each layer's first SVD (progress).
    """
    limit = _svd.FULL_SVD_MAX if full_max is None else full_max
    placeholders = [LayerSpectrum(m.name, torch.zeros(m.max_rank), m.dense_macs, m.macs) for m in layers]
    leading_bound = getattr(criterion, "leading_bound", None)  # optional for a duck-typed criterion
    bounds = (leading_bound(placeholders, fixed_macs) if callable(leading_bound) else None) or {}
    large = {m.name: m for m in layers if m.matrix.ndim == 2 and m.max_rank > limit and m.name in bounds}
    known = known or {}
    large = {name: m for name, m in large.items() if name not in known}
    svds: dict[str, SVD] = {}
    for layer in layers:
        if layer.name not in large:
            svds[layer.name] = known.get(layer.name) or _svd.checked_svd(layer.matrix, f"layer {layer.name!r}")
            if on_svd is not None:
                on_svd(layer.name)
    energy = {name: _svd.scaled_energy(m.matrix) for name, m in large.items()}
    wanted = {name: _step(max(8, m.max_rank // 16), bounds[name]) for name, m in large.items()}
    reported: set[str] = set()
    while True:
        for name, q in wanted.items():
            svds[name] = _svd.top_svd(large[name].matrix, f"layer {name!r}", lambda top, q=q: top.numel() >= q, start=q)
            log.debug("layer %r: %d of %d singular values", name, svds[name][1].shape[-1], large[name].max_rank)
            if on_svd is not None and name not in reported:
                reported.add(name)
                on_svd(name)
        spectra = []
        for layer in layers:
            s = svds[layer.name][1]
            if layer.name in large and s.shape[-1] < layer.max_rank:
                s = padded_spectrum(s, *energy[layer.name], layer.max_rank)
            spectra.append(LayerSpectrum(layer.name, s, layer.dense_macs, layer.macs))
        ranks = criterion.allocate(spectra, fixed_macs)
        wanted = {}
        for spectrum in spectra:
            known = int(svds[spectrum.name][1].shape[-1])
            if spectrum.name not in large or known == spectrum.max_rank or spectrum.name not in ranks:
                continue
            leading_needed = getattr(criterion, "leading_needed", None)
            need = leading_needed(spectrum, int(ranks[spectrum.name])) if callable(leading_needed) else None
            need = spectrum.max_rank if need is None else need
            if need > known:
                # Double (a need read off a padded tail is no guide), stopping once at the full
                # SVD's threshold, a third of the spectrum.
                third = spectrum.max_rank // 3
                q = _step(2 * known, max(bounds[spectrum.name], need))
                wanted[spectrum.name] = min(q, third) if known < third else q
        if not wanted:
            return svds, ranks


def _step(q: int, bound: int) -> int:
    """``q`` values, or all ``bound`` the criterion can need when that is at most a quarter more."""
    return max(1, bound if bound <= q * 5 // 4 else q)
