"""Reading a loss's autograd graph: the edges from its backward nodes into leaf tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor


def leaf_uses(loss: Any) -> Iterator[tuple[Any, Tensor]]:
    """Every ``(node, leaf)`` edge of ``loss``'s autograd graph: ``node`` a backward node one of whose
    inputs is the leaf tensor ``leaf`` (a parameter, reached through its ``AccumulateGrad``), i.e. one
    forward op that used ``leaf``. Visits each node once and only reads the graph; nothing for a
    ``loss`` that is not a tensor with a ``grad_fn``."""
    if not isinstance(loss, Tensor) or loss.grad_fn is None:
        return
    stack, seen = [loss.grad_fn], {loss.grad_fn}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)
            if leaf is not None:
                yield node, leaf
            elif child not in seen:
                seen.add(child)
                stack.append(child)
