"""BatchSizeScheduler: change the training batch size between epochs (seed 004 §3.2, §4.3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
from torch import Tensor
from torch.optim import lr_scheduler as schedulers
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader
from typing_extensions import override

from .. import checks
from ..batch_size_policies import (
    DecayToBatchPolicy,
    ExplicitPolicy,
    NormTestPolicy,
    StagedPolicy,
    _check_size,
    split_physical,
)
from ..gradients.noise_scale import half_batch_noise_parts
from ..gradients.spectrum import noise_scale_ratio
from ..outputs import BATCH_SIZE_SCHEDULER
from ..plotting import plot_batch_size_schedule
from ._base import TrickCallback, first_learning_rate, is_due, resolve_loss_fn
from .fisher_spectrum import FisherSpectrum

LR_SCALINGS = ("none", "linear", "sqrt")
HISTORY_FILE = BATCH_SIZE_SCHEDULER.files["history"]
HISTORY_COLUMNS = ("epoch", "step", "size", "physical", "accumulation", "lr")
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
"""The schedulers whose LR ``lr_scaling`` can scale exactly, and the learning-rate values each
recomputes its LR from besides ``base_lrs`` and the param groups' :data:`LR_GROUP_KEYS`."""


class BatchSizeScheduler(TrickCallback):
    r"""Change the training batch size at epoch boundaries ("dynamic sampling", seed 004).

    Seed ``004_e5d92837cb57ce8a.txt`` §3.2 and §4.3 train with a mini-batch size that changes during
    training: five equal stages with their own sizes (``s32-to-512``: 32, 64, 128, 256, 512;
    ``s512-to-32`` the reverse; ``s16-to-64``: 16, 16, 32, 32, 64), or, with ``-MS``, the sequence
    re-run inside each learning-rate stage; Table 1 reports the same accuracy as the best fixed
    size in less time (CIFAR-10 ResNet: s32-to-128 7.0 h against 7.7 h for s32).

    **Policies.** ``sizes=[...]``: ``len(sizes)`` equal stages over ``max_epochs``; with
    ``multistep=True`` the stages are laid out again between consecutive learning-rate milestones
    (``lr_milestones`` as epochs, or as fractions of ``max_epochs`` in (0, 1) like the project's
    classifier, or read from a ``MultiStepLR`` with ``interval="epoch"``). Sizes change at epoch
    boundaries, so every stage must last the same whole number of epochs: ``max_epochs`` (with
    -MS, each learning-rate stage) a multiple of ``len(sizes)``; otherwise ``on_fit_start``
    raises, naming the ``max_epochs`` that fit (s32-to-512-MS: 20, 40, ...). Each size then
    trains on the same samples with -MS as without (seed 004 §4.3: the two "share the same
    amount of units of mini-batch sizes").
    ``schedule={epoch: size}``: from each listed epoch on, that size (the idiom of Lightning's
    ``GradientAccumulationScheduler``; before the first key the loader's own size).
    ``max_size=...``: increase the batch instead of decaying the LR (Smith et al. 2018, cited by
    seeds 000 and 004): at each LR milestone the batch grows by 1/γ until ``max_size`` while the
    linear LR scaling cancels the scheduled decay; once the batch is at ``max_size`` the LR decays.
    ``max_size=..., adaptive=True``: grow the batch while the *norm test* of Byrd et al. (seed 004
    ref. [37]) fails, tr(Σ)/|B| > θ²·|G|², i.e. while |B| < B_noise/θ² with B_noise = tr Σ / |G|²
    the gradient-noise scale: after each epoch the batch grows by ``growth`` until it passes (up to
    ``max_size``); the batch never shrinks. B_noise = tr Σ / |G|² with both parts unbiased and
    averaged over the epoch before dividing (McCandlish et al. 2018): an attached ``FisherSpectrum``'s
    :attr:`~FisherSpectrum.epoch_noise_scale` (no extra cost), or else the callback's own estimate
    from the gradients of the two halves of every ``noise_every_n_steps``-th batch (McCandlish et
    al. appendix A.1, :func:`~lightning_tricks.gradients.noise_scale.half_batch_noise_parts`): one
    extra forward/backward of that batch at the current parameters, with the module's
    ``compute_loss(batch)`` or ``loss_fn``, that changes nothing the model trains.

    **Mechanism.** The size is the *global* batch of one optimiser step. The callback writes the
    per-process batch into the attribute ``batch_arg_name`` that ``train_dataloader()`` reads — on
    the LightningModule, its ``hparams`` or the datamodule, the attribute Lightning's
    ``BatchSizeFinder`` uses — and makes the Trainer rebuild the training loader before the epoch.
    Under DDP the per-process size is ``size / world_size`` (an error where it does not divide).
    ``max_physical_batch_size`` caps the batch one process computes at once: a larger size runs as
    ``physical × accumulation`` micro-batches (``trainer.accumulate_grad_batches``), the same
    gradient as one large batch: Lightning divides each micro-batch loss by the accumulation A,
    right for full windows only, so the loss gradient of a micro-batch of n samples in the epoch's
    last window of N samples is multiplied by A·n/N (no hook on full windows). Accumulation needs
    automatic optimisation (Lightning ignores it otherwise): under manual optimisation a size
    that needs it raises. A size larger than an epoch's samples raises before training. A
    resumed run continues the schedule where it stopped, its history at the same steps.

    **Learning rate.** ``lr_scaling="linear"`` multiplies every learning rate by new/old size at
    each change (the linear scaling rule of Goyal et al. 2017, seed 003), ``"sqrt"`` by its square
    root, ``"none"`` leaves it; the configured LR is that of the first size. The factor is applied to
    the param groups' :data:`LR_GROUP_KEYS` and to every value a scheduler recomputes its LR from
    (``base_lrs`` and :data:`SCALED_SCHEDULER_VALUES`), so each of torch's 15 schedulers, nested
    in ``ChainedScheduler``/``SequentialLR`` too, continues exactly ×factor; other schedulers are
    refused at fit start.

    Logged at the first step of every epoch: ``batch_size/size``, ``batch_size/physical``,
    ``batch_size/accumulation`` and ``batch_size/lr`` (first param group of the first optimiser).
    ``history`` holds one record ``{"epoch", "step", "size", "physical", "accumulation", "lr"}`` per
    change, also written to ``batch_size.csv`` in the run folder. At fit end the figure
    ``batch_size/schedule`` (also ``batch_size.schedule.png``) shows the size of every trained epoch as
    a step plot and the LR at each epoch's start on a second, logarithmic axis
    (:func:`lightning_tricks.plotting.plot_batch_size_schedule`; :attr:`epochs` holds its data).

    Args:
        sizes: staged policy: the batch size of each of ``len(sizes)`` equal stages.
        schedule: explicit policy: ``{epoch: size}``.
        max_size: increase-instead-of-decay and adaptive policies: the largest batch size.
            Exactly one of ``sizes``, ``schedule`` and ``max_size``.
        adaptive: with ``max_size``, the norm-test policy instead of increase-instead-of-decay.
        theta: the norm test's θ (> 0); smaller θ asks for a less noisy gradient (larger batches).
        growth: the factor by which the adaptive policy grows the batch (> 1).
        multistep: re-run ``sizes`` inside each learning-rate stage (seed 004's -MS).
        lr_milestones: the epochs (ints) or fractions of training (floats in (0, 1)) where the
            learning rate decays, for ``multistep`` and ``max_size``; ``None`` reads a
            ``MultiStepLR``'s milestones.
        gamma: the LR decay factor at each milestone, for ``max_size``; ``None`` reads the
            ``MultiStepLR``'s.
        batch_arg_name: the attribute holding the loader's batch size.
        lr_scaling: ``"none"``, ``"linear"`` or ``"sqrt"`` (``max_size`` implies ``"linear"``).
        max_physical_batch_size: the largest batch one process computes at once, or ``None``.
        noise_every_n_steps: the adaptive policy's own estimate measures the steps with
            ``step % n == 0`` (without FisherSpectrum).
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss`` for the own estimate, for modules
            without ``compute_loss``.

    Raises:
        TypeError: arguments of the wrong kind.
        ValueError: bad values; at ``setup``, a module/datamodule without ``batch_arg_name``, a
            Trainer with ``accumulate_grad_batches > 1`` or a ``GradientAccumulationScheduler``, a
            staged policy without ``max_epochs``, or a size not divisible by the number of processes;
            at fit start, unequal stages, ``lr_scaling`` with a scheduler it cannot scale, or
            accumulation under manual optimisation; at train start, a size above the dataset's.

    Example::

        >>> import lightning as L
        >>> import torch
        >>> from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
        >>> class Module(BoringModel):
        ...     batch_size = 2
        ...
        ...     def train_dataloader(self):
        ...         return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=self.batch_size)
        >>> scheduler = BatchSizeScheduler.staged([4, 8, 16])
        >>> trainer = L.Trainer(max_epochs=3, callbacks=[scheduler], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(Module())
        >>> [record["size"] for record in scheduler.history]
        [4, 8, 16]
    """

    namespace = BATCH_SIZE_SCHEDULER.namespace
    identity_arguments = ("sizes", "schedule", "max_size", "adaptive", "multistep", "batch_arg_name")

    def __init__(
        self,
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
        _check_argument_types(sizes, schedule, lr_milestones, batch_arg_name, multistep, adaptive, loss_fn)
        if sum(policy is not None for policy in (sizes, schedule, max_size)) != 1:
            raise ValueError(
                "BatchSizeScheduler needs exactly one of `sizes` (staged), `schedule` ({epoch: size}) and "
                "`max_size` (increase the batch instead of decaying the LR)."
            )
        if multistep and sizes is None:
            raise ValueError("`multistep=True` re-runs `sizes` inside each LR stage; it needs `sizes`.")
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"`lr_scaling` must be one of {LR_SCALINGS}; got {lr_scaling!r}.")
        if adaptive and max_size is None:
            raise ValueError("`adaptive=True` grows the batch up to `max_size`; it needs `max_size`.")
        smith = max_size is not None and not adaptive
        if smith and lr_scaling == "sqrt":
            raise ValueError(
                "`max_size` cancels each LR decay by the linear scaling rule; use lr_scaling='linear'."
            )
        if max_size is not None:
            _check_size("max_size", max_size)
        if gamma is not None and not smith:
            raise ValueError(
                "`gamma` is the LR decay that the `max_size` policy replaces; it needs `max_size`."
            )
        if max_physical_batch_size is not None and (
            isinstance(max_physical_batch_size, bool)
            or not isinstance(max_physical_batch_size, int)
            or max_physical_batch_size < 1
        ):
            raise ValueError(
                f"`max_physical_batch_size` must be None or an int >= 1; got {max_physical_batch_size!r}."
            )
        self.sizes = None if sizes is None else tuple(sizes)
        self.schedule = None if schedule is None else dict(schedule)
        self.max_size = max_size
        self.multistep = multistep
        self.gamma = gamma
        self.adaptive, self.theta, self.growth = adaptive, theta, growth
        # the policy, validated now; the increase-instead-of-decay one reads γ at fit start if not given
        self.policy = None if smith and gamma is None else self._policy(gamma)
        self.lr_milestones = _checked_milestones(lr_milestones)
        self.batch_arg_name = batch_arg_name
        self.lr_scaling = "linear" if smith else lr_scaling
        self.max_physical_batch_size = max_physical_batch_size
        self.noise_every_n_steps = checks.integer("noise_every_n_steps", noise_every_n_steps, minimum=1)
        self.loss_fn = checks.loss_fn(loss_fn)
        self._fisher: FisherSpectrum | None = None
        self._loss: Callable[[pl.LightningModule, Any], Tensor] | None = None
        self._milestones: list[int] = []
        self.reset_fit_state()

    @classmethod
    def staged(cls, sizes: Sequence[int], multistep: bool = False, **kwargs: Any) -> BatchSizeScheduler:
        """Seed 004's dynamic sampling: ``len(sizes)`` equal stages (``multistep``: per LR stage)."""
        return cls(sizes=sizes, multistep=multistep, **kwargs)

    @classmethod
    def noise_adaptive(
        cls, max_size: int, theta: float = 1.0, growth: float = 2.0, **kwargs: Any
    ) -> BatchSizeScheduler:
        """The norm test: grow the batch while |B| < B_noise/θ², up to ``max_size`` (needs FisherSpectrum)."""
        return cls(max_size=max_size, adaptive=True, theta=theta, growth=growth, **kwargs)

    @classmethod
    def increase_instead_of_decay(cls, max_size: int, **kwargs: Any) -> BatchSizeScheduler:
        """Smith et al.'s policy: the batch grows by 1/γ at each LR milestone, up to ``max_size``."""
        return cls(max_size=max_size, **kwargs)

    def _policy(
        self, gamma: float | None
    ) -> StagedPolicy | ExplicitPolicy | DecayToBatchPolicy | NormTestPolicy:
        if self.adaptive:
            return NormTestPolicy(self.theta, self.growth, self.max_size)
        if self.sizes is not None:
            return StagedPolicy(self.sizes, self.multistep)
        if self.schedule is not None:
            return ExplicitPolicy(self.schedule)
        return DecayToBatchPolicy(gamma, self.max_size)

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        return {
            "batch size (seed 004 §4.3)": ["batch_size/size", "batch_size/physical"],
            "learning rate with the batch size": ["batch_size/lr"],
            "gradient-noise scale (adaptive policy)": ["batch_size/noise_scale"],
        }

    @override
    def metric_descriptions(self) -> dict[str, str]:
        return {
            "batch_size/size": "The global batch size of the epoch's optimiser steps (dynamic sampling, seed 004 §4.3).",
            "batch_size/physical": "The batch one process computes at once (size / processes / accumulation).",
            "batch_size/accumulation": "Micro-batches accumulated per optimiser step (max_physical_batch_size).",
            "batch_size/lr": f"The first param group's learning rate at the epoch's first step (lr_scaling={self.lr_scaling!r}).",
            "batch_size/noise_scale": "The adaptive policy's B_noise = tr Σ / |G|² of the epoch (McCandlish et al. 2018).",
        }

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record ``{"epoch", "step", "size", "physical", "accumulation", "lr"}`` per change."""
        return self._history

    @property
    def epochs(self) -> list[tuple[int, int, float]]:
        """``(epoch, size, lr)`` of every trained epoch, as logged at its first step."""
        return sorted((epoch, size, lr) for epoch, (size, lr) in self._epochs.items())

    @property
    def noise_scale(self) -> float:
        """The adaptive policy's latest epoch estimate of B_noise = tr Σ / |G|² (NaN before one)."""
        return self._noise_scale

    @property
    def size(self) -> int | None:
        """The current global batch size (``None`` before training starts)."""
        return self._size

    # -- Lightning hooks -----------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)
        if self.adaptive:
            self._fisher = next((c for c in trainer.callbacks if isinstance(c, FisherSpectrum)), None)
            if self._fisher is None:
                self._loss = resolve_loss_fn(pl_module, self.loss_fn, "BatchSizeScheduler(adaptive=True)")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._loss_factor = self._window_weight(trainer, batch_idx)
        if trainer.current_epoch != self._logged_epoch:  # the epoch's first batch (also after a resume)
            self._logged_epoch = trainer.current_epoch
            self._log_size(trainer)
        if self._noise_epoch != trainer.current_epoch:  # sums of this epoch's estimates only
            self._noise_epoch, self._noise_sums = trainer.current_epoch, torch.zeros(3, dtype=torch.float64)
        if self._loss is not None and is_due(self.training_step(trainer), self.noise_every_n_steps):
            batch_size = extract_batch_size(batch)
            if batch_size >= 2:
                parts = torch.stack(half_batch_noise_parts(pl_module, self._loss, batch, batch_size))
                self._noise_sums = torch.cat([parts, parts.new_ones(1)]) + self._noise_sums.to(parts.device)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._loss_factor != 1.0 and loss.requires_grad:
            loss.register_hook(partial(_scaled, factor=self._loss_factor))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():  # this batch stepped the optimisers
            self._steps_done = self.training_step(trainer) + 1

    @override
    def reset_fit_state(self) -> None:
        self._initial_size: int | None = None
        self._size: int | None = None
        self._target: int | None = None  # the adaptive policy's next size
        self._history: list[dict[str, Any]] = []
        self._epochs: dict[int, tuple[int, float]] = {}  # epoch -> (size, LR at its start)
        self._noise_sums = torch.zeros(3, dtype=torch.float64)  # Σ tr Σ, Σ |G|², measurements (own estimate)
        self._noise_epoch = -1  # the epoch _noise_sums belong to (checkpointed with them)
        self._noise_scale = math.nan
        self._steps_done = 0  # optimiser steps taken (batches that stepped), kept in checkpoints
        self._loss_factor = 1.0  # the current micro-batch's accumulation weight
        self._logged_epoch: int | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._milestones = self._resolve_milestones(trainer)
        if self.policy is None:
            self.policy = self._policy(self._scheduler_gamma(trainer))
        if isinstance(self.policy, StagedPolicy) and not trainer.fast_dev_run:  # a dry run: max_epochs = 1
            self._check_stages(trainer.max_epochs)
        if self.lr_scaling != "none":
            _check_scalable(trainer)
        if self._initial_size is None:
            self._initial_size = lightning_getattr(pl_module, self.batch_arg_name) * trainer.world_size
        self._check_accumulation(trainer, pl_module)
        if self._size is None:  # a fresh fit: the first epoch's size, at the configured LR
            self._apply(trainer, pl_module, 0, scale_lr=False)
        else:  # resumed: the size of the checkpoint, before the first loader is built
            self._set_loader_size(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_dataset_size(trainer)
        # the loops are restored by now: a checkpoint saved before our epoch-end hook resumes one epoch on
        self._apply(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.policy, NormTestPolicy):
            self._noise_scale = self._epoch_noise_scale(trainer)
            self.log_scalars(
                trainer, {f"{self.namespace}/noise_scale": self._noise_scale}, self.training_step(trainer)
            )
            self._target = _round_up(self.policy.next_size(self._size, self._noise_scale), trainer.world_size)
        self._apply(trainer, pl_module, trainer.current_epoch + 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epochs and trainer.is_global_zero:
            epochs, sizes, lrs = zip(*self.epochs)
            figure = plot_batch_size_schedule(epochs, sizes, lrs)
            self.log_figure(
                trainer, f"{self.namespace}/schedule", figure, max(self.training_step(trainer) - 1, 0)
            )
        super().on_fit_end(trainer, pl_module)

    @override
    def get_state(self) -> dict[str, Any]:
        return {
            "initial_size": self._initial_size,
            "size": self._size,
            "history": list(self._history),
            "epochs": [list(row) for row in self.epochs],
            "steps_done": self._steps_done,
            "noise_sums": self._noise_sums.tolist(),
            "noise_epoch": self._noise_epoch,
        }

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._initial_size, self._size = state["initial_size"], state["size"]
        self._target = self._size
        self._history = list(state["history"])
        self._epochs = {int(e): (int(size), float(lr)) for e, size, lr in state.get("epochs", [])}
        self._steps_done = state.get("steps_done", 0)
        self._noise_sums = torch.tensor(state.get("noise_sums", [0.0, 0.0, 0.0]), dtype=torch.float64)
        self._noise_epoch = state.get("noise_epoch", -1)

    # -- internals -----------------------------------------------------------------------------

    def size_at(self, epoch: int, max_epochs: int) -> int:
        """The policy's global batch size for ``epoch``."""
        if isinstance(self.policy, StagedPolicy):
            return self.policy.size_at(epoch, max_epochs, self._milestones)
        if isinstance(self.policy, DecayToBatchPolicy):
            return self.policy.size_at(epoch, self._initial_size, self._milestones)
        if isinstance(self.policy, NormTestPolicy):
            return self._target or self._size or self._initial_size
        return self.policy.size_at(epoch, self._initial_size)

    def _apply(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, scale_lr: bool = True
    ) -> bool:
        """Switch to the size of ``epoch`` if it differs from the current one; ``True`` if it changed."""
        size = self.size_at(epoch, trainer.max_epochs)
        if size == self._size:
            return False
        if scale_lr and self._size is not None:
            self._scale_learning_rates(trainer, size / self._size)
        self._size = size
        self._set_loader_size(trainer, pl_module)
        physical, accumulation = self._split(trainer, size)
        lr = first_learning_rate(trainer, default=math.nan)
        step = self._next_step(trainer)
        record = {
            "epoch": epoch,
            "step": step,
            "size": size,
            "physical": physical,
            "accumulation": accumulation,
            "lr": lr,
        }
        self._history.append(record)
        self.write_table(HISTORY_FILE, HISTORY_COLUMNS, self._history)
        return True

    def _set_loader_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the per-process batch and accumulation; the training loader is rebuilt before the next epoch."""
        physical, accumulation = self._split(trainer, self._size)
        lightning_setattr(pl_module, self.batch_arg_name, physical)
        trainer.accumulate_grad_batches = accumulation
        trainer.fit_loop._combined_loader = None  # as Lightning's batch-size finder: rebuilt by setup_data()

    def _split(self, trainer: pl.Trainer, size: int) -> tuple[int, int]:
        return split_physical(size, self.max_physical_batch_size, trainer.world_size)

    def _scale_learning_rates(self, trainer: pl.Trainer, ratio: float) -> None:
        """Multiply every LR by ``ratio`` (linear) or ``√ratio`` (sqrt): the param groups'
        :data:`LR_GROUP_KEYS` and every value a scheduler recomputes its LR from
        (:data:`SCALED_SCHEDULER_VALUES`), so the schedule continues exactly ×factor."""
        if self.lr_scaling == "none":
            return
        factor = ratio if self.lr_scaling == "linear" else math.sqrt(ratio)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for key in LR_GROUP_KEYS:
                    if key in group:
                        group[key] *= factor
        for scheduler in _nested_schedulers(config.scheduler for config in trainer.lr_scheduler_configs):
            for name in ("base_lrs", "_last_lr", *SCALED_SCHEDULER_VALUES[type(scheduler)]):
                value = getattr(scheduler, name, None)
                if isinstance(value, (list, tuple)):
                    setattr(scheduler, name, [v * factor for v in value])
                elif isinstance(value, float | int) and not isinstance(value, bool):
                    setattr(scheduler, name, value * factor)

    def _resolve_milestones(self, trainer: pl.Trainer) -> list[int]:
        """LR milestones as epochs: given (fractions of ``max_epochs`` rounded), or a MultiStepLR's."""
        if not (self.multistep or self.policy is None or isinstance(self.policy, DecayToBatchPolicy)):
            return []
        if self.lr_milestones is not None:
            return self._milestones_for(trainer.max_epochs)
        return sorted(self._multistep_lr(trainer, "lr_milestones").milestones)

    def _milestones_for(self, max_epochs: int) -> list[int]:
        """The milestones as epochs of a fit of ``max_epochs`` (fractions rounded; read ones fixed)."""
        if self.lr_milestones is None:
            return self._milestones
        return sorted({m if isinstance(m, int) else round(m * max_epochs) for m in self.lr_milestones})

    def _scheduler_gamma(self, trainer: pl.Trainer) -> float:
        return float(self._multistep_lr(trainer, "gamma").gamma)

    @staticmethod
    def _multistep_lr(trainer: pl.Trainer, argument: str) -> MultiStepLR:
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, MultiStepLR) and config.interval == "epoch":
                return config.scheduler
        raise ValueError(
            f"BatchSizeScheduler needs the learning-rate stages: pass `{argument}` or configure a "
            "MultiStepLR with interval='epoch' (lr_milestones may be epochs or fractions of training)."
        )

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not lightning_hasattr(pl_module, self.batch_arg_name):
            raise ValueError(
                f"BatchSizeScheduler changes the attribute `{self.batch_arg_name}` that train_dataloader() reads, "
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
        if self.sizes is not None and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError(
                "BatchSizeScheduler(sizes=...) lays its stages over the epochs of training: set Trainer(max_epochs=...)."
            )
        for _, size in self._known_sizes():
            self._split(trainer, size)

    def _log_size(self, trainer: pl.Trainer) -> None:
        """Log size, physical batch, accumulation and LR at the current step."""
        physical, accumulation = self._split(trainer, self._size)
        lr = first_learning_rate(trainer, default=math.nan)
        metrics = {"size": self._size, "physical": physical, "accumulation": accumulation, "lr": lr}
        self._epochs[trainer.current_epoch] = (self._size, lr)
        scalars = {f"{self.namespace}/{k}": float(v) for k, v in metrics.items()}
        self.log_scalars(trainer, scalars, self._next_step(trainer))

    def _next_step(self, trainer: pl.Trainer) -> int:
        """The index of the next optimiser step. Lightning's counter lags one step between the
        restore of a checkpoint saved at a batch's end and the first batch (it adds it back then);
        ours, kept in the checkpoint, does not."""
        return max(self.training_step(trainer), self._steps_done)

    def _window_weight(self, trainer: pl.Trainer, batch_idx: int) -> float:
        """The factor A·n/N on the loss gradient of micro-batch ``batch_idx`` (n samples) in an
        accumulation window of N samples, A = ``accumulate_grad_batches``.

        Lightning divides every micro-batch loss (a mean over its n samples) by A; the window's
        gradient is the mean over its N samples only when N = A·n. The epoch's last window can have
        fewer micro-batches, or a short last batch: A·n/N gives it the gradient of one batch of its
        N samples. 1 (no hook, bit-identical) for every full window."""
        accumulation = trainer.accumulate_grad_batches
        layout = _loader_layout(trainer) if accumulation > 1 else None
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

    def _check_stages(self, max_epochs: int) -> None:
        """The staged policy's equal whole-epoch stages, or an error naming ``max_epochs`` that fit."""
        try:
            self.policy.check(max_epochs, self._milestones)
        except ValueError as error:
            fits = [e for e in range(1, 50 * max_epochs + 1) if self._stages_fit(e)][:3]
            hint = f" max_epochs = {', '.join(map(str, fits))}, ... fit." if fits else ""
            raise ValueError(f"{error}{hint}") from None

    def _stages_fit(self, max_epochs: int) -> bool:
        milestones = self._milestones_for(max_epochs) if self.multistep else []
        lengths = [e - s for s, e in self.policy.stages(max_epochs, milestones)]
        return all(length % len(self.sizes) == 0 for length in lengths)

    def _check_accumulation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Accumulation needs automatic optimisation: Lightning ignores ``accumulate_grad_batches``
        under manual optimisation, so a size over ``max_physical_batch_size`` would train as one
        physical batch."""
        if pl_module.automatic_optimization:
            return
        sizes = self._known_sizes()
        if self.sizes is None and 0 not in (self.schedule or {}):  # the loader's own size trains first
            sizes.append(("the loader's batch size", self._initial_size))
        for name, size in sizes:
            physical, accumulation = self._split(trainer, size)
            if accumulation > 1:
                raise ValueError(
                    f"BatchSizeScheduler: {type(pl_module).__name__} uses manual optimisation, where Lightning "
                    f"ignores gradient accumulation, so {name} = {size} cannot run as {accumulation} micro-batches "
                    f"of {physical} (max_physical_batch_size={self.max_physical_batch_size}). Use sizes up to "
                    "max_physical_batch_size per process, or accumulate inside training_step."
                )

    def _check_dataset_size(self, trainer: pl.Trainer) -> None:
        """No size larger than an epoch's samples (it would train on fewer samples than it says)."""
        layout = _loader_layout(trainer)
        if layout is None:
            return
        samples = layout[0] * trainer.world_size
        for name, size in self._known_sizes():
            if size > samples:
                raise ValueError(
                    f"BatchSizeScheduler: `{name}` = {size} is larger than the {samples} training samples of "
                    f"an epoch; batch sizes must be in 1..{samples}."
                )

    def _epoch_noise_scale(self, trainer: pl.Trainer) -> float:
        """B_noise of the epoch: FisherSpectrum's, or the two-batch-size estimate's, with tr Σ and
        |G|² averaged over the epoch (and the processes) before dividing."""
        if self._fisher is not None:
            return self._fisher.epoch_noise_scale
        sums = self._noise_sums
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums.to(trainer.strategy.root_device), reduce_op="sum")
        trace_sigma, grad_sq_norm, count = sums.tolist()
        return (
            noise_scale_ratio(torch.tensor(trace_sigma), torch.tensor(grad_sq_norm)).item()
            if count
            else math.nan
        )

    def _known_sizes(self) -> list[tuple[str, int]]:
        """``(argument, size)`` of every size the policy can train with."""
        if self.sizes is not None:
            return [(f"sizes[{i}]", size) for i, size in enumerate(self.sizes)]
        if self.schedule is not None:
            return [(f"schedule[{epoch}]", size) for epoch, size in self.schedule.items()]
        return [("max_size", self.max_size)]


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _checked_milestones(milestones: Sequence[int | float] | None) -> tuple[int | float, ...] | None:
    if milestones is None:
        return None
    checked = tuple(milestones)
    for m in checked:
        epoch = isinstance(m, int) and not isinstance(m, bool) and m > 0
        fraction = isinstance(m, float) and 0 < m < 1
        if not (epoch or fraction):
            raise ValueError(
                f"`lr_milestones` must be epochs (ints > 0) or fractions of training (floats in (0, 1)); got {m!r}."
            )
    return checked


def _check_argument_types(
    sizes: object,
    schedule: object,
    lr_milestones: object,
    batch_arg_name: object,
    multistep: object,
    adaptive: object,
    loss_fn: object,
) -> None:
    """TypeError for arguments of the wrong kind, naming the argument, the value and what it takes."""
    expected = {
        "sizes": (sizes, sizes is None or _is_sequence(sizes), "None or a sequence of batch sizes"),
        "schedule": (schedule, schedule is None or isinstance(schedule, Mapping), "None or {epoch: size}"),
        "lr_milestones": (
            lr_milestones,
            lr_milestones is None or _is_sequence(lr_milestones),
            "None or a sequence of epochs or fractions of training",
        ),
        "batch_arg_name": (
            batch_arg_name,
            isinstance(batch_arg_name, str) and batch_arg_name != "",
            "the name of the attribute holding the loader's batch size (a non-empty str)",
        ),
        "multistep": (multistep, isinstance(multistep, bool), "a bool"),
        "adaptive": (adaptive, isinstance(adaptive, bool), "a bool"),
        "loss_fn": (loss_fn, loss_fn is None or callable(loss_fn), "None or loss_fn(module, batch) -> loss"),
    }
    for name, (value, valid, allowed) in expected.items():
        if not valid:
            raise TypeError(f"`{name}` must be {allowed}; got {value!r}.")


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _scaled(grad: Tensor, factor: float) -> Tensor:
    return grad * factor


def _loader_layout(trainer: pl.Trainer) -> tuple[int, int, bool] | None:
    """``(samples per epoch on this process, batch size, drop_last)`` of a training ``DataLoader``
    with a batch size and a sampler of known length; ``None`` for anything else."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return None
    try:
        return len(loader.sampler), loader.batch_size, loader.drop_last
    except TypeError:  # a sampler without a length
        return None


def _nested_schedulers(top: Iterable[Any]) -> list[Any]:
    """The schedulers and those inside ``ChainedScheduler``/``SequentialLR``, each once."""
    found: dict[int, Any] = {}
    stack = list(top)
    while stack:
        scheduler = stack.pop()
        found.setdefault(id(scheduler), scheduler)
        stack.extend(getattr(scheduler, "_schedulers", ()))
    return list(found.values())


def _check_scalable(trainer: pl.Trainer) -> None:
    """Refuse ``lr_scaling`` with a scheduler whose LR we cannot scale exactly."""
    for scheduler in _nested_schedulers(config.scheduler for config in trainer.lr_scheduler_configs):
        if type(scheduler) not in SCALED_SCHEDULER_VALUES:
            raise ValueError(
                f"BatchSizeScheduler(lr_scaling=...) scales the learning rates that schedulers recompute from, "
                f"which it knows for torch's {', '.join(c.__name__ for c in SCALED_SCHEDULER_VALUES)}; "
                f"not for {type(scheduler).__name__}. Use one of those or lr_scaling='none'."
            )
