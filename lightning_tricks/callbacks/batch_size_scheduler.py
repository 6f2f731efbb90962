"""BatchSizeScheduler: change the training batch size between epochs (seed 004 §3.2, §4.3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr
from torch import Tensor
from typing_extensions import override

from .. import checks
from ..batch_size_policies import (
    BatchSizePolicy,
    Decision,
    PolicyContext,
    implied_lr_scaling,
    policy_from_arguments,
    split_physical,
)
from ..gradients.noise_scale import EpochNoiseScale, half_batch_noise_parts, shared_noise_scale
from ..lr_scaling import check_scalable, scale_learning_rates, scaling_factor
from ..outputs import BATCH_SIZE_SCHEDULER
from ..plotting import plot_batch_size_schedule
from . import _batch_size_trainer as loader
from ._base import TrickCallback, first_learning_rate, host_values, is_due, resolve_loss_fn

HISTORY_FILE = BATCH_SIZE_SCHEDULER.files["history"]
HISTORY_COLUMNS = ("epoch", "step", "size", "physical", "accumulation", "lr")


def _from_policy(name: str, default: Any = None) -> property:
    """A convenience argument read back from the policy it built: stored once, in the policy."""
    return property(lambda self: getattr(self.policy, name, default), doc=f"The policy's ``{name}``.")


class BatchSizeScheduler(TrickCallback):
    r"""Change the training batch size at epoch boundaries ("dynamic sampling", seed 004 §3.2, §4.3).

    At each epoch's start a **policy** (:mod:`lightning_tricks.batch_size_policies`) names the global
    batch size: any object with ``size_for(epoch, step, context) -> int``, reading what the
    :class:`~lightning_tricks.batch_size_policies.PolicyContext` holds (``max_epochs``, the current
    and initial sizes, the epoch's pooled noise scale, the LR stages, the decisions so far,
    ``trainer.callback_metrics``). The built-ins, by ``policy=`` or their arguments: ``sizes=[...]``
    seed 004's equal stages (``multistep=True``: -MS, per LR stage, ``lr_milestones`` as epochs or
    fractions, else a ``MultiStepLR``'s), ``schedule={epoch: size}``, ``max_size=...`` Smith et al.'s
    increase-instead-of-decay (linear LR scaling, ``gamma`` else the ``MultiStepLR``'s), and
    ``max_size=..., adaptive=True`` the norm test (grow by ``growth`` while |B| < B_noise/θ²). The
    noise scale B_noise is the epoch's, pooled (:mod:`lightning_tricks.gradients.noise_scale`): fed by
    an attached ``FisherSpectrum``, or else measured here from the two halves of every
    ``noise_every_n_steps``-th batch (one extra forward/backward, with ``compute_loss`` or
    ``loss_fn``, that changes nothing the model trains). A decision is taken on rank 0 and broadcast;
    a policy's ``state_dict()`` goes into the checkpoint.

    **Mechanism.** The callback writes the per-process batch (size / world size) into the attribute
    ``batch_arg_name`` that ``train_dataloader()`` reads (module, ``hparams`` or datamodule, as
    Lightning's ``BatchSizeFinder``) and rebuilds the loader. ``max_physical_batch_size`` caps what
    one process computes at once: a larger size runs as accumulated micro-batches, the gradient of
    one large batch (a ragged last window is reweighted), automatic optimisation only.
    ``lr_scaling="linear"``/``"sqrt"`` multiplies every LR by new/old size or its root
    (:mod:`lightning_tricks.lr_scaling`, torch's 15 schedulers). Logged at each epoch's first step:
    ``batch_size/size``, ``physical``, ``accumulation``, ``lr`` (and ``noise_scale`` for policies
    that read it); :attr:`history` (also ``batch_size.csv``) holds one record per change, and at fit
    end the figure ``batch_size/schedule`` draws :attr:`epochs`. A resumed run continues the schedule.

    Raises:
        TypeError, ValueError: bad arguments; at fit start a trainer without the attribute, with its
            own accumulation, stages that are not equal whole epochs (naming the ``max_epochs`` that
            fit), a scheduler ``lr_scaling`` cannot scale, sizes not divisible by the processes or
            above an epoch's samples, or accumulation under manual optimisation.

    Example: a policy in ten lines, here doubling the batch every ``every`` epochs up to ``cap``::

        >>> import lightning as L
        >>> import torch
        >>> from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
        >>> class DoubleEvery:
        ...     def __init__(self, every: int, cap: int) -> None:
        ...         self.every, self.cap = every, cap
        ...
        ...     def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        ...         return min(self.cap, context.initial_size * 2 ** (epoch // self.every))
        >>> class Module(BoringModel):
        ...     batch_size = 2
        ...
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
    sizes, schedule, max_size = _from_policy("sizes"), _from_policy("schedule"), _from_policy("max_size")
    multistep, lr_milestones, gamma = (
        _from_policy("multistep", False),
        _from_policy("lr_milestones"),
        _from_policy("gamma"),
    )
    theta, growth = _from_policy("theta", 1.0), _from_policy("growth", 2.0)
    adaptive = property(
        lambda self: bool(getattr(self.policy, "reads_noise_scale", False)), doc="A noise-scale policy."
    )

    def __init__(
        self,
        policy: BatchSizePolicy | None = None,
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
        self.policy = policy_from_arguments(policy, *arguments)
        self.lr_scaling = implied_lr_scaling(self.policy, lr_scaling)
        if not isinstance(batch_arg_name, str) or not batch_arg_name:
            raise TypeError(
                f"`batch_arg_name` must be the name of the loader's batch-size attribute; got {batch_arg_name!r}."
            )
        self.batch_arg_name = batch_arg_name
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
        layout = {"batch size (seed 004 §4.3)": ["batch_size/size", "batch_size/physical"]}
        layout["learning rate with the batch size"] = ["batch_size/lr"]
        if self.adaptive:
            layout["gradient-noise scale (adaptive policy)"] = ["batch_size/noise_scale"]
        return layout

    @override
    def metric_descriptions(self) -> dict[str, str]:
        return {
            tag: text.format(lr_scaling=self.lr_scaling) for tag, text in loader.METRIC_DESCRIPTIONS.items()
        }

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record ``{"epoch", "step", "size", "physical", "accumulation", "lr"}`` per change."""
        return self._history

    @property
    def epochs(self) -> list[tuple[int, int, float]]:
        """``(epoch, size, lr)`` of every trained epoch, as logged at its first step (the figure's data)."""
        return sorted((epoch, size, lr) for epoch, (size, lr) in self._epochs.items())

    @property
    def noise_scale(self) -> float:
        """The latest epoch's pooled B_noise = tr Σ / |G|² a policy read (NaN before one)."""
        return self._noise_scale

    @property
    def size(self) -> int | None:
        """The current global batch size (``None`` before training starts)."""
        return self._size

    # -- Lightning hooks -----------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            loader.check_trainer(trainer, pl_module, self.batch_arg_name)
            self._noise = shared_noise_scale(trainer)

    @override
    def reset_fit_state(self) -> None:
        self._initial_size: int | None = None
        self._size: int | None = None
        self._decided_epoch: int | None = None  # the epoch whose size is set (checkpointed)
        self._history: list[dict[str, Any]] = []
        self._epochs: dict[int, tuple[int, float]] = {}  # epoch -> (size, LR at its start)
        self._saved_noise: list[dict[str, float]] = []  # our own estimate's pool, from a checkpoint
        self._noise_scale = math.nan
        self._loss: Callable[[pl.LightningModule, Any], Tensor] | None = None  # set when we measure B_noise
        self._steps_done = 0  # optimiser steps taken (batches that stepped), kept in checkpoints
        self._loss_factor = 1.0  # the current micro-batch's accumulation weight
        self._logged_epoch: int | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._lr_milestones, self._lr_gamma = loader.multistep_lr(trainer)
        if self.lr_scaling != "none":
            check_scalable(
                (c.scheduler for c in trainer.lr_scheduler_configs), "BatchSizeScheduler(lr_scaling=...)"
            )
        if self.adaptive and not self._noise.feeders - {type(self).__name__}:  # nobody else measures B_noise
            self._loss = resolve_loss_fn(pl_module, self.loss_fn, "BatchSizeScheduler(adaptive=True)")
            shared_noise_scale(trainer, feeder=type(self).__name__).load_state_dict(self._saved_noise)
        if self._initial_size is None:
            self._initial_size = lightning_getattr(pl_module, self.batch_arg_name) * trainer.world_size
        if hasattr(self.policy, "validate") and not trainer.fast_dev_run:  # a dry run: max_epochs = 1
            self.policy.validate(self._context(trainer, 0))
        loader.check_sizes(trainer, pl_module, self._known_sizes(), self.max_physical_batch_size)
        if self._size is None:  # a fresh fit: the first epoch's size, at the configured LR
            self._decide(trainer, pl_module, 0, scale_lr=False)
        else:  # resumed: the size of the checkpoint, before the first loader is built
            self._set_loader_size(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader.check_dataset_size(trainer, self._known_sizes())
        if self._decided_epoch != trainer.current_epoch:  # a checkpoint saved before our epoch-end hook
            self._decide(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._loss_factor = loader.window_weight(trainer, batch_idx)
        if trainer.current_epoch != self._logged_epoch:  # the epoch's first batch (also after a resume)
            self._logged_epoch = trainer.current_epoch
            self._log_size(trainer)
        if self._loss is not None and is_due(self.training_step(trainer), self.noise_every_n_steps):
            batch_size = extract_batch_size(batch)
            if batch_size >= 2:
                parts = half_batch_noise_parts(pl_module, self._loss, batch, batch_size)
                self._noise.add(trainer.current_epoch, *parts)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._loss_factor != 1.0 and loss.requires_grad:
            loss.register_hook(partial(loader.scaled, factor=self._loss_factor))

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
                trainer, {f"{self.namespace}/noise_scale": self._noise_scale}, self.training_step(trainer)
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epochs and trainer.is_global_zero:
            figure = plot_batch_size_schedule(*zip(*self.epochs))
            self.log_figure(
                trainer, f"{self.namespace}/schedule", figure, max(self.training_step(trainer) - 1, 0)
            )

    @override
    def get_state(self) -> dict[str, Any]:
        return {
            "initial_size": self._initial_size,
            "size": self._size,
            "decided_epoch": self._decided_epoch,
            "history": list(self._history),
            "epochs": [list(row) for row in self.epochs],
            "steps_done": self._steps_done,
            "noise_parts": self._noise.state_dict() if self._loss is not None else [],
            **({"policy": self.policy.state_dict()} if hasattr(self.policy, "state_dict") else {}),
        }

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._initial_size, self._size = state["initial_size"], state["size"]
        self._decided_epoch = state.get("decided_epoch")  # older checkpoints: decided again
        self._history = list(state["history"])
        self._epochs = {int(e): (int(size), float(lr)) for e, size, lr in state.get("epochs", [])}
        self._steps_done = state.get("steps_done", 0)
        self._saved_noise = state.get("noise_parts", loader.legacy_noise_parts(state))
        if "policy" in state and hasattr(self.policy, "load_state_dict"):
            self.policy.load_state_dict(state["policy"])

    # -- internals -----------------------------------------------------------------------------

    def _context(self, trainer: pl.Trainer, epoch: int) -> PolicyContext:
        """What the policy may read when it decides ``epoch``'s size; B_noise is the previous epoch's."""
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if self.adaptive:
            self._noise_scale = loader.epoch_noise_scale(
                trainer, self._noise, epoch - 1, self._loss is not None
            )
        return PolicyContext(
            max_epochs=max_epochs,
            initial_size=self._initial_size,
            size=self._size,
            world_size=trainer.world_size,
            noise_scale=self._noise_scale,
            lr_milestones=self._lr_milestones,
            lr_gamma=self._lr_gamma,
            decisions=tuple(Decision(r["epoch"], r["step"], r["size"]) for r in self._history),
            metrics=host_values({k: v for k, v in trainer.callback_metrics.items() if v.numel() == 1}),
        )

    def _decide(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, scale_lr: bool = True
    ) -> None:
        """Ask the policy for ``epoch``'s size (rank 0's answer on every process) and switch to it."""
        step = self._next_step(trainer)
        size = trainer.strategy.broadcast(self.policy.size_for(epoch, step, self._context(trainer, epoch)))
        checks.integer(f"the size {type(self.policy).__name__} chose for epoch {epoch}", size, minimum=1)
        self._decided_epoch = epoch
        if size == self._size:
            return
        loader.check_sizes(
            trainer, pl_module, {f"the size of epoch {epoch}": size}, self.max_physical_batch_size
        )
        if scale_lr and self._size is not None and self.lr_scaling != "none":
            schedulers = (config.scheduler for config in trainer.lr_scheduler_configs)
            scale_learning_rates(
                trainer.optimizers, schedulers, scaling_factor(self.lr_scaling, size / self._size)
            )
        self._size = size
        physical, accumulation = self._set_loader_size(trainer, pl_module)
        lr = first_learning_rate(trainer, default=math.nan)
        values = (epoch, step, size, physical, accumulation, lr)
        self._history.append(dict(zip(HISTORY_COLUMNS, values)))
        self.write_table(HISTORY_FILE, HISTORY_COLUMNS, self._history)

    def _set_loader_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int]:
        """Write the per-process batch and accumulation; the training loader is rebuilt before the next epoch."""
        physical, accumulation = split_physical(self._size, self.max_physical_batch_size, trainer.world_size)
        lightning_setattr(pl_module, self.batch_arg_name, physical)
        trainer.accumulate_grad_batches = accumulation
        trainer.fit_loop._combined_loader = None  # as Lightning's batch-size finder: rebuilt by setup_data()
        return physical, accumulation

    def _log_size(self, trainer: pl.Trainer) -> None:
        """Log size, physical batch, accumulation and LR at the current step."""
        physical, accumulation = split_physical(self._size, self.max_physical_batch_size, trainer.world_size)
        lr = first_learning_rate(trainer, default=math.nan)
        metrics = {"size": self._size, "physical": physical, "accumulation": accumulation, "lr": lr}
        self._epochs[trainer.current_epoch] = (self._size, lr)
        self.log_scalars(
            trainer, {f"{self.namespace}/{k}": float(v) for k, v in metrics.items()}, self._next_step(trainer)
        )

    def _next_step(self, trainer: pl.Trainer) -> int:
        """The index of the next optimiser step. Lightning's counter lags one step between the
        restore of a checkpoint saved at a batch's end and the first batch (it adds it back then);
        ours, kept in the checkpoint, does not."""
        return max(self.training_step(trainer), self._steps_done)

    def _known_sizes(self) -> dict[str, int]:
        """``{argument: size}`` of every size the policy names in advance (checked before training)."""
        return self.policy.known_sizes() if hasattr(self.policy, "known_sizes") else {}
