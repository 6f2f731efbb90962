"""Batch-size schedules as pure functions of the epoch: seed 004's dynamic sampling (§3.2, §4.3).

Seed ``004_e5d92837cb57ce8a.txt`` §4.3 ("Dynamic Sampling") splits training into five stages of
equal length, each with its own mini-batch size — ``s32-to-512`` uses 32, 64, 128, 256, 512;
``s512-to-32`` the reverse; ``s16-to-64`` uses 16, 16, 32, 32, 64 — and the ``-MS`` variant re-runs
the sequence inside each learning-rate stage ("for each learning rate value, we re-iterate through
the sequence of mini-batch sizes"). A policy here answers one question, the global batch size of
epoch ``e``, with no Lightning import; :class:`~lightning_tricks.BatchSizeScheduler` applies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def _check_size(name: str, size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`{name}` must be an integer batch size >= 1; got {size!r}.")
    return size


def stage_of(epoch: int, num_epochs: int, num_stages: int) -> int:
    """The stage of ``epoch`` when ``num_epochs`` are split into ``num_stages`` equal stages.

    Stage k covers epochs ``[⌊k·E/S⌋, ⌊(k+1)·E/S⌋)``: equal when S divides E, otherwise stages
    differ by at most one epoch and the longer ones come last (E=10, S=3 → 3, 3, 4 epochs), and
    with fewer epochs than stages some stages get no epoch (E=3, S=5 → sizes 2, 4, 5 are used);
    :meth:`StagedPolicy.check` refuses both. Epochs past ``num_epochs`` stay in the last stage."""
    if epoch >= num_epochs:
        return num_stages - 1
    return ((epoch + 1) * num_stages - 1) // num_epochs  # the largest k with ⌊k·E/S⌋ <= epoch


@dataclass(frozen=True)
class StagedPolicy:
    """``sizes[k]`` in the k-th of ``len(sizes)`` equal stages of training (seed 004 §4.3, "-∅").

    With ``lr_milestones`` (the epochs where the learning rate decays) and ``multistep=True``, the
    sequence runs again inside each learning-rate stage ("-MS"): the stages are those of the
    epochs between two milestones. :meth:`check` refuses layouts whose stages are not equal whole
    epochs, so that every size trains on the same number of samples, with -MS as with -∅.
    """

    sizes: tuple[int, ...]
    multistep: bool = False

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("`sizes` must list at least one batch size.")
        for i, size in enumerate(self.sizes):
            _check_size(f"sizes[{i}]", size)

    def stages(self, max_epochs: int, lr_milestones: Sequence[int] = ()) -> list[tuple[int, int]]:
        """The ``[start, end)`` epochs the sequence runs over: the whole training, or (``multistep``)
        each learning-rate stage between consecutive milestones."""
        if not self.multistep:
            return [(0, max_epochs)]
        bounds = [0, *sorted({m for m in lr_milestones if 0 < m < max_epochs}), max_epochs]
        return list(zip(bounds[:-1], bounds[1:]))

    def check(self, max_epochs: int, lr_milestones: Sequence[int] = ()) -> None:
        """Refuse a layout whose stages cannot all be equal whole epochs.

        Seed 004 §4.3: "five stages, each with equal number of training epochs", and -MS shares "the
        same amount of units of mini-batch sizes" as -∅; both hold only when every length in
        :meth:`stages` is a multiple of ``len(sizes)`` (epochs are the unit the size changes at).

        Raises:
            ValueError: naming the stage lengths (the caller adds which ``max_epochs`` would fit).
        """
        lengths = [end - start for start, end in self.stages(max_epochs, lr_milestones)]
        if any(length % len(self.sizes) for length in lengths):
            where = "the learning-rate stages last" if self.multistep else "training lasts"
            raise ValueError(
                f"`sizes` {list(self.sizes)} needs equal stages of whole epochs (seed 004 §4.3), but {where} "
                f"{', '.join(map(str, lengths))} epochs (max_epochs={max_epochs}"
                f"{f', LR milestones at epochs {sorted(set(lr_milestones))}' if self.multistep else ''}): each "
                f"must be a multiple of {len(self.sizes)}."
            )

    def size_at(self, epoch: int, max_epochs: int, lr_milestones: Sequence[int] = ()) -> int:
        """Global batch size of ``epoch`` (0-based) in a fit of ``max_epochs`` epochs."""
        start, end = next(
            (s, e) for s, e in self.stages(max_epochs, lr_milestones)[::-1] if s <= epoch
        )
        return self.sizes[stage_of(epoch - start, end - start, len(self.sizes))]


@dataclass(frozen=True)
class ExplicitPolicy:
    """``{epoch: size}``: from each listed epoch on, that size (the ``GradientAccumulationScheduler``
    idiom); before the first listed epoch, ``initial`` (the loader's own batch size)."""

    schedule: Mapping[int, int]

    def __post_init__(self) -> None:
        if not self.schedule:
            raise ValueError("`schedule` must map at least one epoch to a batch size.")
        for epoch, size in self.schedule.items():
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"`schedule` keys must be epochs (integers >= 0); got {epoch!r}.")
            _check_size(f"schedule[{epoch}]", size)

    def size_at(self, epoch: int, initial: int) -> int:
        """The size listed for the latest epoch ``<= epoch``, else ``initial``."""
        started = [e for e in self.schedule if e <= epoch]
        return self.schedule[max(started)] if started else initial


