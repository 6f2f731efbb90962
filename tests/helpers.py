"""Assertions shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from collections import Counter
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
