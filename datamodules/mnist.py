"""MNIST (28x28 grey handwritten digits) over torchvision's loader."""

from __future__ import annotations

from torchvision.datasets import MNIST

from .vision import TorchvisionDataModule


class MNISTDataModule(TorchvisionDataModule):
    """MNIST: 60,000 training and 10,000 test 28x28 greyscale handwritten digits, 10 classes.

    Default split 55,000 train / 5,000 val (seeded, stratified) / 10,000 test. Training
    augmentation: random 28x28 crop of the image zero-padded by 2 pixels (shifts of up to 2
    pixels), no flip (a mirrored digit is another symbol). Normalisation with the training-set
    mean 0.1307 and standard deviation 0.3081.

    Reads ``data_dir/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (the four unzipped
    idx files); arguments, raised errors and the rest as in ``TorchvisionDataModule``.

    Example::

        dm = MNISTDataModule("data", download=True, batch_size=128)
        trainer.fit(model, datamodule=dm)  # model built with in_channels=dm.in_channels
    """

    dataset_class = MNIST
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)
    crop_padding = 2
    horizontal_flip = False
    default_val_size = 5_000
    required_files = tuple(
        f"MNIST/raw/{split}-{kind}-ubyte"
        for split in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )
    manual_download = (
        "gunzip the four files of https://ossci-datasets.s3.amazonaws.com/mnist/ "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) into {folder}/MNIST/raw"
    )
