"""One measured epoch of seed ``002_696f8026b30a9c31.txt`` Algorithm 1 on a Trainer: the Lightning
side of :mod:`lightning_tricks.gradients.minibatch_distance`.

At the epoch start θ_e is frozen; the gradient ∇_k of each batch's mean loss at θ_e is taken with one
extra forward/backward under ``torch.random.fork_rng`` and the precision plugin's forward context
(training's parameters, buffers and RNG untouched). Under DDP each process holds its share of every
global batch: the per-process gradients are summed with their batch sizes before storage (one
all-reduce of P values, or ``sketch_dim`` in sketch mode, per batch), rank 0 stores them and computes
the row, which is broadcast.

θ_e is not saved in checkpoints (they stay small): an epoch a fit stops or is resumed inside has no
row, with a warning naming it (:func:`warn_stopped_inside`, :func:`warn_if_resumed_inside`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from ..gradients.minibatch_distance import (
    LossFunction,
    MinibatchDistances,
    flatten,
    freeze,
    gradient_at,
    rng_devices,
)
from ..heatmap import epoch_learning_rates
from ..samplers import MetricSortedBatchSampler, sorted_loader
from ._base import first_learning_rate
from ._heatmap_batches import batches_done_at_restart
from ._progress import pass_progress


def warn_if_resumed_inside(trainer: pl.Trainer, namespace: str, every_n_epochs: int) -> None:
    """Say so when the fit restarts inside a measured epoch (after some of its batches): it gets no row."""
    epoch, num_batches = trainer.current_epoch, int(trainer.num_training_batches)
    done = batches_done_at_restart(trainer, num_batches)
    if not done or epoch % every_n_epochs:
        return
    rank_zero_warn(
        f"MinibatchHeatmap ({namespace}): resumed inside epoch {epoch}, after {done} of its {num_batches} "
        f"batches; epoch {epoch} gets no row: its epoch-start weights, at which every batch's gradient is "
        "taken, are not in the checkpoint (checkpoints stay small). The next epochs are measured as in an "
        "uninterrupted fit. To keep every row, save checkpoints at epoch ends "
        "(`ModelCheckpoint(save_on_train_epoch_end=True)` or `every_n_epochs`) or on an epoch's last batch."
    )


def warn_stopped_inside(namespace: str, epoch: int) -> None:
    """Say that measured epoch ``epoch``, which the fit stopped before its last batch, gets no row."""
    rank_zero_warn(
        f"MinibatchHeatmap ({namespace}): the fit stopped before the last batch of epoch {epoch}, which "
        "gets no row: D_ek compares every batch's gradient with their mean over the whole epoch."
    )


def warn_non_finite(epoch: int) -> None:
    """Say that epoch ``epoch``'s row holds NaN distances (a NaN/inf loss or gradient)."""
    rank_zero_warn(
        f"MinibatchHeatmap: non-finite gradient distances in epoch {epoch} (NaN/inf loss or "
        "gradient); they are kept as NaN."
    )


class EpochGradients:
    """θ_e, the stored ∇_k of the epoch's first ``num_batches`` batches (of ``batch_sizes`` samples,
    global) and the learning rates its optimiser steps used.

    Args:
        options: ``mode``, ``memory_budget``, ``sketch_dim`` and ``seed`` of
            :class:`~lightning_tricks.gradients.minibatch_distance.MinibatchDistances`.
        spill_path: the memory-mapped file for exact gradients beyond the budget.
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loss: LossFunction,
        num_batches: int,
        batch_sizes: Sequence[int],
        spill_path: str,
        **options: Any,
    ) -> None:
        self.frozen = freeze(pl_module)
        self.loss, self.num_batches, self.batch_sizes = loss, num_batches, batch_sizes
        dim = sum(p.numel() for p in self.frozen[0].values() if p.requires_grad)
        self.engine = MinibatchDistances(
            num_batches,
            dim,
            device=pl_module.device,
            spill_path=spill_path,
            store=trainer.is_global_zero,  # the other processes only sketch and sum
            **options,
        )
        self.lr_at_start = first_learning_rate(trainer, default=math.nan)
        self.step_lrs: list[float | Tensor] = []

    def note_step(self, trainer: pl.Trainer) -> None:
        """Record the LR an optimiser step is about to use (schedulers move it after the step)."""
        lr = first_learning_rate(trainer)
        self.step_lrs.append(lr.detach().clone() if isinstance(lr, Tensor) else lr)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int, batch: Any) -> None:
        """∇_k of training batch ``batch_idx`` at θ_e (RNG forked), stored."""
        with (
            torch.random.fork_rng(devices=rng_devices(pl_module)),
            trainer.precision_plugin.forward_context(),
        ):
            gradient = flatten(gradient_at(pl_module, *self.frozen, self.loss, batch))
        self._store(trainer, batch_idx, gradient)

    def measure_loader(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loader: DataLoader,
        sampler: MetricSortedBatchSampler,
        description: str,
        progress: bool,
    ) -> None:
        """∇_k of every batch ``sampler`` cuts from ``loader``'s data at θ_e, in a pass of its own with
        the Trainer's progress bar (the loader's RNG draws and the forwards under ``fork_rng``)."""
        with (
            torch.random.fork_rng(devices=rng_devices(pl_module)),
            trainer.precision_plugin.forward_context(),
            pass_progress(trainer, self.num_batches, description, progress) as bar,
        ):
            for batch_idx, batch in enumerate(sorted_loader(loader, sampler)):
                if batch_idx >= self.num_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                self._store(
                    trainer, batch_idx, flatten(gradient_at(pl_module, *self.frozen, self.loss, batch))
                )
                bar.update(1)

    def _store(self, trainer: pl.Trainer, batch_idx: int, gradient: Tensor) -> None:
        """Add ∇_k of the global batch: under DDP Σ_r m_r ∇_k^r / Σ_r m_r over the processes."""
        size = self.batch_sizes[batch_idx]
        row = self.engine.project(gradient)
        if trainer.world_size > 1:
            packed = torch.cat([row * size, row.new_tensor([size])])
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
            size = packed[-1]
            row = packed[:-1] / size
        if trainer.is_global_zero:
            self.engine.add(batch_idx, row, size)

    def finish(self, trainer: pl.Trainer, distance: str) -> tuple[Tensor, Tensor, tuple[float, float, float]]:
        """The epoch's row D_{e,·}, ‖∇_e‖ (on the CPU, on every process) and ``(lr, first, last)``
        (:func:`~lightning_tricks.heatmap.epoch_learning_rates`, the LR at the epoch start if no step
        ran); frees the gradients."""
        row = self.engine.distances(distance) if trainer.is_global_zero else None
        full_norm = self.engine.full_gradient().norm() if trainer.is_global_zero else None
        lrs = epoch_learning_rates(self.step_lrs or [self.lr_at_start])
        self.close()
        row, full_norm = trainer.strategy.broadcast((row, full_norm), src=0)
        return row.cpu(), full_norm.cpu(), lrs

    def close(self) -> None:
        """Free the gradients and remove a spill file."""
        self.engine.close()
