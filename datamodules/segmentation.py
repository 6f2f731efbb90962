"""Pascal VOC 2012 and Cityscapes semantic segmentation over torchvision's datasets (seed 000 §1, Fig. 7)."""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import Cityscapes, VOCSegmentation

from .dense import DenseDataModule, as_image_and_mask, segmentation_transform
from .vision import DatasetNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


class JointTransformed(Dataset):
    """``dataset[i] = (PIL image, PIL mask)`` → ``transform(Image, Mask)`` with the mask's values
    mapped through ``lookup`` (a 256-entry table, e.g. Cityscapes label ids → train ids) if given."""

    def __init__(self, dataset: Dataset, transform: Callable, lookup: Tensor | None = None) -> None:
        self.dataset, self.transform, self.lookup = dataset, transform, lookup

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.dataset[index]
        labels = torch.from_numpy(np.array(mask, dtype=np.uint8)).long()
        if self.lookup is not None:
            labels = self.lookup[labels]
        return self.transform(*as_image_and_mask(image, labels))


class TorchvisionSegmentationDataModule(DenseDataModule):
    """A torchvision segmentation dataset as train / val / test loaders of ``(image, mask)``.

    Images become ``(3, S, S)`` float tensors normalised with the ImageNet mean and std (the
    convention of ImageNet-initialised backbones), masks ``(S, S)`` int64 class indices with
    ``255`` for unlabelled pixels, ``S = image_size``. Training samples are randomly mirrored and
    randomly cropped (seed 000 §1 and §5.1: random mirror, 224×224 crops), image and mask with the
    same flip and crop; evaluation samples are centre-cropped. Images smaller than the crop are
    padded (image with the mean colour, mask with 255). The test loader reads ``test_split``.

    A subclass sets ``num_classes``, ``train_split``, ``val_split``, ``test_split`` and implements
    ``_dataset(split)``, ``_required_paths(split)`` and ``_how_to_get_it(folder)``.

    Args:
        data_dir: the folder torchvision's dataset class reads (its ``root``); ``~`` is expanded.
        image_size: crop side, ``>= 8`` (seed 000: 224).
        batch_size: images per batch, ``>= 1`` (seed 000: 4).
        num_workers: ``DataLoader`` worker processes.
        augment: random mirror and random crop for training (``False``: centre crop).

    Raises:
        DatasetNotFoundError: in ``setup``, the dataset is not under ``data_dir``; the message names
            the missing path and how to get the data.
    """

    num_classes: int
    in_channels = 3
    ignore_index = IGNORE_INDEX
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    train_split, val_split, test_split = "train", "val", "val"

    def __init__(
        self,
        data_dir: str | PathLike = "data",
        image_size: int = 224,
        batch_size: int = 4,
        num_workers: int = 0,
        augment: bool = True,
    ) -> None:
        if not isinstance(data_dir, (str, PathLike)):
            raise TypeError(
                f"`data_dir` must be a str or path, got {data_dir!r} ({type(data_dir).__name__})."
            )
        if not isinstance(augment, bool):
            raise TypeError(f"`augment` must be True or False, got {augment!r}.")
        super().__init__(image_size, batch_size, num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.augment = augment

    def setup(self, stage: str | None = None) -> None:
        """Open the training and validation splits (fit/validate) and the test split (test) once."""
        if stage in ("fit", "validate", None) and self.train_set is None:
            self.train_set = self._load(self.train_split, train=self.augment)
            self.val_set = self._load(self.val_split, train=False)
        if stage in ("test", None) and self.test_set is None:
            self.test_set = self._load(self.test_split, train=False)

    def _load(self, split: str, train: bool) -> Dataset:
        folder = self.data_dir.resolve()
        missing = [str(path) for path in self._required_paths(folder, split) if not path.exists()]
        if missing:
            raise DatasetNotFoundError(
                f"{type(self).__name__}: the {split!r} split is not in {folder}: missing {', '.join(missing)}. "
                f"{self._how_to_get_it(folder)}"
            )
        transform = segmentation_transform(self.image_size, self.mean, self.std, self.ignore_index, train)
        return JointTransformed(self._dataset(split), transform, self._lookup())

    def _lookup(self) -> Tensor | None:
        return None

    def _dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _required_paths(self, folder: Path, split: str) -> list[Path]:
        raise NotImplementedError

    def _how_to_get_it(self, folder: Path) -> str:
        raise NotImplementedError


class VOCSegmentationDataModule(TorchvisionSegmentationDataModule):
    """Pascal VOC 2012 segmentation (seed 000 §1: 21 classes, 1,464 train / 1,449 val images) via
    ``torchvision.datasets.VOCSegmentation``.

    Reads ``<data_dir>/VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png,
    ImageSets/Segmentation/{train,val}.txt}``; masks are palette PNGs whose indices are the classes
    (255 on object borders). The test loader is the val split (the test labels are not public).
    ``download=True`` lets ``prepare_data`` fetch the 2 GB archive with torchvision.

    Example::

        dm = VOCSegmentationDataModule("~/data", image_size=224, batch_size=4)
    """

    num_classes = 21
    year = "2012"

    def __init__(
        self,
        data_dir: str | PathLike = "data",
        download: bool = False,
        image_size: int = 224,
        batch_size: int = 4,
        num_workers: int = 0,
        augment: bool = True,
    ) -> None:
        if not isinstance(download, bool):
            raise TypeError(f"`download` must be True or False, got {download!r}.")
        super().__init__(data_dir, image_size, batch_size, num_workers, augment)
        self.download = download

    def prepare_data(self) -> None:
        """Download VOC 2012 into ``data_dir`` when ``download=True`` and it is not there yet."""
        if self.download and not all(
            p.exists() for p in self._required_paths(self.data_dir.resolve(), "train")
        ):
            VOCSegmentation(self.data_dir, year=self.year, image_set="train", download=True)

    def _dataset(self, split: str) -> Dataset:
        return VOCSegmentation(self.data_dir, year=self.year, image_set=split, download=False)

    def _required_paths(self, folder: Path, split: str) -> list[Path]:
        root = folder / "VOCdevkit" / f"VOC{self.year}"
        return [
            root / "ImageSets" / "Segmentation" / f"{split}.txt",
            root / "JPEGImages",
            root / "SegmentationClass",
        ]

    def _how_to_get_it(self, folder: Path) -> str:
        return (
            f"Pass `download=True` to {type(self).__name__}, or by hand: extract VOCtrainval_11-May-2012.tar "
            f"(http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) into {folder}."
        )


def cityscapes_train_ids() -> Tensor:
    """256-entry table: Cityscapes label id → train id (19 evaluated classes, 255 for the rest)."""
    lookup = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    for cls in Cityscapes.classes:
        if cls.id >= 0 and 0 <= cls.train_id < IGNORE_INDEX:
            lookup[cls.id] = cls.train_id
    return lookup


class CityscapesDataModule(TorchvisionSegmentationDataModule):
    """Cityscapes fine annotations (19 evaluated classes) via ``torchvision.datasets.Cityscapes``.

    Reads ``<data_dir>/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
    ``<data_dir>/gtFine/<split>/<city>/*_gtFine_labelIds.png``; label ids become train ids
    (:func:`cityscapes_train_ids`), the others 255. The test loader is the val split (the test
    labels are not public). Cityscapes needs a login, so there is no download.

    Example::

        dm = CityscapesDataModule("~/data/cityscapes", image_size=256, batch_size=8)
    """

    num_classes = 19

    def _dataset(self, split: str) -> Dataset:
        return Cityscapes(self.data_dir, split=split, mode="fine", target_type="semantic")

    def _lookup(self) -> Tensor:
        return cityscapes_train_ids()

    def _required_paths(self, folder: Path, split: str) -> list[Path]:
        return [folder / "leftImg8bit" / split, folder / "gtFine" / split]

    def _how_to_get_it(self, folder: Path) -> str:
        return (
            "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            f"https://www.cityscapes-dataset.com/downloads/ (login needed) and extract both into {folder}."
        )
