"""Shared machinery of the dense-prediction datamodules (segmentation, image-to-image translation)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from lightning_tricks import checks

from .base import LoaderMixin


class DenseDataModule(LoaderMixin, L.LightningDataModule):
    """Base of the segmentation and paired-image datamodules: argument checks and the three loaders.

    A subclass builds ``train_set``, ``val_set`` and ``test_set`` in ``setup``; each yields pairs
    ``(input, target)`` of tensors. Every loader reads ``self.batch_size`` when it is created, so a
    callback that changes ``batch_size`` (``BatchSizeScheduler``, Lightning's ``BatchSizeFinder``)
    takes effect in the next ``train_dataloader()``. The training loader drops a last incomplete
    batch when the set holds more than one batch: a batch of one image would break BatchNorm after
    global pooling (PSPNet's 1×1 bin, DeepLabV3's image pooling).

    Args:
        image_size: side of the square images the loaders yield (training crop size), ``>= 8``.
        batch_size: samples per batch of every loader, ``>= 1``.
        num_workers: ``DataLoader`` worker processes, ``>= 0``.
    """

    def __init__(self, image_size: int, batch_size: int, num_workers: int) -> None:
        super().__init__()
        checks.integer("image_size", image_size, minimum=8)
        checks.integer("batch_size", batch_size, minimum=1)
        checks.integer("num_workers", num_workers, minimum=0)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training set with the current ``self.batch_size``."""
        dataset = self._require(self.train_set, "train_dataloader", "fit")
        return self._train_loader(dataset, drop_last=len(dataset) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Loader over the validation set."""
        return self._loader(self._require(self.val_set, "val_dataloader", "fit"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over the test set."""
        return self._loader(self._require(self.test_set, "test_dataloader", "test"), shuffle=False)


class PadTo(v2.Transform):
    """Pad images and masks on the right and bottom to at least ``size × size``; images with
    ``image_fill``, masks with ``mask_fill`` (the ignore label), so padding is never a class."""

    def __init__(self, size: int, image_fill: float, mask_fill: int) -> None:
        super().__init__()
        self.size, self.image_fill, self.mask_fill = size, image_fill, mask_fill

    def transform(self, inpt: object, params: dict) -> object:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        height, width = inpt.shape[-2:]
        padding = [0, 0, max(self.size - width, 0), max(self.size - height, 0)]
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return v2.functional.pad(inpt, padding, fill=fill)


def segmentation_transform(
    size: int, mean: Sequence[float], std: Sequence[float], ignore_index: int, train: bool
) -> v2.Compose:
    """Joint transform of ``(Image, Mask)``: float image ``(x/255 − mean)/std``, mask int64; then
    pad to ``size`` (image 0 = the mean colour, mask ``ignore_index``) and a ``size × size`` crop —
    random, after a random mirror, when ``train`` (seed 000 §1, §5.1), central otherwise."""
    steps: list[v2.Transform] = [
        v2.ToDtype(
            {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True
        ),
        v2.Normalize(list(mean), list(std)),
        PadTo(size, 0.0, ignore_index),
    ]
    steps += [v2.RandomHorizontalFlip(), v2.RandomCrop(size)] if train else [v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToPureTensor()])


def as_image_and_mask(image: object, mask: Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Wrap a PIL image (or ``(C, H, W)`` uint8 tensor) and an ``(H, W)`` label tensor for v2 transforms."""
    return v2.functional.to_image(image), tv_tensors.Mask(mask)
