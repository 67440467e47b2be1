"""Model registry: build networks by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from trp.models.resnet_cifar import (
    BasicBlock,
    CifarResNet,
    ShortcutA,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet_cifar,
)

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "resnet_cifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a factory ``f(*, in_channels, num_classes) -> nn.Module`` as ``name``."""

    def decorator(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, *, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Build the registered model ``name``; an unknown name raises ``ValueError``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}"
        ) from None
    return factory(in_channels=in_channels, num_classes=num_classes)


for _name, _factory in (
    ("resnet20", resnet20),
    ("resnet32", resnet32),
    ("resnet44", resnet44),
    ("resnet56", resnet56),
    ("resnet110", resnet110),
):
    register_model(_name)(_factory)
del _name, _factory
