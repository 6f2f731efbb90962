"""Semantic-segmentation networks of seed ``000_e58e526c3e6fcb5b.txt`` §1–§5, built by name.

- ``pspnet``: PSPNet (Zhao et al. 2017, "Pyramid Scene Parsing Network"; seed 000 Fig. 1 and
  Table 1 train PSPNet-101): a dilated ResNet, a pyramid pooling module over 1×1, 2×2, 3×3 and
  6×6 bins, and an optional auxiliary head on ``layer3`` (weight 0.4 in the loss).
- ``fcn``, ``deeplabv3``: torchvision's ``FCN`` and ``DeepLabV3`` models with their heads
  (``FCNHead``, ``DeepLabHead`` with ASPP) on the same dilated ResNet.

Every network maps ``(B, C, H, W)`` images to ``{"out": logits}`` (plus ``"aux"`` with the auxiliary
head), logits ``(B, num_classes, H, W)`` at the input resolution (bilinear upsampling). The backbone
is randomly initialised unless ``backbone_weights`` names local torchvision ResNet weights (see
:meth:`~lightning_tricks.models.nets.dilated_resnet.DilatedResNet.load_pretrained`); nothing
downloads. ``backbone="resnet18", base_width=8`` gives a tiny network for CPU runs on small images.

Example::

    >>> net = build_segmentation_net("pspnet", num_classes=4, backbone="resnet18", base_width=8)
    >>> {k: v.shape for k, v in net(torch.randn(2, 3, 32, 32)).items()}
    {'out': torch.Size([2, 4, 32, 32]), 'aux': torch.Size([2, 4, 32, 32])}
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import FCN, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from lightning_tricks import checks

from .dilated_resnet import DEPTHS, DilatedResNet

SEGMENTATION_NETWORKS = ("pspnet", "fcn", "deeplabv3")
BACKBONES = tuple(f"resnet{depth}" for depth in DEPTHS)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    ]


class PyramidPooling(nn.Module):
    """Average-pool the features into b×b bins for each b, reduce each to ``C/len(bins)`` channels
    (1×1 conv, BN, ReLU), upsample back bilinearly and concatenate with the features (PSPNet §3.2)."""

    def __init__(self, channels: int, bins: Sequence[int]) -> None:
        super().__init__()
        reduced = max(channels // len(bins), 1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(channels, reduced, 1)) for b in bins
        )
        self.out_channels = channels + reduced * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(x), size, mode="bilinear", align_corners=False) for stage in self.stages
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPNet(nn.Module):
    """PSPNet: dilated ResNet → pyramid pooling → 3×3 conv, BN, ReLU, dropout 0.1 → 1×1 classifier.

    Args:
        backbone: a :class:`DilatedResNet` (output stride 8).
        num_classes: output classes.
        bins: pyramid bin sizes (PSPNet: 1, 2, 3, 6).
        aux_loss: also return the auxiliary head's logits from ``layer3`` under ``"aux"``.
    """

    def __init__(
        self,
        backbone: DilatedResNet,
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.ppm = PyramidPooling(backbone.out_channels, bins)
        hidden = backbone.out_channels // 4
        self.classifier = nn.Sequential(
            *_conv_bn_relu(self.ppm.out_channels, hidden, 3),
            nn.Dropout2d(0.1),
            nn.Conv2d(hidden, num_classes, 1),
        )
        self.aux_classifier = (
            nn.Sequential(
                *_conv_bn_relu(backbone.aux_channels, backbone.aux_channels // 4, 3),
                nn.Dropout2d(0.1),
                nn.Conv2d(backbone.aux_channels // 4, num_classes, 1),
            )
            if aux_loss
            else None
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        result = {"out": _upsample(self.classifier(self.ppm(features["out"])), size)}
        if self.aux_classifier is not None:
            result["aux"] = _upsample(self.aux_classifier(features["aux"]), size)
        return result


def _upsample(logits: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(logits, size, mode="bilinear", align_corners=False)


def build_segmentation_net(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    *,
    backbone: str = "resnet50",
    base_width: int = 64,
    aux_loss: bool = True,
    bins: Sequence[int] = (1, 2, 3, 6),
    backbone_weights: str | PathLike | None = None,
) -> nn.Module:
    """Build the segmentation network ``name`` (one of :data:`SEGMENTATION_NETWORKS`).

    Args:
        name: ``"pspnet"``, ``"fcn"`` or ``"deeplabv3"``.
        num_classes: output classes (21 for Pascal VOC, 19 for Cityscapes).
        in_channels: input image channels.
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"`` (dilated).
        base_width: channels of the backbone's first stage (64 = torchvision's ResNet).
        aux_loss: add the auxiliary head on ``layer3`` (its logits under ``"aux"``).
        bins: PSPNet's pyramid bin sizes.
        backbone_weights: ``None`` (random initialisation), a local file of torchvision ResNet
            weights, or a torchvision weights name found in torch hub's cache (``"IMAGENET1K_V1"``).

    Raises:
        ValueError: unknown ``name`` or ``backbone``, or a count < 1.
        TypeError: an argument of the wrong type.
        FileNotFoundError: ``backbone_weights`` names weights that are not on this machine.
    """
    if name not in SEGMENTATION_NETWORKS:
        raise ValueError(f"`arch` must be one of {', '.join(SEGMENTATION_NETWORKS)}; got {name!r}.")
    if backbone not in BACKBONES:
        raise ValueError(f"`backbone` must be one of {', '.join(BACKBONES)}; got {backbone!r}.")
    checks.integer("num_classes", num_classes, minimum=1)
    checks.boolean("aux_loss", aux_loss)
    bins = checks.integers("bins", bins, minimum=1)
    trunk = DilatedResNet(int(backbone.removeprefix("resnet")), in_channels, base_width)
    if backbone_weights is not None:
        trunk.load_pretrained(backbone_weights)
    if name == "pspnet":
        return PSPNet(trunk, num_classes, bins, aux_loss)
    aux = FCNHead(trunk.aux_channels, num_classes) if aux_loss else None
    if name == "fcn":
        return FCN(trunk, FCNHead(trunk.out_channels, num_classes), aux)
    return DeepLabV3(trunk, DeepLabHead(trunk.out_channels, num_classes), aux)
