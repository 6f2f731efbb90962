"""Shared fixtures: one thread for torch, quiet CPU trainers, tiny modules and every logger we support.

Fixtures rather than importable helpers: with ``--import-mode=importlib`` test files cannot import
``conftest``; what they import (references, ``assert_identical``, ``LOGGER_KINDS``) is in ``helpers.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from common import QUIET_TRAINER
from helpers import LOGGER_KINDS
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_tricks.callbacks._base import TrickCallback


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Pin torch to one intra-op thread: tiny kernels on a busy CPU are 10-100x slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trainer_for(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """``trainer_for(callbacks, **overrides)``: a quiet one-epoch CPU trainer rooted in ``tmp_path``
    (``benchmarks/common.py``'s ``QUIET_TRAINER``: no logger, progress bar, summary, checkpointing or
    sanity check unless overridden)."""

    def make(callbacks: list | None = None, **overrides: Any) -> pl.Trainer:
        options = {**QUIET_TRAINER, "max_epochs": 1, "default_root_dir": tmp_path, **overrides}
        return pl.Trainer(callbacks=list(callbacks or []), **options)

    return make


class TinyRegression(pl.LightningModule):
    """Linear -> tanh -> linear on a fixed random regression set; SGD; logs ``train_loss``."""

    def __init__(self, samples: int = 32, batch_size: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        generator = torch.Generator().manual_seed(1)
        self.data = TensorDataset(
            torch.randn(samples, 4, generator=generator), torch.randn(samples, 2, generator=generator)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.hparams.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=self.hparams.lr)


@pytest.fixture
def tiny_module() -> Callable[..., pl.LightningModule]:
    """``tiny_module(samples=32, batch_size=4, lr=0.05)``: a fresh :class:`TinyRegression` (its
    ``hparams`` saved), ``samples // batch_size`` training steps an epoch."""
    return TinyRegression


@pytest.fixture
def make_logger(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Any]:
    """``make_logger(kind, save_dir)``: a fresh logger of ``kind`` (one of :data:`LOGGER_KINDS`)
    writing under ``save_dir`` only, offline: W&B in offline mode with its settings and cache kept
    out of ``save_dir`` and home, MLflow's local file store. ``"none"`` gives ``False``."""
    settings = tmp_path_factory.mktemp("logger_settings")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONFIG_DIR": str(settings / "config"),
        "WANDB_CACHE_DIR": str(settings / "cache"),
        "WANDB_DATA_DIR": str(settings / "data"),
        "WANDB_ARTIFACT_DIR": str(settings / "artifacts"),
    }.items():
        monkeypatch.setenv(name, value)

    def make(kind: str, save_dir: Path) -> Logger | bool:
        save_dir = Path(save_dir)
        if kind == "tensorboard":
            return TensorBoardLogger(save_dir, name="tb")
        if kind == "csv":
            return CSVLogger(save_dir, name="csv")
        if kind == "wandb":
            return WandbLogger(save_dir=str(save_dir), project="tricks", offline=True)
        if kind == "mlflow":
            return MLFlowLogger(experiment_name="tricks", tracking_uri=(save_dir / "mlruns").as_uri())
        if kind == "none":
            return False
        raise ValueError(f"unknown logger kind {kind!r}; one of {LOGGER_KINDS}")

    yield make
    _finish_wandb()


def _finish_wandb() -> None:
    """Close a W&B run a test left open, so the next test starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


class ProbeCallback(TrickCallback):
    """A test-only ``TrickCallback``: logs ``probe/value = 1 + step / 2`` at every training step (so a
    value tells the step it was logged at), a figure at each epoch end, with a layout, a
    description and hyper-parameters."""

    namespace = "probe"
    identity_arguments = ("label",)
    TAG = "probe/value"
    FIGURE = "probe/figure"
    DESCRIPTION = "Probe: one plus half the training step."

    def __init__(self, label: str = "a") -> None:
        super().__init__()
        self.label = label
        self.logged_steps: list[int] = []

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        return {"probe value": [self.TAG]}

    @override
    def metric_descriptions(self) -> dict[str, str]:
        return {self.TAG: self.DESCRIPTION}

    @staticmethod
    def value_at(step: int) -> float:
        return 1.0 + step / 2

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.training_step(trainer)
        self.logged_steps.append(step)
        self.log_scalars(trainer, {self.TAG: torch.tensor(self.value_at(step))}, step)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        figure = Figure(figsize=(2, 2))
        figure.add_subplot().plot([0, 1], [trainer.current_epoch, 1])
        self.log_figure(trainer, self.FIGURE, figure, self.training_step(trainer))


@pytest.fixture
def probe_callback() -> type[ProbeCallback]:
    """The :class:`ProbeCallback` class (``probe_callback(label="a")`` makes one)."""
    return ProbeCallback


# -- flow --


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in :attr:`logged`; shows no figures
    and has no folder unless given ``save_dir`` (then its run folder is ``save_dir/memory/version_0``)."""

    def __init__(self, save_dir: Path | None = None) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []
        self._save_dir = save_dir

    @property
    def save_dir(self) -> str | None:
        return None if self._save_dir is None else str(self._save_dir)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


@pytest.fixture
def memory_logger() -> type[MemoryLogger]:
    """The :class:`MemoryLogger` class (``memory_logger(save_dir=None)`` makes one)."""
    return MemoryLogger


# -- fixtures --


class DigitsSoftmax(pl.LightningModule):
    """Softmax regression on 8×8 digits (``DigitsDataModule(image_size=8)``), SGD with momentum:
    seeded weights, no randomness after construction. Records each training batch's labels
    (:attr:`batches`) and ``(epoch, batch_idx)`` (:attr:`positions`)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layer = nn.Linear(64, 10)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(10, 64, generator=generator) * 0.01)
            self.layer.bias.zero_()
        self.batches: list[torch.Tensor] = []
        self.positions: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.batches.append(labels.clone())
        self.positions.append((self.current_epoch, batch_idx))
        return F.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ValidatedDigitsSoftmax(DigitsSoftmax):
    """:class:`DigitsSoftmax` with a validation loop that logs ``val_loss``."""

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self.layer(images.flatten(1)), labels))


@pytest.fixture
def digits_module() -> Callable[..., DigitsSoftmax]:
    """``digits_module(validate=False)``: a fresh :class:`DigitsSoftmax`, with a validation step
    logging ``val_loss`` when ``validate``."""
    return lambda validate=False: ValidatedDigitsSoftmax() if validate else DigitsSoftmax()
