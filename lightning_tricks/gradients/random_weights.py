"""The random loss weights r_t of seed 000 (``000_e58e526c3e6fcb5b.txt`` §4) and how a backward
applies them: pure torch.

The seed trains with ``loss_random = loss * random(); loss_random.backward()``: backward number t
propagates the loss gradient times r_t.

- :class:`RandomWeightStream` produces r_0, r_1, … for the three schedules of the seed, from its
  own CPU generator, and saves/restores its position exactly; :func:`derived_seed` seeds it from
  torch's; :class:`DrawLog` records the draws;
- :class:`BackwardScaling` multiplies what one backward sends to the selected parameters by r:
  at the loss (``torch.mul`` as the loss's gradient hook, bit for bit ``(loss * r).backward()``)
  or, when the backward also reaches parameters left unscaled (:func:`reaches_any`), at the
  selected parameters;
- the argument checks shared by the stream and the callback (:func:`check_stream_arguments`,
  :func:`check_optimizer_indices`), built on ``lightning_tricks.checks``.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .. import checks

SCHEDULES = ("uniform", "constant", "cyclical")
"""How r_t is drawn: ``U(low, high)``, always ``high``, or :func:`triangular_wave`."""
SEED_LIMIT = 2**64
DERIVED_SEED_OFFSET = 0x5EED_0000
"""Added to ``torch.initial_seed()`` by :func:`derived_seed`, so that the r stream is not the same
Mersenne-Twister sequence that initialised the model's weights."""
BLOCK_DRAWS = 1024
"""Uniform draws taken from the generator at once (the same numbers, in the same order, as one at a
time: the CPU generator fills a tensor element by element)."""


def triangular_wave(t: int, low: float, high: float, period: int) -> float:
    """Smith's triangular cycle: ``low + (high - low) (1 - |2 (t mod P) / P - 1|)``.

    Starts at ``low`` for ``t = 0``, reaches ``high`` at ``t = P / 2`` and returns to ``low`` at
    ``t = P`` (seed 000_e58e526c3e6fcb5b.txt §7; Smith 2015, arXiv:1506.01186, §3.1).
    """
    phase = (t % period) / period
    return low + (high - low) * (1.0 - abs(2.0 * phase - 1.0))


