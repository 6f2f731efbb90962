"""The stream of random loss weights r_t of seed 000 (``000_e58e526c3e6fcb5b.txt`` §4): pure torch.

The seed trains with ``loss_random = loss * random(); loss_random.backward()``: backward number t
propagates the loss gradient times r_t. :class:`RandomWeightStream` produces r_0, r_1, … for the
three schedules of the seed, from its own CPU generator, and saves/restores its position exactly.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

SCHEDULES = ("uniform", "constant", "cyclical")
SEED_LIMIT = 2**64
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
        self.low, self.high = check_bounds(low, high)
        self.schedule = check_schedule(schedule)
        self.period = check_period(period, self.schedule)
        self.seed = check_int("seed", seed, minimum=0, limit=SEED_LIMIT)
        self.draws = 0
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


def check_bounds(low: Any, high: Any) -> tuple[float, float]:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"RandomGradient: `{name}` must be a real number, got {value!r}.")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"RandomGradient: `{name}` must be finite and >= 0, got {value!r}.")
    if low > high:
        raise ValueError(f"RandomGradient: need `low <= high`, got low={low!r} > high={high!r}.")
    if high == 0:
        raise ValueError("RandomGradient: `high` must be > 0 (r = 0 would zero every gradient).")
    return float(low), float(high)


def check_schedule(schedule: Any) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"RandomGradient: `schedule` must be one of {SCHEDULES}, got {schedule!r}.")
    return schedule


def check_period(period: Any, schedule: str) -> int | None:
    if schedule != "cyclical":
        if period is not None:
            raise ValueError(
                f"RandomGradient: `period` is only used by schedule='cyclical', got period={period!r}."
            )
        return None
    if period is None:
        raise ValueError(
            "RandomGradient: schedule='cyclical' needs `period`, an integer >= 2 (backwards per cycle)."
        )
    return check_int("period", period, minimum=2)


def check_int(name: str, value: Any, minimum: int, limit: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"RandomGradient: `{name}` must be an integer, got {value!r}.")
    if value < minimum or (limit is not None and value >= limit):
        upper = "" if limit is None else f" and < {limit}"
        raise ValueError(f"RandomGradient: `{name}` must be >= {minimum}{upper}, got {value!r}.")
    return value
