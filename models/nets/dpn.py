"""Dual Path Networks for CIFAR (Chen et al. 2017), seed ``002_696f8026b30a9c31.txt`` §4.

Seed 002 ("What's the Best Mini-batch?") computes its mini-batch/full-batch gradient distances on
CIFAR-10 with a 92-layer Dual Path Network, built on the public CIFAR code it cites, which adapts
DPN to 32×32 images: a 3×3 stride-1 stem convolution with 64 channels and no max-pooling, four
stages with strides 1, 2, 2, 2, global average pooling and a linear classifier.

A dual path block (Chen et al., §3) runs a bottleneck
``Conv1×1 → BN → ReLU → Conv3×3 (32 groups, stride s) → BN → ReLU → Conv1×1 → BN`` whose output
has ``R + g`` channels. The first ``R`` channels are *added* to the shortcut's first ``R`` channels
(the residual path, which re-uses features); the last ``g`` channels are *concatenated* after all
of the shortcut's channels (the densely connected path, which explores new features). A ReLU
follows. The first block of a stage projects its input with a strided Conv1×1 → BN to ``R + g``
channels; the others pass it through, so a stage of ``n`` blocks ends with ``R + (n + 1)·g``
channels.

Stage settings (bottleneck width, R, g, blocks), shared by both depths:
widths (96, 192, 384, 768), R = (256, 512, 1024, 2048), g = (16, 32, 24, 128);
DPN-26 has (2, 2, 2, 2) blocks, DPN-92 has (3, 4, 20, 3). Convolutions have no bias; all weights
keep PyTorch's default initialisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks import checks

GROUPS = 32
STEM_CHANNELS = 64


class StageConfig(NamedTuple):
    """One DPN stage: bottleneck width, residual channels R, dense growth g, blocks, stride."""

    bottleneck_width: int
    residual_channels: int
    dense_growth: int
    num_blocks: int
    stride: int


def _dpn_stages(num_blocks: tuple[int, int, int, int]) -> tuple[StageConfig, ...]:
    widths, residual, growth, strides = (
        (96, 192, 384, 768),
        (256, 512, 1024, 2048),
        (16, 32, 24, 128),
        (1, 2, 2, 2),
    )
    return tuple(
        StageConfig(*stage) for stage in zip(widths, residual, growth, num_blocks, strides, strict=True)
    )


DPN26_STAGES = _dpn_stages((2, 2, 2, 2))
DPN92_STAGES = _dpn_stages((3, 4, 20, 3))


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
    )
    return [conv, nn.BatchNorm2d(out_channels)]


class DualPathBlock(nn.Module):
    """Bottleneck whose output splits into a residual part (added) and a dense part (concatenated).

    Args:
        in_channels: channels of the input.
        bottleneck_width: channels of the two inner convolutions (a multiple of 32).
        residual_channels: R, channels of the residual path.
        dense_growth: g, channels appended to the dense path.
        stride: stride of the grouped 3×3 convolution.
        project: project the input with a strided Conv1×1 → BN (first block of a stage).
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_width: int,
        residual_channels: int,
        dense_growth: int,
        stride: int,
        project: bool,
    ) -> None:
        super().__init__()
        out_channels = residual_channels + dense_growth
        self.residual_channels = residual_channels
        self.bottleneck = nn.Sequential(
            *_conv_bn(in_channels, bottleneck_width, 1),
            nn.ReLU(),
            *_conv_bn(bottleneck_width, bottleneck_width, 3, stride, GROUPS),
            nn.ReLU(),
            *_conv_bn(bottleneck_width, out_channels, 1),
        )
        self.shortcut = (
            nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride)) if project else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new, old = self.bottleneck(x), self.shortcut(x)
        r = self.residual_channels
        return F.relu(torch.cat([old[:, :r] + new[:, :r], old[:, r:], new[:, r:]], dim=1))


class DPN(nn.Module):
    """Dual Path Network for small images (Chen et al. 2017; seed 002 §4).

    Any input of at least 8×8 pixels works (global average pooling before the classifier).

    Args:
        stages: one :class:`StageConfig` per stage (``DPN26_STAGES``, ``DPN92_STAGES``).
        num_classes: number of outputs.
        in_channels: channels of the input images.

    Raises:
        ValueError: ``num_classes`` or ``in_channels`` < 1, or ``stages`` is empty.
        TypeError: ``num_classes`` or ``in_channels`` is not an int.

    Example::

        >>> net = DPN(DPN26_STAGES, num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, stages: tuple[StageConfig, ...], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        num_classes = checks.integer("num_classes", num_classes, minimum=1)
        in_channels = checks.integer("in_channels", in_channels, minimum=1)
        if not stages:
            raise ValueError("`stages` must hold at least one StageConfig")
        self.stem = nn.Sequential(*_conv_bn(in_channels, STEM_CHANNELS, 3), nn.ReLU())
        blocks, channels = [], STEM_CHANNELS
        for stage in stages:
            for index in range(stage.num_blocks):
                first = index == 0
                blocks.append(
                    DualPathBlock(
                        channels,
                        stage.bottleneck_width,
                        stage.residual_channels,
                        stage.dense_growth,
                        stage.stride if first else 1,
                        project=first,
                    )
                )
                channels = stage.residual_channels + (index + 2) * stage.dense_growth
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def dpn26(num_classes: int, in_channels: int = 3) -> DPN:
    """DPN-26 for CIFAR: 2 dual path blocks per stage (11.6 M parameters at 10 classes)."""
    return DPN(DPN26_STAGES, num_classes, in_channels)


def dpn92(num_classes: int, in_channels: int = 3) -> DPN:
    """DPN-92 for CIFAR, the network of seed 002 §4 (34.2 M parameters at 10 classes)."""
    return DPN(DPN92_STAGES, num_classes, in_channels)
