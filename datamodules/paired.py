"""Paired images in pix2pix's folder format (maps, Cityscapes, facades; seed 000 §5.2, Fig. 7)."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from lightning_tricks import checks

from .dense import DenseDataModule
from .vision import DatasetNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


class SideBySidePairs(Dataset):
    """The image files of ``folder`` (sorted by name), each ``A | B`` side by side, as ``(A, B)``
    halves (left, right) transformed together by ``transform``; ``(B, A)`` when ``swap``."""

    def __init__(self, files: list[Path], transform: v2.Transform, swap: bool) -> None:
        self.files, self.transform, self.swap = files, transform, swap

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        with Image.open(self.files[index]) as file:
            both = v2.functional.to_image(file.convert("RGB"))
        half = both.shape[-1] // 2
        a, b = tv_tensors.Image(both[..., :half]), tv_tensors.Image(both[..., half : 2 * half])
        a, b = self.transform(a, b)
        return (b, a) if self.swap else (a, b)


class PairedImageDataModule(DenseDataModule):
    """pix2pix's aligned datasets: ``<data_dir>/{train,val,test}/*.jpg``, each image the pair A | B.

    The format of the pix2pix datasets (``maps``, ``cityscapes``, ``facades``, ...): every file holds
    the input and the target side by side, A on the left. Both halves are resized to
    ``load_size`` (bilinear); training pairs are then cropped at one random ``image_size`` window
    and mirrored at random, the same for A and B (pix2pix: load 286, crop 256, flip); evaluation
    pairs are resized to ``image_size``. Pixels become float32 in [-1, 1]. ``direction="BtoA"``
    swaps input and target (maps: aerial photo → map is AtoB). The test loader reads ``test/``
    when it exists, else ``val/``.

    Args:
        data_dir: the dataset folder (holding ``train/`` and ``val/``); ``~`` is expanded.
        direction: ``"AtoB"`` or ``"BtoA"``.
        image_size: side of the yielded images, ``>= 8`` (pix2pix: 256).
        load_size: side the halves are resized to before the random training crop,
            ``>= image_size``; ``None`` for ``image_size`` (no crop jitter).
        batch_size: pairs per batch (seed 000: 8).
        num_workers: ``DataLoader`` worker processes.
        augment: random crop and mirror for training.

    Raises:
        DatasetNotFoundError: in ``setup``, ``train/`` or ``val/`` is missing or holds no images;
            the message names the folder.

    Example::

        dm = PairedImageDataModule("~/data/maps", direction="AtoB", image_size=256, load_size=286)
    """

    in_channels = 3

    def __init__(
        self,
        data_dir: str | PathLike = "data",
        direction: str = "AtoB",
        image_size: int = 256,
        load_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        augment: bool = True,
    ) -> None:
        if not isinstance(data_dir, (str, PathLike)):
            raise TypeError(
                f"`data_dir` must be a str or path, got {data_dir!r} ({type(data_dir).__name__})."
            )
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"`direction` must be 'AtoB' or 'BtoA'; got {direction!r}.")
        if not isinstance(augment, bool):
            raise TypeError(f"`augment` must be True or False, got {augment!r}.")
        super().__init__(image_size, batch_size, num_workers)
        load_size = image_size if load_size is None else load_size
        checks.integer("load_size", load_size, minimum=image_size)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.direction, self.load_size, self.augment = direction, load_size, augment

    def setup(self, stage: str | None = None) -> None:
        """Index the training and validation folders (fit/validate) and the test folder (test) once."""
        if stage in ("fit", "validate", None) and self.train_set is None:
            self.train_set = self._pairs("train", train=self.augment)
            self.val_set = self._pairs("val", train=False)
        if stage in ("test", None) and self.test_set is None:
            has_test = (self.data_dir / "test").is_dir()
            self.test_set = self._pairs("test" if has_test else "val", train=False)

    def _pairs(self, split: str, train: bool) -> SideBySidePairs:
        folder = (self.data_dir / split).resolve()
        files = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.is_dir()
            else []
        )
        if not files:
            state = "holds no images" if folder.is_dir() else "does not exist"
            raise DatasetNotFoundError(
                f"{type(self).__name__}: {folder} {state}. Expected pix2pix's format: "
                f"{folder.parent}/{{train,val}}/*.jpg, each image the pair A | B side by side (e.g. extract "
                "maps.tar.gz from http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/ there)."
            )
        return SideBySidePairs(files, self._transform(train), swap=self.direction == "BtoA")

    def _transform(self, train: bool) -> v2.Compose:
        """Resize (``load_size`` for training, ``image_size`` otherwise), random crop and mirror for
        training, then [0, 255] → [-1, 1]."""
        size = self.load_size if train else self.image_size
        steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)]
        if train:
            steps += [v2.RandomCrop(self.image_size), v2.RandomHorizontalFlip()]
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
            v2.ToPureTensor(),
        ]
        return v2.Compose(steps)
