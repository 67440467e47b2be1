"""Model definitions shared by test_io.py and the subprocess that loads its checkpoints.

Builders take no seed: the architecture alone is fixed, weights come from the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(2 * width, 2 * width, (3, 5), padding=(1, 2), bias=False)
        self.dw = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.fc1 = nn.Linear(2 * width, 24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.dw(torch.relu(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((-2, -1)))))


class Other(nn.Module):
    """A different architecture: no `conv2`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.conv1(self.stem(x)).mean((-2, -1)))


BUILDERS = {
    "net": lambda: Net(),
    "net5": lambda: Net(num_classes=5),
    "other": lambda: Other(),
}


def build(kind: str) -> nn.Module:
    return BUILDERS[kind]()
