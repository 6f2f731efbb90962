"""SVHN (32x32 colour street-view house-number digits) over torchvision's loader."""

from __future__ import annotations

from typing import Any

import numpy as np
from torchvision.datasets import SVHN

from .vision import TorchvisionDataModule


class SVHNDataModule(TorchvisionDataModule):
    """SVHN: 73,257 training and 26,032 test 32x32 RGB digit crops, 10 classes (digit 0 is label 0).

    Default split 68,257 train / 5,000 val (seeded, stratified) / 26,032 test; the "extra" set is
    not used. Training augmentation: random 32x32 crop of the image zero-padded by 4 pixels, no
    flip (a mirrored digit is another symbol). Normalisation per channel with the training-set
    mean (0.4377, 0.4438, 0.4728) and standard deviation (0.1980, 0.2010, 0.1970).

    Reads ``data_dir/train_32x32.mat`` and ``data_dir/test_32x32.mat`` (torchvision's layout: the
    files directly in ``data_dir``); arguments, raised errors and the rest as in
    ``TorchvisionDataModule``.

    Example::

        dm = SVHNDataModule("data/svhn", download=True, batch_size=128)
        trainer.fit(model, datamodule=dm)  # model built with num_classes=dm.num_classes
    """

    dataset_class = SVHN
    num_classes = 10
    in_channels = 3
    image_size = 32
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)
    crop_padding = 4
    horizontal_flip = False
    default_val_size = 5_000
    required_files = ("train_32x32.mat", "test_32x32.mat")
    manual_download = (
        "download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and "
        "http://ufldl.stanford.edu/housenumbers/test_32x32.mat into {folder}"
    )

    def _dataset(self, train: bool, download: bool) -> SVHN:
        return self.dataset_class(self.data_dir, split="train" if train else "test", download=download)

    def _labels(self, dataset: Any) -> np.ndarray:
        return np.asarray(dataset.labels)
