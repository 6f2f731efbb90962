"""MinibatchHeatmap (seed 002 §3, Algorithm 1): the Lightning adapter of :mod:`lightning_tricks.heatmap`,
with ``_heatmap_batches`` (the fixed batches) and ``_heatmap_epoch`` (a measured epoch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.figure import Figure
from typing_extensions import override

from .. import checks
from .. import heatmap as table
from ..gradients.minibatch_distance import DISTANCES, MODES, LossFunction
from ..image_metrics import ImageTransform, Metric, metric_name, resolve_metric
from ..outputs import MINIBATCH_HEATMAP
from ._base import TrickCallback, resolve_loss_fn
from ._heatmap_batches import FixedBatches, checked_image_key, checked_metric_transform
from ._heatmap_epoch import EpochGradients, warn_if_resumed_inside, warn_non_finite, warn_stopped_inside


class MinibatchHeatmap(TrickCallback):
    r"""Which fixed mini-batch's gradient is closest to the full-batch gradient, epoch by epoch (seed
    ``002_696f8026b30a9c31.txt`` §3, Algorithm 1; in full, batches to DDP: :mod:`lightning_tricks.heatmap`).

    The training set is scored once by an image ``metric`` (the images as stored), sorted and cut
    into the same mini-batches every epoch. At the start of every ``every_n_epochs``-th epoch e the
    weights θ_e are copied; after each batch k, ∇_k at θ_e is taken with one extra forward/backward
    (training stays bit for bit as it was). At the epoch end D_{e,k} = ‖∇_k − ∇_e‖ (or 1 − cos),
    ∇_e = Σ_k m_k ∇_k / Σ_k m_k (eq. 3): a row of :attr:`matrix` (``heatmap_matrix.npy``), a figure
    per learning-rate phase, scalars ``heatmap/distance_mean`` … Further heatmaps on one Trainer
    measure their own batches after the epoch; that pass and the scoring show in the Trainer's
    progress bar (none if ``enable_progress_bar=False``). DDP is exact. Resume is exact from a
    checkpoint saved at an epoch's end (or last batch); a checkpoint inside a measured epoch loses that
    epoch's row (warned: θ_e is not saved), and so does an epoch the fit stops inside.

    Args:
        metric: ``"intensity"``, ``"color"``, ``"edges"``, ``"perceptual"`` or a callable ``images
            (N, C, H, W) -> (N,)`` scores (or ``(N, m)`` lexicographic keys).
        mode: ``"auto"``, ``"exact"`` or ``"sketch"``.
        memory_budget: bytes of exact gradients kept in memory (``>= 0``).
        sketch_dim: dimension of the sketch (``>= 1``).
        every_n_epochs: measure epochs 0, n, 2n, … (``>= 1``).
        distance: ``"l2"`` or ``"cosine"``.
        phases: ``"lr"``, a list of epochs where phases start, or ``None`` (one phase).
        descending: sort the data by decreasing metric.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss`` for modules without ``compute_loss``.
        log_scale: logarithmic colour scale in the heatmaps.
        seed: seed of the sketch.
        image_key: where the images are in a collated batch (position or key) for scoring.
        score_batch_size: images scored at once (``>= 1``).
        progress: show the scoring and a second heatmap's pass in the Trainer's progress bar.
        metric_transform: ``"auto"`` (the datamodule's ``denormalize`` and ``unaugmented_train_set()``,
            if any), ``None`` or a callable ``images -> images`` applied before the metric.

    Raises:
        ValueError, TypeError: bad arguments (naming the argument); at ``setup``, a module with
            neither ``compute_loss`` nor ``loss_fn``; at the first epoch, a training loader that cannot
            have fixed batches (several loaders, an iterable dataset, a custom batch sampler) or whose
            batches change between epochs, or an ``unaugmented_train_set()`` of another length.

    Example::

        >>> import lightning as L
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Module(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        ...     def compute_loss(self, batch):
        ...         return nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        ...     def training_step(self, batch, batch_idx):
        ...         return self.compute_loss(batch)
        ...     def train_dataloader(self):
        ...         data = TensorDataset(torch.rand(24, 1, 4, 4), torch.randint(0, 2, (24,)))
        ...         return DataLoader(data, batch_size=8, shuffle=True)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> heatmap = MinibatchHeatmap(metric="intensity")
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[heatmap], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(Module())
        >>> heatmap.matrix.shape
        (2, 3)
    """

    namespace = MINIBATCH_HEATMAP.namespace
    identity_arguments = ("metric", "descending", "distance")

    def __init__(
        self,
        metric: str | Metric = "intensity",
        mode: str = "auto",
        memory_budget: int = 1 << 30,
        sketch_dim: int = 4096,
        every_n_epochs: int = 1,
        distance: str = "l2",
        phases: str | Sequence[int] | None = "lr",
        descending: bool = False,
        loss_fn: LossFunction | None = None,
        log_scale: bool = False,
        seed: int = 0,
        image_key: int | str = 0,
        score_batch_size: int = 256,
        progress: bool = True,
        metric_transform: str | ImageTransform | None = "auto",
    ) -> None:
        super().__init__()
        self._metric, self.metric = resolve_metric(metric), metric_name(metric)
        self.mode = checks.choice("mode", mode, MODES)
        self.memory_budget = checks.integer("memory_budget", memory_budget, minimum=0)
        self.sketch_dim = checks.integer("sketch_dim", sketch_dim, minimum=1)
        self.every_n_epochs = checks.integer("every_n_epochs", every_n_epochs, minimum=1)
        self.distance = checks.choice("distance", distance, DISTANCES)
        self.phases = table.checked_phases(phases)
        self.descending = checks.boolean("descending", descending)
        self.loss_fn = checks.loss_fn(loss_fn)
        self.log_scale = checks.boolean("log_scale", log_scale)
        self.seed = checks.integer("seed", seed, minimum=0)
        self.image_key = checked_image_key(image_key)
        self.score_batch_size = checks.integer("score_batch_size", score_batch_size, minimum=1)
        self.progress = checks.boolean("progress", progress)
        self.metric_transform = checked_metric_transform(metric_transform)
        self.leader = True
        self.reset_fit_state()

    # -- dashboard and state -------------------------------------------------------------------

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        return table.summary_charts(self.namespace, "" if self.leader else f" ({self.namespace})")

    @override
    def metric_descriptions(self) -> dict[str, str]:
        descriptions = table.summary_descriptions(self.metric, self.distance)
        return {f"{self.namespace}/{name}": text for name, text in descriptions.items()}

    @override
    def reset_fit_state(self) -> None:
        self._table = table.HeatmapTable(self.phases)
        knobs = ("descending", "image_key", "score_batch_size", "progress", "metric_transform")
        self._batches = FixedBatches(self._metric, *(getattr(self, name) for name in knobs))
        self._epoch: EpochGradients | None = None
        self._started_epoch: int | None = None
        self._warned_non_finite = False

    @override
    def get_state(self) -> dict[str, Any]:
        return self._table.state_dict()

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._table.load_state_dict(state)

    # -- results ---------------------------------------------------------------------------------

    @property
    def matrix(self) -> np.ndarray:
        """D_{e,k}: one row per measured epoch (:attr:`epochs`), one column per batch in metric order."""
        return self._table.matrix

    @property
    def epochs(self) -> list[int]:
        """The measured epochs, one per row of :attr:`matrix`."""
        return list(self._table.epochs)

    @property
    def batch_values(self) -> np.ndarray:
        """Each batch's mean metric value (column 0 of a lexicographic key such as colour's hue)."""
        return np.array(self._table.batch_values or [], dtype=float)

    @property
    def phase_of_epoch(self) -> list[int]:
        """The phase index of each measured epoch (:func:`~lightning_tricks.heatmap.phase_indices`)."""
        return self._table.phase_of_epoch

    @property
    def learning_rates(self) -> list[tuple[float, float, float]]:
        """``(lr, first, last)`` per measured epoch (:func:`~lightning_tricks.heatmap.epoch_learning_rates`)."""
        return list(self._table.lrs)

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per measured epoch and batch (:data:`~lightning_tricks.heatmap.HISTORY_COLUMNS`)."""
        return self._table.history

    def phase_figure(self, phase: int) -> Figure:
        """The heatmap of one phase (:meth:`~lightning_tricks.heatmap.HeatmapTable.phase_figure`)."""
        sizes = self._batches.sampler.global_batch_sizes if self._batches.sampler is not None else []
        return self._table.phase_figure(phase, self.metric, self.distance, self.log_scale, sizes)

    # -- Lightning hooks ---------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # the first heatmap orders the batches, the others measure their own
            self.leader = next(c for c in trainer.callbacks if isinstance(c, MinibatchHeatmap)) is self
            own = table.heatmap_namespace(self.metric, self.descending, self.distance)
            self.namespace = type(self).namespace if self.leader else own
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._loss = resolve_loss_fn(pl_module, self.loss_fn, "MinibatchHeatmap")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed fit may skip epoch start, or restart inside an epoch (going on with its next batch)
        self._batches.fix(trainer, pl_module, self.leader, self._table, fit_start=True)
        warn_if_resumed_inside(trainer, self.namespace, self.every_n_epochs)  # θ_e is not in checkpoints

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_epoch(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # resumed from an epoch's last batch, Lightning skips on_train_epoch_start (θ_e is untouched)
        if batch_idx == 0 and self._started_epoch != trainer.current_epoch:
            self._begin_epoch(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._epoch is not None:
            self._epoch.note_step(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._epoch is None:
            return
        if self.leader and batch_idx < self._epoch.num_batches:
            self._epoch.measure(trainer, pl_module, batch_idx, batch)
        if batch_idx == int(trainer.num_training_batches) - 1:  # now: this batch's checkpoint holds it
            self._finish_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch is not None:  # the fit stopped before the epoch's last batch: no half row
            warn_stopped_inside(self.namespace, trainer.current_epoch)
            self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    # -- an epoch --------------------------------------------------------------------------------

    def _begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started_epoch = trainer.current_epoch
        self._batches.fix(trainer, pl_module, self.leader, self._table)
        self._release()
        if trainer.current_epoch % self.every_n_epochs == 0:
            spill = os.path.join(self.run_dir, table.heatmap_file("spill", self.namespace))
            knobs = {name: getattr(self, name) for name in ("mode", "memory_budget", "sketch_dim", "seed")}
            batches = self._batches.measured(trainer, self.leader)
            self._epoch = EpochGradients(trainer, pl_module, self._loss, *batches, spill, **knobs)

    def _finish_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.leader:
            what = f"{self.namespace}: gradients at the epoch-start weights"
            self._epoch.measure_loader(
                trainer, pl_module, self._batches.loader, self._batches.sampler, what, self.progress
            )
        row, full_norm, lrs = self._epoch.finish(trainer, self.distance)
        self._epoch = None
        epoch, step, ns = trainer.current_epoch, self.training_step(trainer), self.namespace
        if not torch.isfinite(row).all() and not self._warned_non_finite:
            self._warned_non_finite = True
            warn_non_finite(epoch)
        self._table.append(epoch, row.tolist(), lrs)
        summary = table.epoch_summary(row, full_norm, self._table.batch_values)
        self.log_scalars(trainer, {f"{ns}/{name}": value for name, value in summary.items()}, step)
        self.write_array(f"{table.heatmap_file('matrix', ns)}.npy", self.matrix)
        for name, (columns, rows) in self._table.tables(ns).items():
            self.write_table(name, columns, rows)
        if trainer.is_global_zero:
            phase = self.phase_of_epoch[-1]
            self.log_figure(trainer, f"{ns}/phase_{phase}", self.phase_figure(phase), step)

    def _release(self) -> None:
        """Free the epoch's gradients and frozen copy and remove a spill file."""
        if self._epoch is not None:
            self._epoch.close()
        self._epoch = None
