"""pix2pix's networks (Isola et al. 2017, the GAN of seed ``000_e58e526c3e6fcb5b.txt`` §1 and §5.2).

- :class:`UNetGenerator`: an encoder of ``depth`` 4×4 stride-2 convolutions (LeakyReLU 0.2,
  BatchNorm except on the first and the innermost) and a mirrored decoder of 4×4 stride-2
  transposed convolutions (ReLU, BatchNorm, dropout 0.5 on the ``dropout_layers`` innermost
  decoder stages), each decoder stage concatenated with its encoder twin; ``tanh`` output in
  [-1, 1]. pix2pix's 256×256 generator is ``depth=8``; an image side must be a multiple of
  ``2**depth``, so ``depth=3`` suits 8×8 images.
- :class:`PatchDiscriminator`: PatchGAN, classifying overlapping patches of the pair
  ``(input, output)`` concatenated along channels: a 4×4 stride-2 convolution (no norm), ``n_layers
  - 1`` more stride-2 ones with BatchNorm, one stride-1 with BatchNorm and a stride-1 convolution to
  one logit per patch. ``n_layers=3`` is pix2pix's 70×70 PatchGAN; ``n_layers=1`` (16×16 patches)
  fits images of 8 pixels.

No operation runs in place, so module backward hooks work.

Example::

    >>> generator = UNetGenerator(3, 3, depth=3, base_channels=8)
    >>> generator(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 3, 8, 8])
    >>> PatchDiscriminator(6, base_channels=8, n_layers=1)(torch.randn(2, 6, 8, 8)).shape
    torch.Size([2, 1, 2, 2])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_tricks import checks


class UNetBlock(nn.Module):
    """One level of the U-Net: ``down`` → inner levels → ``up``, output concatenated with the input."""

    def __init__(self, down: nn.Module, inner: nn.Module | None, up: nn.Module) -> None:
        super().__init__()
        self.down, self.inner, self.up = down, inner, up

    def forward(self, x: Tensor) -> Tensor:
        y = self.down(x)
        if self.inner is not None:
            y = self.inner(y)
        return torch.cat([x, self.up(y)], dim=1)


class UNetGenerator(nn.Module):
    """pix2pix's U-Net generator (Isola et al. 2017, §3.2.1 and appendix 6.1.1).

    Args:
        in_channels: channels of the input image (A).
        out_channels: channels of the generated image (B).
        depth: number of stride-2 downsamplings (>= 2); image sides must be multiples of ``2**depth``.
        base_channels: channels after the first convolution (pix2pix: 64); doubling per level up to 8×.
        dropout_layers: innermost decoder stages with dropout 0.5 (pix2pix: 3, its source of noise).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int = 8,
        base_channels: int = 64,
        dropout_layers: int = 3,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            checks.integer(name, value, minimum=1)
        checks.integer("base_channels", base_channels, minimum=1)
        if checks.integer("depth", depth, minimum=1) < 2:
            raise ValueError(f"`depth` must be an int >= 2; got {depth}.")
        if isinstance(dropout_layers, bool) or not isinstance(dropout_layers, int) or dropout_layers < 0:
            raise ValueError(f"`dropout_layers` must be an int >= 0; got {dropout_layers!r}.")
        self.depth = depth
        widths = [base_channels * min(2**level, 8) for level in range(depth)]
        block: nn.Module | None = None
        for level in reversed(range(1, depth)):  # from the innermost level outwards
            inner_width = widths[level]
            innermost = block is None
            down = [nn.LeakyReLU(0.2), nn.Conv2d(widths[level - 1], inner_width, 4, 2, 1, bias=innermost)]
            if not innermost:
                down.append(nn.BatchNorm2d(inner_width))
            up_in = inner_width if innermost else 2 * inner_width
            up = [nn.ReLU(), nn.ConvTranspose2d(up_in, widths[level - 1], 4, 2, 1, bias=False)]
            up.append(nn.BatchNorm2d(widths[level - 1]))
            if depth - 1 - level < dropout_layers:
                up.append(nn.Dropout(0.5))
            block = UNetBlock(nn.Sequential(*down), block, nn.Sequential(*up))
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 4, 2, 1),
            block,
            nn.ReLU(),
            nn.ConvTranspose2d(2 * widths[0], out_channels, 4, 2, 1),
            nn.Tanh(),
        )
        for module in self.modules():
            _init_normal(module)

    def forward(self, x: Tensor) -> Tensor:
        multiple = 2**self.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"UNetGenerator(depth={self.depth}) needs image sides that are multiples of {multiple}; "
                f"got {tuple(x.shape[-2:])}. Use a smaller `depth` or resize the images."
            )
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN discriminator (Isola et al. 2017, §3.2.2 and appendix 6.1.2).

    Args:
        in_channels: channels of the concatenated pair (A and B channels).
        base_channels: channels of the first convolution (pix2pix: 64), doubling up to 8×.
        n_layers: stride-2 convolutions (pix2pix: 3, 70×70 patches). Inputs need at least
            ``2**n_layers * 3`` pixels a side.
    """

    def __init__(self, in_channels: int, base_channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        checks.integer("in_channels", in_channels, minimum=1)
        checks.integer("base_channels", base_channels, minimum=1)
        checks.integer("n_layers", n_layers, minimum=1)
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = base_channels
        for level in range(1, n_layers + 1):
            out = base_channels * min(2**level, 8)
            stride = 2 if level < n_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)
        for module in self.modules():
            _init_normal(module)

    def forward(self, x: Tensor) -> Tensor:
        smallest = 2**self.n_layers * 3
        if min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"PatchDiscriminator(n_layers={self.n_layers}) needs images of at least {smallest} pixels a "
                f"side; got {tuple(x.shape[-2:])}. Use a smaller `n_layers`."
            )
        return self.model(x)


def _init_normal(module: nn.Module) -> None:
    """pix2pix's initialisation: convolution weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
