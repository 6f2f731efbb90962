"""Pure-torch gradient engines (no Lightning import)."""

from .gram import GramCollector
from .spectrum import (
    FisherRunningSums,
    FisherStatistics,
    NoiseScaleEstimate,
    fisher_energy,
    fisher_statistics,
    gradient_noise_parts,
    noise_scale_ratio,
    pooled_noise_scale,
)

__all__ = [
    "FisherRunningSums",
    "FisherStatistics",
    "GramCollector",
    "NoiseScaleEstimate",
    "fisher_energy",
    "fisher_statistics",
    "gradient_noise_parts",
    "noise_scale_ratio",
    "pooled_noise_scale",
]
