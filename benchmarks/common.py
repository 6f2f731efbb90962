"""Shared pieces of the callback-overhead benchmarks: the workload and a step timer.

The workload is the one every overhead figure in the README uses: a CIFAR ResNet-20
(``lightning_tricks.models.build_net("resnet20", 10)``) on batches of random 3x32x32 images, SGD
with momentum, CPU, one process.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning_tricks.models import build_net
from torch.utils.data import DataLoader, TensorDataset


class ResNet20Classifier(pl.LightningModule):
    """ResNet-20 with a mean cross-entropy loss and SGD."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.net = build_net("resnet20", 10)
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class StepTimer(Callback):
    """Wall time from ``on_train_batch_start`` to ``on_train_batch_end``, per step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def random_image_loader(steps: int, batch_size: int) -> DataLoader:
    """``steps`` batches of seeded random 3x32x32 images with 10-class labels."""
    generator = torch.Generator().manual_seed(0)
    n = steps * batch_size
    images = torch.randn(n, 3, 32, 32, generator=generator)
    return DataLoader(
        TensorDataset(images, torch.randint(0, 10, (n,), generator=generator)), batch_size=batch_size
    )


def quiet_trainer(
    steps: int, callbacks: list[Callback], root: str | None = None, accelerator: str = "cpu", **options
) -> pl.Trainer:
    """A one-device trainer for ``steps`` steps with no logger, checkpoint, progress bar or summary
    (``options``: more Trainer arguments, e.g. ``precision``)."""
    return pl.Trainer(
        default_root_dir=root,
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    )


def silence_lightning() -> None:
    """Keep the benchmark's table readable: no Lightning info lines or warnings."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def machine_description() -> str:
    """CPU model, logical CPUs, whether AVX-512 is present, torch version and intra-op threads."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
    except OSError:
        lines = []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = models[0] if models else platform.processor() or platform.machine()
    simd = ", AVX-512" if any(line.startswith("flags") and " avx512f" in line for line in lines) else ""
    return (
        f"CPU: {model} ({os.cpu_count()} logical CPUs{simd}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
