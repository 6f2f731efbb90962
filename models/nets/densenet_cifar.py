"""CIFAR DenseNet with one growth rate per block, from seed ``004_e5d92837cb57ce8a.txt`` §4.

Seed 004 (Liao et al.) trains a 110-layer DenseNet on CIFAR-10/100 and SVHN: three dense blocks of
18 dense layers with growth rates 8, 10 and 14, "tuned" to match the 1.73 M parameters of its
ResNet-110, and an 8-layer DenseNet on MNIST. Each dense layer computes (seed 004 eq. 2)
``d_l = f_d([v_1, ..., v_l])`` and its output is concatenated to its input.

Configuration (the one of the authors' released code, which the defaults reproduce):

- stem: Conv3×3 from ``in_channels`` to ``init_channels`` = 16 channels (no BN/ReLU after it);
- dense layer ``f_d``: BN → ReLU → Conv3×3(k), no bottleneck (``bottleneck=True`` uses
  BN → ReLU → Conv1×1(4k) → BN → ReLU → Conv3×3(k), the DenseNet-B layer of Huang et al. 2017);
- transition between blocks: BN → ReLU → Conv1×1(⌊θ·C⌋) → AvgPool2×2, with compression
  θ = ``compression`` = 1 (no compression);
- head: BN → ReLU → global average pooling → Linear.

At the defaults the network has 1.725 M parameters for 10 classes and 3 input channels: 2.5 %
under the 1.77 M the seed quotes, which is as close as the authors' own architecture comes.
Depth = 2 × 3 × 18 + 2 = 110 as the authors count it (their code derives 18 layers per block from
depth 110). The 8-layer MNIST DenseNet of the seed is ``layers_per_block=1`` in that count: about
10,000 parameters, the figure the seed gives (its text also says "6 dense layers", which is
``layers_per_block=2``, about 30,000 parameters).

Convolutions have no bias and are initialised N(0, 2 / (k·k·C_out)) as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_tricks import checks

from ._init import init_like_seed004


def _bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
    ]


class DenseLayer(nn.Module):
    """``[v, f_d(v)]``: the input concatenated with ``growth_rate`` new channels (seed 004 eq. 2).

    Args:
        in_channels: channels of the input (all earlier feature maps of the block).
        growth_rate: channels ``k`` added by this layer.
        bottleneck: put a BN-ReLU-Conv1×1(4k) before the BN-ReLU-Conv3×3(k).
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool) -> None:
        super().__init__()
        layers = []
        if bottleneck:
            layers += _bn_relu_conv(in_channels, 4 * growth_rate, 1)
            in_channels = 4 * growth_rate
        layers += _bn_relu_conv(in_channels, growth_rate, 3)
        self.new_features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.new_features(x)], dim=1)


class CifarDenseNet(nn.Module):
    """DenseNet for small images with one growth rate per dense block (seed 004 §4).

    Any input of at least 8×8 pixels works (global average pooling before the classifier).

    Args:
        num_classes: number of outputs.
        in_channels: channels of the input images.
        growth_rates: growth rate of each dense block; their number is the number of blocks.
        layers_per_block: dense layers in every block.
        init_channels: output channels of the stem convolution.
        bottleneck: use DenseNet-B layers (1×1 convolution to 4k channels first).
        compression: transition compression θ in (0, 1]; a transition keeps ⌊θ·C⌋ channels.

    Raises:
        ValueError: an int argument is < 1, ``growth_rates`` is empty, or ``compression`` is
            outside (0, 1].
        TypeError: an argument has the wrong type.

    Example::

        >>> net = CifarDenseNet(num_classes=10)  # the seed's 110-layer model
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> mnist_net = CifarDenseNet(num_classes=10, in_channels=1, layers_per_block=1)
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        growth_rates: Sequence[int] = (8, 10, 14),
        layers_per_block: int = 18,
        init_channels: int = 16,
        bottleneck: bool = False,
        compression: float = 1.0,
    ) -> None:
        super().__init__()
        num_classes = checks.integer("num_classes", num_classes, minimum=1)
        in_channels = checks.integer("in_channels", in_channels, minimum=1)
        growth_rates = checks.integers("growth_rates", growth_rates, minimum=1)
        layers_per_block = checks.integer("layers_per_block", layers_per_block, minimum=1)
        channels = checks.integer("init_channels", init_channels, minimum=1)
        bottleneck = checks.boolean("bottleneck", bottleneck)
        compression = _compression(compression)

        body: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block, growth_rate in enumerate(growth_rates):
            for _ in range(layers_per_block):
                body.append(DenseLayer(channels, growth_rate, bottleneck))
                channels += growth_rate
            if block < len(growth_rates) - 1:
                reduced = max(1, int(compression * channels))
                body += [*_bn_relu_conv(channels, reduced, 1), nn.AvgPool2d(2)]
                channels = reduced
        self.features = nn.Sequential(*body)
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )
        init_like_seed004(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _compression(value: object) -> float:
    """Return the transition compression θ; raise unless it is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`compression` must be a float in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"`compression` must be in (0, 1], got {value}")
    return float(value)


def densenet_cifar(
    num_classes: int,
    in_channels: int = 3,
    *,
    growth_rates: Sequence[int] = (8, 10, 14),
    layers_per_block: int = 18,
    init_channels: int = 16,
    bottleneck: bool = False,
    compression: float = 1.0,
) -> CifarDenseNet:
    """Seed 004's CIFAR DenseNet (defaults: 110 layers, 1.72 M parameters); see CifarDenseNet."""
    return CifarDenseNet(
        num_classes,
        in_channels,
        growth_rates=growth_rates,
        layers_per_block=layers_per_block,
        init_channels=init_channels,
        bottleneck=bottleneck,
        compression=compression,
    )