class RandomWeightStream:
    """r_0, r_1, …: the loss weight of every backward (seed 000_e58e526c3e6fcb5b.txt §4, §2, §7).

    ``"uniform"``: r_t = low + (high − low)·u_t, u_t ~ U[0, 1) drawn in float64 from a CPU
    generator seeded with ``seed`` (the seed's ``random()`` is U(0, 1)), :data:`BLOCK_DRAWS` at a
    time so that a draw costs no tensor op; ``"constant"``: r_t = high
    (§2, Fig. 1 right, a fixed loss weight, also > 1); ``"cyclical"``: :func:`triangular_wave` from
    ``low`` to ``high`` and back over ``period`` backwards (§7). Values are Python floats: using
    one costs no host-device synchronisation.

    Args:
        low: lower end of r (``0 <= low <= high``).
        high: upper end of r and the constant value (``high > 0``).
        schedule: ``"uniform"``, ``"constant"`` or ``"cyclical"``.
        period: backwards per cycle, an integer >= 2, for ``"cyclical"`` only.
        seed: generator seed, ``0 <= seed < 2**64``.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (the message names it).

    Example::

        >>> stream = RandomWeightStream(seed=0)
        >>> round(stream.next(), 4), stream.draws
        (0.9701, 1)
    """

    def __init__(
        self,
        low: float = 0.0,
        high: float = 1.0,
        schedule: str = "uniform",
        period: int | None = None,
        seed: int = 0,
    ) -> None:
        self.low, self.high, self.schedule, self.period = check_stream_arguments(low, high, schedule, period)
        self.seed = check_seed(seed)
        self.draws = 0
        """The number t of draws so far (the index of the next r_t)."""
        self._generator = torch.Generator().manual_seed(self.seed)
        self._block: list[float] = []
        self._used = 0
        self._block_start: torch.Tensor | None = None

    def next(self) -> float:
        """r_t for t = :attr:`draws`, then advance t."""
        r = self._value(self.draws)
        self.draws += 1
        return r

    def _value(self, t: int) -> float:
        if self.schedule == "uniform":
            return self.low + (self.high - self.low) * self._uniform()
        if self.schedule == "constant":
            return self.high
        return triangular_wave(t, self.low, self.high, self.period)

    def _uniform(self) -> float:
        """The next u ~ U[0, 1) of the generator, from the current block of draws."""
        if self._used == len(self._block):
            self._block_start = self._generator.get_state()
            self._block = torch.rand(BLOCK_DRAWS, dtype=torch.float64, generator=self._generator).tolist()
            self._used = 0
        u = self._block[self._used]
        self._used += 1
        return u

    def state_dict(self) -> dict[str, Any]:
        """Seed, position and generator state: enough to continue the stream exactly (the state
        of a generator that drew one number at a time, the unused rest of a block not drawn)."""
        return {"seed": self.seed, "draws": self.draws, "generator": self._generator_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.draws = state["draws"]
        self._generator.set_state(state["generator"])
        self._block, self._used, self._block_start = [], 0, None

    def _generator_state(self) -> torch.Tensor:
        """The generator's state after the draws used so far: replayed from the block's start."""
        if self._used == len(self._block):
            return self._generator.get_state()
        replay = torch.Generator()
        replay.set_state(self._block_start)
        if self._used:
            torch.rand(self._used, dtype=torch.float64, generator=replay)
        return replay.get_state()


def derived_seed(initial_seed: int) -> int:
    """The stream's seed when none is given: ``(initial_seed + DERIVED_SEED_OFFSET) mod 2**64``
    (``initial_seed``: ``torch.initial_seed()``, so ``seed_everything`` makes it reproducible)."""
    return (initial_seed + DERIVED_SEED_OFFSET) % SEED_LIMIT


class DrawLog:
    """The draws of a fit, ``(step, backward, r)`` each (``backward``: the stream index t), in
    compact arrays; :meth:`unwritten` hands out each draw once, for appending to a file."""

    def __init__(self) -> None:
        self.steps, self.backwards, self.values = array("q"), array("q"), array("d")
        self._written = 0

    def add(self, step: int, backward: int, r: float) -> None:
        self.steps.append(step)
        self.backwards.append(backward)
        self.values.append(r)

    def records(self) -> list[dict[str, float]]:
        """``{"step", "backward", "r"}`` per draw, in order."""
        return [
            {"step": step, "backward": t, "r": r}
            for step, t, r in zip(self.steps, self.backwards, self.values)
        ]

    def unwritten(self) -> list[tuple[int, int, float]]:
        """The draws not handed out yet (:meth:`mark_written` takes them)."""
        return list(zip(self.steps, self.backwards, self.values))[self._written :]

    def mark_written(self, count: int) -> None:
        """The next ``count`` draws of :meth:`unwritten` are written."""
        self._written += count


def reaches_any(loss: Tensor, leaf_ids: frozenset[int]) -> bool:
    """Whether a backward from ``loss`` accumulates into any leaf tensor whose ``id`` is in ``leaf_ids``.

    Walks the autograd graph from ``loss.grad_fn`` to its ``AccumulateGrad`` nodes, visiting each
    node once; stops at the first hit.
    """
    if loss.grad_fn is None:
        return False
    seen, stack = {loss.grad_fn}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "AccumulateGrad":
            if id(node.variable) in leaf_ids:
                return True
            continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def parameters_of(optimizers: Sequence[torch.optim.Optimizer], indices: Iterable[int]) -> list[Tensor]:
    """Distinct parameters in the param groups of the given optimisers, in order of appearance."""
    unique: dict[int, Tensor] = {}
    for index in indices:
        for group in optimizers[index].param_groups:
            for parameter in group["params"]:
                unique.setdefault(id(parameter), parameter)
    return list(unique.values())


class BackwardScaling:
    """Makes one backward's parameter gradients those of ``(loss * r).backward()`` (seed 000 §4),
    for every parameter or only those of selected optimisers.

    :meth:`begin` before the backward, :meth:`end` after it. Without a selection (or when the
    backward reaches no parameter of an unselected optimiser) ``r`` multiplies the loss's incoming
    gradient: a gradient hook that is ``torch.mul`` itself (one op, no Python in the backward),
    bit for bit ``(loss * r).backward()``. When the backward also reaches unselected parameters
    (:func:`reaches_any`), per-parameter hooks (:meth:`select`) multiply the selected parameters'
    gradients by ``r`` before they accumulate into ``.grad``: the same gradients up to rounding.
    """

    def __init__(self) -> None:
        self._loss_hook: RemovableHandle | None = None
        self._parameter_hooks: list[RemovableHandle] = []
        self._unselected_ids: frozenset[int] = frozenset()
        self._active_r: float | None = None

    def select(self, optimizers: Sequence[torch.optim.Optimizer], indices: Sequence[int]) -> int:
        """Scale only the parameters of ``optimizers[i]``, ``i`` in ``indices`` (a parameter shared
        with another optimiser counts as selected); returns how many of them do not require grad
        (those get no hook)."""
        selected = parameters_of(optimizers, indices)
        others = parameters_of(optimizers, [i for i in range(len(optimizers)) if i not in indices])
        self._unselected_ids = frozenset(map(id, others)) - set(map(id, selected))
        self._parameter_hooks = [p.register_hook(self._scale_selected) for p in selected if p.requires_grad]
        return len(selected) - len(self._parameter_hooks)

    def begin(self, loss: Tensor, r: float) -> None:
        """The backward from ``loss`` about to run multiplies by ``r``."""
        if self._unselected_ids and reaches_any(loss, self._unselected_ids):
            self._active_r = r
        elif loss.requires_grad:
            self._loss_hook = loss.register_hook(partial(torch.mul, other=r))

    def end(self) -> None:
        """The backward ran: nothing is scaled until the next :meth:`begin`."""
        self._active_r = None
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None

    def remove(self) -> None:
        """Remove every hook and the selection (every parameter is scaled again)."""
        self.end()
        for handle in self._parameter_hooks:
            handle.remove()
        self._parameter_hooks, self._unselected_ids = [], frozenset()

    def _scale_selected(self, grad: Tensor) -> Tensor | None:
        """Per-parameter hook: ``grad * r`` inside a training backward, unchanged elsewhere."""
        return None if self._active_r is None else grad * self._active_r


def check_stream_arguments(
    low: Any, high: Any, schedule: Any, period: Any
) -> tuple[float, float, str, int | None]:
    """``low``, ``high``, ``schedule`` and ``period`` of a :class:`RandomWeightStream`, checked:
    ``0 <= low <= high``, ``high > 0`` (r = 0 would zero every gradient), ``schedule`` one of
    :data:`SCHEDULES`, ``period`` an integer >= 2 for ``"cyclical"`` and None otherwise."""
    low = checks.real("low", low, minimum=0.0)
    high = checks.real("high", high, above=0.0)
    if low > high:
        raise ValueError(f"need `low <= high`, got low={low!r} > high={high!r}.")
    schedule = checks.choice("schedule", schedule, SCHEDULES)
    if schedule != "cyclical" and period is not None:
        raise ValueError(f"`period` is only used by schedule='cyclical', got period={period!r}.")
    if schedule == "cyclical" and period is None:
        raise ValueError("schedule='cyclical' needs `period`, an integer >= 2 (backwards per cycle).")
    return low, high, schedule, checks.integer("period", period, minimum=2, allow_none=True)


def check_seed(seed: Any, allow_none: bool = False) -> int | None:
    """A generator seed, ``0 <= seed < 2**64`` (None where allowed)."""
    return checks.integer("seed", seed, minimum=0, maximum=SEED_LIMIT - 1, allow_none=allow_none)


def check_optimizer_indices(optimizers: Any) -> tuple[int, ...] | None:
    """None, or a non-empty list of distinct optimiser indices >= 0, as a tuple."""
    if optimizers is None:
        return None
    indices = checks.integers("optimizers", optimizers, minimum=0)
    if len(set(indices)) != len(indices):
        raise ValueError(f"`optimizers` must be without duplicates, got {optimizers!r}.")
    return indices
