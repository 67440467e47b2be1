"""MAC and parameter counts.

Convention: one multiply-add is one MAC. Only ``nn.Conv2d`` and ``nn.Linear`` modules
are counted (bias additions, batch norm, activations, pooling, attention matmuls and
other functional ops are not). A conv costs ``out_elements · (C_in / groups) · kh · kw``
and a linear ``out_elements · in_features``, for one forward pass at ``input_shape``
(batch dimension included, so ``(1, 3, 32, 32)`` gives MACs per image).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["count_macs", "count_params", "layer_macs", "probe_forward"]

Hook = Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]


def probe_forward(model: nn.Module, input_shape: Sequence[int], hooks: dict[nn.Module, Hook]) -> None:
    """One eval-mode, no-grad forward pass on zeros of ``input_shape`` with forward hooks."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    # Restore each module's own mode (a frozen BatchNorm inside a training model stays eval).
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        for m, mode in modes:
            m.training = mode
        for handle in handles:
            handle.remove()


def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs of every Conv2d and Linear module, by module name, at ``input_shape``."""
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_out = (module.in_channels // module.groups) * kh * kw
            else:
                per_out = module.in_features
            counts[name] = counts.get(name, 0) + output.numel() * per_out

        return hook

    convs_and_linears = {
        m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    hooks = {m: make_hook(n) for m, n in convs_and_linears.items()}
    probe_forward(model, input_shape, hooks)
    return counts


def count_macs(model: nn.Module, input_shape: Sequence[int], convs_only: bool = False) -> int:
    """Total MACs of ``model``'s Conv2d and Linear layers (only Conv2d with ``convs_only``)."""
    modules = dict(model.named_modules())
    return sum(
        c
        for name, c in layer_macs(model, input_shape).items()
        if not convs_only or isinstance(modules[name], nn.Conv2d)
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
