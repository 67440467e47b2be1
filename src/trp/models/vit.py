"""A small Vision Transformer for MNIST (28×28) and CIFAR (32×32) images.

Patch embedding (a Conv2d with kernel = stride = patch size), a class token and a learned
position embedding, ``depth`` pre-LayerNorm blocks of multi-head self-attention and an MLP
(Linear → GELU → Linear), a final LayerNorm and a Linear head on the class token.

Attention uses explicit ``nn.Linear`` layers (``attn.qkv``, ``attn.proj``) and
``scaled_dot_product_attention``, so the library can factorize them. With the default
layer selection of :mod:`trp.core.layers`, every ``qkv``, ``proj``, ``mlp.fc1`` and ``mlp.fc2``
is selected; the patch embedding (the first conv) and the ``head`` (the last Linear) are
not. MAC counts of :mod:`trp.core.counting` cover the Conv2d/Linear layers only, not the
attention products.

Init: truncated-normal (std 0.02) for Linear weights, the class token and the position
embedding; zero biases; LayerNorm weight one, bias zero; PyTorch's default for the patch
embedding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.models.mlp import default_image_size

__all__ = ["Attention", "FeedForward", "Block", "VisionTransformer", "vit_tiny"]


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``qkv`` and ``proj`` Linear layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (b, heads, t, d/heads)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """``fc1 → GELU → fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier for square ``image_size × image_size`` inputs split into square patches."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if min(in_channels, num_classes, image_size, patch_size, dim, depth, heads) < 1:
            raise ValueError("in_channels, num_classes, image_size, patch_size, dim, depth and heads "
                             "must all be positive")
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT was built for {self.image_size}×{self.image_size} images, got "
                f"{x.shape[-2]}×{x.shape[-1]}; build it with image_size={x.shape[-1]}"
                if x.shape[-2] == x.shape[-1] else
                f"this ViT takes square {self.image_size}×{self.image_size} images, got "
                f"{x.shape[-2]}×{x.shape[-1]}"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def vit_tiny(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    depth: int = 4,
) -> VisionTransformer:
    """Small ViT (registered as ``"vit_tiny"``; not timm's ViT-Ti): width 64, 4 heads, MLP ratio 2.

    ``image_size`` None means 28 for one input channel (MNIST) and 32 otherwise (CIFAR).
    ``patch_size`` None means 7 for 28×28 images (16 patches, cheap enough for a CPU) and 4
    otherwise (64 patches at 32×32). Under 150k parameters.
    """
    size = default_image_size(in_channels)[0] if image_size is None else image_size
    patch = (7 if size == 28 else 4) if patch_size is None else patch_size
    return VisionTransformer(in_channels, num_classes, size, patch, depth=depth)
