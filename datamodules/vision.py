"""Base of the datamodules over torchvision's classification datasets (CIFAR, MNIST, SVHN)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import VisionDataset
from torchvision.transforms import v2

from .base import ClassificationDataModule


class DatasetNotFoundError(FileNotFoundError, RuntimeError):
    """No usable copy of a dataset under ``data_dir``: files missing, or failing torchvision's md5 check.

    A ``FileNotFoundError`` by meaning, and a ``RuntimeError`` like the error torchvision raises for
    the same condition, so handlers written for either keep working.
    """


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image (all samples if ``indices`` is None).

    The wrapped dataset holds no transform of its own, so the augmented training view and the
    plain validation view share one copy of the data.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | None, transform: Callable) -> None:
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[int(self.indices[index])]
        return self.transform(image), label


class TorchvisionDataModule(ClassificationDataModule):
    """A torchvision classification dataset as train / val / test loaders.

    The validation split is drawn (seeded, optionally stratified) from the official training set
    and uses the un-augmented transform; the official test set is the test split. Images become
    float tensors in ``[0, 1]``, then ``(x - mean) / std`` per channel with the dataset's published
    training-set constants (``mean``, ``std`` class attributes). Training augmentation is a random
    ``image_size`` crop of the image zero-padded by ``crop_padding`` pixels (plus a random
    horizontal flip where ``horizontal_flip``), the scheme of He et al. that seed
    004_e5d92837cb57ce8a.txt §4 trains with.

    A subclass sets ``dataset_class``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``,
    ``std``, ``crop_padding``, ``horizontal_flip``, ``default_val_size``, ``required_files`` (paths
    under ``data_dir`` that torchvision reads) and ``manual_download`` (how to get them by hand, a
    template with ``{folder}`` for the resolved ``data_dir``).

    Args:
        data_dir: folder torchvision's dataset class reads (its ``root``); ``~`` is expanded.
        download: let ``prepare_data`` download the dataset into ``data_dir`` if it is missing.
        batch_size: samples per batch of every loader, ``>= 1``.
        num_workers: ``DataLoader`` worker processes, ``>= 0``.
        val_size: validation samples taken from the official training set: an int (count) or a
            float in ``[0, 1)`` (fraction); ``None`` for the dataset's ``default_val_size``;
            ``0`` trains on the whole training set with no validation loader.
        seed: seed of the train/val split, ``>= 0``.
        stratify: keep class proportions equal in the training and validation parts.
        augment: apply the training augmentation (``False``: training images are only normalised).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range; in ``setup``, a ``val_size`` that leaves no
            training samples.
        DatasetNotFoundError: in ``setup``, the files are missing from ``data_dir`` or corrupted.

    Example (another torchvision dataset in a few lines)::

        from torchvision.datasets import FashionMNIST

        class FashionMNISTDataModule(TorchvisionDataModule):
            dataset_class = FashionMNIST
            num_classes, in_channels, image_size = 10, 1, 28
            mean, std = (0.2860,), (0.3530,)
            crop_padding, horizontal_flip, default_val_size = 2, True, 5_000
            required_files = tuple(
                f"FashionMNIST/raw/{split}-{kind}-ubyte"
                for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
            )
            manual_download = "gunzip the four Fashion-MNIST idx files into {folder}/FashionMNIST/raw"
    """

    dataset_class: type[VisionDataset]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    horizontal_flip: bool
    default_val_size: int
    required_files: tuple[str, ...]
    manual_download: str

    def __init__(
        self,
        data_dir: str | PathLike = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float | None = None,
        seed: int = 0,
        stratify: bool = True,
        augment: bool = True,
    ) -> None:
        if not isinstance(data_dir, (str, PathLike)):
            raise TypeError(
                f"`data_dir` must be a str or path, got {data_dir!r} ({type(data_dir).__name__})."
            )
        for name, flag in (("download", download), ("augment", augment)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
        super().__init__(
            batch_size, num_workers, self.default_val_size if val_size is None else val_size, seed, stratify
        )
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.augment = augment

    def prepare_data(self) -> None:
        """Download both official splits into ``data_dir`` if ``download=True`` (torchvision skips files present)."""
        if self.download:
            for train in (True, False):
                self._dataset(train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the official training set (stages fit/validate) and test set (stage test) once."""
        if stage in ("fit", "validate", None) and self.train_set is None:
            dataset = self._load(train=True)
            self._split_train_val(self._labels(dataset))
            self.train_set = TransformedSubset(dataset, self.train_indices, self.train_transform())
            self.val_set = TransformedSubset(dataset, self.val_indices, self.eval_transform())
        if stage in ("test", None) and self.test_set is None:
            self.test_set = TransformedSubset(self._load(train=False), None, self.eval_transform())

    def unaugmented_train_set(self) -> TransformedSubset:
        """The training split without its random augmentation: ``train_set``'s samples in the same order
        (index ``i`` is the image of ``train_set[i]``) through ``eval_transform``. ``MinibatchHeatmap``
        scores this view, so that each image's metric is the stored image's, not one random crop's."""
        train_set = self._require(self.train_set, "unaugmented_train_set", "fit")
        return TransformedSubset(train_set.dataset, train_set.indices, self.eval_transform())

    def eval_transform(self) -> v2.Compose:
        """PIL image -> float tensor ``(x / 255 - mean) / std`` per channel, shape ``(C, H, W)``."""
        return v2.Compose(
            [
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
                v2.ToPureTensor(),
            ]
        )

    def train_transform(self) -> v2.Compose:
        """The augmentation (padded random crop, optional flip) followed by ``eval_transform``."""
        if not self.augment:
            return self.eval_transform()
        augmentation = [v2.RandomCrop(self.image_size, padding=self.crop_padding)]
        if self.horizontal_flip:
            augmentation.append(v2.RandomHorizontalFlip())
        return v2.Compose([*augmentation, self.eval_transform()])

    def _dataset(self, train: bool, download: bool) -> VisionDataset:
        """torchvision's dataset for the official training (``train``) or test split, without transform."""
        return self.dataset_class(self.data_dir, train=train, download=download)

    def _labels(self, dataset: Any) -> np.ndarray:
        return np.asarray(dataset.targets)

    def _load(self, train: bool) -> VisionDataset:
        """The split via torchvision, or a ``DatasetNotFoundError`` that says where it looked and how to fix it."""
        folder = self.data_dir.resolve()
        missing = [str(folder / name) for name in self.required_files if not (folder / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"{self.dataset_class.__name__} not found in {folder}: missing {', '.join(missing)}. "
                f"{self._how_to_get_it(folder)}"
            )
        try:
            return self._dataset(train, download=False)
        except RuntimeError as error:
            raise DatasetNotFoundError(
                f"{self.dataset_class.__name__} in {folder} failed torchvision's integrity (md5) check "
                f"({error}). {self._how_to_get_it(folder)}"
            ) from error

    def _how_to_get_it(self, folder: Path) -> str:
        return (
            f"Pass `download=True` to {type(self).__name__} to download it, "
            f"or by hand: {self.manual_download.format(folder=folder)}."
        )
