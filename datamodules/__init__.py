"""LightningDataModules: image classification (embedded digits, torchvision's CIFAR, MNIST, SVHN),
semantic segmentation (embedded shapes, Pascal VOC, Cityscapes) and paired images for pix2pix
(embedded shapes, pix2pix's folder format)."""

from .base import ClassificationDataModule
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .dense import DenseDataModule
from .digits import DigitsDataModule
from .mnist import MNISTDataModule
from .paired import PairedImageDataModule
from .segmentation import CityscapesDataModule, VOCSegmentationDataModule
from .shapes import PairedShapesDataModule, ShapesSegmentationDataModule
from .svhn import SVHNDataModule
from .vision import DatasetNotFoundError, TorchvisionDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CityscapesDataModule",
    "ClassificationDataModule",
    "DatasetNotFoundError",
    "DenseDataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "PairedImageDataModule",
    "PairedShapesDataModule",
    "SVHNDataModule",
    "ShapesSegmentationDataModule",
    "TorchvisionDataModule",
    "VOCSegmentationDataModule",
]
