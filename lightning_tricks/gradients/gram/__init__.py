"""Exact Gram matrix of per-sample gradients from one backward (seed 004_e5d92837cb57ce8a.txt §3, eq. 6).

Laid out like Opacus' ``grad_sample`` and BackPACK's extensions:

- :mod:`.factors`: the factor algebra, exact compact forms of one parameter's per-sample gradients
  with the ghost and materialised Gram of each and their costs;
- :mod:`.registry`: :class:`GramRule`, the one decorator :func:`register_gram_rule` and the lookup
  :func:`gram_rule_for` (a module's type, else its nearest registered base);
- :mod:`.rules`: one file per layer family (linear, conv, norm, embedding, attention, recurrent,
  misc), imported here so that importing the engine registers every rule;
- :mod:`.fallback`: per-sample vector-Jacobian products for any other parameterised module;
- :mod:`.collector`: :class:`GramCollector`, the hooks, capture and clean-up.
"""

from . import rules
from .collector import GramCollector
from .fallback import FALLBACK_RULE
from .registry import GRAM_RULES, GramRule, gram_rule_for, register_gram_rule

__all__ = [
    "FALLBACK_RULE",
    "GRAM_RULES",
    "GramCollector",
    "GramRule",
    "gram_rule_for",
    "register_gram_rule",
    "rules",
]
