"""Assertions shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from typing import Any

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
