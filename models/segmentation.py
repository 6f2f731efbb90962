"""Semantic segmentation task of seed ``000_e58e526c3e6fcb5b.txt`` (§1, §5.1: Pascal VOC, PSPNet, mIoU)."""

from __future__ import annotations

from os import PathLike
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lightning_tricks import checks

from .classifier import lr_factor, next_step_progress
from .nets.segmentation import BACKBONES, SEGMENTATION_NETWORKS, build_segmentation_net

SEGMENTATION_OPTIMIZERS = ("sgd", "adam")


def per_image_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """``(B,)`` losses: each image's cross-entropy averaged over its own labelled pixels.

    ℓ_i = Σ_p [y_ip ≠ ignore] · CE(z_ip, y_ip) / max(1, Σ_p [y_ip ≠ ignore]); an image without
    labelled pixels has loss 0. The training loss is the mean of ℓ_i over the batch, so a sample is
    an image and its gradient is ∇ℓ_i (what FisherSpectrum's per-sample gradients assume).
    """
    pixels = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten(1)
    labelled = (target != ignore_index).flatten(1).sum(dim=1).clamp_min(1)
    return pixels.sum(dim=1) / labelled


class SegmentationModule(L.LightningModule):
    """Semantic segmentation with PSPNet, FCN or DeepLabV3 on a dilated ResNet (seed 000 §1, §5.1).

    Seed 000 trains PSPNet-101 and ResNet-DUC+HDC on Pascal VOC 2012 (21 classes) with SGD and
    momentum 0.9–0.95, batch size 4, 224×224 crops, random mirroring, L2 0.0005, the "poly"
    learning rate ``lr · (1 − iter/max_iter)^0.9`` and reports the mean IoU over the classes.

    - Loss (:meth:`compute_loss`): pixel cross-entropy with ``ignore_index`` (255, VOC's object
      borders), averaged per image over its labelled pixels, then over the batch (see
      :func:`per_image_cross_entropy`); plus ``aux_weight`` × the same loss of the auxiliary head
      during training (PSPNet: 0.4).
    - Learning rate: ``lr · (1 − progress)^power`` updated every step, ``progress`` from
      :func:`next_step_progress`: iteration k of K trains with ``lr · (1 − k/K)^power``.
    - Metrics: ``{val,test}/miou`` (torchmetrics ``MulticlassJaccardIndex``, macro average over the
      classes present in the prediction or the target, ignoring ``ignore_index`` pixels),
      ``{val,test}/pixel_acc`` and ``{train,val,test}/loss``.

    Args:
        arch: ``"pspnet"``, ``"fcn"`` or ``"deeplabv3"``.
        num_classes: classes (21 for VOC, 19 for Cityscapes).
        in_channels: image channels.
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"`` (dilated, output stride 8).
        base_width: channels of the backbone's first stage (64: torchvision's; 8: tiny, for CPU).
        aux_loss: train with the auxiliary head on ``layer3``.
        aux_weight: weight of the auxiliary loss, >= 0.
        backbone_weights: ``None`` (random init), or local torchvision ResNet weights (a file, or a
            weights name such as ``"IMAGENET1K_V1"`` found in torch hub's cache); nothing downloads.
        ignore_index: label of unlabelled pixels.
        optimizer: ``"sgd"`` (momentum) or ``"adam"``.
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        betas: Adam betas.
        power: exponent of the poly schedule (seed 000: 0.9); 0 keeps the learning rate constant.

    Raises:
        ValueError: unknown ``arch``, ``backbone`` or ``optimizer``, or an argument out of range.
        FileNotFoundError: ``backbone_weights`` are not on this machine.

    Example::

        model = SegmentationModule("pspnet", num_classes=4, backbone="resnet18", base_width=8, lr=0.01)
        L.Trainer(max_epochs=4).fit(model, datamodule=ShapesSegmentationDataModule(image_size=32))
    """

    def __init__(
        self,
        arch: str = "pspnet",
        num_classes: int = 21,
        in_channels: int = 3,
        backbone: str = "resnet50",
        base_width: int = 64,
        aux_loss: bool = True,
        aux_weight: float = 0.4,
        backbone_weights: str | PathLike | None = None,
        ignore_index: int = 255,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        power: float = 0.9,
    ) -> None:
        super().__init__()
        checks.choice("arch", arch, SEGMENTATION_NETWORKS)
        checks.choice("backbone", backbone, BACKBONES)
        checks.choice("optimizer", optimizer, SEGMENTATION_OPTIMIZERS)
        _check_ranges(lr=lr, momentum=momentum, weight_decay=weight_decay, power=power, aux_weight=aux_weight)
        if (
            isinstance(ignore_index, bool)
            or not isinstance(ignore_index, int)
            or 0 <= ignore_index < num_classes
        ):
            raise ValueError(
                f"`ignore_index` must be an int outside 0..{num_classes - 1} (the class labels); got {ignore_index!r}."
            )
        self.save_hyperparameters()
        self.net = build_segmentation_net(
            arch,
            num_classes,
            in_channels,
            backbone=backbone,
            base_width=base_width,
            aux_loss=aux_loss,
            backbone_weights=backbone_weights,
        )
        self.val_metrics = _segmentation_metrics(num_classes, ignore_index, "val/")
        self.test_metrics = _segmentation_metrics(num_classes, ignore_index, "test/")
        self._progress = 0.0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes, H, W)`` of the main head."""
        return self.net(x)["out"]

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Training loss of ``batch = (images, masks)``: mean over the images of their per-pixel mean
        cross-entropy, plus ``aux_weight`` times that of the auxiliary head when it is on; a scalar."""
        images, masks = batch
        outputs = self.net(images)
        loss = self._loss(outputs["out"], masks)
        if "aux" in outputs and self.hparams.aux_weight > 0:
            loss = loss + self.hparams.aux_weight * self._loss(outputs["aux"], masks)
        return loss

    def _loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        return per_image_cross_entropy(logits, masks, self.hparams.ignore_index).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self._progress = next_step_progress(self.trainer, batch_idx)  # read by the scheduler's step
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val/", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test/", self.test_metrics)

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str, metrics: MetricCollection) -> None:
        images, masks = batch
        logits = self(images)
        metrics.update(logits, masks)
        self.log(f"{prefix}loss", self._loss(logits, masks))
        self.log_dict(metrics, prog_bar=prefix == "val/")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = _optimizer(self.parameters(), hp)

        def factor(_: int) -> float:
            """Poly: ``(1 − iter/max_iter)^power`` (seed 000 §1)."""
            return lr_factor(self._progress, "poly", power=hp.power)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _optimizer(parameters: Any, hp: Any) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    return torch.optim.Adam(parameters, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)


def _segmentation_metrics(num_classes: int, ignore_index: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        },
        prefix=prefix,
    )


_RANGES = {
    "lr": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "power": (lambda v: v >= 0, ">= 0"),
    "aux_weight": (lambda v: v >= 0, ">= 0"),
}


def _check_ranges(**values: float) -> None:
    for name, value in values.items():
        valid, allowed = _RANGES[name]
        if not valid(value):
            raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")
