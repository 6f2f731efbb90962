"""Argument checks shared by the network builders."""

from __future__ import annotations

from collections.abc import Sequence


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1; otherwise raise naming ``name``.

    Raises:
        TypeError: ``value`` is not an int (bools are rejected too).
        ValueError: ``value`` < 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value}")
    return value


def positive_int_tuple(name: str, values: object, length: int | None = None) -> tuple[int, ...]:
    """Return ``values`` as a non-empty tuple of ints >= 1 (of ``length`` items if given).

    Raises:
        TypeError: ``values`` is not a sequence of ints.
        ValueError: it is empty, has the wrong length, or holds an int < 1.
    """
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"`{name}` must be a sequence of ints >= 1, got {values!r}")
    if not values or (length is not None and len(values) != length):
        wanted = f"{length} ints" if length is not None else "at least one int"
        raise ValueError(f"`{name}` must hold {wanted} >= 1, got {tuple(values)!r}")
    return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


def boolean(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool; otherwise raise ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value
