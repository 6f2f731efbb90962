"""Multilayer perceptron of the toy problem in seed ``004_e5d92837cb57ce8a.txt`` §4.4.

Seed 004 (Liao et al.) also characterises the training of an MLP on MNIST: two fully connected
hidden layers of 500 ReLU units and a 10-way output (softmax is left to the loss), 0.77 M
parameters in all. That count is the one of a 32×32 single-channel input (MNIST padded to
32×32): 1024·500 + 500 + 500·500 + 500 + 500·10 + 10 = 768,010.

The input size is an explicit argument (``image_size``, default 32) so that the parameter count
is fixed at construction and every layer exists before the first batch (per-layer hooks can be
attached at once). An input of another spatial size is first resampled to
``image_size × image_size`` by adaptive average pooling (the identity when the size already
matches), then flattened.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_tricks import checks


class MLP(nn.Module):
    """Flatten → [Linear → ReLU] × len(hidden_sizes) → Linear (seed 004 §4.4).

    Args:
        num_classes: number of outputs.
        in_channels: channels of the input images.
        image_size: side of the square image the first layer is built for; other input sizes
            are resampled to it by adaptive average pooling.
        hidden_sizes: width of each hidden layer.

    Raises:
        ValueError: an int argument is < 1 or ``hidden_sizes`` is empty.
        TypeError: an argument has the wrong type.

    Example::

        >>> net = MLP(num_classes=10, in_channels=1)  # the seed's 0.77 M-parameter MLP
        >>> sum(p.numel() for p in net.parameters())
        768010
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        hidden_sizes: Sequence[int] = (500, 500),
    ) -> None:
        super().__init__()
        num_classes = checks.integer("num_classes", num_classes, minimum=1)
        in_channels = checks.integer("in_channels", in_channels, minimum=1)
        image_size = checks.integer("image_size", image_size, minimum=1)
        hidden_sizes = checks.integers("hidden_sizes", hidden_sizes, minimum=1)

        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(image_size), nn.Flatten()]
        width = in_channels * image_size * image_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp(
    num_classes: int,
    in_channels: int = 3,
    *,
    image_size: int = 32,
    hidden_sizes: Sequence[int] = (500, 500),
) -> MLP:
    """The MLP of seed 004 §4.4 (two hidden layers of 500 ReLU units); see :class:`MLP`."""
    return MLP(num_classes, in_channels, image_size, hidden_sizes)
