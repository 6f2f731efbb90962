"""Scale every learning rate of a run by one factor, torch's schedulers included.

When the batch size changes, the linear scaling rule (Goyal et al. 2017, seed 003) multiplies the
learning rate by new/old size, the square-root rule by its square root. A scheduler recomputes its
LR from values it keeps (``base_lrs``, ``eta_min``, ...), so scaling the param groups alone would be
undone at its next step: :func:`scale_learning_rates` scales those values too, and the schedule
continues exactly ×factor. No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch.optim import Optimizer
from torch.optim import lr_scheduler as schedulers

LR_SCALINGS = ("none", "linear", "sqrt")
"""How the learning rate follows a batch-size change by a ratio r: kept (``"none"``), times r
(``"linear"``) or times √r (``"sqrt"``)."""
LR_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
"""Param-group entries that hold learning rates (``max_lr``/``min_lr``: OneCycleLR's)."""
SCALED_SCHEDULER_VALUES: dict[type, tuple[str, ...]] = {
    schedulers.LambdaLR: (),
    schedulers.MultiplicativeLR: (),
    schedulers.StepLR: (),
    schedulers.MultiStepLR: (),
    schedulers.ConstantLR: (),
    schedulers.LinearLR: (),
    schedulers.ExponentialLR: (),
    schedulers.PolynomialLR: (),
    schedulers.CosineAnnealingLR: ("eta_min",),
    schedulers.CosineAnnealingWarmRestarts: ("eta_min",),
    schedulers.CyclicLR: ("max_lrs",),
    schedulers.OneCycleLR: (),
    schedulers.ReduceLROnPlateau: ("min_lrs", "eps"),
    schedulers.ChainedScheduler: (),
    schedulers.SequentialLR: (),
}
"""The schedulers whose LR can be scaled exactly, and the learning-rate values each recomputes its
LR from besides ``base_lrs`` and the param groups' :data:`LR_GROUP_KEYS`."""


def scaling_factor(rule: str, size_ratio: float) -> float:
    """The LR factor of a batch-size change by ``size_ratio``: ``"linear"`` r, ``"sqrt"`` √r, ``"none"`` 1."""
    return {"none": 1.0, "linear": size_ratio, "sqrt": math.sqrt(size_ratio)}[rule]


def nested_schedulers(top: Iterable[Any]) -> list[Any]:
    """The schedulers and those inside ``ChainedScheduler``/``SequentialLR``, each once."""
    found: dict[int, Any] = {}
    stack = list(top)
    while stack:
        scheduler = stack.pop()
        found.setdefault(id(scheduler), scheduler)
        stack.extend(getattr(scheduler, "_schedulers", ()))
    return list(found.values())


def check_scalable(top: Iterable[Any], user: str) -> None:
    """Refuse a scheduler whose LR cannot be scaled exactly (``user`` names who scales)."""
    for scheduler in nested_schedulers(top):
        if type(scheduler) not in SCALED_SCHEDULER_VALUES:
            raise ValueError(
                f"{user} scales the learning rates that schedulers recompute from, which it knows for torch's "
                f"{', '.join(c.__name__ for c in SCALED_SCHEDULER_VALUES)}; not for {type(scheduler).__name__}. "
                "Use one of those or lr_scaling='none'."
            )


def scale_learning_rates(optimizers: Iterable[Optimizer], top: Iterable[Any], factor: float) -> None:
    """Multiply every LR by ``factor``: the param groups' :data:`LR_GROUP_KEYS` and every value a
    scheduler recomputes its LR from (``base_lrs``, ``_last_lr`` and :data:`SCALED_SCHEDULER_VALUES`)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in LR_GROUP_KEYS:
                if key in group:
                    group[key] *= factor
    for scheduler in nested_schedulers(top):
        for name in ("base_lrs", "_last_lr", *SCALED_SCHEDULER_VALUES[type(scheduler)]):
            value = getattr(scheduler, name, None)
            if isinstance(value, (list, tuple)):
                setattr(scheduler, name, [v * factor for v in value])
            elif isinstance(value, float | int) and not isinstance(value, bool):
                setattr(scheduler, name, value * factor)
