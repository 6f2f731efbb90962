"""Pure-torch gradient engines (no Lightning import)."""

from .gram import GramCollector
from .gram_fallback import FALLBACK_RULE
from .gram_rules import GRAM_RULES, GramRule, gram_rule_for, register_gram_rule
from .spectrum import FisherStatistics, fisher_energy, fisher_statistics

__all__ = [
    "FALLBACK_RULE",
    "GRAM_RULES",
    "FisherStatistics",
    "GramCollector",
    "GramRule",
    "fisher_energy",
    "fisher_statistics",
    "gram_rule_for",
    "register_gram_rule",
]
