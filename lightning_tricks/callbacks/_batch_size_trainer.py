"""BatchSizeScheduler's glue beyond its hooks: what it reads from and checks on a Trainer (the checks
before training, the accumulation weight of a ragged last window, the learning-rate stages of a
``MultiStepLR``, the policy's context, the epoch's pooled noise scale over the processes), its
convenience arguments read back from the policy, and its tags' descriptions."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from torch import Tensor
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader

from ..batch_size_policies import Decision, PolicyContext, split_physical
from ..gradients.noise_scale import EpochNoiseScale, half_batch_noise_parts
from ..lr_scaling import scale_learning_rates as scale_all
from ..outputs import BATCH_SIZE_SCHEDULER
from ._base import host_values


def loader_layout(trainer: pl.Trainer) -> tuple[int, int, bool] | None:
    """``(samples per epoch on this process, batch size, drop_last)`` of a training ``DataLoader``
    with a batch size and a sampler of known length; ``None`` for anything else."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return None
    try:
        return len(loader.sampler), loader.batch_size, loader.drop_last
    except TypeError:  # a sampler without a length
        return None


def window_weight(trainer: pl.Trainer, batch_idx: int) -> float:
    """The factor A·n/N on the loss gradient of micro-batch ``batch_idx`` (n samples) in an
    accumulation window of N samples, A = ``accumulate_grad_batches``.

    Lightning divides every micro-batch loss (a mean over its n samples) by A; the window's
    gradient is the mean over its N samples only when N = A·n. The epoch's last window can have
    fewer micro-batches, or a short last batch: A·n/N gives it the gradient of one batch of its
    N samples. 1 (no hook, bit-identical) for every full window."""
    accumulation = trainer.accumulate_grad_batches
    layout = loader_layout(trainer) if accumulation > 1 else None
    if layout is None:
        return 1.0
    samples, physical, drop_last = layout
    last = math.ceil(samples / physical) - 1 if not drop_last else samples // physical - 1
    last_size = physical if drop_last else samples - last * physical
    start = batch_idx - batch_idx % accumulation
    end = min(start + accumulation, trainer.num_training_batches)
    window = (end - start) * physical - (physical - last_size if start <= last < end else 0)
    micro = last_size if batch_idx == last else physical
    return accumulation * micro / window


def scaled(grad: Tensor, factor: float) -> Tensor:
    return grad * factor


def from_policy(*names: str, default: Any = None) -> tuple[property, ...]:
    """A scheduler's convenience arguments read back from the policy they built (``default`` if it has none)."""
    return tuple(property(partial(_policy_attribute, name=name, default=default)) for name in names)


def _policy_attribute(scheduler: Any, name: str, default: Any) -> Any:
    return getattr(scheduler.policy, name, default)


def set_loader_size(
    trainer: pl.Trainer, pl_module: pl.LightningModule, attribute: str, physical: int, accumulation: int
) -> tuple[int, int]:
    """Write the per-process batch and the accumulation; the loader is rebuilt before the next epoch."""
    lightning_setattr(pl_module, attribute, physical)
    trainer.accumulate_grad_batches = accumulation
    trainer.fit_loop._combined_loader = None  # as Lightning's batch-size finder: rebuilt by setup_data()
    return physical, accumulation


HISTORY_FILE = BATCH_SIZE_SCHEDULER.files["history"]
HISTORY_COLUMNS = ("epoch", "step", "size", "physical", "accumulation", "lr")
_DESCRIPTIONS = {
    "batch_size/size": "The global batch size of the epoch's optimiser steps (dynamic sampling, seed 004 §4.3).",
    "batch_size/physical": "The batch one process computes at once (size / processes / accumulation).",
    "batch_size/accumulation": "Micro-batches accumulated per optimiser step (max_physical_batch_size).",
    "batch_size/lr": "The first param group's learning rate at the epoch's first step (lr_scaling={lr_scaling!r}).",
    "batch_size/noise_scale": "The adaptive policy's B_noise = tr Σ / |G|² of the epoch (McCandlish et al. 2018).",
}


def metric_descriptions(lr_scaling: str) -> dict[str, str]:
    """The scheduler's tags and what they mean (TensorBoard's Scalars tab)."""
    return {tag: text.format(lr_scaling=lr_scaling) for tag, text in _DESCRIPTIONS.items()}


def dashboard_layout(adaptive: bool) -> dict[str, list[str]]:
    """The scheduler's Custom Scalars charts (the noise scale's for a policy that reads it)."""
    layout = {"batch size (seed 004 §4.3)": ["batch_size/size", "batch_size/physical"]}
    layout["learning rate with the batch size"] = ["batch_size/lr"]
    if adaptive:
        layout["gradient-noise scale (adaptive policy)"] = ["batch_size/noise_scale"]
    return layout


def size_metrics(size: int, physical: int, accumulation: int, lr: float) -> dict[str, float]:
    """The scalars logged at an epoch's first step."""
    values = {"size": size, "physical": physical, "accumulation": accumulation, "lr": lr}
    return {f"{BATCH_SIZE_SCHEDULER.namespace}/{name}": float(value) for name, value in values.items()}


def known_sizes(policy: Any) -> dict[str, int]:
    """``{argument: size}`` of every size the policy names in advance (checked before training)."""
    return policy.known_sizes() if hasattr(policy, "known_sizes") else {}


