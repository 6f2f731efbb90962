"""Pure-torch gradient engines (no Lightning import)."""

from .gram import GramCollector
from .spectrum import FisherStatistics, fisher_energy, fisher_statistics

__all__ = ["FisherStatistics", "GramCollector", "fisher_energy", "fisher_statistics"]
