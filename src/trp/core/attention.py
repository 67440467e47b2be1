"""``nn.MultiheadAttention`` rebuilt from four projection layers, so each can be split.

``nn.MultiheadAttention`` keeps its query/key/value projections as one packed parameter and
reads ``out_proj.weight`` directly, so none of its projections can be replaced by two thin
layers. :class:`SplitMultiheadAttention` computes the same function (same ``forward``
signature and outputs: ``batch_first``, unbatched inputs, ``key_padding_mask``/``attn_mask``
as bool or float, ``need_weights``, ``average_attn_weights``, ``add_bias_kv``,
``add_zero_attn``, ``kdim``/``vdim``, dropout) from four ordinary modules ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj``, which it *calls*. :func:`trp.decompose` converts every
``nn.MultiheadAttention`` before selecting layers, and converts back those where no projection
was split, so a model only changes structure where it was split.

``nn.TransformerEncoder`` holding converted layers has its nested-tensor fast path turned off
(``use_nested_tensor = False``): that path reads the packed weights. On it, PyTorch returns
zeros at padded positions (eval mode with ``src_key_padding_mask``); the regular path, used
after conversion, returns computed values there. Unpadded positions are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import set_module

__all__ = ["SplitMultiheadAttention", "Converted", "convert_attention", "restore_attention"]


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype, name: str) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask.to(dtype)


class SplitMultiheadAttention(nn.Module):
    """Multi-head attention equal to a given ``nn.MultiheadAttention``, with separate projections."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, w = mha.embed_dim, mha.out_proj.weight
        kw = dict(device=w.device, dtype=w.dtype)
        bias = mha.in_proj_bias is not None
        self.embed_dim, self.kdim, self.vdim = e, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first, self.add_zero_attn = mha.dropout, mha.batch_first, mha.add_zero_attn
        self.q_proj = nn.Linear(e, e, bias=bias, **kw)
        self.k_proj = nn.Linear(mha.kdim, e, bias=bias, **kw)
        self.v_proj = nn.Linear(mha.vdim, e, bias=bias, **kw)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
            for proj, wt, b in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases):
                proj.weight.copy_(wt)
                if b is not None:
                    proj.bias.copy_(b)
        self.out_proj = mha.out_proj
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        # What PyTorch's Transformer fast paths check: they stay off for this module.
        self.in_proj_weight = None
        self.in_proj_bias = None
        self._qkv_same_embed_dim = False
        self.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Same arguments and results as ``nn.MultiheadAttention.forward``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt_len, bsz, _ = query.shape
        heads, hd = self.num_heads, self.head_dim
        dtype = query.dtype
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (L, N, E), (S, N, E)
        attn_mask = _float_mask(attn_mask, dtype, "attn_mask")
        key_padding_mask = _float_mask(key_padding_mask, dtype, "key_padding_mask")
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        q = q.reshape(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, hd).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, hd), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        src_len = k.shape[1]
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        scores = torch.bmm(q * (1.0 / math.sqrt(hd)), k.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = F.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


@dataclass
class Converted:
    """What :func:`convert_attention` replaced: original attention modules and encoder flags, by name."""

    originals: dict[str, nn.MultiheadAttention] = field(default_factory=dict)
    nested: dict[str, bool] = field(default_factory=dict)


def convert_attention(model: nn.Module) -> Converted:
    """Replace (in place) every ``nn.MultiheadAttention`` of ``model`` by :class:`SplitMultiheadAttention`.

    A module used at two places is left as it is (converting it at one would untie them).
    """
    places: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        places[id(m)] = places.get(id(m), 0) + 1
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.MultiheadAttention) and places[id(m)] == 1 and n]
    for name, mha in found:
        set_module(model, name, SplitMultiheadAttention(mha))
    done = Converted(dict(found))
    if found:
        for name, m in model.named_modules():
            if isinstance(m, nn.TransformerEncoder):
                done.nested[name] = bool(getattr(m, "use_nested_tensor", False))
                m.use_nested_tensor = False
    return done


def restore_attention(model: nn.Module, converted: Converted, keep: set[str]) -> None:
    """Put back (in place) the original attention modules, except those named in ``keep``.

    For attention left unsplit: the originals still hold their weights. An encoder whose layers
    hold no converted attention any more gets its nested-tensor fast path back.
    """
    for name, mha in converted.originals.items():
        if name not in keep:
            set_module(model, name, mha)
    for name, flag in converted.nested.items():
        encoder = model.get_submodule(name)
        if not any(isinstance(m, SplitMultiheadAttention) for m in encoder.modules()):
            encoder.use_nested_tensor = flag
