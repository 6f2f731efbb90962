"""Batch-size policies: which global batch size each epoch trains with (seed 004 §3.2, §4.3).

A policy is any object with one method, ``size_for(epoch, step, context) -> int`` (the
:class:`BatchSizePolicy` protocol): the global batch size of ``epoch``, decided at that epoch's start
(``step`` is the index of its first optimiser step), from what :class:`PolicyContext` says about the
run. :class:`~lightning_tricks.BatchSizeScheduler` asks it once per epoch and applies the answer; no
policy imports Lightning. Optional members, used when present: ``reads_noise_scale = True`` (the
scheduler then measures B_noise if nothing else does), ``validate(context)`` (refuse a layout at fit
start), ``known_sizes() -> {argument: size}`` (checked against the data before training),
``implied_lr_scaling``, and ``state_dict()``/``load_state_dict()`` (kept in the checkpoint).

The built-ins are seed 004 §4.3's "Dynamic Sampling" — five stages of equal length, each with its
own size (``s32-to-512``: 32, 64, 128, 256, 512; ``s512-to-32`` the reverse; ``s16-to-64``: 16, 16,
32, 32, 64), and ``-MS``, the sequence re-run inside each learning-rate stage ("for each learning
rate value, we re-iterate through the sequence of mini-batch sizes") — an explicit
``{epoch: size}`` schedule, Smith et al.'s increase-instead-of-decay and the norm test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from . import checks
from .lr_scaling import LR_SCALINGS


class Decision(NamedTuple):
    """A change of the batch size: from ``epoch`` (first optimiser step ``step``) on, ``size``."""

    epoch: int
    step: int
    size: int


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may read when it decides an epoch's size; the same on every process.

    Attributes:
        max_epochs: ``Trainer(max_epochs)``; ``None`` when training is bounded by steps only.
        initial_size: the training loader's own global batch size at fit start.
        size: the global size of the epoch before (``None`` at the first decision of a fit).
        world_size: the number of processes (a size must be a multiple of it).
        noise_scale: B_noise = tr Σ / |G|² pooled over the epoch just trained
            (:mod:`lightning_tricks.gradients.noise_scale`); NaN when nothing measured it.
        lr_milestones: the milestones of a ``MultiStepLR`` stepped per epoch, if there is one.
        lr_gamma: that ``MultiStepLR``'s decay factor.
        decisions: the size changes of the run so far, oldest first.
        metrics: ``trainer.callback_metrics`` as floats (e.g. ``fisher/C_bar``, ``fisher/L``, ``val/acc``).
    """

    max_epochs: int | None
    initial_size: int
    size: int | None = None
    world_size: int = 1
    noise_scale: float = math.nan
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float | None = None
    decisions: tuple[Decision, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class BatchSizePolicy(Protocol):
    """Anything with ``size_for(epoch, step, context) -> int``: the global batch size of ``epoch``."""

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int: ...


def stage_of(epoch: int, num_epochs: int, num_stages: int) -> int:
    """The stage of ``epoch`` when ``num_epochs`` are split into ``num_stages`` equal stages.

    Stage k covers epochs ``[⌊k·E/S⌋, ⌊(k+1)·E/S⌋)``: equal when S divides E, otherwise stages
    differ by at most one epoch and the longer ones come last (E=10, S=3 → 3, 3, 4 epochs), and
    with fewer epochs than stages some stages get no epoch (E=3, S=5 → sizes 2, 4, 5 are used);
    :meth:`StagedPolicy.check` refuses both. Epochs past ``num_epochs`` stay in the last stage."""
    if epoch >= num_epochs:
        return num_stages - 1
    return ((epoch + 1) * num_stages - 1) // num_epochs  # the largest k with ⌊k·E/S⌋ <= epoch


def checked_milestones(milestones: Any) -> tuple[int | float, ...] | None:
    """``None``, or learning-rate milestones as epochs (ints > 0) or fractions of training (floats in (0, 1))."""
    milestones = checks.sequence(
        "lr_milestones", milestones, allow_none=True, what="a list of epochs or fractions"
    )
    for m in milestones or ():
        if not (
            (isinstance(m, int) and not isinstance(m, bool) and m > 0) or (isinstance(m, float) and 0 < m < 1)
        ):
            raise ValueError(
                f"`lr_milestones` must be epochs (ints > 0) or fractions of training (floats in (0, 1)); got {m!r}."
            )
    return milestones


def milestone_epochs(
    given: Sequence[int | float] | None, max_epochs: int, read: Sequence[int] | None
) -> list[int]:
    """The LR milestones as epochs of a fit of ``max_epochs``: ``given`` (fractions rounded), else ``read``
    (a ``MultiStepLR``'s); a ``ValueError`` naming both ways when there are neither."""
    if given is not None:
        return sorted({m if isinstance(m, int) else round(m * max_epochs) for m in given})
    if read is None:
        raise ValueError(
            "this batch-size policy needs the learning-rate stages: pass `lr_milestones` or configure a "
            "MultiStepLR with interval='epoch' (lr_milestones may be epochs or fractions of training)."
        )
    return sorted(read)


@dataclass(frozen=True)
class StagedPolicy:
    """``sizes[k]`` in the k-th of ``len(sizes)`` equal stages of training (seed 004 §4.3, "-∅").

    With ``multistep=True`` the sequence runs again inside each learning-rate stage ("-MS"): the
    stages are those of the epochs between two milestones (``lr_milestones`` as epochs or fractions
    of ``max_epochs``, else a ``MultiStepLR``'s). :meth:`check` refuses layouts whose stages are not
    equal whole epochs, so that every size trains on the same number of samples, with -MS as with -∅.
    """

    sizes: tuple[int, ...]
    multistep: bool = False
    lr_milestones: tuple[int | float, ...] | None = None

    def __post_init__(self) -> None:
        sizes = checks.sequence("sizes", self.sizes, what="a list of batch sizes")
        if not sizes:
            raise ValueError("`sizes` must list at least one batch size.")
        for i, size in enumerate(sizes):
            checks.integer(f"sizes[{i}]", size, minimum=1)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "multistep", checks.boolean("multistep", self.multistep))
        object.__setattr__(self, "lr_milestones", checked_milestones(self.lr_milestones))

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
        start, end = next((s, e) for s, e in self.stages(max_epochs, lr_milestones)[::-1] if s <= epoch)
        return self.sizes[stage_of(epoch - start, end - start, len(self.sizes))]

    def milestones_for(self, max_epochs: int, context: PolicyContext) -> list[int]:
        """The LR milestones of a fit of ``max_epochs`` (none without ``multistep``)."""
        return (
            milestone_epochs(self.lr_milestones, max_epochs, context.lr_milestones) if self.multistep else []
        )

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        return self.size_at(epoch, context.max_epochs, self.milestones_for(context.max_epochs, context))

    def validate(self, context: PolicyContext) -> None:
        """:meth:`check` at fit start, naming the first ``max_epochs`` that fit; needs ``max_epochs``."""
        if context.max_epochs is None or context.max_epochs < 1:
            raise ValueError(
                "`sizes` lays its stages over the epochs of training: set Trainer(max_epochs=...)."
            )
        try:
            self.check(context.max_epochs, self.milestones_for(context.max_epochs, context))
        except ValueError as error:
            candidates = range(1, 50 * context.max_epochs + 1)
            fits = [e for e in candidates if self._fits(e, context)][:3]
            hint = f" max_epochs = {', '.join(map(str, fits))}, ... fit." if fits else ""
            raise ValueError(f"{error}{hint}") from None

    def _fits(self, max_epochs: int, context: PolicyContext) -> bool:
        lengths = [e - s for s, e in self.stages(max_epochs, self.milestones_for(max_epochs, context))]
        return all(length % len(self.sizes) == 0 for length in lengths)

    def known_sizes(self) -> dict[str, int]:
        return {f"sizes[{i}]": size for i, size in enumerate(self.sizes)}


