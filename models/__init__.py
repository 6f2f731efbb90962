"""Networks and LightningModules of the reference tasks (installed as ``lightning_tricks.models``)."""

from .classifier import ImageClassifier
from .nets import NETWORKS, build_net

__all__ = ["NETWORKS", "ImageClassifier", "build_net"]
