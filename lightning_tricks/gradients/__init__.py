"""Pure-torch gradient engines (no Lightning import)."""

from .gradient_tests import GradientTests, gradient_tests, needed_batch_size
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
    "GradientTests",
    "GramCollector",
    "GramRule",
    "NoiseScaleEstimate",
    "fisher_energy",
    "fisher_statistics",
    "gradient_noise_parts",
    "gradient_tests",
    "gram_rule_for",
    "needed_batch_size",
    "noise_scale_ratio",
    "pooled_noise_scale",
    "register_gram_rule",
]
