"""pix2pix image-to-image translation (Isola et al. 2017), the GAN task of seed ``000_e58e526c3e6fcb5b.txt`` §5.2."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from lightning_tricks.plotting import plot_labelled_grid

from .nets.pix2pix_nets import PatchDiscriminator, UNetGenerator

GAN_MODES = ("vanilla", "lsgan")
SAMPLE_COLUMNS = ("input", "generated", "target")
GENERATOR, DISCRIMINATOR = 0, 1
"""Positions of the two optimisers in ``trainer.optimizers`` (e.g. ``RandomGradient(optimizers=[0])``)."""


def gan_loss(logits: Tensor, real: bool, mode: str) -> Tensor:
    """Mean over patches of the GAN loss of PatchGAN ``logits`` against the label ``real``.

    ``"vanilla"``: binary cross-entropy with logits (Goodfellow et al. 2014), −log D or −log(1 − D);
    ``"lsgan"``: least squares (Mao et al. 2017), (D − 1)² or D² on the raw outputs.
    """
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)


class Pix2Pix(L.LightningModule):
    """pix2pix: a U-Net generator G and a PatchGAN discriminator D trained adversarially (seed 000 §5.2).

    Seed 000 trains pix2pix on maps and Cityscapes "strictly following" Isola et al. 2017 with batch
    size 8: Adam, learning rate 0.0002, β = (0.5, 0.999), and shows input | output | ground truth
    (Fig. 7). The losses (Isola et al. eq. 4):

    - D: ``½ [GAN(D(a, b), real) + GAN(D(a, G(a)), fake)]`` (pix2pix halves D's objective);
    - G: ``GAN(D(a, G(a)), real) + λ · |b − G(a)|₁`` with λ = ``l1_weight`` (100).

    Manual optimisation, one D step then one G step per batch; ``toggle_optimizer`` makes only the
    stepped network's parameters require grad, so D is frozen during G's step (its backward reaches
    G's parameters only) and D's step sees ``G(a)`` detached. Optimisers are ``[G, D]``
    (:data:`GENERATOR` = 0, :data:`DISCRIMINATOR` = 1), each an Adam with a constant learning rate.

    Logged: ``train/loss_d``, ``train/loss_g``, ``train/loss_g_gan``, ``train/loss_g_l1`` and
    ``{val,test}/l1`` (mean |G(a) − b| in the [-1, 1] image scale). At each validation epoch end a
    grid of the first ``sample_count`` validation pairs, one row per pair — input | generated |
    target, like seed 000 Fig. 7, its columns labelled "input", "generated", "target" — goes to
    TensorBoard as the figure ``pix2pix/samples`` (when the logger is a ``TensorBoardLogger``;
    nothing is logged otherwise).

    Args:
        in_channels: channels of the input images A.
        out_channels: channels of the target images B.
        depth: the U-Net's downsamplings; image sides must be multiples of ``2**depth``.
        generator_channels: the U-Net's first-layer channels (pix2pix: 64).
        dropout_layers: innermost decoder stages with dropout 0.5 (pix2pix: 3).
        discriminator_channels: the PatchGAN's first-layer channels (pix2pix: 64).
        discriminator_layers: the PatchGAN's stride-2 convolutions (3: 70×70 patches).
        gan_mode: ``"vanilla"`` (BCE) or ``"lsgan"``.
        l1_weight: λ, weight of the L1 term (pix2pix: 100), >= 0.
        lr: Adam learning rate of both networks.
        betas: Adam betas.
        sample_count: validation pairs shown in the image grid, >= 0 (0: no grid).

    Raises:
        ValueError: unknown ``gan_mode`` or an argument out of range.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        depth: int = 8,
        generator_channels: int = 64,
        dropout_layers: int = 3,
        discriminator_channels: int = 64,
        discriminator_layers: int = 3,
        gan_mode: str = "vanilla",
        l1_weight: float = 100.0,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        sample_count: int = 4,
    ) -> None:
        super().__init__()
        if gan_mode not in GAN_MODES:
            raise ValueError(
                f"`gan_mode` must be one of {', '.join(map(repr, GAN_MODES))}; got {gan_mode!r}."
            )
        if not l1_weight >= 0:
            raise ValueError(f"`l1_weight` must be >= 0; got {l1_weight!r}.")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0; got {lr!r}.")
        if isinstance(sample_count, bool) or not isinstance(sample_count, int) or sample_count < 0:
            raise ValueError(f"`sample_count` must be an int >= 0; got {sample_count!r}.")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = UNetGenerator(in_channels, out_channels, depth, generator_channels, dropout_layers)
        self.discriminator = PatchDiscriminator(
            in_channels + out_channels, discriminator_channels, discriminator_layers
        )
        self._samples: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, a: Tensor) -> Tensor:
        """The translated image G(a), in [-1, 1]."""
        return self.generator(a)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        a, b = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(a)

        self.toggle_optimizer(opt_d)
        loss_d = self._discriminator_loss(a, b, fake.detach())
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        self.toggle_optimizer(opt_g)
        loss_gan = gan_loss(self.discriminator(torch.cat([a, fake], 1)), True, self.hparams.gan_mode)
        loss_l1 = F.l1_loss(fake, b)
        loss_g = loss_gan + self.hparams.l1_weight * loss_l1
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.log_dict(
            {
                "train/loss_d": loss_d,
                "train/loss_g": loss_g,
                "train/loss_g_gan": loss_gan,
                "train/loss_g_l1": loss_l1,
            },
            prog_bar=False,
        )

    def _discriminator_loss(self, a: Tensor, b: Tensor, fake: Tensor) -> Tensor:
        mode = self.hparams.gan_mode
        real_loss = gan_loss(self.discriminator(torch.cat([a, b], 1)), True, mode)
        fake_loss = gan_loss(self.discriminator(torch.cat([a, fake], 1)), False, mode)
        return 0.5 * (real_loss + fake_loss)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        fake = self._evaluate(batch, "val/")
        if batch_idx == 0 and self.hparams.sample_count > 0:
            count = self.hparams.sample_count
            self._samples = (batch[0][:count], fake[:count], batch[1][:count])

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test/")

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> Tensor:
        a, b = batch
        fake = self.generator(a)
        self.log(f"{prefix}l1", F.l1_loss(fake, b), prog_bar=prefix == "val/")
        return fake

    def on_validation_epoch_end(self) -> None:
        samples, self._samples = self._samples, None
        if samples is None or self.trainer.sanity_checking:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("pix2pix/samples", sample_figure(*samples), self.global_step)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        return [
            torch.optim.Adam(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas)),
            torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas)),
        ]


def sample_figure(inputs: Tensor, generated: Tensor, targets: Tensor) -> Figure:
    """:func:`sample_grid` as a figure whose columns are labelled input | generated | target."""
    grid = sample_grid(inputs, generated, targets).permute(1, 2, 0).numpy()
    return plot_labelled_grid(grid, SAMPLE_COLUMNS, title="pix2pix validation samples")


def sample_grid(inputs: Tensor, generated: Tensor, targets: Tensor) -> Tensor:
    """``(3, H', W')`` image in [0, 1]: one row per sample, input | generated | target (seed 000 Fig. 7).

    Images in [-1, 1] are mapped to [0, 1]; one-channel images are repeated to three.
    """
    columns = [_rgb(t.detach().float().cpu()) for t in (inputs, generated, targets)]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)
    return make_grid((tiles + 1) / 2, nrow=3, padding=2, pad_value=1.0).clamp(0, 1)


def _rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
