"""The registry of Gram rules: module type → :class:`GramRule`, filled by one decorator.

A rule is ``factorize(layer, activations, backprops) -> {parameter name: factor}`` (seed
004_e5d92837cb57ce8a.txt §3, eq. 6: each factor describes column i of J_k for that parameter, see
:mod:`.factors`), registered for one or more module types with :func:`register_gram_rule`, and
found for a module by :func:`gram_rule_for` (its own type, else the nearest registered base class
whose ``forward`` it inherits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .factors import GradFactor

Rule = Callable[[nn.Module, Any, Any], dict[str, GradFactor]]
"""``factorize(layer, activations, backprops)``; ``backprops`` is the output gradient (a tuple of
them, ``None`` where none arrived, for a module with several tensor outputs)."""


Capture = Callable[[nn.Module, tuple, dict, Any], Any]
"""``capture(layer, args, kwargs, output)``: what the rule keeps of a forward call (its
``activations``), right after the call."""


BatchSize = Callable[[nn.Module, tuple, dict], int]
"""``batch_size(layer, args, kwargs)``: B of a call; raises ``ValueError`` on an unsupported layout."""


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The first tensor among a call's arguments (positional, then keyword), or ``None``."""
    if args and isinstance(args[0], Tensor):  # the usual call, without walking the pytree
        return args[0]
    return next((leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)), None)


def capture_input(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
    """Default capture: the rule's ``activations`` are the call's first tensor argument."""
    return first_tensor(args, kwargs)


def leading_batch_size(layer: nn.Module, args: tuple, kwargs: dict) -> int:
    """Default B: the leading dimension of the first tensor argument."""
    inputs = first_tensor(args, kwargs)
    if inputs is None or inputs.dim() == 0:
        raise ValueError(
            f"{type(layer).__name__} was called without a batched tensor argument; per-sample gradients "
            "need the batch dimension first in its first tensor argument"
        )
    return len(inputs)


class GramRule(NamedTuple):
    """A registered rule: ``factorize(layer, activations, backprops) -> {parameter name: factor}``.

    ``param_names`` lists the parameters the rule covers (``None``: all the module has);
    ``capture(layer, args, kwargs, output)`` runs right after the
    forward and returns what ``factorize`` receives as ``activations`` (by default the first
    tensor argument). ``batch_size(layer, args, kwargs)`` gives B of a call (default: the leading
    dimension of the first tensor argument). A ``composite`` rule covers the parameters of the
    module's whole subtree, named relative to it (``"out_proj.weight"``): for modules that call
    children functionally, whose own hooks never fire. ``method`` names how the rule computes
    per-sample gradients in :attr:`~lightning_tricks.gradients.gram.collector.GramCollector.methods` when it is not a ghost/materialise
    choice. ``applies(layer)``, if given, says whether the rule serves this instance (else the
    search goes on up the type hierarchy).
    """

    factorize: Rule
    param_names: tuple[str, ...] | None = ("weight", "bias")
    capture: Capture = capture_input
    batch_size: BatchSize = leading_batch_size
    composite: bool = False
    method: str | None = None
    applies: Callable[[nn.Module], bool] | None = None

    def activations(self, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """What ``factorize`` receives as ``activations`` for this call."""
        return self.capture(layer, args, kwargs, output)

    def covers(self, name: str) -> bool:
        """Whether the rule gives the factor of parameter ``name``."""
        return self.param_names is None or name in self.param_names


GRAM_RULES: dict[type[nn.Module], GramRule] = {}
"""The global registry, module type → rule; read through :func:`gram_rule_for`."""


def register_gram_rule(
    *module_types: type[nn.Module],
    param_names: tuple[str, ...] | None = ("weight", "bias"),
    capture: Capture = capture_input,
    batch_size: BatchSize = leading_batch_size,
    composite: bool = False,
    method: str | None = None,
    applies: Callable[[nn.Module], bool] | None = None,
    overwrite: bool = False,
) -> Callable[[Rule], Rule]:
    """Decorator: register ``factorize`` as the rule of ``module_types`` (and, by the type
    hierarchy, of their subclasses); the keywords are the fields of :class:`GramRule`::

        @register_gram_rule(MyLayer, OtherLayer, param_names=("weight",))
        def my_factors(layer, activations, backprops):
            return {"weight": PerSampleFactor(...)}

    A type that already has a rule raises ``ValueError`` unless ``overwrite=True`` (nothing is
    registered then); the function is returned unchanged.
    """
    if not module_types:
        raise TypeError("register_gram_rule needs at least one torch.nn.Module subclass")
    for module_type in module_types:
        _check_module_type(module_type)

    def register(factorize: Rule) -> Rule:
        if not callable(factorize):
            raise TypeError(f"register_gram_rule decorates a function, got {factorize!r}")
        clashes = [t for t in module_types if t in GRAM_RULES]
        if clashes and not overwrite:
            raise ValueError(
                f"{clashes[0].__name__} already has a Gram rule ({GRAM_RULES[clashes[0]].factorize.__name__}); "
                "pass overwrite=True to replace it, or rules={...} to GramCollector to override it there only"
            )
        rule = GramRule(factorize, param_names, capture, batch_size, composite, method, applies)
        GRAM_RULES.update(dict.fromkeys(module_types, rule))
        return factorize

    return register


def _check_module_type(module_type: Any) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"register_gram_rule takes torch.nn.Module subclasses, got {module_type!r}; use it as a "
            "decorator on the rule's function: @register_gram_rule(ModuleType, param_names=...)"
        )


def gram_rule_for(
    layer: nn.Module, rules: Mapping[type[nn.Module], GramRule | None] | None = None
) -> GramRule | None:
    """The rule of the nearest class in ``type(layer).__mro__`` registered in ``rules`` (which wins)
    or in :data:`GRAM_RULES`, or ``None``. A ``None`` in ``rules`` stops the search (no rule).

    A rule found for a base class serves a subclass only if the subclass inherits that class's
    ``forward`` (a subclass computing something else would get a wrong gradient). A rule whose
    ``applies(layer)`` is false is passed over.
    """
    rules = rules or {}
    for cls in type(layer).__mro__:
        if cls in rules or cls in GRAM_RULES:
            rule = rules[cls] if cls in rules else GRAM_RULES[cls]
            if rule is not None and rule.applies is not None and not rule.applies(layer):
                continue
            return rule if rule is None or type(layer).forward is cls.forward else None
    return None
