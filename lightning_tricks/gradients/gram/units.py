"""Which modules the Gram engine measures, and as what unit (seed 004_e5d92837cb57ce8a.txt §3, eq. 6).

Column i of J_k (seed 004 eq. 6) is sample i's gradient over every measured parameter. The
collector gets it layer by layer, from each parameterised module's captured calls; that needs
every use of a parameter to happen inside a captured call of its module, on inputs that carry
the batch. Three situations break this, and this module names them before any forward runs:

- *Units*: a module whose forward reads a descendant's parameter directly (torchvision's
  ``ShiftedWindowAttention`` calls ``F.linear(x, self.qkv.weight)``) or calls a parameterised
  child on its own attributes only, tensors without a sample dimension (Swin v2's
  ``self.cpb_mlp(self.relative_coords_table)``). Such a module is measured whole: per-sample
  vector-Jacobian products of its recomputed forward (:data:`UNIT_RULE`, the generic fallback's
  machinery over its whole subtree), exact. Found by reading the forward's source (and the
  methods it calls on ``self``); a use the source does not show is still caught at the first
  measured step by :meth:`~lightning_tricks.gradients.GramCollector.check_outside_use`.
- *Refusals in training mode*: modules whose per-sample gradients the engine cannot reproduce
  while they draw dropout masks inside a forward it recomputes (:func:`training_refusal`).
- *Compiled modules*: ``torch.compile`` wrappers and compiled forwards run cached graphs without
  module hooks (:func:`compiled_modules`).
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import sys
import textwrap
from collections.abc import Iterable
from typing import NamedTuple

from torch import nn

from .fallback import generic_unit_capture, recompute_factors
from .registry import GramRule

UNIT_RULE = GramRule(
    recompute_factors,
    param_names=None,
    capture=generic_unit_capture,
    composite=True,
    method="fallback",
)
"""A module measured whole: g_i of every parameter of its subtree, the per-sample VJP of its
recomputed forward (seed 004 eq. 6; :func:`.fallback.recompute_factors`)."""

METADATA = frozenset(
    {"shape", "dtype", "device", "ndim", "size", "dim", "numel", "is_cuda", "requires_grad", "layout"}
)
"""Reading these of a parameter does not use its value (no gradient flows through them)."""


# -- units ----------------------------------------------------------------------------------------


def is_unit(module: nn.Module) -> bool:
    """Whether ``module``'s forward (or a method it calls on ``self``) reads a parameter of a
    child it never calls (the child only holds weights for the parent's functional code), or
    calls a parameterised child with nothing but its own attributes and constants as arguments.
    A child that is also called (a tied output projection ``F.linear(h, self.embed.weight)``)
    does not make a unit: measuring the whole parent would hold per-sample gradients of all its
    parameters at once; that use is refused by the outside-use check instead. Stock ``torch.nn``
    modules never count (their rules know them)."""
    if not any(True for child in module.children() for _ in child.parameters()):
        return False
    uses = _source_uses(type(module))
    return any(
        chain[0] not in uses.called and _is_descendant_parameter(module, chain) for chain in uses.reads
    ) or any(_is_static_call(module, child, arguments) for child, arguments in uses.static_calls)


def _is_descendant_parameter(module: nn.Module, chain: tuple[str, ...]) -> bool:
    """``self.<chain>`` goes through at least one child module and ends at (or reads the value of)
    one of its parameters."""
    owner: nn.Module = module
    for depth, name in enumerate(chain):
        child = owner._modules.get(name)
        if child is not None:
            owner = child
            continue
        if name not in owner._parameters or depth == 0:
            return False
        rest = chain[depth + 1 :]
        return not rest or rest[0] not in METADATA
    return False


def _is_static_call(module: nn.Module, child: str, arguments: list[tuple[str, ...] | None]) -> bool:
    """``self.<child>(...)`` on a parameterised child whose every argument is a constant
    (``None`` entries) or an attribute of ``module`` that is not a module: no sample dimension."""
    target = module._modules.get(child)
    if target is None or next(target.parameters(), None) is None:
        return False
    return all(chain is None or _is_own_value(module, chain) for chain in arguments)


def _is_own_value(module: nn.Module, chain: tuple[str, ...]) -> bool:
    name = chain[0]
    if name in module._modules:
        return False
    return name in module._buffers or name in module._parameters or name in module.__dict__


class _SourceUses(NamedTuple):
    """What ``cls.forward`` and the methods it calls on ``self`` do with ``self``: ``reads``, the
    attribute chains ``self.a.b…`` read (outside ``is``/``is not`` tests); ``static_calls``, the
    calls ``self.child(args)`` whose every argument is a constant (``None``) or such a chain;
    ``called``, the names ``x`` of every call ``self.x(...)``."""

    reads: tuple[tuple[str, ...], ...]
    static_calls: tuple[tuple[str, list], ...]
    called: frozenset[str]


@functools.cache
def _source_uses(cls: type) -> _SourceUses:
    reads: list[tuple[str, ...]] = []
    calls: list[tuple[str, list]] = []
    called: set[str] = set()
    pending, seen = ["forward"], set()
    while pending:
        name = pending.pop()
        seen.add(name)
        tree = _method_tree(cls, name)
        if tree is None:
            continue
        visitor = _SelfUses(tree.args.args[0].arg if tree.args.args else "self")
        visitor.visit(tree)
        reads += visitor.reads
        calls += visitor.calls
        called.update(visitor.methods)
        pending += [m for m in visitor.methods if m not in seen and _is_method(cls, m)]
    return _SourceUses(tuple(reads), tuple(calls), frozenset(called))


def _is_method(cls: type, name: str) -> bool:
    return inspect.isfunction(inspect.getattr_static(cls, name, None))


def _method_tree(cls: type, name: str) -> ast.FunctionDef | None:
    """The parsed source of ``cls.name``, or ``None`` for stock ``torch.nn`` code or no source."""
    function = inspect.getattr_static(cls, name, None)
    if not inspect.isfunction(function) or (function.__module__ or "").startswith("torch.nn"):
        return None
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    except (OSError, TypeError, SyntaxError):
        return None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


class _SelfUses(ast.NodeVisitor):
    def __init__(self, self_name: str) -> None:
        self.self_name = self_name
        self.reads: list[tuple[str, ...]] = []
        self.calls: list[tuple[str, list]] = []
        self.methods: list[str] = []

    def chain(self, node: ast.AST) -> tuple[str, ...] | None:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == self.self_name and parts:
            return tuple(reversed(parts))
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = self.chain(node)
        if chain is None:
            self.generic_visit(node)
        else:
            self.reads.append(chain)

    def visit_Compare(self, node: ast.Compare) -> None:
        if all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            return  # `self.fc.bias is not None` reads no value
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        chain = self.chain(node.func)
        if chain is not None and len(chain) == 1:
            self.methods.append(chain[0])
            arguments = [*node.args, *(k.value for k in node.keywords)]
            chains = [None if isinstance(a, ast.Constant) else self.chain(a) for a in arguments]
            constant = [isinstance(a, ast.Constant) for a in arguments]
            if all(c is not None or const for c, const in zip(chains, constant)):
                self.calls.append((chain[0], chains))
        self.generic_visit(node)


# -- refusals, compiled modules ---------------------------------------------------------------------


def training_refusal(module: nn.Module) -> str | None:
    """Why the engine cannot measure ``module`` in training mode, or ``None``: dropout drawn
    between the layers of a multi-layer RNN, inside a forward the recurrent rule recomputes per
    sample, whose masks that recomputation cannot replay."""
    if isinstance(module, nn.RNNBase) and module.num_layers > 1 and module.dropout > 0:
        return f"dropout={module.dropout} between layers"
    return None


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of the modules in ``model`` that run compiled: ``torch.compile`` wrappers
    (``OptimizedModule``), modules compiled in place (``module.compile()``) and modules whose
    ``forward`` attribute was replaced by a compiled function (Lightning's ``from_compiled``).
    Nothing can be compiled before ``torch._dynamo`` is imported, so it is not imported here."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return []
    wrapper = getattr(dynamo, "OptimizedModule", ())
    return [name or "<root>" for name, module in model.named_modules() if _is_compiled(module, wrapper)]


def _is_compiled(module: nn.Module, wrapper: type | tuple) -> bool:
    if isinstance(module, wrapper) or getattr(module, "_compiled_call_impl", None) is not None:
        return True
    forward = module.__dict__.get("forward")
    return forward is not None and hasattr(forward, "_torchdynamo_orig_callable")


# -- exclusion ------------------------------------------------------------------------------------


def excluded_parameters(model: nn.Module, exclude: Iterable[str | nn.Module] | None) -> set[nn.Parameter]:
    """The parameters of the modules named (as in ``model.named_modules()``) or given in
    ``exclude``, with their subtrees'."""
    if exclude is None:
        return set()
    if isinstance(exclude, (str, nn.Module)) or not isinstance(exclude, Iterable):
        raise TypeError(f"exclude must be a list of module names or modules, got {type(exclude).__name__}")
    names = dict(model.named_modules(remove_duplicate=False))
    members = {id(m) for m in names.values()}
    params: set[nn.Parameter] = set()
    for item in exclude:
        params.update(_excluded_module(item, names, members).parameters())
    return params


def _excluded_module(item: object, names: dict[str, nn.Module], members: set[int]) -> nn.Module:
    if isinstance(item, nn.Module):
        if id(item) not in members:
            raise ValueError(f"exclude: {type(item).__name__} module is not part of the model")
        return item
    if isinstance(item, str):
        if item not in names:
            raise ValueError(f"exclude: the model has no module named {item!r}{_near(item, names)}")
        return names[item]
    raise TypeError(f"exclude must hold module names (str) or modules, got {type(item).__name__}")


def _near(name: str, names: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest module name, or nothing."""
    close = difflib.get_close_matches(name, [n for n in names if n], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
