"""One Lightning callback a file; each is a thin adapter over a pure-torch engine."""

from .batch_size_scheduler import BatchSizeScheduler
from .fisher_spectrum import FisherSpectrum
from .gradient_flow import GradientFlow, GradientFlowAlarm
from .minibatch_heatmap import MinibatchHeatmap
from .random_gradient import RandomGradient

__all__ = [
    "BatchSizeScheduler",
    "FisherSpectrum",
    "GradientFlow",
    "GradientFlowAlarm",
    "MinibatchHeatmap",
    "RandomGradient",
]
