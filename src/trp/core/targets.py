"""Which modules trp can split exactly, the weight each really applies, and why others are skipped.

A *candidate* is a module that computes ``x ↦ W·x`` (+ bias) with one weight: ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d`` and Hugging Face's ``Conv1D`` (a linear layer storing its
weight transposed, ``in × out``). A subclass with a ``forward`` of its own is split only when trp has its *standard form*
(:mod:`trp.core.equivalents`: registered with ``trp.register_layer``, built in for timm
``Conv2dSame``/``StdConv2d`` and kin, or found by probing for zero padding before the conv);
the split then applies the standard form's padding before its first thin layer and splits the
weight the standard form applies (the standardized one for weight-standardized convs: trp
splits that *effective* weight, the split layers are plain convs, and TRP training leaves such
layers alone, since projecting the stored weight does not make the standardized weight low rank).
Any other subclass whose ``forward`` (or ``_conv_forward``) differs from the base class's is
skipped with the reason and the one-line registration that would fix it.
Nothing here imports timm or transformers: classes are recognized by module path and name.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .equivalents import own_forward, pad_same, standard_form

__all__ = [
    "is_candidate",
    "layer_kind",
    "split_reason",
    "effective_weight",
    "same_padding",
    "projects_raw_weight",
    "dense_forward",
    "pad_same",
    "pre_layer",
    "standard_core",
]

def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def is_candidate(module: nn.Module) -> bool:
    """Whether ``module`` is a one-weight linear layer trp knows about (see the module docstring)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or _is_hf_conv1d(module)


def layer_kind(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"hf_conv1d"``, ``"conv1d"`` or ``"conv2d"``; None for anything else."""
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def _own_forward(module: nn.Module) -> bool:
    """Whether a Linear/Conv subclass overrides the computation of its base class."""
    return own_forward(module)


def _standard(module: nn.Module):
    return standard_form(module)


def split_reason(module: nn.Module, scheme: str = "channel") -> Optional[str]:
    """Why ``module`` cannot be split exactly under ``scheme``, or None when it can."""
    kind = layer_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a Linear/Conv1d/Conv2d layer"
    name = type(module).__name__
    if _own_forward(module) and _standard(module) is None:
        return (f"{name} subclasses {type(module).__mro__[1].__name__} with a forward of its own that trp does not "
                f"recognise; if it computes a plain layer after padding, register it once: "
                f"trp.register_layer({name}, to_standard=lambda m: nn.Sequential(nn.ZeroPad2d(...), "
                "trp.plain_layer(m)))")
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter) or weight is None or weight.numel() == 0:
        return f"uninitialized (lazy) {name}"
    if kind in ("conv1d", "conv2d"):
        groups = module.groups  # type: ignore[union-attr]
        if groups != 1 and module.in_channels // groups == 1:  # type: ignore[union-attr]
            return (f"depthwise conv (groups={groups}, one input channel per group): its per-group matrix "
                    f"has at most {module.weight.shape[0] // groups}×{int(torch.tensor(module.kernel_size).prod())} "  # type: ignore[union-attr]
                    "entries, and no split of it saves MACs")
        if groups != 1 and scheme != "channel":
            return f"grouped conv (groups={groups}): only the channel scheme splits it (per group), not {scheme!r}"
        if kind == "conv1d" and scheme != "channel":
            return f"Conv1d: only the channel scheme splits a 1-D kernel, not {scheme!r}"
    return None


def same_padding(module: nn.Module) -> bool:
    """Whether ``module``'s standard form pads its input before the plain layer (:mod:`trp.core.equivalents`)."""
    std = _standard(module)
    return std is not None and bool(std.pre)


def pre_layer(module: nn.Module) -> Optional[nn.Module]:
    """What ``module`` applies to its input before its plain layer (padding), as one module, or None."""
    std = _standard(module)
    return None if std is None else std.pre_module()


def projects_raw_weight(module: nn.Module) -> bool:
    """Whether making ``module.weight`` low rank makes the weight it applies low rank (TRP)."""
    std = _standard(module)
    return std is None or std.applies_stored_weight(module)


def standard_core(module: nn.Module) -> nn.Module:
    """The plain layer ``module`` applies (after its padding): ``module`` itself when it is plain."""
    std = _standard(module)
    return module if std is None else std.core


def effective_weight(module: nn.Module) -> Tensor:
    """The weight ``module`` applies to its input (standardized for StdConv2d-like layers)."""
    std = _standard(module)
    return module.weight if std is None else std.core.weight


def dense_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """What ``module`` computes on ``x`` when ``weight`` is the weight it applies (and ``bias``, if given, its bias)."""
    kind = layer_kind(module)
    bias = module.bias if bias is None else bias
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "hf_conv1d":
        return F.linear(x, weight.mT, bias)
    if kind not in ("conv1d", "conv2d"):
        raise TypeError(f"{type(module).__name__} is not a layer trp splits")
    std = _standard(module)
    if std is not None:
        for pre in std.pre:
            x = pre(x)
        module, bias = std.core, std.core.bias
    base = nn.Conv1d if kind == "conv1d" else nn.Conv2d
    return base._conv_forward(module, x, weight, bias)  # type: ignore[arg-type]
