"""The fixed, metric-sorted mini-batches a :class:`~lightning_tricks.callbacks.MinibatchHeatmap`
measures (seed ``002_696f8026b30a9c31.txt`` §3): the Lightning side of
:mod:`lightning_tricks.samplers`.

The training set is scored once by the image metric, on rank 0 (then broadcast), with the Trainer's
progress bar. The metric scores the images as stored, not the standardised tensors a loader gives:
``metric_transform="auto"`` passes the loader's images through the datamodule's
``denormalize(images)`` when it has one, and scores its ``unaugmented_train_set()`` (the same samples
in the same order without random augmentation) when the loader is over its ``train_set``. The
leading heatmap installs the sorted batches in the fit loop's training loader; the others form
their own batches from the same data, batch size and ``drop_last``. A fit restarted inside an epoch
(a mid-epoch checkpoint) goes on with that epoch's next batch, as the uninterrupted fit does
(Lightning would replay a loader without ``state_dict`` from its first batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset

from ..gradients.minibatch_distance import rng_devices
from ..heatmap import HeatmapTable, limited_batches
from ..image_metrics import Metric, color
from ..samplers import MetricSortedBatchSampler, score_dataset, sorted_loader
from ._progress import pass_progress


def checked_image_key(image_key: Any) -> int | str:
    """The ``image_key`` argument: a position (``int``) or a key (``str``) in a collated batch."""
    if isinstance(image_key, bool) or not isinstance(image_key, (int, str)):
        raise TypeError(f"`image_key` must be a position (int) or a key (str); got {image_key!r}.")
    return image_key


def checked_metric_transform(metric_transform: Any) -> Any:
    """The ``metric_transform`` argument: ``"auto"``, ``None`` or a callable ``images -> images``."""
    if metric_transform != "auto" and metric_transform is not None and not callable(metric_transform):
        raise TypeError(
            "`metric_transform` must be 'auto' (the datamodule's `denormalize`), None (images as the "
            f"loader gives them) or a callable images -> images; got {metric_transform!r}."
        )
    return metric_transform


def batches_done_at_restart(trainer: pl.Trainer, num_batches: int) -> int:
    """The batches of the current epoch a fit restarted inside it had trained (Lightning goes on with
    that batch index), 0 unless the checkpoint was saved before the epoch's last batch."""
    loop = trainer.fit_loop.epoch_loop
    done = loop.batch_progress.current.ready
    return done if loop.restarting and 0 < done < num_batches else 0


class _ResumedBatches(MetricSortedBatchSampler):
    """``sampler``'s batches, its next pass from batch ``start`` on (the rest of a restarted epoch)."""

    def __init__(self, sampler: MetricSortedBatchSampler, start: int) -> None:
        vars(self).update(vars(sampler))  # the same batches, scores and fingerprint: nothing scored again
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        return iter([list(batch) for batch in self.batches[start:]])


