"""A fully connected network for MNIST-sized images, like the LoRITa paper's FC nets.

The input is flattened and passed through hidden Linear layers with ReLU between them
(default widths 500-300-100), then a Linear classifier. Weights are Kaiming-normal
(``fan_in``, ReLU gain), biases zero.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from torch import Tensor, nn

__all__ = ["MLP", "mlp", "default_image_size"]


def default_image_size(in_channels: int) -> tuple[int, int]:
    """28×28 for one channel (MNIST), 32×32 otherwise (CIFAR): the library's datasets."""
    return (28, 28) if in_channels == 1 else (32, 32)


class MLP(nn.Module):
    """Flatten, then ``Linear → ReLU`` for each hidden width, then a Linear classifier.

    Modules are named ``features.fc1, features.fc2, …`` and ``classifier``. The input must
    be ``(batch, in_channels, *input_size)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: tuple[int, int] = (28, 28),
        hidden: Sequence[int] = (500, 300, 100),
    ) -> None:
        super().__init__()
        h, w = (int(v) for v in input_size)
        if in_channels < 1 or num_classes < 1 or h < 1 or w < 1:
            raise ValueError(
                f"in_channels, num_classes and input_size must be positive, got {in_channels}, "
                f"{num_classes} and {tuple(input_size)}"
            )
        if any(int(d) < 1 for d in hidden):
            raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}")
        self.in_channels = in_channels
        self.input_size = (h, w)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_channels * h * w
        for i, d in enumerate(hidden, 1):
            layers[f"fc{i}"] = nn.Linear(width, int(d))
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            width = int(d)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, *self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"this MLP was built for inputs of shape (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}; build it with the matching in_channels and input_size"
            )
        return self.classifier(self.features(x.flatten(1)))


def mlp(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: Optional[tuple[int, int]] = None,
    hidden: Sequence[int] = (500, 300, 100),
) -> MLP:
    """Fully connected net ``C·H·W → 500 → 300 → 100 → classes`` (registered as ``"mlp"``).

    ``input_size`` is ``(H, W)``; None means :func:`default_image_size` (28×28 for one
    channel, 32×32 otherwise). About 0.57M parameters on MNIST.
    """
    size = default_image_size(in_channels) if input_size is None else input_size
    return MLP(in_channels, num_classes, size, hidden)
