"""Which modules trp can split exactly, the weight each really applies, and why others are skipped.

A *candidate* is a module that computes ``x ↦ W·x`` (+ bias) with one weight: ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d`` and Hugging Face's ``Conv1D`` (a linear layer storing its
weight transposed, ``in × out``). A subclass with a ``forward`` of its own is split only when
trp knows what that forward does:

- timm ``Conv2dSame``: pads the input TF-"SAME" style (the padding depends on the input size),
  then convolves. The split layer pads the same way before its first conv.
- timm ``StdConv2d`` / ``StdConv2dSame`` / ``ScaledStdConv2d`` / ``ScaledStdConv2dSame``
  (weight standardization, BiT ResNets): the weight the layer applies is the standardized
  one, a fixed function of the stored weight. trp splits that *effective* weight, so the split
  model computes exactly what the dense model computes; the split layers are plain convs (a
  later fine-tune of them no longer re-standardizes). TRP training leaves these layers alone:
  projecting the stored weight does not make the standardized weight low rank.

Any other subclass of Linear/Conv1d/Conv2d whose ``forward`` (or ``_conv_forward``) differs from
the base class's is skipped with the reason: trp cannot know that splitting its weight is exact.
Nothing here imports timm or transformers: classes are recognized by module path and name.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "is_candidate",
    "layer_kind",
    "split_reason",
    "effective_weight",
    "same_padding",
    "projects_raw_weight",
    "dense_forward",
    "pad_same",
]

_SAME = {"Conv2dSame"}
_STD = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


def _timm_class(module: nn.Module, names: set[str]) -> bool:
    cls = type(module)
    return cls.__module__.startswith("timm.") and cls.__name__ in names


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
    cls = type(module)
    for base in (nn.Linear, nn.Conv1d, nn.Conv2d):
        if isinstance(module, base):
            if cls.forward is not base.forward:
                return True
            return base is not nn.Linear and cls._conv_forward is not base._conv_forward  # type: ignore[attr-defined]
    return False


def _known_subclass(module: nn.Module) -> bool:
    return _timm_class(module, _SAME | _STD)


def split_reason(module: nn.Module, scheme: str = "channel") -> Optional[str]:
    """Why ``module`` cannot be split exactly under ``scheme``, or None when it can."""
    kind = layer_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a Linear/Conv1d/Conv2d layer"
    name = type(module).__name__
    if _own_forward(module) and not _known_subclass(module):
        return (f"{name} subclasses {type(module).__mro__[1].__name__} with a forward of its own; trp cannot "
                "know that splitting its weight is exact")
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
    """Whether ``module`` pads its input TF-"SAME" style at run time (timm ``Conv2dSame``)."""
    if _timm_class(module, _SAME):
        return True
    return _timm_class(module, _STD) and bool(getattr(module, "same_pad", False))


def projects_raw_weight(module: nn.Module) -> bool:
    """Whether making ``module.weight`` low rank makes the weight it applies low rank (TRP)."""
    return not _timm_class(module, _STD)


def effective_weight(module: nn.Module) -> Tensor:
    """The weight ``module`` applies to its input (standardized for StdConv2d-like layers)."""
    weight = module.weight
    if not _timm_class(module, _STD):
        return weight
    gain = None
    if hasattr(module, "gain"):
        gain = (module.gain * module.scale).view(-1)
    flat = weight.reshape(1, weight.shape[0], -1)
    return F.batch_norm(flat, None, None, weight=gain, training=True, momentum=0.0, eps=module.eps).reshape_as(weight)


def pad_same(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """Zero-pad the last two dimensions so a strided conv covers the input TF-"SAME" style."""
    pads: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[-2:], kernel, stride, dilation))):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


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
    if same_padding(module):
        x = pad_same(x, tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation))
    base = nn.Conv1d if kind == "conv1d" else nn.Conv2d
    return base._conv_forward(module, x, weight, bias)  # type: ignore[arg-type]
