"""scikit-learn's embedded handwritten digits: real image data that needs no download."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from lightning_tricks import checks

from .base import ClassificationDataModule, check_split_size, holdout_split, split_count

DIGITS_PIXEL_MAX = 16.0
DIGITS_NATIVE_SIZE = 8


class DigitsDataModule(ClassificationDataModule):
    """The 1,797 8x8 handwritten digits of ``sklearn.datasets.load_digits`` (10 classes), as tensors.

    The data ship inside scikit-learn, so this module works offline and sets up in well under a
    second; it is the default of the demo and the tests. In ``setup`` the images are built once:

    1. pixel values ``0..16`` are divided by 16, giving ``[0, 1]``;
    2. resized from 8x8 to ``image_size`` by bilinear interpolation (``align_corners=False``;
       ``image_size=8`` keeps the native images);
    3. standardised ``(x - mean) / std`` with the mean and (population) standard deviation of all
       pixels of the training split, stored per channel as ``self.mean`` / ``self.std`` tuples
       like the torchvision datamodules' constants (``denormalize(x)`` undoes this step);
    4. repeated to ``channels`` identical channels.

    The test split is drawn first, then the validation split from the rest; both are seeded and
    (by default) stratified, and fractions refer to all 1,797 images (defaults: 1,258 train / 180
    val / 359 test). There is no augmentation. ``train_indices``, ``val_indices`` and
    ``test_indices`` give each split's positions in ``load_digits()``.

    Args:
        image_size: side of the square images, ``>= 8``.
        channels: 1 (grey) or 3 (the grey channel repeated, for RGB networks).
        batch_size: samples per batch of every loader, ``>= 1``.
        num_workers: ``DataLoader`` worker processes, ``>= 0``.
        val_size: validation samples: an int (count) or a float in ``[0, 1)`` (fraction of all images).
        test_size: test samples: an int (count) or a float in ``[0, 1)`` (fraction of all images).
        seed: seed of the splits, ``>= 0``.
        stratify: keep class proportions equal across the splits.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range; in ``setup``, split sizes that leave no training images.

    Example::

        dm = DigitsDataModule(image_size=32, channels=3, batch_size=64)
        dm.setup("fit")
        images, labels = next(iter(dm.train_dataloader()))  # (64, 3, 32, 32) float32, (64,) int64
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        test_size: int | float = 0.2,
        seed: int = 0,
        stratify: bool = True,
    ) -> None:
        checks.integer("image_size", image_size, minimum=DIGITS_NATIVE_SIZE)
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels!r}.")
        check_split_size("test_size", test_size)
        super().__init__(batch_size, num_workers, val_size, seed, stratify)
        self.image_size = image_size
        self.in_channels = channels
        self.test_size = test_size
        self.test_indices: np.ndarray | None = None
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load, split and normalise all three splits on the first call."""
        if self.train_set is not None:
            return
        digits = load_digits()
        labels = torch.from_numpy(digits.target)
        self._split_three_ways(labels)
        images = self._resize(torch.from_numpy(digits.images).float().unsqueeze(1) / DIGITS_PIXEL_MAX)
        train_pixels = images[self.train_indices]
        mean, std = train_pixels.mean().item(), train_pixels.std(correction=0).item()
        self.mean, self.std = (mean,) * self.in_channels, (std,) * self.in_channels
        images = ((images - mean) / std).repeat(1, self.in_channels, 1, 1)
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(images[indices], labels[indices])
            for indices in (self.train_indices, self.val_indices, self.test_indices)
        )

    def _split_three_ways(self, labels: torch.Tensor) -> None:
        """Set ``train/val/test_indices``: the test split first, then validation from the rest."""
        total = len(labels)
        n_val, n_test = split_count(self.val_size, total), split_count(self.test_size, total)
        if n_val + n_test >= total:
            raise ValueError(
                f"`val_size`={self.val_size!r} and `test_size`={self.test_size!r} hold out {n_val} + {n_test} "
                f"of the {total} digits and leave none to train on; choose smaller sizes."
            )
        rest, test = holdout_split(labels.numpy(), n_test, self.seed, self.stratify)
        train, val = holdout_split(labels.numpy()[rest], n_val, self.seed, self.stratify)
        self.train_indices, self.val_indices, self.test_indices = rest[train], rest[val], test

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size == DIGITS_NATIVE_SIZE:
            return images
        return F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
