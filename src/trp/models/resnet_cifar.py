"""CIFAR ResNets of He et al. 2016 (section 4.2): depth 6n+2 with option-A shortcuts.

Weights are initialized with Kaiming-normal: ``fan_out`` mode for convolutions and
``fan_in`` mode for the linear classifier (ReLU gain in both cases); biases are zero,
batch-norm weights one and biases zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ShortcutA",
    "BasicBlock",
    "CifarResNet",
    "resnet_cifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: spatial subsampling plus zero channel padding.

    With ``stride > 1`` the input is subsampled as ``x[:, :, ::stride, ::stride]``; when
    ``out_planes > in_planes`` zero channels are appended after the input channels.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"ShortcutA cannot reduce channels ({in_planes} -> {out_planes})")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - self.in_planes
        if extra > 0:
            # F.pad pads trailing dims first: (W_left, W_right, H_top, H_bottom, C_front, C_back).
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, followed by ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 16/32/64-channel stages of ``n`` basic blocks each."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_cifar(depth: int, *, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet of the given depth (6n+2)."""
    return CifarResNet(depth, in_channels=in_channels, num_classes=num_classes)


def resnet20(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (n=3, 0.27M parameters for 10 classes)."""
    return CifarResNet(20, in_channels=in_channels, num_classes=num_classes)


def resnet32(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (n=5)."""
    return CifarResNet(32, in_channels=in_channels, num_classes=num_classes)


def resnet44(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (n=7)."""
    return CifarResNet(44, in_channels=in_channels, num_classes=num_classes)


def resnet56(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (n=9)."""
    return CifarResNet(56, in_channels=in_channels, num_classes=num_classes)


def resnet110(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-110 (n=18)."""
    return CifarResNet(110, in_channels=in_channels, num_classes=num_classes)
