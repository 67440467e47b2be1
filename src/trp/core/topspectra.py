"""Whole-model ranks from the leading singular values of large layers only.

A whole-model criterion that says which leading values decide its ranks
(:meth:`~trp.core.allocation.WholeModelCriterion.leading_needed`, e.g. :class:`TargetSpeedup`)
sees, for a large layer, its top ``q`` singular values followed by equal values carrying the
rest of the layer's energy: the energy is ``||W||_F²`` (no SVD needed), so the known values'
shares are exact. ``q`` starts small and doubles for each layer whose rank needs more, up to
the criterion's bound (from a sixteenth of the spectrum); a ``q`` past a third of the spectrum gets the full SVD
(:func:`trp.core.svd.top_svd`). The ranks equal those from the full spectra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import svd as _svd
from .allocation import LayerSpectrum, WholeModelCriterion

__all__ = ["LayerMatrix", "padded_spectrum", "allocate_leading"]

SVD = tuple[Tensor, Tensor, Tensor]


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
) -> tuple[dict[str, SVD], dict[str, int]]:
    """``(svds, ranks)``: each layer's SVD (full, or its leading part) and the criterion's ranks.

    Layers whose smaller side is at most ``full_max`` (default ``trp.core.svd.FULL_SVD_MAX``),
    batched views, and every layer of a criterion that does not implement ``leading_bound``
    get the full SVD. ``on_svd(name)`` is called after each layer's first SVD (progress).
    """
    limit = _svd.FULL_SVD_MAX if full_max is None else full_max
    placeholders = [LayerSpectrum(l.name, torch.zeros(l.max_rank), l.dense_macs, l.macs) for l in layers]
    bounds = criterion.leading_bound(placeholders, fixed_macs) or {}
    large = {l.name: l for l in layers if l.matrix.ndim == 2 and l.max_rank > limit and l.name in bounds}
    svds: dict[str, SVD] = {}
    for layer in layers:
        if layer.name not in large:
            svds[layer.name] = _svd.checked_svd(layer.matrix, f"layer {layer.name!r}")
            if on_svd is not None:
                on_svd(layer.name)
    energy = {name: _svd.scaled_energy(l.matrix) for name, l in large.items()}
    wanted = {name: max(1, min(bounds[name], max(8, l.max_rank // 16))) for name, l in large.items()}
    reported: set[str] = set()
    while True:
        for name, q in wanted.items():
            svds[name] = _svd.top_svd(large[name].matrix, f"layer {name!r}", lambda top, q=q: top.numel() >= q, start=q)
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
            need = criterion.leading_needed(spectrum, int(ranks[spectrum.name]))
            need = spectrum.max_rank if need is None else need
            if need > known:
                # Double (a need read off a padded tail is no guide), stopping once at the full
                # SVD's threshold, a third of the spectrum.
                third = spectrum.max_rank // 3
                q = min(2 * known, max(bounds[spectrum.name], need))
                wanted[spectrum.name] = min(q, third) if known < third else q
        if not wanted:
            return svds, ranks
