"""The Gram rules, one module per layer family; importing this package registers them all.

A new layer type: one function in the family's file (or a new file imported here), decorated with
:func:`~lightning_tricks.gradients.gram.registry.register_gram_rule`, and one row in the test
table (``tests/test_gram_rules.py``).
"""

from . import attention, conv, embedding, linear, misc, norm, recurrent

__all__ = ["attention", "conv", "embedding", "linear", "misc", "norm", "recurrent"]
