"""lightning-tricks: training tricks and diagnostics from research papers as Lightning callbacks."""

__version__ = "0.1.0"

from .callbacks import FisherSpectrum, GradientFlow, RandomGradient

__all__ = ["FisherSpectrum", "GradientFlow", "RandomGradient", "__version__"]
