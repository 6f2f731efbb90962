"""LightningDataModules for image classification: embedded digits and torchvision's CIFAR, MNIST, SVHN."""

from .base import ClassificationDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .digits import DigitsDataModule
from .mnist import MNISTDataModule
from .svhn import SVHNDataModule
from .vision import DatasetNotFoundError, TorchvisionDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "TorchvisionDataModule",
]
