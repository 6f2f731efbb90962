"""CIFAR ResNets of depth 6n + 2 as trained in seed ``004_e5d92837cb57ce8a.txt`` §4.

Seed 004 (Liao et al., "Approximate Fisher Information Matrix to Characterize the Training of
Deep Neural Networks") trains a 110-layer ResNet on CIFAR-10/100 and SVHN (1.73 M parameters)
and an 8-layer ResNet on MNIST. The network is the CIFAR ResNet of He et al. (2016): a 3×3 stem
convolution, three stages of ``n`` residual units with 16, 32 and 64 channels (the first unit of
stages 2 and 3 halves the resolution), global average pooling and a linear classifier.

Residual unit (seed 004 §4 and eq. 1, ``r_l(v) = f_r(v) + v``)::

    f_r = Conv3×3 → BN → ReLU → Conv3×3 → BN        output = f_r(v) + shortcut(v)

There is no ReLU after the addition: the seed lists exactly these five operators and notes that
this unit beats the original one (its ref. [44]); the authors' released code agrees, and, like
it, the stem is Conv3×3 → BN and the network ends with BN → ReLU before the pooling. The
shortcut has no parameters ("option A" of He et al.): stride-2 subsampling and zero-padding of
the new channels. Convolutions have no bias (a BatchNorm follows each) and are initialised
N(0, 2 / (3·3·C_out)) as in the authors' code; BatchNorm and the classifier weight keep
PyTorch's defaults, the classifier bias starts at zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks import checks

from ._init import init_like_seed004

WIDTHS = (16, 32, 64)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: keep every ``stride``-th pixel, zero-pad the extra channels.

    Args:
        in_channels: channels of the unit's input.
        out_channels: channels of the unit's output (>= ``in_channels``).
        stride: spatial subsampling factor of the unit.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class ResidualUnit(nn.Module):
    """``f_r(v) + shortcut(v)`` with ``f_r`` = Conv3×3-BN-ReLU-Conv3×3-BN (seed 004 §4, eq. 1).

    Args:
        in_channels: channels of the input ``v``.
        out_channels: channels of the output.
        stride: stride of the first convolution (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            _conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            _conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class CifarResNet(nn.Module):
    """ResNet for small images, depth ``6n + 2`` (seed 004 §4; He et al. 2016, §4.2).

    ``depth`` counts the weight layers: the stem convolution, ``6n`` convolutions in ``3n``
    residual units and the classifier. Any input of at least 8×8 pixels works (global
    average pooling before the classifier).

    Args:
        depth: ``6n + 2`` for some n >= 1 (8, 20, 32, 56, 110, ...).
        num_classes: number of outputs.
        in_channels: channels of the input images.

    Raises:
        ValueError: ``depth`` is not of the form 6n + 2, or an argument is < 1.
        TypeError: an argument is not an int.

    Example::

        >>> net = CifarResNet(depth=20, num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        units_per_stage = _units_per_stage(depth)
        num_classes = checks.integer("num_classes", num_classes, minimum=1)
        in_channels = checks.integer("in_channels", in_channels, minimum=1)
        self.stem = nn.Sequential(_conv3x3(in_channels, WIDTHS[0]), nn.BatchNorm2d(WIDTHS[0]))
        self.stages = nn.Sequential(*_stages(units_per_stage))
        self.head = nn.Sequential(
            nn.BatchNorm2d(WIDTHS[-1]),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(WIDTHS[-1], num_classes),
        )
        init_like_seed004(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _units_per_stage(depth: int) -> int:
    """n = (depth − 2) / 6; raise if depth is not 6n + 2 with n >= 1."""
    depth = checks.integer("depth", depth, minimum=1)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


def _stages(units_per_stage: int) -> list[ResidualUnit]:
    units, in_channels = [], WIDTHS[0]
    for stage, width in enumerate(WIDTHS):
        for index in range(units_per_stage):
            stride = 2 if stage > 0 and index == 0 else 1
            units.append(ResidualUnit(in_channels, width, stride))
            in_channels = width
    return units


def resnet_cifar(num_classes: int, in_channels: int = 3, *, depth: int = 20) -> CifarResNet:
    """CIFAR ResNet of any depth 6n + 2 (seed 004 §4); see :class:`CifarResNet`."""
    return CifarResNet(depth, num_classes, in_channels)


def resnet8(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """8-layer ResNet, 3 residual units (seed 004 §4, the MNIST model)."""
    return CifarResNet(8, num_classes, in_channels)


def resnet20(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """20-layer CIFAR ResNet (0.27 M parameters)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """32-layer CIFAR ResNet (0.46 M parameters)."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """56-layer CIFAR ResNet (0.85 M parameters)."""
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """110-layer CIFAR ResNet, 54 residual units, 1.73 M parameters (seed 004 §4)."""
    return CifarResNet(110, num_classes, in_channels)
