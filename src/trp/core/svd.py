"""A checked singular value decomposition shared by training and decomposition."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SVDError", "checked_svd"]


class SVDError(RuntimeError):
    """An SVD that failed in float32 and again in float64."""


def checked_svd(matrix: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, Vh)`` of a (batch of) matrices, computed in at least float32.

    Non-finite entries raise ``ValueError`` naming ``what``; a failed float32 SVD is
    retried in float64, and a second failure raises :class:`SVDError`. The factors are
    returned in the dtype the SVD ran in.
    """
    if not torch.isfinite(matrix).all():
        raise ValueError(
            f"{what}: weight contains NaN or Inf; training has diverged or the checkpoint is "
            "corrupt. Lower the learning rate or load a healthy checkpoint before decomposing."
        )
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
