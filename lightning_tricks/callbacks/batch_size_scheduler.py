"""BatchSizeScheduler: change the training batch size between epochs (seed 004 §3.2, §4.3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.parsing import lightning_getattr
from torch import Tensor
from typing_extensions import override

from .. import batch_size_policies as policies
from .. import checks
from ..gradients.noise_scale import EpochNoiseScale, shared_noise_scale
from ..lr_scaling import check_scalable, scaling_factor
from ..outputs import BATCH_SIZE_SCHEDULER
from ..plotting import plot_batch_size_schedule
from . import _batch_size_trainer as glue
from ._base import TrickCallback, first_learning_rate, is_due, resolve_loss_fn
from ._batch_size_trainer import HISTORY_COLUMNS, HISTORY_FILE


class BatchSizeScheduler(TrickCallback):
    r"""Change the training batch size at epoch boundaries ("dynamic sampling", seed 004 §3.2, §4.3).

    At each epoch's start a **policy** (:mod:`lightning_tricks.batch_size_policies`) names the global
    batch size: any ``size_for(epoch, step, context) -> int`` reading the ``PolicyContext`` (sizes so
    far, ``max_epochs``, the last epoch's pooled noise scale, LR stages, ``callback_metrics``).
    Built-ins, by ``policy=`` or their arguments: ``sizes=[...]`` seed 004's equal stages
    (``multistep=True``: -MS), ``schedule={epoch: size}``, ``max_size=...`` increase-instead-of-decay,
    ``max_size=..., adaptive=True`` the norm test. B_noise comes from the run's shared estimate
    (:mod:`lightning_tricks.gradients.noise_scale`), fed by a ``FisherSpectrum``, else measured here on
    the halves of every ``noise_every_n_steps``-th batch (one extra forward/backward with
    ``compute_loss``/``loss_fn``, changing nothing trained). Rank 0's decision applies on every
    process; a policy's ``state_dict()`` is checkpointed.

    The per-process batch (size / world size) goes into the attribute ``batch_arg_name`` that
    ``train_dataloader()`` reads (as Lightning's ``BatchSizeFinder``); ``max_physical_batch_size``
    runs larger sizes as accumulated micro-batches with the gradient of one batch; ``lr_scaling``
    (``"linear"``, ``"sqrt"``) scales every LR and scheduler with the size
    (:mod:`lightning_tricks.lr_scaling`). Logged at each epoch's first step: ``batch_size/size``,
    ``physical``, ``accumulation``, ``lr`` (``noise_scale`` at its end); ``history`` (and
    ``batch_size.csv``) has a record per change; the fit-end figure ``batch_size/schedule`` draws
    :attr:`epochs`. Bad arguments raise ``TypeError``/``ValueError``; so do, at fit start, unequal
    stages (naming the ``max_epochs`` that fit), sizes the data, processes or optimisation cannot run.

    Example: a policy in ten lines, here doubling the batch every ``every`` epochs up to ``cap``::

        >>> import lightning as L
        >>> import torch
        >>> from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
        >>> class DoubleEvery:
        ...     def __init__(self, every: int, cap: int) -> None:
        ...         self.every, self.cap = every, cap
        ...     def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        ...         return min(self.cap, context.initial_size * 2 ** (epoch // self.every))
        >>> class Module(BoringModel):
        ...     batch_size = 2
        ...     def train_dataloader(self):
        ...         return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=self.batch_size)
        >>> scheduler = BatchSizeScheduler(DoubleEvery(every=2, cap=8))  # or BatchSizeScheduler.staged([2, 4, 8])
        >>> trainer = L.Trainer(max_epochs=6, callbacks=[scheduler], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(Module())
        >>> [(record["epoch"], record["size"]) for record in scheduler.history]
        [(0, 2), (2, 4), (4, 8)]
    """

    namespace = BATCH_SIZE_SCHEDULER.namespace
    identity_arguments = ("sizes", "schedule", "max_size", "adaptive", "multistep", "batch_arg_name")
    # the convenience arguments, read back from the policy they built (stored once, there)
    sizes, schedule, max_size, lr_milestones, gamma = glue.from_policy(
        "sizes", "schedule", "max_size", "lr_milestones", "gamma"
    )
    multistep, adaptive = glue.from_policy("multistep", "reads_noise_scale", default=False)
    (theta,), (growth,) = glue.from_policy("theta", default=1.0), glue.from_policy("growth", default=2.0)

    def __init__(
        self,
        policy: policies.BatchSizePolicy | None = None,
        sizes: Sequence[int] | None = None,
        schedule: Mapping[int, int] | None = None,
        max_size: int | None = None,
        multistep: bool = False,
        lr_milestones: Sequence[int | float] | None = None,
        gamma: float | None = None,
        adaptive: bool = False,
        theta: float = 1.0,
        growth: float = 2.0,
        batch_arg_name: str = "batch_size",
        lr_scaling: str = "none",
        max_physical_batch_size: int | None = None,
        noise_every_n_steps: int = 10,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        arguments = (sizes, schedule, max_size, multistep, lr_milestones, gamma, adaptive, theta, growth)
        self.policy = policies.policy_from_arguments(policy, *arguments)
        self.lr_scaling = policies.implied_lr_scaling(self.policy, lr_scaling)
        self.batch_arg_name = glue.attribute_name("batch_arg_name", batch_arg_name)
        self.max_physical_batch_size = checks.integer(
            "max_physical_batch_size", max_physical_batch_size, 1, allow_none=True
        )
        self.noise_every_n_steps = checks.integer("noise_every_n_steps", noise_every_n_steps, minimum=1)
        self.loss_fn = checks.loss_fn(loss_fn)
        self._noise = EpochNoiseScale()  # the run's shared one from setup on
        self.reset_fit_state()

    @classmethod
    def staged(cls, sizes: Sequence[int], multistep: bool = False, **kwargs: Any) -> BatchSizeScheduler:
        """Seed 004's dynamic sampling: ``len(sizes)`` equal stages (``multistep``: per LR stage)."""
        return cls(sizes=sizes, multistep=multistep, **kwargs)

    @classmethod
    def noise_adaptive(
        cls, max_size: int, theta: float = 1.0, growth: float = 2.0, **kwargs: Any
    ) -> BatchSizeScheduler:
        """The norm test: grow the batch while |B| < B_noise/θ², up to ``max_size``."""
        return cls(max_size=max_size, adaptive=True, theta=theta, growth=growth, **kwargs)

    @classmethod
    def increase_instead_of_decay(cls, max_size: int, **kwargs: Any) -> BatchSizeScheduler:
        """Smith et al.'s policy: the batch grows by 1/γ at each LR milestone, up to ``max_size``."""
        return cls(max_size=max_size, **kwargs)

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        return glue.dashboard_layout(self.adaptive)

    @override
    def metric_descriptions(self) -> dict[str, str]:
        return glue.metric_descriptions(self.lr_scaling)

    @property
    def epochs(self) -> list[tuple[int, int, float]]:
        """``(epoch, size, lr)`` of every trained epoch, as logged at its first step (the figure's data)."""
        return sorted((epoch, size, lr) for epoch, (size, lr) in self._epochs.items())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            glue.check_trainer(trainer, pl_module, self.batch_arg_name)
            self._noise = shared_noise_scale(trainer)

    @override
    def reset_fit_state(self) -> None:
        self.size: int | None = None  # the current global batch size (None before training)
        self.history: list[dict[str, Any]] = []  # one record per change, as HISTORY_COLUMNS
        self.noise_scale = math.nan  # the latest epoch's pooled B_noise a policy read
        self._initial_size: int | None = None
        self._decided_epoch: int | None = None  # the epoch whose size is set (checkpointed)
        self._epochs: dict[int, tuple[int, float]] = {}  # epoch -> (size, LR at its start)
        self._saved_noise: list[dict[str, float]] = []  # our own estimate's pool, from a checkpoint
        self._loss: Callable[[pl.LightningModule, Any], Tensor] | None = None  # set when we measure B_noise
        self._steps_done = 0  # optimiser steps taken (batches that stepped), kept in checkpoints
        self._loss_factor = 1.0  # the current micro-batch's accumulation weight
        self._logged_epoch: int | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.lr_scaling != "none":
            check_scalable(glue.schedulers(trainer), "BatchSizeScheduler(lr_scaling=...)")
        if self.adaptive and not self._noise.feeders - {type(self).__name__}:  # nobody else measures B_noise
            self._loss = resolve_loss_fn(pl_module, self.loss_fn, "BatchSizeScheduler(adaptive=True)")
            shared_noise_scale(trainer, feeder=type(self).__name__).load_state_dict(self._saved_noise)
        if self._initial_size is None:
            self._initial_size = lightning_getattr(pl_module, self.batch_arg_name) * trainer.world_size
        if hasattr(self.policy, "validate") and not trainer.fast_dev_run:  # a dry run: max_epochs = 1
            self.policy.validate(self._context(trainer, 0))
        glue.check_sizes(trainer, pl_module, glue.known_sizes(self.policy), self.max_physical_batch_size)
        if self.size is None:  # a fresh fit: the first epoch's size, at the configured LR
            self._decide(trainer, pl_module, 0)
        else:  # resumed: the size of the checkpoint, before the first loader is built
            self._set_loader_size(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        glue.check_dataset_size(trainer, glue.known_sizes(self.policy))
        if self._decided_epoch != trainer.current_epoch:  # a checkpoint saved before our epoch-end hook
            self._decide(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._loss_factor = glue.window_weight(trainer, batch_idx)
        if trainer.current_epoch != self._logged_epoch:  # the epoch's first batch (also after a resume)
            self._logged_epoch = trainer.current_epoch
            self._log_size(trainer)
        if self._loss is not None and is_due(self.training_step(trainer), self.noise_every_n_steps):
            glue.measure_noise_scale(self._noise, trainer.current_epoch, pl_module, self._loss, batch)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._loss_factor != 1.0 and loss.requires_grad:
            loss.register_hook(partial(glue.scaled, factor=self._loss_factor))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():  # this batch stepped the optimisers
            self._steps_done = self.training_step(trainer) + 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._decide(trainer, pl_module, trainer.current_epoch + 1)
        if self.adaptive:
            self.log_scalars(
                trainer, {f"{self.namespace}/noise_scale": self.noise_scale}, self.training_step(trainer)
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epochs and trainer.is_global_zero:
            figure = plot_batch_size_schedule(*zip(*self.epochs))
            self.log_figure(
                trainer, f"{self.namespace}/schedule", figure, max(self.training_step(trainer) - 1, 0)
            )
        super().on_fit_end(trainer, pl_module)

    @override
    def get_state(self) -> dict[str, Any]:
        return {
            "initial_size": self._initial_size,
            "size": self.size,
            "decided_epoch": self._decided_epoch,
            "history": list(self.history),
            "epochs": [list(row) for row in self.epochs],
            "steps_done": self._steps_done,
            "noise_parts": self._noise.state_dict() if self._loss is not None else [],
            **({"policy": self.policy.state_dict()} if hasattr(self.policy, "state_dict") else {}),
        }

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._initial_size, self.size = state["initial_size"], state["size"]
        self._decided_epoch = state.get("decided_epoch")  # older checkpoints: decided again
        self.history = list(state["history"])
        self._epochs = {int(e): (int(size), float(lr)) for e, size, lr in state.get("epochs", [])}
        self._steps_done = state.get("steps_done", 0)
        self._saved_noise = state.get("noise_parts", glue.legacy_noise_parts(state))
        if "policy" in state and hasattr(self.policy, "load_state_dict"):
            self.policy.load_state_dict(state["policy"])

    def _context(self, trainer: pl.Trainer, epoch: int) -> policies.PolicyContext:
        """What the policy may read when it decides ``epoch``'s size; B_noise is the previous epoch's."""
        if self.adaptive:
            per_process = self._loss is not None  # our own measurements: each process's
            self.noise_scale = glue.epoch_noise_scale(trainer, self._noise, epoch - 1, per_process)
        decisions = tuple(policies.Decision(r["epoch"], r["step"], r["size"]) for r in self.history)
        return glue.policy_context(trainer, self._initial_size, self.size, self.noise_scale, decisions)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Ask the policy for ``epoch``'s size (rank 0's answer on every process) and switch to it."""
        step = self._next_step(trainer)
        size = trainer.strategy.broadcast(self.policy.size_for(epoch, step, self._context(trainer, epoch)))
        checks.integer(f"the size {type(self.policy).__name__} chose for epoch {epoch}", size, minimum=1)
        self._decided_epoch = epoch
        if size == self.size:
            return
        glue.check_sizes(
            trainer, pl_module, {f"the size of epoch {epoch}": size}, self.max_physical_batch_size
        )
        if self.size is not None:  # the LR of the first size is the configured one
            glue.scale_learning_rates(trainer, scaling_factor(self.lr_scaling, size / self.size))
        self.size = size
        row = (
            epoch,
            step,
            size,
            *self._set_loader_size(trainer, pl_module),
            first_learning_rate(trainer, math.nan),
        )
        self.history.append(dict(zip(HISTORY_COLUMNS, row)))
        self.write_table(HISTORY_FILE, HISTORY_COLUMNS, self.history)

    def _set_loader_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int]:
        return glue.set_loader_size(trainer, pl_module, self.batch_arg_name, *self._split(trainer))

    def _log_size(self, trainer: pl.Trainer) -> None:
        """Log size, physical batch, accumulation and LR at the current step (the epoch's first)."""
        lr = first_learning_rate(trainer, default=math.nan)
        self._epochs[trainer.current_epoch] = (self.size, lr)
        metrics = glue.size_metrics(self.size, *self._split(trainer), lr)
        self.log_scalars(trainer, metrics, self._next_step(trainer))

    def _split(self, trainer: pl.Trainer) -> tuple[int, int]:
        return policies.split_physical(self.size, self.max_physical_batch_size, trainer.world_size)

    def _next_step(self, trainer: pl.Trainer) -> int:
        """The index of the next optimiser step (Lightning's lags one after restoring a checkpoint saved
        at a batch's end, until the first batch; ours, in the checkpoint, does not)."""
        return max(self.training_step(trainer), self._steps_done)