@dataclass(frozen=True)
class ExplicitPolicy:
    """``{epoch: size}``: from each listed epoch on, that size (the ``GradientAccumulationScheduler``
    idiom); before the first listed epoch, the loader's own batch size."""

    schedule: Mapping[int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Mapping):
            raise TypeError(f"`schedule` must be None or {{epoch: size}}; got {self.schedule!r}.")
        if not self.schedule:
            raise ValueError("`schedule` must map at least one epoch to a batch size.")
        for epoch, size in self.schedule.items():
            checks.integer("the `schedule`'s epochs", epoch, minimum=0)
            checks.integer(f"schedule[{epoch}]", size, minimum=1)
        object.__setattr__(self, "schedule", dict(self.schedule))

    def size_at(self, epoch: int, initial: int) -> int:
        """The size listed for the latest epoch ``<= epoch``, else ``initial``."""
        started = [e for e in self.schedule if e <= epoch]
        return self.schedule[max(started)] if started else initial

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        return self.size_at(epoch, context.initial_size)

    def known_sizes(self) -> dict[str, int]:
        return {f"schedule[{epoch}]": size for epoch, size in self.schedule.items()}


@dataclass(frozen=True)
class DecayToBatchPolicy:
    """Increase the batch size instead of decaying the learning rate (Smith et al. 2018, "Don't
    decay the learning rate, increase the batch size", cited by seeds 000 and 004): at each
    learning-rate milestone with decay factor γ the batch grows by 1/γ, up to ``max_size``.

    Combined with the linear LR scaling (the LR follows size / initial size) the scheduled decay
    γ and the growth 1/γ cancel while the batch can grow, and the LR decays once it cannot: the
    noise scale ε·N/B falls by γ at every milestone either way (Smith et al. §2). ``gamma`` and
    ``lr_milestones`` default to a ``MultiStepLR``'s."""

    max_size: int
    gamma: float | None = None
    lr_milestones: tuple[int | float, ...] | None = None
    implied_lr_scaling: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        checks.integer("max_size", self.max_size, minimum=1)
        if self.gamma is not None:
            _check_gamma(self.gamma)
        object.__setattr__(self, "lr_milestones", checked_milestones(self.lr_milestones))

    def size_at(
        self, epoch: int, initial: int, lr_milestones: Sequence[int], gamma: float | None = None
    ) -> int:
        """``min(max_size, initial · (1/γ)^k)`` with k the milestones reached by ``epoch``."""
        decays = sum(epoch >= m for m in lr_milestones)
        return min(max(self.max_size, initial), round(initial / (gamma or self.gamma) ** decays))

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        gamma = self.gamma if self.gamma is not None else _check_gamma(context.lr_gamma, read=True)
        milestones = milestone_epochs(self.lr_milestones, context.max_epochs or 0, context.lr_milestones)
        return self.size_at(epoch, context.initial_size, milestones, gamma)

    def known_sizes(self) -> dict[str, int]:
        return {"max_size": self.max_size}


