"""One formula for two kinds of arrays: the statistics of F̃ are written once, with the operations
torch and NumPy share (``where``, ``sqrt``, ``isfinite``, ``amin``, ``stack``, ``log10``, methods
``sum``/``all``/``diagonal``), and run on whatever their input is.

- A ``torch.Tensor`` (any device, batched or not): tensors out, no host sync — the form for device
  code and batches of matrices.
- A NumPy ``float64`` array or number (the host): NumPy numbers out (``numpy.float64`` is a Python
  ``float``). A B×B matrix's statistics are a few dozen scalar operations, which NumPy runs in about
  a microsecond each where a 0-d tensor op costs several: FisherSpectrum's host path.

Eigenvalues are always torch's ``linalg.eigvalsh`` (LAPACK's ``syevd`` on the host), so both kinds
give the same eigenvalues, computed under torch's thread settings.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TypeVar, Union

import numpy as np
import torch
from torch import Tensor

Array = Union[Tensor, np.ndarray, float]
"""A tensor, a NumPy array or a number (Python or NumPy)."""

Result = TypeVar("Result")


def namespace(*values: object) -> ModuleType:
    """``torch`` if any of ``values`` is a tensor, else ``numpy``."""
    for value in values:
        if isinstance(value, Tensor):
            return torch
    return np


def float64(value: Array) -> Array:
    """``value`` in float64 (a tensor stays on its device; a number becomes ``numpy.float64``)."""
    if type(value) is np.float64 or (type(value) is np.ndarray and value.dtype == np.float64):
        return value
    if isinstance(value, Tensor):
        return value if value.dtype == torch.float64 else value.to(torch.float64)
    return np.float64(value)


def numeric(value: Array) -> Array:
    """``value`` as it is if an array (tensor or NumPy) or a NumPy number, a Python number as
    ``numpy.float64`` (so that x / 0 gives inf or NaN, not ``ZeroDivisionError``)."""
    return value if isinstance(value, (Tensor, np.ndarray, np.generic)) else np.float64(value)


def eigvalsh(matrix: Array) -> Array:
    """Ascending eigenvalues of the symmetric ``matrix`` (..., B, B), by ``torch.linalg.eigvalsh``
    for both kinds (a NumPy matrix is read and its eigenvalues written in place: no copy, no read
    back from a tensor)."""
    if isinstance(matrix, Tensor):
        return torch.linalg.eigvalsh(matrix)
    values = np.empty(matrix.shape[:-1])
    torch.linalg.eigvalsh(torch.from_numpy(np.ascontiguousarray(matrix)), out=torch.from_numpy(values))
    return values


def quiet(function: Callable[..., Result]) -> Callable[..., Result]:
    """Run ``function`` without NumPy's warnings for 0/0, x/0 and sqrt of NaN: its formulas turn
    those into the documented NaN and inf, as tensors do silently (one ``np.errstate`` for a call
    and all the quiet functions it calls)."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> Result:
        if getattr(_quiet, "active", False):
            return function(*args, **kwargs)
        _quiet.active = True
        try:
            with np.errstate(divide="ignore", invalid="ignore"):
                return function(*args, **kwargs)
        finally:
            _quiet.active = False

    return wrapper


_quiet = threading.local()


def total(value: Array) -> Array:
    """The sum of all of ``value``'s entries (a NumPy number is its own sum)."""
    return value if isinstance(value, np.generic) else value.sum()


def where(condition: Array, chosen: Array | float, other: Array | float) -> Array:
    """``chosen`` where ``condition`` holds, else ``other`` (float64 values).

    NumPy: under one condition (a ``bool``) the chosen value itself, filled out to the other's
    shape if it is a number (``np.where`` costs microseconds even on scalars); a 0-d result is a
    ``numpy.float64`` number, as NumPy's arithmetic gives, not a 0-d array."""
    if type(condition) is np.bool_ or type(condition) is bool:
        picked, unpicked = (chosen, other) if condition else (other, chosen)
        if type(picked) is float or type(picked) is np.float64:
            if type(unpicked) is float or type(unpicked) is np.float64:
                return np.float64(picked)
            if type(unpicked) is np.ndarray:
                return np.full(unpicked.shape, picked)
        elif type(picked) is np.ndarray and (
            type(unpicked) is float or (type(unpicked) is np.ndarray and unpicked.shape == picked.shape)
        ):
            return picked
    if isinstance(condition, Tensor) or isinstance(chosen, Tensor) or isinstance(other, Tensor):
        return torch.where(torch.as_tensor(condition), chosen, other)
    return np.where(condition, chosen, other)[()]


def stack(values: Sequence[Array]) -> Array:
    """``values`` (of one shape) stacked along a new first dimension."""
    if namespace(*values) is torch:
        return torch.stack(values)
    return np.array(values, dtype=np.float64)


def nonnegative(value: Array) -> Array:
    """``value`` with its negative entries set to 0 (NaN kept): ``clamp(min=0)`` for both kinds."""
    return where(value < 0, 0.0, value)


def constant(like: Array, value: float) -> Array:
    """A float64 array of ``like``'s kind, shape (and device) filled with ``value``."""
    if isinstance(like, Tensor):
        return torch.full(like.shape, value, dtype=torch.float64, device=like.device)
    if isinstance(like, (float, bool, np.generic)):
        return np.float64(value)
    return np.full(np.shape(like), value, dtype=np.float64)[()]


def same_kind(value: Array, reference: Array) -> Array:
    """``value`` as ``reference``'s kind: a tensor on its device, or a NumPy array."""
    if isinstance(reference, Tensor):
        return torch.as_tensor(value, device=reference.device)
    return value.cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
