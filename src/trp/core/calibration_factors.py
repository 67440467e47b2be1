"""The closed form of a calibrated split: from a layer's statistics to its two factors at any rank.

See :mod:`trp.core.calibration` for the derivation; this module turns one layer's collected
:class:`Statistics` into a :class:`CalibratedFactors` (the eigenvalues ``λ`` and the factors at
any rank), working in float64 row blocks so that large layers need a few ``d×d`` matrices at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .schemes import Scheme
from .targets import effective_weight

__all__ = ["Statistics", "CalibratedFactors", "calibrated_factors", "layer_factors", "effective_matrix"]

#: eigenvalues below this fraction of a layer's largest count as zero (a rank past them adds no error)
_TINY = 1e-12


_ROWS = 2048  # row block for the input-side products


@dataclass
class Statistics:
    """One layer's calibration statistics: ``Σ cols colsᵀ`` and ``Σ cols`` over ``positions`` columns,
    per group, of its outputs (``side="output"``, bias excluded) or of its im2col inputs (``"input"``)."""

    side: str
    second: Tensor  # (g, d, d)
    total: Tensor  # (g, d)
    positions: float


def _sym_eigh(a: Tensor, descending: bool = True) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD float64 matrix, **overwriting** ``a``.

    Only the lower triangle is read (no symmetrised copy: the statistics are symmetric sums). The
    eigenvectors are computed in ``a``'s memory (no copy of it; the caller hands ``a`` over), in
    descending order of the eigenvalues unless ``descending=False`` (ascending, no reordering copy)."""
    vals = torch.empty(a.shape[:-1], dtype=a.dtype, device=a.device)
    # a is symmetric: its transpose is the same matrix in LAPACK's column-major layout, so eigh
    # writes the eigenvectors there with no copy (a row-major out= would add a temporary)
    vals, vecs = torch.linalg.eigh(a.mT, out=(vals, a.mT))
    if descending:
        vecs = vecs.flip(-1)  # the ascending copy is freed here
        vals = vals.flip(-1)
    return vals.clamp_min(0), vecs


