"""Image classification task shared by the seed experiments (seeds 000, 001, 002, 004)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks import checks

from .nets import NETWORKS, build_net

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "cosine", "poly", "constant")


def lr_factor(
    progress: float,
    schedule: str,
    *,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    eta_min_ratio: float = 0.0,
    power: float = 0.9,
    warmup: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at ``progress`` ∈ [0, 1] of training.

    - ``multistep``: ``gamma ** (number of milestones <= progress)``; seed 004 §4 decays by 1/10
      at 50 % and 75 % of training.
    - ``cosine``: ``r + (1 - r)·(1 + cos(π·progress))/2`` with ``r = eta_min/lr`` (seed 001 §5.2).
    - ``poly``: ``(1 - progress) ** power`` (seed 000 §1, power 0.9).
    - ``constant``: 1.

    A linear warm-up over the first ``warmup`` fraction of training multiplies the factor.
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "multistep":
        factor = gamma ** sum(progress >= m for m in milestones)
    elif schedule == "cosine":
        factor = eta_min_ratio + (1.0 - eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "poly":
        factor = (1.0 - progress) ** power
    else:
        factor = 1.0
    if warmup > 0.0 and progress < warmup:
        factor *= progress / warmup
    return factor


def next_step_progress(trainer: L.Trainer, batch_idx: int) -> float:
    """Progress of training at the start of the optimiser step after batch ``batch_idx``, the value
    a per-step scheduler stepped after this batch needs: ``(epoch + (batch_idx + 1) / batches) /
    max_epochs``, or ``(global_step + 1) / max_steps`` when training is bounded by steps.

    Step k of an epoch of K batches starts at batch k (k·A with accumulation A), so the LR of every
    step is the schedule's value at its own start (step 0 at progress 0; the scheduler computes
    it at construction). Counting in epochs keeps the schedule right when a callback changes the
    batch size, and with it the number of steps per epoch."""
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        batches = trainer.num_training_batches
        epoch_fraction = (batch_idx + 1) / batches if math.isfinite(batches) and batches > 0 else 0.0
        return (trainer.current_epoch + epoch_fraction) / trainer.max_epochs
    return (trainer.global_step + 1) / max(trainer.max_steps, 1)


class ImageClassifier(L.LightningModule):
    """Classifier over any network of :func:`lightning_tricks.models.build_net`.

    Cross-entropy loss, top-1 (and top-5 when there are at least 5 classes) accuracy from
    torchmetrics on train/val/test, SGD (momentum, Nesterov, weight decay) or Adam/AdamW, and a
    learning-rate schedule driven by training progress (so it stays correct when a callback
    changes the batch size and with it the number of steps per epoch): every optimiser step runs
    at ``lr · lr_factor(progress at the step's start)`` (:func:`next_step_progress`); with a
    warm-up the first step therefore runs at LR 0.

    Args:
        arch: network name, one of ``lightning_tricks.models.NETWORKS``.
        num_classes: number of classes.
        in_channels: input channels (1 or 3).
        net_kwargs: extra keyword arguments of the network builder (e.g. ``{"batch_norm": True}``).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: base learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 weight decay (decoupled for AdamW).
        betas: Adam/AdamW betas.
        schedule: ``"multistep"``, ``"cosine"``, ``"poly"`` or ``"constant"``; see :func:`lr_factor`.
        milestones: multistep milestones as fractions of training, increasing in (0, 1].
        gamma: multistep decay factor.
        eta_min: cosine floor learning rate.
        power: poly exponent.
        warmup: fraction of training with a linear warm-up, in [0, 1).

    Raises:
        ValueError: unknown ``arch``, ``optimizer`` or ``schedule``, or an argument out of range.

    The loss is defined once in :meth:`compute_loss` (mean-reduced), the protocol that callbacks
    evaluating a loss by themselves rely on.

    Example::

        model = ImageClassifier("resnet20", num_classes=10, in_channels=1, lr=0.05)
        trainer = L.Trainer(max_epochs=3)
        trainer.fit(model, datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        arch: str = "resnet20",
        num_classes: int = 10,
        in_channels: int = 3,
        net_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: str = "multistep",
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        eta_min: float = 0.0,
        power: float = 0.9,
        warmup: float = 0.0,
    ) -> None:
        super().__init__()
        checks.choice("arch", arch, tuple(NETWORKS))
        checks.choice("optimizer", optimizer, OPTIMIZERS)
        checks.choice("schedule", schedule, SCHEDULES)
        _check_hyperparameters(lr, momentum, weight_decay, milestones, gamma, eta_min, power, warmup)
        self.save_hyperparameters()
        self.net = build_net(arch, num_classes, in_channels=in_channels, **(net_kwargs or {}))
        self.train_metrics = _accuracy_metrics(num_classes, "train/")
        self.val_metrics = _accuracy_metrics(num_classes, "val/")
        self.test_metrics = _accuracy_metrics(num_classes, "test/")
        self._progress = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of ``batch = (images, labels)``; a scalar."""
        return self._loss_and_logits(batch)[0]

    def _loss_and_logits(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits = self._loss_and_logits(batch)
        self._progress = next_step_progress(self.trainer, batch_idx)  # read by the scheduler's step
        self.train_metrics.update(logits.detach(), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val/", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test/", self.test_metrics)

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str, metrics: MetricCollection) -> None:
        loss, logits = self._loss_and_logits(batch)
        metrics.update(logits, batch[1])
        self.log(f"{prefix}loss", loss, prog_bar=prefix == "val/")
        self.log_dict(metrics, prog_bar=prefix == "val/")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = _build_optimizer(self.parameters(), hp)
        ratio = hp.eta_min / hp.lr

        def factor(_: int) -> float:
            return lr_factor(
                self._progress,
                hp.schedule,
                milestones=hp.milestones,
                gamma=hp.gamma,
                eta_min_ratio=ratio,
                power=hp.power,
                warmup=hp.warmup,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _build_optimizer(params: Any, hp: Any) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
    optimizer_class = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)


def _accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics: dict[str, nn.Module] = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def _check_hyperparameters(
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: Sequence[float],
    gamma: float,
    eta_min: float,
    power: float,
    warmup: float,
) -> None:
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0; got {lr}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1); got {momentum}.")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0; got {weight_decay}.")
    if any(not 0 < m <= 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(
            f"`milestones` must be increasing fractions of training in (0, 1]; got {milestones}."
        )
    if not 0 < gamma <= 1:
        raise ValueError(f"`gamma` must be in (0, 1]; got {gamma}.")
    if not 0 <= eta_min <= lr:
        raise ValueError(f"`eta_min` must be in [0, lr]; got {eta_min}.")
    if power < 0:
        raise ValueError(f"`power` must be >= 0; got {power}.")
    if not 0 <= warmup < 1:
        raise ValueError(f"`warmup` must be in [0, 1); got {warmup}.")
