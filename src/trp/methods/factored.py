"""Training layers as their rank-r factors: TRP's last epochs with no projection.

After a projection each TRP layer's weight is exactly ``U_r S_r V_rᵀ`` in its scheme's matrix view.
:func:`factorize` re-parametrizes it (``torch.nn.utils.parametrize``) as the product ``A·B`` of two
trainable factors, ``A = U_r √S_r`` and ``B = √S_r V_rᵀ``, so that training goes on at exactly rank
``r`` with no projection: the weight never leaves rank ``r``, and nothing jumps when a projection
would have snapped it back. The layer computes what its split computes (the same two factors, as
one weight), so training it is training the split network. :func:`merge` multiplies the factors
back into one plain weight of rank ``r``, which :func:`trp.decompose` splits again at that rank.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.schemes import Scheme
from ..core.svd import checked_svd

__all__ = ["Factors", "factorize", "merge", "is_factored"]


class Factors(nn.Module):
    """The parametrization ``weight = scheme.from_matrix(A @ B)`` of a rank-``rank`` weight of ``shape``."""

    def __init__(self, scheme: Scheme, shape: torch.Size, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"a factored weight needs rank >= 1, got {rank}")
        self.scheme = scheme
        self.shape = torch.Size(shape)
        self.rank = int(rank)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.scheme.from_matrix((a @ b)[None], self.shape)[0]

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The balanced factors of ``weight``'s best rank-``rank`` approximation (the weight itself when it has that rank)."""
        matrix = self.scheme.to_matrix(weight.detach()[None])[0]
        u, s, vh = checked_svd(matrix, f"factored weight of shape {tuple(self.shape)}")
        r = min(self.rank, s.shape[-1])
        root = s[..., :r].sqrt()
        a = (u[..., :r] * root[..., None, :]).to(weight.dtype).contiguous()
        b = (root[..., :, None] * vh[..., :r, :]).to(weight.dtype).contiguous()
        return a, b


def is_factored(module: nn.Module) -> bool:
    """Whether ``module``'s weight is parametrized by :class:`Factors`."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, Factors) for p in module.parametrizations["weight"])


def factorize(model: nn.Module, layers: Mapping[str, tuple[Scheme, int]]) -> None:
    """Re-parametrize each named layer's weight as rank-``r`` factors (``layers``: name → (scheme, rank)), in place.

    The weights are replaced by the factors as parameters: an optimizer built before must be given
    the model's new parameters.
    """
    for name, (scheme, rank) in layers.items():
        module = model.get_submodule(name)
        if is_factored(module):
            raise ValueError(f"layer {name!r} is already factored")
        parametrize.register_parametrization(module, "weight", Factors(scheme, module.weight.shape, rank))


def merge(model: nn.Module) -> list[str]:
    """Multiply every factored weight of ``model`` back into one plain weight, in place; the names merged."""
    found = [(name, module) for name, module in model.named_modules() if is_factored(module)]
    for _, module in found:
        with torch.no_grad():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return [name for name, _ in found]
