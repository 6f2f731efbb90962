"""Shared machinery of the classification datamodules: argument checks, the seeded split, the loaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_tricks import checks


def check_split_size(name: str, value: object) -> None:
    """Raise unless ``value`` is a count (int ``>= 0``) or a fraction (float in ``[0, 1)``)."""
    allowed = "a count (int >= 0) or a fraction of the samples (float in [0, 1))"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r} ({type(value).__name__}).")
    if (isinstance(value, int) and value < 0) or (isinstance(value, float) and not 0.0 <= value < 1.0):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def split_count(value: int | float, total: int) -> int:
    """Samples a split size asks for: the int itself, or ``round(value * total)`` for a fraction."""
    return value if isinstance(value, int) else round(value * total)


def holdout_split(
    labels: np.ndarray, holdout: int, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into sorted ``(kept, held_out)`` index arrays, ``held_out`` of size ``holdout``.

    The draw depends only on ``seed`` (scikit-learn's ``train_test_split``), so every process of a
    distributed run computes the same split. With ``stratify`` each class keeps its share of
    samples in both parts, up to rounding.
    """
    indices = np.arange(len(labels))
    if holdout == 0:
        return indices, indices[:0]
    kept, held_out = train_test_split(
        indices, test_size=holdout, random_state=seed, stratify=labels if stratify else None
    )
    return np.sort(kept), np.sort(held_out)


