"""lightning-tricks: training tricks and diagnostics from research papers as Lightning callbacks."""

__version__ = "0.1.0"

from .callbacks import (
    BatchSizeScheduler,
    FisherSpectrum,
    GradientFlow,
    GradientFlowAlarm,
    MinibatchHeatmap,
    RandomGradient,
)

__all__ = [
    "BatchSizeScheduler",
    "FisherSpectrum",
    "GradientFlow",
    "GradientFlowAlarm",
    "MinibatchHeatmap",
    "RandomGradient",
    "__version__",
]