class CalibratedFactors:
    """A layer's calibrated eigen-decomposition: ``λ`` (descending) and the two factors at any rank.

    ``matrix`` is the layer's matrix view ``(m, n)`` or ``(g, m, n)`` (output × input). Built by
    :func:`calibrated_factors`.
    """

    def __init__(self, matrix: Tensor, lam: Tensor, basis: Tensor, side: str,
                 mean_output: Optional[Tensor] = None) -> None:
        self.matrix = matrix  # original dtype; float64 blocks are made on demand
        self.lam = lam  # (g, r) float64, r = min(m, n)
        self.basis = basis  # output side: U (g, m, m); input side: T Q (g, n, n)
        self.side = side
        self.mean_output = mean_output  # (g, m): centred statistics, the bias absorbs the mean

    def bias_shift(self, k: int) -> Optional[Tensor]:
        """What to add to the bias at rank ``k``: the mean of the discarded part, ``(I − U_k U_kᵀ) μ_y``
        (``(g·m,)`` float64); None for uncentred statistics."""
        if self.mean_output is None:
            return None
        u = self.output_basis(k)
        mu = self.mean_output
        return (mu - (u @ (u.mT @ mu[..., None]))[..., 0]).reshape(-1)

    @property
    def spectrum(self) -> Tensor:
        """``sqrt(λ)``: the singular values of ``W X`` (``(r,)`` for one group, ``(g, r)`` for several)."""
        s = self.lam.sqrt()
        return s[0] if s.shape[0] == 1 else s

    def output_basis(self, k: int, start: int = 0) -> Tensor:
        """Eigenvectors ``start..k-1`` of ``Σ_y`` of every group: ``(g, m, k - start)`` float64, orthonormal
        columns (zero columns past the data's rank); ``start=0`` gives ``U_k``."""
        if self.side == "output":
            return self.basis[..., start:k]
        lam = self.lam[:, start:k]
        valid = lam > _TINY * self.lam[:, :1].clamp_min(torch.finfo(torch.float64).tiny)
        scale = torch.where(valid, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
        tq = self.basis[..., start:k] * scale[:, None, :]
        m = self.matrix.shape[-2]
        out = torch.empty(self.lam.shape[0], m, k - start, dtype=torch.float64, device=self.lam.device)
        mat = self.matrix.reshape(-1, m, self.matrix.shape[-1])
        for r0 in range(0, m, _ROWS):
            out[:, r0:r0 + _ROWS] = mat[:, r0:r0 + _ROWS].double() @ tq
        return out

    def factors(self, k: int) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``A = U_k`` (``m×k``) and ``B = U_kᵀ W`` (``k×n``), per group, float64; ``A B = W_k``."""
        u = self.output_basis(k)
        m = self.matrix.shape[-2]
        mat = self.matrix.reshape(-1, m, self.matrix.shape[-1])
        b = torch.zeros(u.shape[0], k, mat.shape[-1], dtype=torch.float64, device=u.device)
        for r0 in range(0, m, _ROWS):
            b += u[:, r0:r0 + _ROWS].mT @ mat[:, r0:r0 + _ROWS].double()
        if self.matrix.ndim == 2:
            return u[0], b[0]
        return u, b


def calibrated_factors(matrix: Tensor, side: str, stat: Tensor, mean: Optional[Tensor] = None) -> CalibratedFactors:
    """The calibrated decomposition of a matrix view ``(m, n)`` / ``(g, m, n)`` from its layer's statistic.

    ``stat`` is ``Σ_y`` (``side="output"``, ``(g, m, m)``) or ``X Xᵀ`` (``side="input"``, ``(g, n, n)``),
    summed over the calibration positions; it is overwritten (its memory holds eigenvectors). With
    ``mean`` (the mean output ``(g, m)`` or input ``(g, n)`` column), ``stat`` must be centred
    (``Σ (c − μ)(c − μ)ᵀ``): for a layer with a bias, the best rank-``k`` split plus a free bias fits
    the centred moment and moves the mean of what it discards, ``(I − U_k U_kᵀ) W μ_x``, into the
    bias (:meth:`CalibratedFactors.bias_shift`).
    """
    mat = matrix.detach().reshape(-1, *matrix.shape[-2:])
    g, m, n = mat.shape
    r = min(m, n)
    if not bool(torch.isfinite(stat).all()):
        raise ValueError("calibration statistics are not finite: the model produced inf/NaN on the calibration data")
    mean_output = None
    if mean is not None:
        mean = mean.double()
        mean_output = mean if side == "output" else (mat.double() @ mean[..., None])[..., 0]
    if side == "output":
        lam, u = _sym_eigh(stat)
        return CalibratedFactors(matrix.detach(), lam[:, :r].contiguous(), u, side, mean_output)
    # input side: T = V D^½, G = (W T)ᵀ (W T), eigh(G) = Q Λ Qᵀ; keep T Q
    d, t = _sym_eigh(stat, descending=False)  # in the statistic's memory: the caller hands it over
    del stat
    t.mul_(d.sqrt()[:, None, :])
    del d
    gram = torch.zeros(g, n, n, dtype=torch.float64, device=t.device)
    for r0 in range(0, m, _ROWS):
        wt = mat[:, r0:r0 + _ROWS].double() @ t
        gram.baddbmm_(wt.mT, wt)  # in place: no n×n temporary
        del wt
    lam, q = _sym_eigh(gram)
    del gram
    tq = t @ q
    del t, q
    return CalibratedFactors(matrix.detach(), lam[:, :r].contiguous(), tq, side, mean_output)


def layer_factors(matrix: Tensor, stats: "Statistics", centred: bool) -> CalibratedFactors:
    """:func:`calibrated_factors` from collected :class:`Statistics`, centred (bias absorbs the mean) or not.

    The statistic is centred in place and handed over (``stats`` loses it), so that a large layer
    holds one ``d×d`` matrix less while its eigen-decompositions run."""
    box, stats.second = [stats.second], None  # no other reference: calibrated_factors frees it when done
    if not centred or stats.positions <= 0:
        return calibrated_factors(matrix, stats.side, box.pop())
    mean = stats.total / stats.positions
    box[0].baddbmm_(mean[..., :, None], mean[..., None, :], alpha=-stats.positions)
    return calibrated_factors(matrix, stats.side, box.pop(), mean)


def effective_matrix(module: nn.Module, sch: Scheme) -> Tensor:
    """The layer's matrix view (of the weight it applies)."""
    return sch.to_matrix(effective_weight(module).detach())
