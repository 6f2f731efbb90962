"""Assertions and brute-force references shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Equal structure (dicts, lists, tuples), and every tensor equal bit for bit, compared on the
    CPU whatever device it is on."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual.cpu(), expected.cpu()), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def jacobian_row(grads: tuple, params: list[torch.Tensor]) -> torch.Tensor:
    """One row of J: the gradients concatenated, zeros for parameters that got none."""
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def per_sample_jacobian(
    params: list[torch.Tensor], sample_loss: Callable[[int], torch.Tensor], batch: int
) -> torch.Tensor:
    """J (B, P): row i = ∇ℓ_i over ``params``, ``sample_loss(i)`` computed on sample i alone, one
    ``torch.autograd.grad`` per sample (the brute-force reference of seed 004 eq. 6's J_k)."""
    rows = [
        jacobian_row(torch.autograd.grad(sample_loss(i), params, allow_unused=True), params)
        for i in range(batch)
    ]
    return torch.stack(rows)


def reference_gram(
    model: torch.nn.Module, sample_loss: Callable[[int], torch.Tensor], batch: int
) -> torch.Tensor:
    """G = J Jᵀ over the model's trainable parameters (:func:`per_sample_jacobian`)."""
    jacobian = per_sample_jacobian([p for p in model.parameters() if p.requires_grad], sample_loss, batch)
    return jacobian @ jacobian.T


class AtenOpsPerStep(pl.Callback):
    """Per training step (``on_train_batch_start`` to ``on_train_batch_end``), the top-level aten
    ops (no aten op above them in the profile) it ran: :attr:`names` (op name → calls) and
    :attr:`counts` (their number)."""

    def __init__(self) -> None:
        self.names: list[Counter[str]] = []
        self._profiler: torch.profiler.profile | None = None

    @property
    def counts(self) -> list[int]:
        return [sum(step.values()) for step in self.names]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._profiler.__exit__(None, None, None)
        events = self._profiler.events()
        self.names.append(Counter(event.name for event in events if _is_top_level_aten(event)))


def _is_top_level_aten(event) -> bool:
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True
