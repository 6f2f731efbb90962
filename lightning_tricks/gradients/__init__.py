"""Pure-torch gradient engines (no Lightning import)."""

from .gram import FALLBACK_RULE, GRAM_RULES, GramCollector, GramRule, gram_rule_for, register_gram_rule
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
    "FALLBACK_RULE",
    "GRAM_RULES",
    "FisherRunningSums",
    "FisherStatistics",
    "GramCollector",
    "GramRule",
    "NoiseScaleEstimate",
    "fisher_energy",
    "fisher_statistics",
    "gradient_noise_parts",
    "gram_rule_for",
    "noise_scale_ratio",
    "pooled_noise_scale",
    "register_gram_rule",
]
