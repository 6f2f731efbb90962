"""VGG38 and VGG08 exactly as in seed ``001_0184062a2e770d9a.txt`` §5.2–5.3.

Seed 001 ("MLP Coursework 2: Investigating the Optimization of Convolutional Networks") shows
that VGG38 fails to learn on CIFAR-100 because of vanishing gradients (its Fig. 1) and that a
BatchNorm after every convolution fixes it (§5.3, Fig. 2); VGG08 is the shallow control (Fig. 3).

Architecture (§5.2): every Conv2D has 32 filters, kernel 3, padding 1; every activation is
LeakyReLU with negative slope 0.01.

- input block: Conv2D → LeakyReLU;
- 3 stages, each of N convolutional blocks (Conv2D → LeakyReLU → Conv2D → LeakyReLU) and one
  dimensionality-reduction block (Conv2D → LeakyReLU → AvgPool2d(2) → Conv2D → LeakyReLU);
- fully connected output layer (softmax is left to the loss), after global average pooling.

VGG38: N = 5, 1 + 3·(2·5 + 2) + 1 = 38 weight layers. VGG08: N = 0, 1 + 3·2 + 1 = 8.
``batch_norm=True`` puts a BatchNorm2d after every Conv2D (before its LeakyReLU, §5.3); the
convolutions then have no bias, which the BatchNorm would cancel. Initialisation is PyTorch's
default. Three 2×2 poolings take an 8×8 input to 1×1, so every input of at least 8×8 works.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_tricks import checks

WIDTH = 32
NEGATIVE_SLOPE = 0.01
NUM_STAGES = 3


class VGG(nn.Module):
    """The VGG family of seed 001 §5.2 with ``blocks_per_stage`` convolutional blocks per stage.

    Args:
        blocks_per_stage: convolutional blocks N before each reduction block (5: VGG38, 0: VGG08).
        num_classes: number of outputs.
        in_channels: channels of the input images.
        batch_norm: BatchNorm2d after every Conv2D (seed 001 §5.3).

    Raises:
        ValueError: ``num_classes``/``in_channels`` < 1 or ``blocks_per_stage`` < 0.
        TypeError: an argument has the wrong type.

    Example::

        >>> net = VGG(blocks_per_stage=5, num_classes=100, batch_norm=True)  # VGG38 + BN
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int,
        in_channels: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(blocks_per_stage, bool) or not isinstance(blocks_per_stage, int):
            raise TypeError(f"`blocks_per_stage` must be an int >= 0, got {blocks_per_stage!r}")
        if blocks_per_stage < 0:
            raise ValueError(f"`blocks_per_stage` must be an int >= 0, got {blocks_per_stage}")
        num_classes = checks.integer("num_classes", num_classes, minimum=1)
        in_channels = checks.integer("in_channels", in_channels, minimum=1)
        self.batch_norm = checks.boolean("batch_norm", batch_norm)

        layers = self._conv_act(in_channels)
        for _ in range(NUM_STAGES):
            for _ in range(blocks_per_stage):
                layers += self._conv_act() + self._conv_act()
            layers += [*self._conv_act(), nn.AvgPool2d(2), *self._conv_act()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, num_classes))

    def _conv_act(self, in_channels: int = WIDTH) -> list[nn.Module]:
        """Conv2D(k3, p1, 32 filters) [→ BatchNorm2d] → LeakyReLU(0.01)."""
        conv = nn.Conv2d(in_channels, WIDTH, 3, padding=1, bias=not self.batch_norm)
        norm = [nn.BatchNorm2d(WIDTH)] if self.batch_norm else []
        return [conv, *norm, nn.LeakyReLU(NEGATIVE_SLOPE)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg38(num_classes: int, in_channels: int = 3, *, batch_norm: bool = False) -> VGG:
    """VGG38 of seed 001 §5.2 (5 convolutional blocks per stage, 38 weight layers)."""
    return VGG(5, num_classes, in_channels, batch_norm)


def vgg08(num_classes: int, in_channels: int = 3, *, batch_norm: bool = False) -> VGG:
    """VGG08 of seed 001 §5.2, Fig. 3 (no convolutional blocks, 8 weight layers)."""
    return VGG(0, num_classes, in_channels, batch_norm)
