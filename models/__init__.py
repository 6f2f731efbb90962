"""Networks and LightningModules of the reference tasks (installed as ``lightning_tricks.models``)."""

from .classifier import ImageClassifier
from .nets import NETWORKS, build_net
from .nets.segmentation import SEGMENTATION_NETWORKS, build_segmentation_net
from .pix2pix import Pix2Pix
from .segmentation import SegmentationModule

__all__ = [
    "NETWORKS",
    "SEGMENTATION_NETWORKS",
    "ImageClassifier",
    "Pix2Pix",
    "SegmentationModule",
    "build_net",
    "build_segmentation_net",
]
