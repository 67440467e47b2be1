"""A Linear layer whose weight has a decaying spectrum (singular values 1 to 1e-3), like a trained layer."""

from __future__ import annotations

import torch
from torch import nn


def decaying_linear(m: int = 160, n: int = 300, seed: int = 0) -> nn.Linear:
    """``nn.Linear(n, m)`` with singular values log-spaced from 1 to 1e-3 and random singular vectors (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_((u * torch.logspace(0, -3, k)) @ v.T)
    return layer
