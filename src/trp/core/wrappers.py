"""Training wrappers around a model: DistributedDataParallel, DataParallel, torch.compile.

Such a wrapper holds the real model as a child (``.module`` for (Distributed)DataParallel,
``._orig_mod`` for ``torch.compile``'s OptimizedModule) and prefixes every parameter
name with ``module.`` or ``_orig_mod.``. trp works on the model inside: layer names,
recipes and saved files never carry the prefix.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

__all__ = ["unwrap", "WRAPPER_PREFIXES", "wrapper_prefix"]

#: Name prefixes the wrappers add to every parameter and buffer.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _inner(model: nn.Module) -> Optional[nn.Module]:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any (nested) DDP / DataParallel / torch.compile wrappers."""
    inner = _inner(model)
    while inner is not None:
        model = inner
        inner = _inner(model)
    return model


def wrapper_prefix(names: Iterable[str]) -> Optional[str]:
    """The wrapper prefix (``"module."``, ``"_orig_mod."``, or a nesting of them) every name carries, else None."""
    names = list(names)
    if not names:
        return None
    prefix = ""
    while True:
        rest = [n[len(prefix):] for n in names]
        step = next((p for p in WRAPPER_PREFIXES if all(r.startswith(p) for r in rest)), None)
        if step is None:
            return prefix or None
        prefix += step
