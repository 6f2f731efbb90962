"""lightning-tricks: training tricks and diagnostics from research papers as Lightning callbacks."""

__version__ = "0.1.0"

from .callbacks import FisherSpectrum, GradientFlow, GradientFlowAlarm, RandomGradient

__all__ = ["FisherSpectrum", "GradientFlow", "GradientFlowAlarm", "RandomGradient", "__version__"]
