"""Steps 1 and 3 of a TRP refresh: the spectra of the target weights, and the apply step.

Step 1 takes one batched SVD per group of same-shaped matrices (a large layer under a per-layer
criterion: only the leading triplets its rank needs, :mod:`trp.core.topspectra`); step 3 sets each
weight to ``U_r S_r V_rᵀ`` (on a projection) and keeps ``U_r V_rᵀ`` as its nuclear sub-gradient.
Step 2, the ranks, is the criterion's (per layer) or :class:`trp.methods.trp_target.TargetRanks`'s
(a whole-model target). :class:`trp.TRP` is built on :class:`ProjectionSteps`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core import svd as svd_module
from ..core.allocation import pooled_spectrum
from ..core.svd import checked_svd
from ..core.topspectra import leading_svd
from .trp_target import TargetRanks, _Spectra

__all__ = ["ProjectionSteps"]


def _layer_ranks(criterion: Any, s: Tensor) -> Tensor:
    """A per-layer criterion's ranks for a stack of spectra ``(layers, ..., k)``, one per matrix.

    A layer of several matrices (decouple: one per filter) gets one rank, from the energy pooled
    over its matrices, so the split layer really is rank r.
    """
    batch = pooled_spectrum(s, keep=1) if s.ndim > 2 else s
    if callable(getattr(criterion, "ranks", None)):
        ranks = criterion.ranks(batch)
    else:  # a plain callable sigma -> rank
        ranks = torch.tensor([int(criterion(row)) for row in batch], dtype=torch.long, device=s.device)
    if s.ndim > 2:
        ranks = ranks.reshape(-1, *([1] * (s.ndim - 2))).expand(s.shape[:-1])
    return ranks


class ProjectionSteps(TargetRanks):
    """Steps 1 and 3 of TRP's refresh (see the module docstring) on the layers of :class:`TargetRanks`."""

    def _spectra(self, mine: set[str], project: bool, per_layer: Any) -> tuple[list[_Spectra], dict[str, Tensor]]:
        """Step 1: the SVDs of this rank's layers, batched per group; and, under a whole-model criterion
        (``per_layer`` None), the large layers it counts (their leading triplets come with step 2)."""
        whole = per_layer is None
        out: list[_Spectra] = []
        large: dict[str, Tensor] = {}
        for names in self._groups().values():
            names = [n for n in names if n in mine]
            if not names:
                continue
            matrix = self._matrix(names)
            if matrix.ndim == 3 and min(matrix.shape[-2:]) > svd_module.FULL_SVD_MAX:
                if whole:
                    large.update({n: matrix[i] for i, n in enumerate(names) if n in self._costs})
                    names = [n for n in names if n not in self._costs]
                    if not names:
                        continue
                    matrix = self._matrix(names)
                elif project:  # one at a time, only the triplets the kept rank needs
                    out += [self._leading(name, matrix[i], per_layer) for i, name in enumerate(names)]
                    continue
            u, s, vh = checked_svd(matrix, f"TRP layers {names}")
            out.append(_Spectra(names, u, s, vh))
        return out, large

    def _leading(self, name: str, matrix: Tensor, criterion: Any) -> _Spectra:
        """A large layer's leading triplets for a per-layer criterion.

        The search starts at the layer's previous rank; a layer that last kept more than a third
        of its spectrum gets the full SVD at once (the leading part would not be cheaper).
        """
        previous = self.ranks.get(name)
        what = f"TRP layer {name!r}"
        if previous is not None and previous > min(matrix.shape) // 3:
            (u, s, vh), for_rank = checked_svd(matrix, what), None
        else:
            (u, s, vh), for_rank = leading_svd(criterion, matrix, what, start=previous)
        return _Spectra([name], u, s, vh, batched=False, matrix=matrix, for_rank=for_rank)

    # -- step 3 --------------------------------------------------------------------------
    def _apply(self, spectra: list[_Spectra], ranks: Optional[dict[str, int]], project: bool, criterion: Any) -> None:
        """Step 3: weights ``U_r S_r V_rᵀ`` (with ``project``) and sub-gradients ``U_r V_rᵀ``.

        ``ranks`` is the whole-model choice, or None: then a projection takes each layer's rank
        from the per-layer ``criterion``, and a sub-gradient refresh alone keeps every nonzero value.
        """
        for e in spectra:
            if not e.batched:
                name = e.names[0]
                if ranks is not None:
                    rank = ranks[name]
                    u, s, vh = (e.u, e.s, e.vh) if rank <= e.s.shape[-1] else \
                        checked_svd(e.matrix, f"TRP layer {name!r}")  # kept whole (dense): every triplet
                else:
                    rank, (u, s, vh) = int(criterion(e.s if e.for_rank is None else e.for_rank)), (e.u, e.s, e.vh)
                self._set_projection(name, u, s, vh, rank, project)
                continue
            u, s, vh, names = e.u, e.s, e.vh, e.names
            scheme, shape = self._schemes[names[0]], self._params[names[0]].shape
            if ranks is not None:
                r = torch.tensor([ranks[n] for n in names], device=s.device)
                r = r.reshape(-1, *([1] * (s.ndim - 2))).expand(s.shape[:-1])
            elif project:
                r = _layer_ranks(criterion, s)
            else:
                r = None
            if r is None:
                tol = s[..., :1] * max(u.shape[-2], vh.shape[-1]) * torch.finfo(s.dtype).eps
                keep = (s > tol).to(s.dtype)
            else:
                keep = (torch.arange(s.shape[-1], device=s.device) < r[..., None]).to(s.dtype)
            subgrad = scheme.from_matrix((u * keep[..., None, :]) @ vh, shape)
            if project:
                low = scheme.from_matrix((u * (s * keep)[..., None, :]) @ vh, shape)
                kept = r.reshape(len(names), -1).max(dim=1).values.tolist()
            for i, name in enumerate(names):
                param = self._params[name]
                self._subgrad[name] = subgrad[i].to(param.dtype)
                if project:
                    param.copy_(low[i].to(param.dtype))
                    self.ranks[name] = int(kept[i])

    def _set_projection(self, name: str, u: Tensor, s: Tensor, vh: Tensor, rank: int, project: bool) -> None:
        """Store ``U_r V_rᵀ`` as the layer's sub-gradient and, with ``project``, set its weight to ``U_r S_r V_rᵀ``."""
        param, scheme = self._params[name], self._schemes[name]
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        self._subgrad[name] = scheme.from_matrix((u @ vh)[None], param.shape)[0].to(param.dtype)
        if project:
            param.copy_(scheme.from_matrix(((u * s) @ vh)[None], param.shape)[0].to(param.dtype))
            self.ranks[name] = rank
