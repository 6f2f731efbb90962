"""torchvision's ResNet-34, DenseNet-121 and MobileNetV2, adapted to 32×32 images.

Seed ``000_e58e526c3e6fcb5b.txt`` §5.1 (Random Gradient) trains ResNet-34, DenseNet-121 and
MobileNetV2 on CIFAR-10. The networks here are torchvision's, randomly initialised (no
pretrained weights), with the usual CIFAR adaptation of their ImageNet stem so that a 32×32
image is not shrunk to 8×8 before the first block:

- ResNet-34: the 7×7 stride-2 stem convolution becomes 3×3 stride 1 (64 channels) and the 3×3
  max-pooling is removed;
- DenseNet-121: likewise, 3×3 stride-1 ``conv0`` (64 channels) and no ``pool0``;
- MobileNetV2: the first convolution (3×3, 32 channels) gets stride 1.

The new stem convolution takes ``in_channels`` inputs and is initialised like the rest of its
network (torchvision's Kaiming-normal rule of that model); the classifier has ``num_classes``
outputs. torchvision's global average pooling makes any input of at least 8×8 pixels work.

The networks are also made safe for module backward hooks (``register_full_backward_hook``),
which per-layer gradient diagnostics rely on: activations do not run in place, and the ResNet
block and the DenseNet head, which modify a BatchNorm output in place in torchvision, are
replaced by out-of-place equivalents with the same parameters.

Example::

    >>> net = resnet34(num_classes=10)
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet, mobilenet_v2
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, ResNet

from lightning_tricks import checks


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's ResNet ``BasicBlock`` (same arguments) computed without in-place operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class OutOfPlaceDenseNet(DenseNet):
    """torchvision's ``DenseNet`` (same arguments); the final ReLU keeps BN's output intact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(out, 1))


def _stem_conv(in_channels: int, out_channels: int, fan_mode: str) -> nn.Conv2d:
    """3×3 stride-1 convolution, Kaiming-normal initialised with the given fan mode."""
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode=fan_mode, nonlinearity="relu")
    return conv


def _disable_inplace_activations(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            module.inplace = False


def resnet34(num_classes: int, in_channels: int = 3) -> ResNet:
    """torchvision ResNet-34 with a 3×3 stride-1 stem and no max-pooling (seed 000 §5.1).

    Raises:
        ValueError: ``num_classes`` or ``in_channels`` < 1.
        TypeError: either is not an int.
    """
    num_classes = checks.integer("num_classes", num_classes, minimum=1)
    in_channels = checks.integer("in_channels", in_channels, minimum=1)
    net = ResNet(OutOfPlaceBasicBlock, [3, 4, 6, 3], num_classes=num_classes)
    net.conv1 = _stem_conv(in_channels, 64, fan_mode="fan_out")
    net.maxpool = nn.Identity()
    _disable_inplace_activations(net)
    return net


def densenet121(num_classes: int, in_channels: int = 3) -> DenseNet:
    """torchvision DenseNet-121 with a 3×3 stride-1 ``conv0`` and no ``pool0`` (seed 000 §5.1).

    Raises:
        ValueError: ``num_classes`` or ``in_channels`` < 1.
        TypeError: either is not an int.
    """
    num_classes = checks.integer("num_classes", num_classes, minimum=1)
    in_channels = checks.integer("in_channels", in_channels, minimum=1)
    net = OutOfPlaceDenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)
    net.features.conv0 = _stem_conv(in_channels, 64, fan_mode="fan_in")
    net.features.pool0 = nn.Identity()
    _disable_inplace_activations(net)
    return net


def mobilenetv2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """torchvision MobileNetV2 whose first convolution has stride 1 (seed 000 §5.1).

    Raises:
        ValueError: ``num_classes`` or ``in_channels`` < 1.
        TypeError: either is not an int.
    """
    num_classes = checks.integer("num_classes", num_classes, minimum=1)
    in_channels = checks.integer("in_channels", in_channels, minimum=1)
    net = mobilenet_v2(weights=None, num_classes=num_classes)
    net.features[0][0] = _stem_conv(in_channels, 32, fan_mode="fan_out")
    _disable_inplace_activations(net)
    return net
