"""MinibatchHeatmap: distance of each fixed mini-batch's gradient to the full gradient, per epoch
(seed 002 §3, Algorithm 1)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset
from typing_extensions import override

from .. import checks
from ..gradients.minibatch_distance import (
    DISTANCES,
    MODES,
    LossFunction,
    MinibatchDistances,
    flatten,
    freeze,
    gradient_at,
    rng_devices,
)
from ..image_metrics import Metric, color, metric_name, resolve_metric
from ..outputs import MINIBATCH_HEATMAP
from ..plotting import plot_minibatch_heatmap
from ..samplers import MetricSortedBatchSampler, score_dataset, sorted_loader
from ._base import TrickCallback, first_learning_rate, resolve_loss_fn

MATRIX_FILE = MINIBATCH_HEATMAP.files["matrix"]
HISTORY_FILE = MINIBATCH_HEATMAP.files["history"]
HISTORY_COLUMNS = ("epoch", "lr", "lr_first", "lr_last", "phase", "batch", "metric", "distance")
SPILL_FILE = MINIBATCH_HEATMAP.files["spill"]
ImageTransform = Callable[[Tensor], Tensor]
"""``images (N, C, H, W) -> images``: what the metric sees of a training batch (e.g. a datamodule's
``denormalize``)."""


class MinibatchHeatmap(TrickCallback):
    r"""Which fixed mini-batch's gradient is closest to the full-batch gradient, epoch by epoch
    (seed ``002_696f8026b30a9c31.txt`` §3, Algorithm 1, Figs. 1–4).

    **Batches.** The training set is scored once by an image ``metric`` (seed §3.2:
    ``"intensity"``, ``"color"``, ``"edges"``, ``"perceptual"`` — see
    :mod:`lightning_tricks.image_metrics` — or any callable ``images -> scores``), sorted
    (``descending`` or not) and cut into the same mini-batches every epoch
    (:class:`~lightning_tricks.samplers.MetricSortedBatchSampler`, batch size and ``drop_last`` of the
    Trainer's training loader). The callback installs those batches in the training loader at the
    first epoch; a loader whose batch sampler already is a ``MetricSortedBatchSampler`` is used as
    it is. Batch rank k = 0 … K−1 is the metric order. The metric scores the images as stored
    (seed §3.2), not the standardised tensors a loader gives: ``metric_transform="auto"`` passes the
    loader's images through the datamodule's ``denormalize(images)`` (the protocol:
    ``x · std + mean`` per channel, :class:`~lightning_tricks.datamodules.ClassificationDataModule`
    and its subclasses define it) when ``Trainer.fit(datamodule=...)`` has one, and, where the
    datamodule also has ``unaugmented_train_set()`` (the protocol: its ``train_set`` without random
    augmentation, same samples in the same order, e.g. the torchvision datamodules), scores that
    view rather than one random augmented view of each image; with your own loader
    pass ``metric_transform=`` (any ``images -> images``), ``None`` scores what the loader gives.
    ``color`` on grey images (one channel, or equal channels) warns: hue and saturation are all 0,
    so it orders by mean value, the order of ``intensity``.

    **Several heatmaps** (to compare metrics on one run): the first ``MinibatchHeatmap`` in
    ``Trainer(callbacks=...)`` decides the training order as above; every other one forms its own
    fixed batches (same data, batch size and ``drop_last``) and, after each measured epoch's last
    batch, takes their gradients at the same θ_e (one extra forward/backward per batch, RNG forked):
    training is as with the first alone. Their files and tags use ``heatmap_<metric>[_descending]_<distance>``
    instead of ``heatmap`` (e.g. ``heatmap_edges_l2_matrix.npy``, ``heatmap_edges_l2/distance_min``).
    Two heatmaps with the same metric, ``descending`` and ``distance`` are refused by Lightning (same
    ``state_key``).

    **Measurement.** At the start of every ``every_n_epochs``-th epoch e (0, n, 2n, …) the parameters
    θ_e (and buffers) are copied; after each training batch k, the gradient ∇_k of the batch's mean
    loss at θ_e is taken with one extra forward/backward (the seed's ``net_compare``, without a second
    module: ``torch.func.functional_call`` on the copies, under ``torch.random.fork_rng``; BatchNorm's
    train-mode updates go to the copied buffers). At the epoch end ∇_e = Σ_k m_k ∇_k / Σ_k m_k
    (eq. 3, m_k the batch sizes) and D_{e,k} = ‖∇_k − ∇_e‖ (``distance="l2"``) or
    1 − cos(∇_k, ∇_e) (``"cosine"``). The loss is the module's ``compute_loss(batch)`` (a scalar,
    mean-reduced) or, if the module has none, ``loss_fn(module, batch)``. Training is unperturbed:
    parameters, buffers, optimiser state and RNG evolve bit for bit as without the callback (on the
    same batches).

    **Storage.** ``mode="exact"`` keeps the K gradients (K×P float32) on the module's device up to
    ``memory_budget`` bytes and the rest in a memory-mapped file in the run folder, removed after
    the epoch. ``mode="sketch"`` keeps a seeded CountSketch of each (O(P) per batch, K×``sketch_dim``
    memory): each distance is within relative error ε of the exact one with probability at least
    1 − 2/(``sketch_dim``·ε²) (Johnson–Lindenstrauss-type bound, see
    :class:`~lightning_tricks.gradients.minibatch_distance.CountSketch`; e.g. ``sketch_dim=4096``:
    ±10 % with probability ≥ 95 %). ``"auto"`` is exact when K×P×4 bytes fit the budget.

    **Output.** :attr:`matrix` (measured epochs × K, batches in metric order), written with the epoch
    numbers as ``heatmap_matrix.npy`` / ``heatmap_matrix.csv`` in the run folder after each measured
    epoch; :attr:`history`, one record ``{"epoch", "lr", "phase", "batch", "metric", "distance"}``
    per epoch and batch (``heatmap.csv``, so a reader can split it by phase; with
    ``Trainer(limit_train_batches=...)`` ∇_e is the mean over the visited batches and the others
    are NaN); one heatmap per phase (``heatmap/phase_<p>``, x batch rank with the
    batch's mean metric value on the top axis, y epoch; ``log_scale`` colours; a short last batch,
    the remainder of the data, is hatched and labelled with its size) through every logger
    that shows images and as PNG. Phases (seed §3.1: "epochs with the same learning rate"):
    ``phases="lr"``: an epoch's learning rate is the first param group's as its optimiser steps used
    it (read in ``on_before_optimizer_step``, before a scheduler moves it), the value most of its
    steps used (ties: the later); a phase is a maximal run of measured epochs with the same one. An
    epoch whose LR changed between its steps (per-step schedules, a scheduler one step late) thus
    joins the phase of the LR it mostly trained with; ``lr_first``/``lr_last`` in ``heatmap.csv``
    and the figure title show it. A schedule that changes the LR every step makes each epoch its own
    phase: pass ``phases=[...]`` then. A list of epochs starts a phase at each; ``None``: one
    phase. Scalars per measured epoch: ``heatmap/distance_mean``, ``heatmap/distance_min``,
    ``heatmap/distance_max``, ``heatmap/best_batch`` (rank of the smallest distance),
    ``heatmap/best_batch_metric`` and ``heatmap/full_gradient_norm`` (‖∇_e‖, sketched in sketch mode).

    **Resume and DDP.** The matrix, epochs, learning rates and a fingerprint of the batches are saved
    in checkpoints; an epoch's row is recorded at its last batch, so a checkpoint of that batch
    (``ModelCheckpoint(every_n_train_steps=...)``) holds it and a run resumed from there measures the
    next epochs as an uninterrupted one; an epoch interrupted before its last batch is not measured.
    Under DDP each process takes its contiguous share of every global batch (``batch_size × world
    size``), the per-process gradients are summed with their batch sizes before storage (one
    all-reduce of P values, or ``sketch_dim`` in sketch mode, per batch), rank 0 stores and computes
    the row and broadcasts it: the matrix equals one process training with the global batch. A last
    global batch with fewer samples than processes is dropped there.

    Args:
        metric: ``"intensity"``, ``"color"``, ``"edges"``, ``"perceptual"`` or a callable ``images
            (N, C, H, W) -> (N,)`` scores (or ``(N, m)`` lexicographic keys).
        mode: ``"auto"``, ``"exact"`` or ``"sketch"``.
        memory_budget: bytes of exact gradients kept in memory (``>= 0``).
        sketch_dim: dimension of the sketch (``>= 1``).
        every_n_epochs: measure epochs 0, n, 2n, … (``>= 1``).
        distance: ``"l2"`` or ``"cosine"``.
        phases: ``"lr"``, a list of epochs where phases start, or ``None``.
        descending: sort the data by decreasing metric.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss`` for modules without ``compute_loss``.
        log_scale: logarithmic colour scale in the heatmaps.
        seed: seed of the sketch.
        image_key: where the images are in a collated batch (position or key) for scoring.
        score_batch_size: images scored at once (``>= 1``).
        progress: show a progress bar while scoring.
        metric_transform: ``"auto"`` (the datamodule's ``denormalize`` and ``unaugmented_train_set``,
            if any), ``None`` or a callable ``images -> images`` applied before the metric.

    Raises:
        ValueError / TypeError: bad arguments (naming the argument); at ``setup``, a module with
            neither ``compute_loss`` nor ``loss_fn``; at the first epoch, a training loader that
            cannot have fixed batches (several loaders, an iterable dataset, a custom batch
            sampler) or whose batches change between epochs (e.g. a reloaded loader with another
            batch size), or a datamodule's ``unaugmented_train_set()`` of another length than its
            ``train_set``.

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
        >>> heatmap = MinibatchHeatmap(metric="intensity", progress=False)
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
        self._metric = resolve_metric(metric)
        _check_choice("mode", mode, MODES)
        _check_choice("distance", distance, DISTANCES)
        _check_int("memory_budget", memory_budget, 0)
        _check_int("sketch_dim", sketch_dim, 1)
        _check_int("score_batch_size", score_batch_size, 1)
        _check_int("seed", seed, 0)
        for name, flag in (("descending", descending), ("log_scale", log_scale), ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False; got {flag!r}.")
        if isinstance(image_key, bool) or not isinstance(image_key, (int, str)):
            raise TypeError(f"`image_key` must be a position (int) or a key (str); got {image_key!r}.")
        if metric_transform != "auto" and metric_transform is not None and not callable(metric_transform):
            raise TypeError(
                "`metric_transform` must be 'auto' (the datamodule's `denormalize`), None (images as the "
                f"loader gives them) or a callable images -> images; got {metric_transform!r}."
            )
        self.every_n_epochs = checks.integer("every_n_epochs", every_n_epochs, minimum=1)
        self.phases = _checked_phases(phases)
        checks.loss_fn(loss_fn)
        self.metric, self.mode, self.distance = metric_name(metric), mode, distance
        self.memory_budget, self.sketch_dim, self.seed = memory_budget, sketch_dim, seed
        self.descending, self.loss_fn, self.log_scale = descending, loss_fn, log_scale
        self.image_key, self.score_batch_size, self.progress = image_key, score_batch_size, progress
        self.metric_transform = metric_transform
        self.leader = True
        self.reset_fit_state()

    # -- identity, state, dashboard ------------------------------------------------------------

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        ns, which = self.namespace, "" if self.leader else f" ({self.namespace})"
        return {
            f"mini-batch distance to the full gradient (seed 002 Alg. 1){which}": [
                f"{ns}/distance_min",
                f"{ns}/distance_mean",
                f"{ns}/distance_max",
            ],
            f"closest mini-batch{which}": [f"{ns}/best_batch", f"{ns}/best_batch_metric"],
            f"full-batch gradient norm{which}": [f"{ns}/full_gradient_norm"],
        }

    @override
    def metric_descriptions(self) -> dict[str, str]:
        what = "‖∇_k − ∇_e‖" if self.distance == "l2" else "1 − cos(∇_k, ∇_e)"
        ns = self.namespace
        return {
            f"{ns}/distance_mean": f"Mean over the epoch's fixed mini-batches of D_ek = {what} at the epoch-start parameters (seed 002 Alg. 1).",
            f"{ns}/distance_min": f"Smallest D_ek = {what} of the epoch.",
            f"{ns}/distance_max": f"Largest D_ek = {what} of the epoch.",
            f"{ns}/best_batch": f"Rank (in {self.metric} order) of the mini-batch closest to the full gradient.",
            f"{ns}/best_batch_metric": f"Mean {self.metric} of the mini-batch closest to the full gradient.",
            f"{ns}/full_gradient_norm": "‖∇_e‖, the norm of the batch-size-weighted mean of the mini-batch gradients.",
        }

    @override
    def reset_fit_state(self) -> None:
        self._rows: list[list[float]] = []
        self._epochs: list[int] = []
        self._lrs: list[tuple[float, float, float]] = []  # (epoch LR, first step's, last step's)
        self._batch_values: list[float] | None = None
        self._fingerprint: tuple[int, int, int] | None = None
        self._sampler: MetricSortedBatchSampler | None = None
        self._source: tuple[Any, int, bool] | None = None  # (dataset, batch size, drop_last) scored
        self._engine: MinibatchDistances | None = None
        self._frozen: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self._step_lrs: list[float | Tensor] | None = None
        self._started_epoch: int | None = None
        self._warned_non_finite = False

    @override
    def get_state(self) -> dict[str, Any]:
        return {
            "rows": [list(row) for row in self._rows],
            "epochs": list(self._epochs),
            "lrs": [list(lr) for lr in self._lrs],
            "batch_values": self._batch_values,
            "fingerprint": self._fingerprint,
        }

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._rows = [list(row) for row in state["rows"]]
        self._epochs = list(state["epochs"])
        self._lrs = [(lr, lr, lr) if isinstance(lr, (int, float)) else tuple(lr) for lr in state["lrs"]]
        self._batch_values = state["batch_values"]
        self._fingerprint = None if state["fingerprint"] is None else tuple(state["fingerprint"])

    # -- results ---------------------------------------------------------------------------------

    @property
    def matrix(self) -> np.ndarray:
        """D_{e,k}: one row per measured epoch (:attr:`epochs`), one column per batch in metric order."""
        width = len(self._batch_values or [])
        return np.array(self._rows, dtype=float).reshape(len(self._rows), width)

    @property
    def epochs(self) -> list[int]:
        """The measured epochs, one per row of :attr:`matrix`."""
        return list(self._epochs)

    @property
    def batch_values(self) -> np.ndarray:
        """Each batch's mean metric value (column 0 of a lexicographic key such as colour's hue)."""
        return np.array(self._batch_values or [], dtype=float)

    @property
    def phase_of_epoch(self) -> list[int]:
        """The phase index of each measured epoch (see :func:`phase_indices`)."""
        return phase_indices(self._epochs, [lr for lr, _, _ in self._lrs], self.phases)

    @property
    def learning_rates(self) -> list[tuple[float, float, float]]:
        """``(lr, first, last)`` of each measured epoch: the learning rate most of its optimiser steps
        used (ties: the later one), the first step's and the last step's (the first param group's,
        read as each step uses it)."""
        return list(self._lrs)

    @property
    def history(self) -> list[dict[str, float]]:
        """One record ``{"epoch", "lr", "lr_first", "lr_last", "phase", "batch", "metric", "distance"}``
        per measured epoch and batch (the three LRs: :attr:`learning_rates`; ``phase``:
        :attr:`phase_of_epoch`)."""
        values = self._batch_values or []
        return [
            {
                "epoch": epoch,
                "lr": lr,
                "lr_first": first,
                "lr_last": last,
                "phase": phase,
                "batch": k,
                "metric": values[k],
                "distance": distance,
            }
            for epoch, (lr, first, last), phase, row in zip(
                self._epochs, self._lrs, self.phase_of_epoch, self._rows
            )
            for k, distance in enumerate(row)
        ]

    # -- Lightning hooks ---------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._take_role(trainer)
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._loss = resolve_loss_fn(pl_module, self.loss_fn, "MinibatchHeatmap")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch skips that epoch's start hook: fix its batches here
        self._install_sorted_batches(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_epoch(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning resumed from a checkpoint of an epoch's last batch runs the next epoch from its
        # first batch without calling on_train_epoch_start: begin the epoch here (θ_e is untouched)
        if batch_idx == 0 and self._started_epoch != trainer.current_epoch:
            self._begin_epoch(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._step_lrs is not None:  # the LR this step uses (schedulers move it after the step)
            lr = first_learning_rate(trainer)
            self._step_lrs.append(lr.detach().clone() if isinstance(lr, Tensor) else lr)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is None:
            return
        if self.leader and batch_idx < self._num_batches:
            params, buffers = self._frozen
            with (
                torch.random.fork_rng(devices=rng_devices(pl_module)),
                trainer.precision_plugin.forward_context(),
            ):
                gradient = flatten(gradient_at(pl_module, params, buffers, self._loss, batch))
            self._store(trainer, batch_idx, gradient)
        if batch_idx == int(trainer.num_training_batches) - 1:
            # the row is complete: record it now, so a checkpoint of this batch holds it
            self._finish_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:  # the epoch stopped before its last batch
            self._finish_epoch(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    # -- roles -----------------------------------------------------------------------------------

    def _take_role(self, trainer: pl.Trainer) -> None:
        """The first ``MinibatchHeatmap`` of the Trainer orders the training batches (namespace
        ``heatmap``); each other one measures its own batches (namespace ``heatmap_<metric>…``)."""
        heatmaps = [c for c in trainer.callbacks if isinstance(c, MinibatchHeatmap)]
        self.leader = heatmaps[0] is self
        if self.leader:
            self.namespace = type(self).namespace
            return
        suffix = [self.metric] + (["descending"] if self.descending else []) + [self.distance]
        self.namespace = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(["heatmap", *suffix]))

    def _file(self, kind: str) -> str:
        """This callback's file names: ``heatmap_matrix`` / ``heatmap.csv`` / the spill file, with
        ``heatmap`` replaced by :attr:`namespace` for the non-leading heatmaps."""
        names = {"matrix": MATRIX_FILE, "history": HISTORY_FILE, "spill": SPILL_FILE}
        return names[kind].replace("heatmap", self.namespace, 1)

    # -- batches -------------------------------------------------------------------------------

    def _begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started_epoch = trainer.current_epoch
        self._install_sorted_batches(trainer, pl_module)
        self._release()
        if trainer.current_epoch % self.every_n_epochs == 0:
            self._start_epoch(trainer, pl_module)

    def _install_sorted_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the training loader form the metric-sorted batches (once per loader built); a
        non-leading heatmap only forms its own batches from the loader's data."""
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        loaders = combined.flattened
        if len(loaders) != 1:
            raise ValueError(
                f"MinibatchHeatmap needs a single training loader to fix its batches; got {len(loaders)}."
            )
        loader = loaders[0]
        current = getattr(loader, "batch_sampler", None)
        if not self.leader:
            self._adopt(self._own_sampler(trainer, pl_module, loader))
            return
        if isinstance(current, MetricSortedBatchSampler):
            self._adopt(current)
            return
        sampler = self._sorted_sampler(trainer, pl_module, loader)
        self._adopt(sampler)
        combined.flattened = [sorted_loader(loader, sampler)]
        num_batches = _limited(len(sampler), trainer.limit_train_batches)
        combined.limits = [num_batches]
        if num_batches != fit_loop.max_batches and isinstance(trainer.val_check_interval, float):
            trainer.val_check_batch = max(1, int(num_batches * trainer.val_check_interval))
        fit_loop.max_batches = num_batches
        fit_loop._data_fetcher.setup(combined)
        with torch.random.fork_rng(devices=rng_devices(pl_module)):  # as the replaced loader's iterator drew
            iter(fit_loop._data_fetcher)

    def _own_sampler(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any
    ) -> MetricSortedBatchSampler:
        """A non-leading heatmap's batches: the loader's data in this metric's order, with the loader's
        batch size and ``drop_last`` (scored once per dataset and batch size)."""
        batch_sampler = getattr(loader, "batch_sampler", None)
        source = (
            getattr(loader, "dataset", None),
            getattr(batch_sampler, "batch_size", None),
            getattr(batch_sampler, "drop_last", None),
        )
        if self._source is None or source[0] is not self._source[0] or source[1:] != self._source[1:]:
            self._sampler = self._sorted_sampler(trainer, pl_module, loader)
            self._source = source
        self._loader = loader
        return self._sampler

    def _sorted_sampler(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any
    ) -> MetricSortedBatchSampler:
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise ValueError(
                "MinibatchHeatmap forms fixed batches from a map-style dataset; the training loader is "
                f"{type(loader).__name__} over {type(getattr(loader, 'dataset', None)).__name__}. Use a "
                "DataLoader over a Dataset with __getitem__/__len__."
            )
        batch_sampler = loader.batch_sampler
        if type(batch_sampler) is not BatchSampler and not (
            not self.leader and isinstance(batch_sampler, MetricSortedBatchSampler)
        ):
            raise ValueError(
                f"MinibatchHeatmap needs the same batches every epoch, but the training loader's batch sampler "
                f"is a {type(batch_sampler).__name__}, whose batches may change between epochs. Use a DataLoader "
                "with `batch_size=` (the callback sorts it) or a MetricSortedBatchSampler."
            )
        scores = None
        if trainer.is_global_zero:
            scores = score_dataset(
                self._scored_dataset(trainer, loader),
                self._metric,
                batch_size=self.score_batch_size,
                collate_fn=loader.collate_fn,
                image_key=self.image_key,
                device=pl_module.device,
                progress=self.progress,
                transform=self._image_view(trainer),
            )
            if self._metric is color and not scores[:, 1].any():
                rank_zero_warn(
                    "MinibatchHeatmap(metric='color'): the training images are grey (one channel, or equal "
                    "channels), so every hue and saturation is 0 and `color` orders them by mean value "
                    "alone, the order of `intensity`."
                )
        scores = trainer.strategy.broadcast(scores, src=0)
        return MetricSortedBatchSampler(
            scores,
            batch_sampler.batch_size,
            descending=self.descending,
            drop_last=batch_sampler.drop_last,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
        )

    def _scored_dataset(self, trainer: pl.Trainer, loader: DataLoader) -> Dataset:
        """The images the metric scores, index for index the loader's dataset: with ``"auto"`` and a
        loader over the datamodule's ``train_set``, its ``unaugmented_train_set()`` (the same samples
        in the same order without random augmentation), else the loader's dataset."""
        datamodule = trainer.datamodule
        view = getattr(datamodule, "unaugmented_train_set", None)
        own_split = loader.dataset is getattr(datamodule, "train_set", None)
        if self.metric_transform != "auto" or view is None or not own_split:
            return loader.dataset
        dataset = view()
        if len(dataset) != len(loader.dataset):
            raise ValueError(
                f"{type(datamodule).__name__}.unaugmented_train_set() has {len(dataset)} samples, its "
                f"`train_set` {len(loader.dataset)}; the view must hold the same samples in the same order."
            )
        return dataset

    def _image_view(self, trainer: pl.Trainer) -> ImageTransform | None:
        """What the metric scores (seed §3.2 scores the images): ``metric_transform``, or with
        ``"auto"`` the datamodule's ``denormalize`` (the images as stored, before normalisation)."""
        if self.metric_transform != "auto":
            return self.metric_transform
        return getattr(trainer.datamodule, "denormalize", None)

    def _adopt(self, sampler: MetricSortedBatchSampler) -> None:
        """Use ``sampler``'s batches, refusing batches other than those of earlier epochs."""
        fingerprint = sampler.fingerprint()
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            raise ValueError(
                "MinibatchHeatmap compares the same mini-batches across epochs, but the training batches "
                f"changed (samples, batches, hash: {self._fingerprint} -> {fingerprint}), e.g. by a reloaded "
                "loader with another batch size or dataset. Keep the training loader's batches fixed while it is attached."
            )
        self._fingerprint = fingerprint
        self._sampler = sampler
        self._batch_values = sampler.batch_values.tolist()

    # -- measurement ----------------------------------------------------------------------------

    def _start_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._frozen = freeze(pl_module)
        dim = sum(p.numel() for p in self._frozen[0].values() if p.requires_grad)
        self._num_batches = (
            int(trainer.num_training_batches)
            if self.leader
            else _limited(len(self._sampler), trainer.limit_train_batches)
        )
        self._engine = MinibatchDistances(
            self._num_batches,
            dim,
            mode=self.mode,
            memory_budget=self.memory_budget,
            sketch_dim=self.sketch_dim,
            seed=self.seed,
            device=pl_module.device,
            spill_path=os.path.join(self.run_dir, self._file("spill")),
            store=trainer.is_global_zero,  # the other processes only sketch and sum
        )
        self._lr_at_start = first_learning_rate(trainer, default=math.nan)
        self._step_lrs = []

    def _measure_own_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A non-leading heatmap's ∇_k: its own fixed batches at θ_e, after the epoch's training
        (the loader's RNG draws and the extra forwards under ``fork_rng``)."""
        params, buffers = self._frozen
        loader = sorted_loader(self._loader, self._sampler)
        with (
            torch.random.fork_rng(devices=rng_devices(pl_module)),
            trainer.precision_plugin.forward_context(),
        ):
            for batch_idx, batch in enumerate(loader):
                if batch_idx >= self._num_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                gradient = flatten(gradient_at(pl_module, params, buffers, self._loss, batch))
                self._store(trainer, batch_idx, gradient)

    def _store(self, trainer: pl.Trainer, batch_idx: int, gradient: Tensor) -> None:
        """Add ∇_k of the global batch: under DDP Σ_r m_r ∇_k^r / Σ_r m_r over the processes."""
        size = self._sampler.batch_sizes[batch_idx]
        row = self._engine.project(gradient)
        if trainer.world_size > 1:
            packed = torch.cat([row * size, row.new_tensor([size])])
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
            size = packed[-1]
            row = packed[:-1] / size
        if trainer.is_global_zero:
            self._engine.add(batch_idx, row, size)

    def _finish_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.leader:
            self._measure_own_batches(trainer, pl_module)
        row = self._engine.distances(self.distance) if trainer.is_global_zero else None
        full_norm = self._engine.full_gradient().norm() if trainer.is_global_zero else None
        lrs = self._epoch_learning_rates()
        self._release()
        row, full_norm = trainer.strategy.broadcast((row, full_norm), src=0)
        self._record(trainer, row.cpu(), full_norm.cpu(), lrs)

    def _epoch_learning_rates(self) -> tuple[float, float, float]:
        """``(lr, first, last)``: the LR most of the epoch's optimiser steps used (ties: the later),
        its first step's and its last step's (the LR at the epoch start if no step ran)."""
        values = [float(lr) for lr in self._step_lrs or [self._lr_at_start]]
        counts = {value: values.count(value) for value in values}
        last_use = {value: index for index, value in enumerate(values)}
        lr = max(counts, key=lambda value: (counts[value], last_use[value]))
        return lr, values[0], values[-1]

    def _record(
        self, trainer: pl.Trainer, row: Tensor, full_norm: Tensor, lrs: tuple[float, float, float]
    ) -> None:
        epoch, step = trainer.current_epoch, self.training_step(trainer)
        finite = row[torch.isfinite(row)]
        if len(finite) < len(row) and not self._warned_non_finite:
            self._warned_non_finite = True
            rank_zero_warn(
                f"MinibatchHeatmap: non-finite gradient distances in epoch {epoch} (NaN/inf loss or "
                "gradient); they are kept as NaN."
            )
        # batches past Trainer(limit_train_batches) are not visited: NaN
        self._rows.append(row.tolist() + [math.nan] * (len(self._batch_values) - len(row)))
        self._epochs.append(epoch)
        self._lrs.append(lrs)
        best = int(torch.argmin(torch.where(torch.isfinite(row), row, math.inf))) if len(finite) else -1
        ns = self.namespace
        scalars = {
            f"{ns}/distance_mean": finite.mean() if len(finite) else math.nan,
            f"{ns}/distance_min": finite.min() if len(finite) else math.nan,
            f"{ns}/distance_max": finite.max() if len(finite) else math.nan,
            f"{ns}/best_batch": float(best),
            f"{ns}/best_batch_metric": self._batch_values[best] if best >= 0 else math.nan,
            f"{ns}/full_gradient_norm": full_norm,
        }
        self.log_scalars(trainer, scalars, step)
        self._write_files()
        if trainer.is_global_zero:
            current = self.phase_of_epoch[-1]
            self.log_figure(trainer, f"{ns}/phase_{current}", self.phase_figure(current), step)

    def _write_files(self) -> None:
        matrix = self.matrix
        self.write_array(f"{self._file('matrix')}.npy", matrix)
        columns = ["epoch", *(f"batch_{k}" for k in range(matrix.shape[1]))]
        rows = ([epoch, *row] for epoch, row in zip(self._epochs, matrix.tolist()))
        self.write_table(f"{self._file('matrix')}.csv", columns, rows)
        self.write_table(self._file("history"), HISTORY_COLUMNS, self.history)

    def phase_figure(self, phase: int) -> Figure:
        """The heatmap of one phase: its epochs × batches, titled with the phase's learning rate(s);
        a last batch shorter than the others (the remainder of the data) is marked on its column."""
        rows = [i for i, p in enumerate(self.phase_of_epoch) if p == phase]
        lr = self._lrs[rows[0]][0]
        changed = [self._epochs[i] for i in rows if not _same_lr(self._lrs[i][1], self._lrs[i][2])]
        note = f"\nthe LR changed inside epoch {', '.join(map(str, changed))}" if changed else ""
        figure = plot_minibatch_heatmap(
            self.matrix[rows],
            [self._epochs[i] for i in rows],
            self.batch_values,
            metric=self.metric,
            distance=self.distance,
            log_scale=self.log_scale,
            title=f"Mini-batch gradient distance, phase {phase} (lr {lr:.3g}){note}",
        )
        sizes = self._sampler.global_batch_sizes if self._sampler is not None else []
        if len(sizes) > 1 and sizes[-1] < sizes[0]:
            _mark_remainder(figure.axes[0], len(sizes) - 1, sizes[-1], sizes[0])
        return figure

    def _release(self) -> None:
        """Free the epoch's gradients and frozen copy and remove a spill file."""
        if self._engine is not None:
            self._engine.close()
        self._engine, self._frozen, self._step_lrs = None, None, None


def _mark_remainder(axes: Any, column: int, size: int, full: int) -> None:
    """Hatch the remainder batch's column and say under the x axis how many samples it holds."""
    axes.axvspan(column - 0.5, column + 0.5, fill=False, hatch="//", edgecolor="tab:cyan", linewidth=0)
    axes.set_xlabel(f"{axes.get_xlabel()}\nhatched: batch {column}, the remainder ({size} of {full} samples)")


def _same_lr(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def phase_indices(
    epochs: Sequence[int], lrs: Sequence[float], phases: str | Sequence[int] | None
) -> list[int]:
    """Phase of each measured epoch (seed ``002_696f8026b30a9c31.txt`` §3.1: "training phases based on
    epochs with the same learning rate").

    ``"lr"``: a phase is a maximal run of consecutive measured epochs with the same learning rate
    ``lrs`` (each epoch's, the one most of its optimiser steps used; equal within a relative 1e-9).
    A list of epochs starts a phase at each; ``None``: one phase, 0."""
    if phases is None:
        return [0] * len(epochs)
    if phases == "lr":
        out, phase = [], 0
        for i, lr in enumerate(lrs):
            if i and not _same_lr(lr, lrs[i - 1]):
                phase += 1
            out.append(phase)
        return out
    return [sum(epoch >= boundary for boundary in phases) for epoch in epochs]


def _limited(length: int, limit: int | float) -> int:
    """Batches per epoch under ``Trainer(limit_train_batches=limit)``, as Lightning counts them."""
    return min(length, int(limit)) if isinstance(limit, int) else int(length * limit)


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}; got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")


def _checked_phases(phases: Any) -> str | tuple[int, ...] | None:
    if phases is None or phases == "lr":
        return phases
    if isinstance(phases, str) or not isinstance(phases, Sequence):
        raise TypeError(
            f"`phases` must be 'lr', None or a list of epochs (ints >= 0) where phases start; got {phases!r} "
            f"({type(phases).__name__})."
        )
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in phases):
        raise ValueError(
            f"`phases` must be 'lr', None or a list of epochs (ints >= 0) where phases start; got {phases!r}."
        )
    return tuple(sorted(phases))