class FixedBatches:
    """The batches of one heatmap, scored once per dataset, batch size and ``drop_last``.

    Args: as :class:`~lightning_tricks.callbacks.MinibatchHeatmap`'s (``metric`` resolved).
    """

    def __init__(
        self,
        metric: Metric,
        descending: bool,
        image_key: int | str,
        score_batch_size: int,
        progress: bool,
        metric_transform: Any,
    ) -> None:
        self.metric, self.descending, self.image_key = metric, descending, image_key
        self.score_batch_size, self.progress = score_batch_size, progress
        self.metric_transform = metric_transform
        self.sampler: MetricSortedBatchSampler | None = None
        self.loader: DataLoader | None = None  # the training loader the batches are cut from
        self._source: tuple[Any, int, bool] | None = None  # (dataset, batch size, drop_last) scored

    def fix(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        leader: bool,
        table: HeatmapTable,
        fit_start: bool = False,
    ) -> None:
        """Fix the sorted batches and have ``table`` adopt them (it refuses other batches than its
        earlier epochs'): the leader makes the training loader form them (once per loader built, and at
        the ``fit_start`` of a fit restarted inside an epoch, from that epoch's next batch on); another
        heatmap forms its own from the loader's data."""
        sampler = self._fix(trainer, pl_module, leader, fit_start)
        table.adopt(sampler.fingerprint(), sampler.batch_values.tolist())

    def _fix(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, leader: bool, fit_start: bool
    ) -> MetricSortedBatchSampler:
        combined = trainer.fit_loop._combined_loader
        if len(combined.flattened) != 1:
            raise ValueError(
                f"MinibatchHeatmap needs a single training loader to fix its batches; got {len(combined.flattened)}."
            )
        self.loader = loader = combined.flattened[0]
        if not leader:
            return self._own_batches(trainer, pl_module, loader)
        batch_sampler = getattr(loader, "batch_sampler", None)
        fixed = isinstance(batch_sampler, MetricSortedBatchSampler)  # installed, or the user's own
        self.sampler = batch_sampler if fixed else self._sorted_sampler(trainer, pl_module, loader, leader)
        num_batches = limited_batches(len(self.sampler), trainer.limit_train_batches)
        start = batches_done_at_restart(trainer, num_batches) if fit_start else 0
        if start or not fixed:
            self._install(trainer, pl_module, loader, self.sampler, start)
        return self.sampler

    def _own_batches(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any
    ) -> MetricSortedBatchSampler:
        """A further heatmap's batches: the loader's data in this metric's order (scored again only
        for another dataset, batch size or ``drop_last``)."""
        batch_sampler = getattr(loader, "batch_sampler", None)
        source = (getattr(loader, "dataset", None), *_batching(batch_sampler))
        if self._source is None or source[0] is not self._source[0] or source[1:] != self._source[1:]:
            self.sampler, self._source = self._sorted_sampler(trainer, pl_module, loader, False), source
        return self.sampler

    def _install(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loader: Any,
        sampler: MetricSortedBatchSampler,
        start: int,
    ) -> None:
        """Make the fit loop's training loader form ``sampler``'s batches, counted as Lightning counts,
        the first pass from batch ``start`` on (the rest of a restarted epoch)."""
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        num_batches = limited_batches(len(sampler), trainer.limit_train_batches)
        combined.flattened = [sorted_loader(loader, _ResumedBatches(sampler, start) if start else sampler)]
        combined.limits = [num_batches]
        if num_batches != fit_loop.max_batches and isinstance(trainer.val_check_interval, float):
            trainer.val_check_batch = max(1, int(num_batches * trainer.val_check_interval))
        fit_loop.max_batches = num_batches
        fit_loop._data_fetcher.setup(combined)
        with torch.random.fork_rng(devices=rng_devices(pl_module)):  # as the replaced loader's iterator drew
            iter(fit_loop._data_fetcher)

    def measured(self, trainer: pl.Trainer, leader: bool) -> tuple[int, list[int]]:
        """How many batches an epoch measures (the fit loop's for the leader, whose batches are
        training's, else as many as ``Trainer(limit_train_batches)`` allows) and the batch sizes."""
        if leader:
            return int(trainer.num_training_batches), self.sampler.batch_sizes
        return limited_batches(len(self.sampler), trainer.limit_train_batches), self.sampler.batch_sizes

    def _sorted_sampler(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any, leader: bool
    ) -> MetricSortedBatchSampler:
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise ValueError(
                "MinibatchHeatmap forms fixed batches from a map-style dataset; the training loader is "
                f"{type(loader).__name__} over {type(getattr(loader, 'dataset', None)).__name__}. Use a "
                "DataLoader over a Dataset with __getitem__/__len__."
            )
        batch_sampler = loader.batch_sampler
        if type(batch_sampler) is not BatchSampler and (
            leader or not isinstance(batch_sampler, MetricSortedBatchSampler)
        ):
            raise ValueError(
                f"MinibatchHeatmap needs the same batches every epoch, but the training loader's batch sampler "
                f"is a {type(batch_sampler).__name__}, whose batches may change between epochs. Use a DataLoader "
                "with `batch_size=` (the callback sorts it) or a MetricSortedBatchSampler."
            )
        scores = self._scores(trainer, pl_module, loader) if trainer.is_global_zero else None
        scores = trainer.strategy.broadcast(scores, src=0)
        return MetricSortedBatchSampler(
            scores,
            batch_sampler.batch_size,
            descending=self.descending,
            drop_last=batch_sampler.drop_last,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
        )

    def _scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader) -> torch.Tensor:
        scores = score_dataset(
            self._scored_dataset(trainer, loader),
            self.metric,
            batch_size=self.score_batch_size,
            collate_fn=loader.collate_fn,
            image_key=self.image_key,
            device=pl_module.device,
            progress=partial(pass_progress, trainer, enabled=self.progress),
            transform=self._image_view(trainer),
        )
        if self.metric is color and not scores[:, 1].any():
            rank_zero_warn(
                "MinibatchHeatmap(metric='color'): the training images are grey (one channel, or equal "
                "channels), so every hue and saturation is 0 and `color` orders them by mean value "
                "alone, the order of `intensity`."
            )
        return scores

    def _scored_dataset(self, trainer: pl.Trainer, loader: DataLoader) -> Dataset:
        """The images the metric scores, index for index the loader's dataset: with ``"auto"`` and a
        loader over the datamodule's ``train_set``, its ``unaugmented_train_set()``, else the
        loader's dataset."""
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

    def _image_view(self, trainer: pl.Trainer) -> Any:
        """What the metric scores (seed §3.2 scores the images): ``metric_transform``, or with
        ``"auto"`` the datamodule's ``denormalize`` (the images as stored, before normalisation)."""
        if self.metric_transform != "auto":
            return self.metric_transform
        return getattr(trainer.datamodule, "denormalize", None)


def _batching(batch_sampler: Any) -> tuple[Any, Any]:
    return getattr(batch_sampler, "batch_size", None), getattr(batch_sampler, "drop_last", None)
