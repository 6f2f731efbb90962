"""Argument checks shared by every callback, policy and engine: one message style, one place.

Each check takes the argument's name and value and returns the value (normalised where said), so a
constructor validates and stores a knob in one line::

    self.every_n_steps = checks.integer("every_n_steps", every_n_steps, minimum=1)

A value of the wrong kind raises ``TypeError``, one of the right kind out of range ``ValueError``;
both name the argument, say what it takes and show what it got.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any, TypeVar

T = TypeVar("T")


def _fail(error: type[Exception], name: str, expected: str, value: Any) -> Exception:
    return error(f"`{name}` must be {expected}; got {value!r} ({type(value).__name__}).")


def _bounds_text(minimum: float | None, maximum: float | None, above: float | None) -> str:
    parts = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else ""]
    parts.append(f"<= {maximum}" if maximum is not None else "")
    return " and ".join(part for part in parts if part)


def integer(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False
) -> int | None:
    """An ``int`` (not a ``bool``) in ``[minimum, maximum]``; ``None`` too where ``allow_none``."""
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, None)
    expected = f"{'None or ' if allow_none else ''}an integer{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(TypeError, name, expected, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(ValueError, name, expected, value)
    return value


def real(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    allow_none: bool = False,
) -> float | None:
    """A finite real number (not a ``bool``) as ``float``, ``>= minimum``, ``> above``, ``<= maximum``;
    ``None`` too where ``allow_none``."""
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, above)
    expected = f"{'None or ' if allow_none else ''}a finite number{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _fail(TypeError, name, expected, value)
    value = float(value)
    out_of_range = (
        (minimum is not None and value < minimum)
        or (above is not None and value <= above)
        or (maximum is not None and value > maximum)
    )
    if not math.isfinite(value) or out_of_range:
        raise _fail(ValueError, name, expected, value)
    return value


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not a truthy stand-in such as ``1`` or ``"yes"``)."""
    if not isinstance(value, bool):
        raise _fail(TypeError, name, "True or False", value)
    return value


def choice(name: str, value: T, allowed: Sequence[Any]) -> T:
    """One of ``allowed`` (compared with ``==``)."""
    if value not in allowed:
        raise _fail(ValueError, name, f"one of {', '.join(map(repr, allowed))}", value)
    return value


def sequence(name: str, value: Any, allow_none: bool = False, what: str = "a list") -> tuple[Any, ...] | None:
    """A list or tuple (not a string) as a tuple; its items are the caller's to check."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _fail(TypeError, name, f"{'None or ' if allow_none else ''}{what}", value)
    return tuple(value)


def integers(
    name: str, values: Any, minimum: int | None = None, length: int | None = None
) -> tuple[int, ...]:
    """A non-empty list or tuple of integers ``>= minimum`` (``length`` of them if given), as a tuple."""
    values = sequence(name, values, what="a list of integers")
    if not values or (length is not None and len(values) != length):
        count = f"{length} integers" if length is not None else "at least one integer"
        raise _fail(ValueError, name, f"a list of {count}", values)
    return tuple(integer(f"{name}[{i}]", value, minimum=minimum) for i, value in enumerate(values))


def strings(name: str, values: Any, what: str = "names") -> tuple[str, ...]:
    """A list or tuple of strings (not one string), as a tuple."""
    values = sequence(name, values, what=f"a list of {what}")
    if not all(isinstance(value, str) for value in values):
        raise _fail(TypeError, name, f"a list of {what} (str)", values)
    return values


def callable_with(name: str, value: Any, arguments: int, signature_text: str, allow_none: bool = True) -> Any:
    """A callable that can be called with ``arguments`` positional arguments (``signature_text``
    shows how, e.g. ``"loss_fn(module, batch) -> scalar mean loss"``); ``None`` where allowed.
    Builtins without an inspectable signature are accepted as they are."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise _fail(
            TypeError, name, f"{'None or ' if allow_none else ''}a callable `{signature_text}`", value
        )
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return value
    try:
        signature.bind(*([None] * arguments))
    except TypeError as error:
        raise TypeError(
            f"`{name}` must be callable as `{signature_text}`; {value!r} has the signature {signature} ({error})."
        ) from None
    return value


def loss_fn(value: Any, name: str = "loss_fn") -> Callable[..., Any] | None:
    """``None`` or ``loss_fn(module, batch) -> scalar mean loss``, the loss a callback evaluates by
    itself when the module has no ``compute_loss(batch)``."""
    if value is not None and not callable(value):
        raise TypeError(
            f"`{name}` must be None or a callable `{name}(module, batch) -> scalar mean loss`; got "
            f"{value!r} ({type(value).__name__}). Wrap a loss, e.g. "
            "`lambda module, batch: F.mse_loss(module(batch[0]), batch[1])`."
        )
    return callable_with(name, value, 2, f"{name}(module, batch)")
