"""Which layers of a model are low-rank targets.

Default selection (``layers=None``), the reference code's choice (SPEC §1.3):
every ``Conv2d`` except the model's first one (the stem) and except 1×1 convs, and
every ``Linear`` except the model's last one (the classifier). Layers inside an
already factorized :class:`~trp.core.schemes.LowRank` are never picked by default.
Grouped/depthwise convs are never factorized; when selected they are reported as
skipped with the reason.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from torch import nn

from .schemes import LowRank, unsupported_reason

__all__ = ["LayerSelector", "select_layers", "set_module"]

LayerSelector = Optional[Union[Sequence[str], Callable[[str, nn.Module], bool]]]


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d/Linear modules in definition order, excluding those inside LowRank.

    A model holding a wrapper that refuses splitting (see the module docstring) raises ValueError.
    """
    inside: set[str] = set()
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        refuse = getattr(module, "refuse_split", None)
        if callable(refuse):
            raise ValueError(f"layer {name!r}: {refuse()}")
        if isinstance(module, LowRank):
            inside.add(name)
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            found.append((name, module))
    return found


def _default(name: str, module: nn.Module, first_conv: str, last_linear: str) -> bool:
    if isinstance(module, nn.Conv2d):
        return name != first_conv and tuple(module.kernel_size) != (1, 1)
    return name != last_linear


def select_layers(
    model: nn.Module, layers: LayerSelector = None
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """Selected ``(name, module)`` targets, and ``(name, reason)`` for selected layers skipped."""
    candidates = _candidates(model)
    if layers is None:
        convs = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
        first_conv = convs[0] if convs else ""
        last_linear = linears[-1] if linears else ""
        chosen = [(n, m) for n, m in candidates if _default(n, m, first_conv, last_linear)]
    elif callable(layers):
        chosen = [(n, m) for n, m in candidates if layers(n, m)]
    elif isinstance(layers, str):
        raise ValueError(f"layers must be a list of module names, not the string {layers!r}")
    else:
        modules = dict(model.named_modules())
        chosen = []
        for name in layers:
            if name not in modules:
                raise ValueError(
                    f"layer {name!r} not found in the model; names look like "
                    f"{[n for n, _ in candidates[:3]]}"
                )
            module = modules[name]
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                raise ValueError(
                    f"layer {name!r} is a {type(module).__name__}; only Conv2d and Linear "
                    "layers can be factorized"
                )
            chosen.append((name, module))
    targets, skipped = [], []
    for name, module in chosen:
        reason = unsupported_reason(module)
        if reason is None:
            targets.append((name, module))
        else:
            skipped.append((name, reason))
    return targets, skipped


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