def attribute_name(name: str, value: Any) -> str:
    """The name of an attribute (a non-empty ``str``)."""
    if not isinstance(value, str) or not value:
        raise TypeError(
            f"`{name}` must be the name of the loader's batch-size attribute (a str); got {value!r}."
        )
    return value


def schedulers(trainer: pl.Trainer) -> list[Any]:
    """The Trainer's learning-rate schedulers."""
    return [config.scheduler for config in trainer.lr_scheduler_configs]


def scale_learning_rates(trainer: pl.Trainer, factor: float) -> None:
    """Every learning rate of the Trainer's optimisers and schedulers ×``factor`` (1: untouched)."""
    if factor != 1.0:
        scale_all(trainer.optimizers, schedulers(trainer), factor)


def policy_context(
    trainer: pl.Trainer,
    initial_size: int,
    size: int | None,
    noise_scale: float,
    decisions: tuple[Decision, ...],
) -> PolicyContext:
    """The :class:`PolicyContext` of this moment of ``trainer``'s fit."""
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    milestones, gamma = multistep_lr(trainer)
    metrics = host_values({k: v for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    return PolicyContext(
        max_epochs, initial_size, size, trainer.world_size, noise_scale, milestones, gamma, decisions, metrics
    )


def multistep_lr(trainer: pl.Trainer) -> tuple[tuple[int, ...] | None, float | None]:
    """``(milestones, gamma)`` of the first ``MultiStepLR`` stepped per epoch, or ``(None, None)``."""
    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, MultiStepLR) and config.interval == "epoch":
            return tuple(sorted(config.scheduler.milestones)), float(config.scheduler.gamma)
    return None, None


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, batch_arg_name: str) -> None:
    """The loader's batch size is an attribute we can set, and nobody else sets the accumulation."""
    if not lightning_hasattr(pl_module, batch_arg_name):
        raise ValueError(
            f"BatchSizeScheduler changes the attribute `{batch_arg_name}` that train_dataloader() reads, "
            f"but neither {type(pl_module).__name__}, its hparams nor the datamodule has it. Expose the "
            "loader's batch size there (as for Lightning's BatchSizeFinder) or set `batch_arg_name`."
        )
    if trainer.accumulate_grad_batches != 1 or any(
        isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks
    ):
        raise ValueError(
            "BatchSizeScheduler sets the gradient accumulation itself (see `max_physical_batch_size`); "
            "remove Trainer(accumulate_grad_batches=...) and any GradientAccumulationScheduler."
        )


def check_sizes(
    trainer: pl.Trainer, pl_module: pl.LightningModule, sizes: Mapping[str, int], max_physical: int | None
) -> None:
    """Every ``{argument: size}`` the policy may choose: divisible by the processes, and, under manual
    optimisation (where Lightning ignores ``accumulate_grad_batches``), without accumulation."""
    for name, size in sizes.items():
        physical, accumulation = split_physical(size, max_physical, trainer.world_size)
        if accumulation > 1 and not pl_module.automatic_optimization:
            raise ValueError(
                f"BatchSizeScheduler: {type(pl_module).__name__} uses manual optimisation, where Lightning "
                f"ignores gradient accumulation, so {name} = {size} cannot run as {accumulation} micro-batches "
                f"of {physical} (max_physical_batch_size={max_physical}). Use sizes up to "
                "max_physical_batch_size per process, or accumulate inside training_step."
            )


def check_dataset_size(trainer: pl.Trainer, sizes: Mapping[str, int]) -> None:
    """No size larger than an epoch's samples (it would train on fewer samples than it says)."""
    layout = loader_layout(trainer)
    if layout is None:
        return
    samples = layout[0] * trainer.world_size
    for name, size in sizes.items():
        if size > samples:
            raise ValueError(
                f"BatchSizeScheduler: `{name}` = {size} is larger than the {samples} training samples of "
                f"an epoch; batch sizes must be in 1..{samples}."
            )


def epoch_noise_scale(trainer: pl.Trainer, estimate: EpochNoiseScale, epoch: int, per_process: bool) -> float:
    """The pooled B_noise of ``epoch``; ``per_process``: each process fed its own measurements, which
    are summed over the processes first (a collective: every rank calls it)."""
    parts = estimate.parts(epoch)
    if per_process and trainer.world_size > 1:
        parts = trainer.strategy.reduce(parts.to(trainer.strategy.root_device), reduce_op="sum")
    return estimate.value(parts=parts)


def legacy_noise_parts(state: Mapping[str, Any]) -> list[dict[str, float]]:
    """The own estimate's pool as older checkpoints kept it: ``noise_sums`` (Σ tr Σ, Σ |G|², n)."""
    trace_sigma, grad_sq_norm, count = state.get("noise_sums", (0.0, 0.0, 0.0))
    record = {"epoch": state.get("noise_epoch", -1), "trace_sigma": trace_sigma, "grad_sq_norm": grad_sq_norm}
    return [record] if count else []


def measure_noise_scale(
    estimate: EpochNoiseScale,
    epoch: int,
    pl_module: pl.LightningModule,
    loss: Callable[..., Tensor],
    batch: Any,
) -> None:
    """Feed ``estimate`` the (tr Σ, |G|²) of ``batch``'s two halves
    (:func:`~lightning_tricks.gradients.noise_scale.half_batch_noise_parts`; batches of 2 samples or more)."""
    batch_size = extract_batch_size(batch)
    if batch_size >= 2:
        estimate.add(epoch, *half_batch_noise_parts(pl_module, loss, batch, batch_size))