class ResumableSampler(DistributedSampler):
    """The training order of epoch e — a permutation seeded by ``seed + e`` (sequential without
    ``shuffle``), then this process's share — that can start an epoch part-way (:meth:`resume`).

    The epoch of an iteration is ``current_epoch()`` when given (the trainer's epoch: after a
    resume from a checkpoint saved at ``on_train_epoch_end``, Lightning 2.6 passes ``set_epoch``
    one more than its epoch), else the last ``set_epoch``. A ``DistributedSampler``, so Lightning
    leaves it in place under DDP. The order depends on the seed and the epoch only, never on the
    global RNG.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        current_epoch: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._current_epoch = current_epoch
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, start: int) -> None:
        """Make the next iteration the one of ``epoch``, without its first ``start`` indices (once)."""
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self._resume or (self._epoch_now(), 0)
        self._resume = None
        self.set_epoch(epoch)
        return iter(list(super().__iter__())[start:])

    def _epoch_now(self) -> int:
        epoch = self._current_epoch() if self._current_epoch is not None else None
        return self.epoch if epoch is None else epoch


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over a :class:`ResumableSampler` with the ``state_dict`` /
    ``load_state_dict`` Lightning saves in checkpoints for such loaders: the epoch and the samples
    of it already trained on, read from the trainer (``batches_done``; so the datamodule must be
    the one passed to ``Trainer.fit``) — not counted here, where Lightning's one-batch prefetch
    would count a batch that was never trained on. A fit resumed from a mid-epoch checkpoint goes
    on with the next batch of the same order; one resumed at an epoch boundary shuffles the next
    epoch as the uninterrupted fit does.
    """

    def __init__(
        self, dataset: Dataset, sampler: ResumableSampler, batches_done: Callable[[], int], **options: Any
    ) -> None:
        super().__init__(dataset, sampler=sampler, **options)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "start"}``: the epoch the next batch belongs to and its first sample's position."""
        done = self._batches_done()
        if done >= len(self):
            return {"epoch": self.sampler.epoch + 1, "start": 0}
        return {"epoch": self.sampler.epoch, "start": done * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume(state_dict["epoch"], state_dict["start"])


class LoaderMixin:
    """The loaders every datamodule here builds: ``self.batch_size`` and ``self.num_workers`` read
    when a loader is created, and one clear error when ``setup`` has not run.

    The training loader is a :class:`ResumableLoader`: its order is a function of the seed of
    ``seed_everything`` (``PL_GLOBAL_SEED``, 0 without one — Lightning's own choice for its
    distributed samplers) and the epoch, and a resumed fit trains on exactly the batches the
    uninterrupted one would, from a mid-epoch checkpoint too.
    """

    batch_size: int
    num_workers: int
    trainer: L.Trainer | None

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _train_loader(self, dataset: Dataset, drop_last: bool = False) -> ResumableLoader:
        """Shuffled, resumable loader over ``dataset``, this process's share of it under DDP."""
        trainer = getattr(self, "trainer", None)
        shares = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(dataset, shuffle=True, seed=seed, current_epoch=self._epoch, **shares)
        return ResumableLoader(
            dataset,
            sampler,
            self._batches_done,
            batch_size=self.batch_size,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _epoch(self) -> int | None:
        """The trainer's current epoch, ``None`` without a trainer."""
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else trainer.current_epoch

    def _batches_done(self) -> int:
        """Training batches of the current epoch the trainer has processed (0 without a trainer)."""
        trainer = getattr(self, "trainer", None)
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _require(self, dataset: Dataset | None, hook: str, stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{hook}() needs the data: call `setup({stage!r})` first "
                "(the Trainer does this for you)."
            )
        return dataset


class ClassificationDataModule(LoaderMixin, L.LightningDataModule):
    """Base of the image-classification datamodules: argument checks, train/val split and loaders.

    A subclass sets the class attributes ``num_classes``, ``in_channels`` and ``image_size`` (a
    model config can link to them) and builds ``train_set``, ``val_set``, ``test_set`` and the
    index arrays ``train_indices`` / ``val_indices`` in ``setup``. Every loader reads
    ``self.batch_size`` when it is created, so a callback that changes ``batch_size`` (Lightning's
    ``BatchSizeFinder``, a batch-size scheduler) takes effect in the next ``train_dataloader()``.

    Args:
        batch_size: samples per batch of every loader, ``>= 1``.
        num_workers: ``DataLoader`` worker processes, ``>= 0``.
        val_size: validation samples held out of the training data: an int (count) or a float
            in ``[0, 1)`` (fraction, rounded). ``0`` means no validation loader.
        seed: seed of the train/val split, ``>= 0``.
        stratify: keep class proportions equal in the training and validation parts.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example (a subclass over in-memory tensors)::

        class NoiseDataModule(ClassificationDataModule):
            num_classes, in_channels, image_size = 2, 1, 4

            def __init__(self, batch_size: int = 8) -> None:
                super().__init__(batch_size, num_workers=0, val_size=0.25, seed=0, stratify=True)

            def setup(self, stage=None):
                images, labels = torch.randn(40, 1, 4, 4), torch.arange(40) % 2
                self._split_train_val(labels.numpy())
                self.train_set = TensorDataset(images[self.train_indices], labels[self.train_indices])
                self.val_set = self.test_set = TensorDataset(images[self.val_indices], labels[self.val_indices])
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __init__(
        self, batch_size: int, num_workers: int, val_size: int | float, seed: int, stratify: bool
    ) -> None:
        super().__init__()
        checks.integer("batch_size", batch_size, minimum=1)
        checks.integer("num_workers", num_workers, minimum=0)
        check_split_size("val_size", val_size)
        checks.integer("seed", seed, minimum=0)
        checks.boolean("stratify", stratify)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.stratify = stratify
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled, resumable loader (:class:`ResumableLoader`) over the training split with the
        current ``self.batch_size``."""
        return self._train_loader(self._require(self.train_set, "train_dataloader", "fit"))

    def val_dataloader(self) -> DataLoader | list:
        """Loader over the validation split, or ``[]`` (no validation) when ``val_size`` is 0."""
        val_set = self._require(self.val_set, "val_dataloader", "fit")
        return self._loader(val_set, shuffle=False) if len(val_set) else []

    def test_dataloader(self) -> DataLoader:
        """Loader over the test split."""
        return self._loader(self._require(self.test_set, "test_dataloader", "test"), shuffle=False)

    def denormalize(self, images: Tensor) -> Tensor:
        """The images as stored, ``x · std + mean`` per channel, from the loaders' standardised
        ``(N, C, H, W)`` tensors (the inverse of the per-channel ``(x - mean) / std``; unchanged when
        ``mean``/``std`` are ``None``: a datamodule that does not standardise). A callback that scores
        the images themselves (``MinibatchHeatmap``'s metrics) calls it."""
        if self.mean is None or self.std is None:
            return images
        shape = (1, -1, 1, 1)
        return images * images.new_tensor(self.std).view(shape) + images.new_tensor(self.mean).view(shape)

    def _split_train_val(self, labels: np.ndarray) -> None:
        """Set ``train_indices`` / ``val_indices`` (positions in ``labels``) from ``val_size`` and ``seed``."""
        total = len(labels)
        n_val = split_count(self.val_size, total)
        if n_val >= total:
            raise ValueError(
                f"`val_size`={self.val_size!r} holds out {n_val} of the {total} training samples and "
                "leaves none to train on; choose a smaller count or fraction."
            )
        self.train_indices, self.val_indices = holdout_split(labels, n_val, self.seed, self.stratify)
