"""Model registry: build networks by name; real pretrained models from offline packages (:mod:`trp.models.pretrained`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from trp.models.mlp import MLP, mlp
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
from trp.models.pretrained import (
    PretrainedNotInstalled,
    SentenceEncoder,
    minilm_l6_v2,
    mobilenet_v2_imagenet,
)
from trp.models.torchvision_models import (
    create_torchvision_model,
    list_torchvision_models,
    load_pretrained,
    torchvision_name,
)
from trp.models.vit import VisionTransformer, vit_tiny

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "list_torchvision_models",
    "load_pretrained",
    "mobilenet_v2_imagenet",
    "minilm_l6_v2",
    "SentenceEncoder",
    "PretrainedNotInstalled",
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "resnet_cifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "MLP",
    "mlp",
    "VisionTransformer",
    "vit_tiny",
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
    """Build the registered model ``name``; an unknown name raises ``ValueError``.

    Names not registered in trp fall back to torchvision's classification models, built
    with ``weights=None``: ``"torchvision.resnet18"``, or ``"resnet18"`` when no trp model
    has that name (see :func:`list_torchvision_models`; for ``in_channels != 3`` their
    first conv is replaced, and :func:`load_pretrained` loads local weights).
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        if torchvision_name(name) is not None:
            return create_torchvision_model(name, in_channels=in_channels, num_classes=num_classes)
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}; "
            "torchvision classification models are accepted too, as 'torchvision.resnet18' "
            "or 'resnet18' (see trp.models.list_torchvision_models())"
        )
    return factory(in_channels=in_channels, num_classes=num_classes)


for _name, _factory in (
    ("resnet20", resnet20),
    ("resnet32", resnet32),
    ("resnet44", resnet44),
    ("resnet56", resnet56),
    ("resnet110", resnet110),
    ("mlp", mlp),
    ("vit_tiny", vit_tiny),
):
    register_model(_name)(_factory)
del _name, _factory
