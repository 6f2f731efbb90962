"""Dilated ResNet backbones for semantic segmentation, with optional local pretrained weights.

PSPNet (Zhao et al. 2017, the network of seed ``000_e58e526c3e6fcb5b.txt`` §2 Fig. 1 and Table 1)
and DeepLabV3 run a ResNet whose last two stages replace their stride by dilation, so the
feature map is 1/8 of the input (output stride 8). This module builds that backbone for depths
18, 34, 50 and 101 with a configurable ``base_width`` (64 is torchvision's ResNet; 8 or 16 make
a tiny network that trains on CPU). Parameter names are torchvision's (``conv1``, ``bn1``,
``layer1`` … ``layer4``, ``downsample.0``), so torchvision's ImageNet ResNet weights load into a
``base_width=64`` backbone: from a file, or by the name of a torchvision weights enum
(``"IMAGENET1K_V1"``) when that checkpoint is already in torch hub's cache. Nothing downloads.

No operation runs in place, so module backward hooks (per-layer gradient diagnostics) work.

Example::

    >>> backbone = DilatedResNet(18, base_width=8)
    >>> [f.shape[1:] for f in backbone(torch.randn(2, 3, 32, 32)).values()]
    [torch.Size([32, 4, 4]), torch.Size([64, 4, 4])]
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import get_model_weights

from lightning_tricks import checks

DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
"""ResNet depth -> (block kind, blocks per stage), as in He et al. 2016 and torchvision."""


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection; ``dilation`` widens both (out of place)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided, dilated) → 1×1 ×4 with a residual connection (torchvision's v1.5 layout)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class DilatedResNet(nn.Module):
    """ResNet-``depth`` of output stride 8: ``layer3`` and ``layer4`` dilate by 2 and 4 instead of striding.

    ``forward`` returns ``{"aux": layer3 features, "out": layer4 features}``, both at 1/8 of the
    input size, with :attr:`aux_channels` and :attr:`out_channels` channels
    (``4·base_width·e`` and ``8·base_width·e``, ``e`` = 1 for depths 18/34, 4 for 50/101).

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: input image channels.
        base_width: channels of the first stage (torchvision: 64).

    Raises:
        ValueError / TypeError: ``depth`` not in :data:`DEPTHS`, or a width/channel count < 1.
    """

    def __init__(self, depth: int = 50, in_channels: int = 3, base_width: int = 64) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"`depth` must be one of {sorted(DEPTHS)}; got {depth!r}.")
        checks.integer("in_channels", in_channels, minimum=1)
        checks.integer("base_width", base_width, minimum=1)
        kind, blocks = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.base_width = depth, base_width
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._in = base_width
        self.layer1 = self._stage(block, base_width, blocks[0], stride=1, dilation=1)
        self.layer2 = self._stage(block, 2 * base_width, blocks[1], stride=2, dilation=1)
        self.layer3 = self._stage(block, 4 * base_width, blocks[2], stride=1, dilation=2)
        self.layer4 = self._stage(block, 8 * base_width, blocks[3], stride=1, dilation=4)
        self.aux_channels = 4 * base_width * block.expansion
        self.out_channels = 8 * base_width * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block: type, planes: int, count: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in != planes * block.expansion:
            downsample = _conv_bn(self._in, planes * block.expansion, 1, stride)
        # The first block of a dilated stage uses half the dilation (Yu et al. 2017, DRN), as torchvision.
        layers = [block(self._in, planes, stride, max(dilation // 2, 1), downsample)]
        self._in = planes * block.expansion
        layers += [block(self._in, planes, 1, dilation, None) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        aux = self.layer3(self.layer2(self.layer1(x)))
        return {"aux": aux, "out": self.layer4(aux)}

    def load_pretrained(self, weights: str | PathLike) -> None:
        """Load torchvision ResNet ImageNet weights (its classifier ``fc.*`` is dropped).

        ``weights`` is a file holding a torchvision ResNet ``state_dict``, or the name of a member of
        torchvision's ``ResNet{depth}_Weights`` (e.g. ``"IMAGENET1K_V1"``, ``"DEFAULT"``), read from
        torch hub's checkpoint cache where torchvision would have saved it. Nothing downloads.

        Raises:
            FileNotFoundError: the file (or the cached checkpoint) does not exist; the message names
                the path and, for a weights name, the URL to fetch it from by hand.
            ValueError: the weights do not fit this backbone (e.g. ``base_width != 64``).
        """
        path = _weights_path(self.depth, weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        missing = sorted(set(own) - set(state))
        if wrong or missing:
            raise ValueError(
                f"`backbone_weights` {str(path)!r} do not fit ResNet-{self.depth} with base_width="
                f"{self.base_width}: {len(wrong)} unexpected or mis-shaped tensors (e.g. {wrong[:2]}), "
                f"{len(missing)} missing (e.g. {missing[:2]}); torchvision's weights need base_width=64 "
                "and in_channels=3."
            )
        self.load_state_dict(state)


def _weights_path(depth: int, weights: str | PathLike) -> Path:
    """The local file of ``weights``: the path itself, or torch hub's cached copy of a torchvision enum member."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    enum = get_model_weights(f"resnet{depth}")
    if isinstance(weights, str) and weights in enum.__members__:
        url = enum[weights].url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if cached.is_file():
            return cached
        raise FileNotFoundError(
            f"ResNet-{depth} weights {weights!r} are not in torch hub's cache: {cached} does not exist. "
            f"Nothing is downloaded here; fetch {url} into that folder, or pass the path of a local file."
        )
    raise FileNotFoundError(
        f"`backbone_weights` {str(weights)!r}: no such file ({path.resolve()}), and not a member of "
        f"torchvision's ResNet{depth}_Weights ({', '.join(enum.__members__)})."
    )
