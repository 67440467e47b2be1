"""A checked singular value decomposition shared by training and decomposition.

:func:`checked_svd` computes the full thin SVD. :func:`top_svd` computes only the leading
singular triplets of a large matrix (a randomized SVD), growing their
number until the caller's test says they suffice, and falls back to the full SVD when most
of the spectrum is needed anyway.

Precision: SVDs run in float32 (float64 for float64 weights, and as the retry of a failed
float32 SVD); the float32 randomized SVD matches the full one to float32 rounding in the
triplets it returns. Sums of squared singular values are taken in float64 after scaling
(:func:`scaled_energy`): in float32 they overflow for weights above ~1e19 and lose the
small tail of a long spectrum.
"""

from __future__ import annotations

from typing import Callable

from ..errors import Error
import torch
from torch import Tensor

__all__ = ["SVDError", "checked_svd", "top_svd", "scaled_energy", "FULL_SVD_MAX"]

# Matrices whose smaller side is at most this always get the full SVD (it takes well under a second).
FULL_SVD_MAX = 1024


class SVDError(Error, RuntimeError):
    """An SVD that failed in float32 and again in float64 (a :class:`trp.Error`, and a RuntimeError as before)."""


def checked_svd(matrix: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, Vh)`` of a (batch of) matrices, computed in at least float32.

    Non-finite entries raise ``ValueError`` naming ``what``; a failed float32 SVD is
    retried in float64, and a second failure raises :class:`SVDError`. The factors are
    returned in the dtype the SVD ran in.
    """
    _check_finite(matrix, what)
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        try:
            return torch.linalg.svd(matrix.to(dtype), full_matrices=False)
        except RuntimeError as first:  # e.g. LAPACK "failed to converge"
            if dtype == torch.float64:
                raise SVDError(f"{what}: SVD failed in float64 ({first})") from first
            try:
                u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
            except RuntimeError as second:
                raise SVDError(
                    f"{what}: SVD failed in float32 ({first}) and float64 ({second}); "
                    "the weight is likely ill-conditioned beyond repair"
                ) from second
            return u.to(dtype), s.to(dtype), vh.to(dtype)


def _check_finite(matrix: Tensor, what: str) -> None:
    if not torch.isfinite(matrix).all():
        raise ValueError(
            f"{what}: weight contains NaN or Inf; training has diverged or the checkpoint is "
            "corrupt. Lower the learning rate or load a healthy checkpoint before decomposing."
        )


def top_svd(
    matrix: Tensor,
    what: str,
    enough: Callable[[Tensor], bool],
    start: int = 64,
    oversample: int = 32,
    niter: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Leading singular triplets ``(U, S, Vh)`` of one matrix, as many as ``enough(S)`` needs.

    ``enough`` receives the top ``q`` singular values (descending) and says whether they decide
    the rank; ``q`` starts at ``start`` (at most a third of the spectrum) and doubles. Small
    matrices, batches, and a ``q`` beyond a third of the spectrum get the full :func:`checked_svd`
    instead. The randomized SVD uses its own seeded generator: results repeat and the global
    random state is untouched.
    """
    _check_finite(matrix, what)
    k = min(matrix.shape[-2:])
    if matrix.ndim != 2 or k <= FULL_SVD_MAX:
        return checked_svd(matrix, what)
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    q = max(1, min(start, k // 3))
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        work = matrix.to(dtype)
        while q <= k // 3:
            try:
                u, s, vh = _randomized_svd(work, min(q + oversample, k), niter)
            except RuntimeError:  # a failed step: the full SVD retries in float64
                break
            u, s, vh = u[:, :q], s[:q], vh[:q]
            if enough(s):
                return u, s, vh
            q *= 2
    return checked_svd(matrix, what)


def scaled_energy(matrix: Tensor) -> tuple[float, float]:
    """``(scale, total)``: the largest absolute entry and ``||matrix / scale||_F²``, in float64.

    The squared Frobenius norm is the sum of all squared singular values, so it normalises a
    spectrum of which only the top is known. It is summed in row blocks (no float64 copy of a
    large weight) after dividing by ``scale``, so weights of any magnitude neither overflow
    nor underflow when squared.
    """
    matrix = matrix.detach()
    flat = matrix.reshape(-1, matrix.shape[-1])
    scale = float(flat.abs().max().double().clamp_min(torch.finfo(torch.float64).tiny)) if flat.numel() else 1.0
    total = sum(float((rows.double() / scale).square().sum()) for rows in flat.split(1024))
    return scale, total


def _randomized_svd(matrix: Tensor, q: int, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``q`` randomized SVD with ``niter`` power iterations (Halko, Martinsson, Tropp 2011).

    Not :func:`torch.svd_lowrank`: on CPU its final SVD of a very wide ``q × n`` matrix took
    6 of 33 seconds for a 4096×11008 weight; here that SVD is a QR plus a ``q × q`` SVD, the power
    iterations are normalised by Cholesky QR (a ``q × q`` factorization; Householder QR when
    that fails), and the seeded generator leaves the global random state alone.
    """
    gen = torch.Generator(device=matrix.device).manual_seed(0)
    omega = torch.randn(matrix.shape[1], q, generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis = _orthonormal(matrix @ omega)
    for _ in range(niter):  # power iterations
        basis = _orthonormal(matrix @ _orthonormal(matrix.mT @ basis))
    basis = torch.linalg.qr(basis).Q
    small = basis.mT @ matrix  # q × n, equal to r.mT @ qt.mT below
    qt, r = torch.linalg.qr(small.mT)
    u_small, s, vh_small = torch.linalg.svd(r.mT)
    return basis @ u_small, s, vh_small @ qt.mT


def _orthonormal(basis: Tensor) -> Tensor:
    """Orthonormal columns spanning ``basis`` (tall): Cholesky QR, or Householder QR if ill-conditioned."""
    gram = basis.mT @ basis
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        ortho = torch.linalg.solve_triangular(chol, basis.mT, upper=False).mT
        if torch.isfinite(ortho).all():
            return ortho
    return torch.linalg.qr(basis).Q
