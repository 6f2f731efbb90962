"""CIFAR-10 and CIFAR-100 (32x32 colour images) over torchvision's loaders."""

from __future__ import annotations

from torchvision.datasets import CIFAR10, CIFAR100

from .vision import TorchvisionDataModule


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32x32 RGB images of 10 classes.

    Default split 45,000 train / 5,000 val (seeded, stratified) / 10,000 test. Training
    augmentation: random 32x32 crop of the image zero-padded by 4 pixels and a random horizontal
    flip, the "mirroring/shifting" of seed 000_e58e526c3e6fcb5b.txt §1 and seed
    004_e5d92837cb57ce8a.txt §4. Normalisation per channel with the training-set mean
    (0.4914, 0.4822, 0.4465) and standard deviation (0.2470, 0.2435, 0.2616).

    Reads ``data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (the
    extracted python archive); arguments, raised errors and the rest as in ``TorchvisionDataModule``.

    Example::

        dm = CIFAR10DataModule("data", download=True, batch_size=128)
        trainer.fit(model, datamodule=dm)  # model built with num_classes=dm.num_classes
    """

    dataset_class = CIFAR10
    num_classes = 10
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    crop_padding = 4
    horizontal_flip = True
    default_val_size = 5_000
    required_files = tuple(
        f"cifar-10-batches-py/{name}"
        for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
    )
    manual_download = "extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {folder}"


class CIFAR100DataModule(TorchvisionDataModule):
    """CIFAR-100: 50,000 training and 10,000 test 32x32 RGB images of 100 (fine) classes.

    Default split 47,500 train / 2,500 val (seeded, stratified) / 10,000 test, as in seed
    001_0184062a2e770d9a.txt §5.1, which also prescribes the augmentation used here: random 32x32
    crop of the image zero-padded by 4 pixels and a random horizontal flip. Normalisation per
    channel with the training-set mean (0.5071, 0.4865, 0.4409) and standard deviation
    (0.2673, 0.2564, 0.2762).

    Reads ``data_dir/cifar-100-python/{train, test, meta}`` (the extracted python archive);
    arguments, raised errors and the rest as in ``TorchvisionDataModule``.

    Example::

        dm = CIFAR100DataModule("data", download=True, batch_size=100)
        trainer.fit(model, datamodule=dm)  # model built with num_classes=dm.num_classes
    """

    dataset_class = CIFAR100
    num_classes = 100
    in_channels = 3
    image_size = 32
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    crop_padding = 4
    horizontal_flip = True
    default_val_size = 2_500
    required_files = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")
    manual_download = "extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into {folder}"
