"""Weight initialisation shared by the networks of seed ``004_e5d92837cb57ce8a.txt`` §4."""

from __future__ import annotations

from torch import nn


def init_like_seed004(net: nn.Module) -> None:
    """Conv weights ~ N(0, 2 / (k_h·k_w·C_out)) (He et al. 2015, fan-out), linear biases zero.

    This is the initialisation of the seed authors' released ResNet and DenseNet code; BatchNorm
    and linear weights keep PyTorch's defaults.
    """
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