def _check_gamma(gamma: Any, read: bool = False) -> float:
    if gamma is None and read:
        raise ValueError(
            "increase-instead-of-decay needs the LR decay: pass `gamma` or configure a MultiStepLR."
        )
    if not (isinstance(gamma, float) and 0 < gamma < 1):
        raise ValueError(f"`gamma` must be the LR decay factor, a float in (0, 1); got {gamma!r}.")
    return gamma


@dataclass(frozen=True)
class NormTestPolicy:
    """Grow the batch while the *norm test* fails (Byrd et al. 2012, seed 004 ref. [37]).

    The test asks that the variance of the batch gradient be small against its mean:
    tr(Σ)/|B| ≤ θ²·|G|², i.e. |B| ≥ B_noise/θ² with B_noise = tr Σ / |G|² the gradient-noise scale
    (McCandlish et al. 2018). After each epoch the batch grows by ``growth`` until it passes (at
    most ``max_size``, rounded up to a multiple of the processes); it never shrinks. An infinite
    B_noise (no detectable mean gradient) grows one step; NaN (nothing measured) keeps the size."""

    max_size: int
    theta: float = 1.0
    growth: float = 2.0
    reads_noise_scale: ClassVar[bool] = True

    def __post_init__(self) -> None:
        checks.real("theta", self.theta, above=0)
        checks.real("growth", self.growth, above=1)
        checks.integer("max_size", self.max_size, minimum=1)

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

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        if context.size is None:
            return context.initial_size
        grown = self.next_size(context.size, context.noise_scale)
        return -(-grown // context.world_size) * context.world_size

    def known_sizes(self) -> dict[str, int]:
        return {"max_size": self.max_size}


def policy_from_arguments(
    policy: Any = None,
    sizes: Sequence[int] | None = None,
    schedule: Mapping[int, int] | None = None,
    max_size: int | None = None,
    multistep: bool = False,
    lr_milestones: Sequence[int | float] | None = None,
    gamma: float | None = None,
    adaptive: bool = False,
    theta: float = 1.0,
    growth: float = 2.0,
) -> BatchSizePolicy:
    """``policy``, or the built-in policy :class:`~lightning_tricks.BatchSizeScheduler`'s convenience
    arguments name: ``sizes`` (+ ``multistep``) staged, ``schedule`` explicit, ``max_size``
    increase-instead-of-decay or, with ``adaptive``, the norm test. Exactly one of ``policy``,
    ``sizes``, ``schedule`` and ``max_size``."""
    checks.boolean("multistep", multistep)
    checks.boolean("adaptive", adaptive)
    if sum(value is not None for value in (policy, sizes, schedule, max_size)) != 1:
        raise ValueError(
            "BatchSizeScheduler needs exactly one of `policy`, `sizes` (staged), `schedule` ({epoch: size}) "
            "and `max_size` (increase the batch instead of decaying the LR)."
        )
    if multistep and sizes is None:
        raise ValueError("`multistep=True` re-runs `sizes` inside each LR stage; it needs `sizes`.")
    if adaptive and max_size is None:
        raise ValueError("`adaptive=True` grows the batch up to `max_size`; it needs `max_size`.")
    if gamma is not None and (max_size is None or adaptive):
        raise ValueError("`gamma` is the LR decay that the `max_size` policy replaces; it needs `max_size`.")
    if policy is not None and (isinstance(policy, type) or not isinstance(policy, BatchSizePolicy)):
        raise TypeError(
            f"`policy` must be None or have size_for(epoch, step, context) -> int; got {policy!r}."
        )
    if policy is not None or sizes is not None:
        return policy or StagedPolicy(sizes, multistep, lr_milestones)
    checked_milestones(lr_milestones)
    if schedule is not None:
        return ExplicitPolicy(schedule)
    if adaptive:
        return NormTestPolicy(max_size, theta, growth)
    return DecayToBatchPolicy(max_size, gamma, lr_milestones)


def implied_lr_scaling(policy: BatchSizePolicy, lr_scaling: Any) -> str:
    """``lr_scaling`` (one of :data:`~lightning_tricks.lr_scaling.LR_SCALINGS`), or the rule a policy
    is built on (``implied_lr_scaling``: increase-instead-of-decay's linear rule), which ``"none"`` takes."""
    implied = getattr(policy, "implied_lr_scaling", None)
    if implied and lr_scaling not in ("none", implied):
        raise ValueError(
            f"{type(policy).__name__} cancels each LR decay by the {implied} scaling rule; use "
            f"lr_scaling='{implied}'."
        )
    return implied or checks.choice("lr_scaling", lr_scaling, LR_SCALINGS)


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
