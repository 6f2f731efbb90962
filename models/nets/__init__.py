"""Image-classification networks of the seed experiments, built by name.

Every network maps a batch of images ``(B, in_channels, H, W)`` with ``H, W >= 8`` to logits
``(B, num_classes)``; none of them runs an operation in place, so module backward hooks work.

Registered names (``NETWORKS``) and their sources:

- ``resnet8``, ``resnet20``, ``resnet32``, ``resnet56``, ``resnet110``, and ``resnet_cifar`` with
  any ``depth=6n+2``: CIFAR ResNet with parameter-free shortcuts (seed 004 §4);
- ``densenet_cifar``: DenseNet with growth rates (8, 10, 14), 18 layers per block (seed 004 §4);
- ``mlp``: two hidden layers of 500 ReLU units (seed 004 §4.4);
- ``vgg38``, ``vgg08``: 32-filter VGG with LeakyReLU, optional BatchNorm (seed 001 §5.2-5.3);
- ``resnet34``, ``densenet121``, ``mobilenetv2``: torchvision, stem adapted to 32×32 images
  (seed 000 §5.1);
- ``dpn26``, ``dpn92``: Dual Path Networks for CIFAR (seed 002 §4).

Example::

    >>> from lightning_tricks.models import build_net
    >>> net = build_net("resnet110", num_classes=10)
    >>> net = build_net("vgg38", num_classes=100, batch_norm=True)
    >>> net = build_net("resnet_cifar", num_classes=10, in_channels=1, depth=8)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from .densenet_cifar import CifarDenseNet, densenet_cifar
from .dpn import DPN, dpn26, dpn92
from .mlp import MLP, mlp
from .resnet_cifar import (
    CifarResNet,
    resnet8,
    resnet20,
    resnet32,
    resnet56,
    resnet110,
    resnet_cifar,
)
from .torchvision_cifar import densenet121, mobilenetv2, resnet34
from .vgg import VGG, vgg08, vgg38

NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "resnet_cifar": resnet_cifar,
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "densenet_cifar": densenet_cifar,
    "mlp": mlp,
    "vgg38": vgg38,
    "vgg08": vgg08,
    "resnet34": resnet34,
    "densenet121": densenet121,
    "mobilenetv2": mobilenetv2,
    "dpn26": dpn26,
    "dpn92": dpn92,
}
"""Network name -> builder ``(num_classes, in_channels=3, **options) -> nn.Module``."""


def network_options(name: str) -> tuple[str, ...]:
    """Names of the keyword options that network ``name`` accepts besides the common two."""
    parameters = inspect.signature(_builder(name)).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_net(name: str, num_classes: int, in_channels: int = 3, **options: object) -> nn.Module:
    """Build the network registered as ``name`` in :data:`NETWORKS`.

    Args:
        name: a key of :data:`NETWORKS`.
        num_classes: number of outputs (>= 1).
        in_channels: channels of the input images (>= 1; 1 for MNIST, 3 for CIFAR).
        **options: network-specific options, e.g. ``depth`` for ``resnet_cifar``,
            ``batch_norm`` for ``vgg38``/``vgg08``, ``image_size`` for ``mlp``
            (see :func:`network_options`).

    Raises:
        ValueError: unknown ``name`` (the message lists the available ones), or an argument
            out of range (the message names it).
        TypeError: an option the network does not take, or an argument of the wrong type.

    Example::

        >>> net = build_net("densenet_cifar", num_classes=10, in_channels=1, layers_per_block=1)
    """
    builder = _builder(name)
    unknown = sorted(set(options) - set(network_options(name)))
    if unknown:
        allowed = ", ".join(network_options(name)) or "none"
        raise TypeError(f"network {name!r} got unknown option(s) {', '.join(unknown)}; it accepts: {allowed}")
    return builder(num_classes, in_channels, **options)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; available: {', '.join(NETWORKS)}")
    return NETWORKS[name]


__all__ = [
    "DPN",
    "MLP",
    "NETWORKS",
    "VGG",
    "CifarDenseNet",
    "CifarResNet",
    "build_net",
    "network_options",
]