@dataclass(frozen=True)
class DecayToBatchPolicy:
    """Increase the batch size instead of decaying the learning rate (Smith et al. 2018, "Don't
    decay the learning rate, increase the batch size", cited by seeds 000 and 004): at each
    learning-rate milestone with decay factor γ the batch grows by 1/γ, up to ``max_size``.

    Combined with the linear LR scaling (the LR follows size / initial size) the scheduled decay
    γ and the growth 1/γ cancel while the batch can grow, and the LR decays once it cannot: the
    noise scale ε·N/B falls by γ at every milestone either way (Smith et al. §2)."""

    gamma: float
    max_size: int

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, float) and 0 < self.gamma < 1):
            raise ValueError(f"`gamma` must be the LR decay factor, a float in (0, 1); got {self.gamma!r}.")
        _check_size("max_size", self.max_size)

    def size_at(self, epoch: int, initial: int, lr_milestones: Sequence[int]) -> int:
        """``min(max_size, initial · (1/γ)^k)`` with k the milestones reached by ``epoch``."""
        decays = sum(epoch >= m for m in lr_milestones)
        return min(max(self.max_size, initial), round(initial / self.gamma**decays))


@dataclass(frozen=True)
class NormTestPolicy:
    """Grow the batch while the *norm test* fails (Byrd et al. 2012, seed 004 ref. [37]).

    The test asks that the variance of the batch gradient be small against its mean:
    tr(Σ)/|B| ≤ θ²·|G|², i.e. |B| ≥ B_noise/θ² with B_noise = tr Σ / |G|² the gradient-noise scale
    (McCandlish et al. 2018). After each epoch the batch grows by ``growth`` until it passes (at
    most ``max_size``); it never shrinks. An infinite B_noise (no detectable mean gradient) grows
    one step; NaN (nothing measured) keeps the size."""

    theta: float
    growth: float
    max_size: int

    def __post_init__(self) -> None:
        for name, value, low in (("theta", self.theta, 0), ("growth", self.growth, 1)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and low < value < math.inf):
                raise ValueError(f"`{name}` must be a finite number > {low}; got {value!r}.")
        _check_size("max_size", self.max_size)

    def next_size(self, size: int, noise_scale: float) -> int:
        """The smallest ``size · growth^k`` (rounded up) that passes the test, capped at ``max_size``."""
        if math.isnan(noise_scale) or size >= self.max_size:
            return size
        target = math.inf if math.isinf(noise_scale) else noise_scale / self.theta**2
        grown = size
        while grown < target and grown < self.max_size:
            grown = math.ceil(grown * self.growth)
            if math.isinf(target):
                break
        return min(grown, self.max_size)


def split_physical(size: int, max_physical: int | None, world_size: int = 1) -> tuple[int, int]:
    """``(physical, accumulation)`` per process with ``physical · accumulation · world_size = size``.

    The fewest accumulation steps whose physical batch fits ``max_physical``; a size that cannot be
    split exactly raises ``ValueError`` (so the optimiser always sees exactly ``size`` samples)."""
    if size % world_size:
        raise ValueError(
            f"batch size {size} is the global batch of {world_size} processes and must be divisible by "
            f"{world_size}; choose sizes that are multiples of the number of processes."
        )
    local = size // world_size
    limit = local if max_physical is None else max_physical
    for accumulation in range(1, local + 1):
        if local % accumulation == 0 and local // accumulation <= limit:
            return local // accumulation, accumulation
    raise AssertionError("unreachable: accumulation = local always fits")
