"""GradientFlow: per-layer gradient magnitudes against depth, with vanishing/exploding alarms.

Seed ``001_0184062a2e770d9a.txt`` (§2, Fig. 1–2, §5.3) diagnoses the vanishing-gradient problem by
plotting, per layer in depth order, the average mean absolute value of the loss gradient: VGG38
without BatchNorm falls to 1e-20 near the input and does not train; with BatchNorm the values
stay within [1e-4, 1e-1]. This callback computes that quantity at every optimiser step.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_tricks.gradients.layer_stats import (
    ForwardOrderRecorder,
    GradientStats,
    LayerFilter,
    LayerGradientStats,
    LayerPatterns,
    find_layers,
    sort_by_forward_order,
)
from lightning_tricks.plotting import plot_gradient_flow

ALARM_ACTIONS = ("warn", "raise", "stop")
ALARM_KINDS = ("vanishing", "exploding")
METRIC_PREFIX = "grad_flow"


class GradientFlowAlarm(RuntimeError):
    """Raised by ``GradientFlow(on_alarm="raise")`` when gradients vanish or explode."""


@dataclass
class FlowHistory:
    """Per-epoch gradient flow of one optimiser: the layer × epoch matrix of seed 001's Fig. 1a.

    Attributes:
        layer_names: layers in forward order; when the tracked layers change (e.g. a parameter
            group is added for fine-tuning) the latest order comes first, then layers no longer
            tracked.
        epochs: epoch number of every column.
        columns: per epoch, ``{layer: average over the epoch's steps of its mean |g|}``.
    """

    layer_names: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    columns: list[dict[str, float]] = field(default_factory=list)

    @property
    def matrix(self) -> np.ndarray:
        """``(layers, epochs)`` float64 array; NaN where a layer had no finite gradient."""
        return np.array(
            [[column.get(name, math.nan) for column in self.columns] for name in self.layer_names],
            dtype=np.float64,
        ).reshape(len(self.layer_names), len(self.columns))

    def add_epoch(self, epoch: int, names: list[str], values: np.ndarray) -> None:
        """Append the column of ``epoch``; ``values[i]`` belongs to layer ``names[i]``."""
        if names != self.layer_names[: len(names)]:
            self.layer_names = list(names) + [name for name in self.layer_names if name not in names]
        self.epochs.append(epoch)
        self.columns.append({name: float(v) for name, v in zip(names, values, strict=True)})

    def state_dict(self) -> dict[str, Any]:
        return {
            "layer_names": list(self.layer_names),
            "epochs": list(self.epochs),
            "columns": [dict(column) for column in self.columns],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FlowHistory:
        return cls(list(state["layer_names"]), list(state["epochs"]), [dict(c) for c in state["columns"]])


class AlarmRule(NamedTuple):
    """When a layer's gradient counts as vanishing or exploding (see :class:`GradientFlow`)."""

    vanish_threshold: float | None
    vanish_ratio: float | None
    explode_threshold: float | None
    nonfinite_alarms: bool

    def vanishing(self, mean_abs: Tensor, valid: Tensor, last: int) -> Tensor:
        """``(L,)`` bool: ``m_ℓ < vanish_threshold`` or ``m_ℓ < vanish_ratio · m_last`` where
        ``m_ℓ`` is layer ℓ's mean |g| and ``last`` the deepest layer with a gradient (seed 001 §2,
        eq. 1–2: the product of Jacobians shrinks the gradient towards the input)."""
        flags = torch.zeros_like(valid)
        if self.vanish_threshold is not None:
            flags |= mean_abs < self.vanish_threshold
        if self.vanish_ratio is not None and last >= 0:
            flags |= mean_abs < self.vanish_ratio * mean_abs[last]
        return flags & valid

    def exploding(self, mean_abs: Tensor, valid: Tensor, nonfinite: Tensor) -> Tensor:
        """``(L,)`` bool: ``m_ℓ > explode_threshold``, or a non-finite gradient when no GradScaler
        skips such steps."""
        flags = (
            valid & (mean_abs > self.explode_threshold)
            if self.explode_threshold is not None
            else torch.zeros_like(valid)
        )
        return flags | nonfinite if self.nonfinite_alarms else flags


class _Flow:
    """One optimiser's gradient flow: the batched statistics and their on-device accumulators.

    Between host synchronisations it keeps, per layer, the epoch's sum and count of finite mean
    ``|g|`` values and the alarm flags raised since the last check, and the number of steps with
    a vanishing, exploding or non-finite gradient; nothing here reads a value back to the host
    except :meth:`read_step` and :meth:`read_epoch`.
    """

    def __init__(
        self, stats: LayerGradientStats, num_optimizer_params: int, window_start: int, epoch: int
    ) -> None:
        self.stats = stats
        self.names = stats.names
        self.num_optimizer_params = num_optimizer_params
        self.window_start = window_start
        self.epoch = epoch
        self.steps_in_epoch = 0
        self.current: GradientStats | None = None
        self._restored: dict[str, tuple[float, float]] = {}
        self._epoch_sum = self._epoch_count = self._flags = self._counts = self._first = None

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def restore_epoch(self, partial: dict[str, tuple[float, float]]) -> None:
        """Seed the epoch accumulators with ``{layer: (sum, count)}`` from a checkpoint."""
        self._restored = dict(partial)
        self.steps_in_epoch = max(self.steps_in_epoch, int(max((c for _, c in partial.values()), default=0)))

    def _allocate(self, like: Tensor) -> None:
        restored = [self._restored.get(name, (0.0, 0.0)) for name in self.names]
        self._epoch_sum = torch.tensor([s for s, _ in restored], dtype=like.dtype, device=like.device)
        self._epoch_count = torch.tensor([c for _, c in restored], dtype=like.dtype, device=like.device)
        self._flags = torch.zeros(2, self.num_layers, dtype=torch.bool, device=like.device)
        self._counts = torch.zeros(3, dtype=like.dtype, device=like.device)
        self._first = torch.full((2,), -1.0, dtype=like.dtype, device=like.device)

    def update(self, stats: GradientStats, rule: AlarmRule, offset: int) -> None:
        """Fold one step's statistics into the accumulators (device ops only)."""
        if self._epoch_sum is None:
            self._allocate(stats.mean_abs)
        self.current = stats
        self.steps_in_epoch += 1
        mean_abs = stats.mean_abs
        finite = torch.isfinite(mean_abs) & torch.isfinite(stats.l2)
        valid = stats.present & finite
        nonfinite = stats.present & ~finite
        self._epoch_sum += torch.where(valid, mean_abs, 0.0)
        self._epoch_count += valid
        if self.num_layers == 0:
            return
        flags = torch.stack(
            [rule.vanishing(mean_abs, valid, stats.last_present), rule.exploding(mean_abs, valid, nonfinite)]
        )
        raised = flags.any(dim=1)
        self._flags |= flags
        self._counts += torch.cat([raised, nonfinite.any().view(1)])
        self._first.copy_(torch.where((self._first < 0) & raised, float(offset), self._first))

    def _alarm_block(self) -> list[Tensor]:
        return [self._flags.flatten().to(self._counts.dtype), self._counts, self._first]

    def read_step(self) -> dict[str, np.ndarray]:
        """The current step's statistics and the alarm window, in one host transfer."""
        s = self.current
        parts = [s.mean_abs, s.l2, s.max_abs, s.present.to(s.mean_abs.dtype), s.global_norm.view(1)]
        values = torch.cat(parts + self._alarm_block()).cpu().numpy()
        return self._unpack(values, ("mean_abs", "l2", "max_abs", "present", "global_norm"))

    def read_epoch(self) -> dict[str, np.ndarray]:
        """The epoch's per-layer sums and counts and the alarm window, in one host transfer."""
        values = torch.cat([self._epoch_sum, self._epoch_count, *self._alarm_block()]).cpu().numpy()
        return self._unpack(values, ("epoch_sum", "epoch_count"))

    def _unpack(self, values: np.ndarray, leading: tuple[str, ...]) -> dict[str, np.ndarray]:
        sizes = {"global_norm": 1, "flags": 2 * self.num_layers, "counts": 3, "first": 2}
        out, start = {}, 0
        for key in (*leading, "flags", "counts", "first"):
            size = sizes.get(key, self.num_layers)
            out[key] = values[start : start + size]
            start += size
        out["flags"] = out["flags"].reshape(2, self.num_layers).astype(bool)
        return out

    def reset_window(self, window_start: int) -> None:
        self.window_start = window_start
        self._flags.zero_()
        self._counts.zero_()
        self._first.fill_(-1.0)

    def reset_epoch(self) -> None:
        self.steps_in_epoch = 0
        self._restored = {}
        if self._epoch_sum is not None:
            self._epoch_sum.zero_()
            self._epoch_count.zero_()

    def partial_epoch(self) -> dict[str, tuple[float, float]]:
        """``{layer: (sum, count)}`` of the epoch so far (host copy, for checkpoints)."""
        if self._epoch_sum is None:
            return dict(self._restored)
        sums, counts = torch.stack([self._epoch_sum, self._epoch_count]).cpu().tolist()
        return {name: (s, c) for name, s, c in zip(self.names, sums, counts, strict=True)}


class GradientFlow(Callback):
    r"""Per-layer gradient magnitudes in depth order ("gradient flow"), with alarms.

    Seed ``001_0184062a2e770d9a.txt`` (§2, Fig. 1–2) plots, for each layer in depth order, the
    average over training steps of the mean absolute value of the loss gradient; a network whose
    values fall by orders of magnitude towards the input suffers from vanishing gradients.

    At every optimiser step, on the final gradient (after accumulation, DDP all-reduce and AMP
    unscaling: Lightning's ``on_before_optimizer_step``), this callback computes per layer — a
    module that owns parameters, weight and bias together —

    - ``mean_abs = Σ|g| / numel`` (the seed's quantity), ``l2 = ‖g‖₂`` and ``max_abs = ‖g‖_∞``,
    - and the global gradient norm over all of the optimiser's parameters,

    in one batched pass on the device (``torch._foreach_norm``), with one host transfer per logged
    step. Layers are ordered by when they first run in the forward pass (recorded once with
    forward pre-hooks on the first training batch); layers that did not run follow in
    registration order.

    Logged scalars (every ``every_n_steps`` optimiser steps), all under ``grad_flow/``:
    ``global_norm``, ``min_layer_mean``, ``max_layer_mean``, ``first_to_last_ratio`` (mean |g| of
    the first layer over the last, among layers with a gradient) and the cumulative step counts
    ``vanishing_steps``, ``exploding_steps``, ``nonfinite_steps``; with ``log_per_layer`` also
    ``grad_flow/layers/<layer>/{mean_abs,l2,max_abs}``. At each training epoch end the
    per-layer average of mean |g| over the epoch's steps is appended to :attr:`history`; the
    figure of mean |g| against depth, one line per epoch (seed 001 Fig. 1a), goes to loggers
    whose experiment has ``add_figure`` (TensorBoard) as ``grad_flow/figure``, and the layer ×
    epoch matrix is written to the log dir as ``grad_flow.npy`` and ``grad_flow.csv`` (rank 0).
    With several optimisers (GANs, manual optimisation) every optimiser ``i`` has its own flow,
    named ``grad_flow/opt{i}/…`` and ``grad_flow_opt{i}.{npy,csv}``, ``i`` its index in
    ``trainer.optimizers``. The step axis is the optimiser's own step count.

    Alarms. A layer's gradient *vanishes* when ``mean_abs < vanish_threshold`` or
    ``mean_abs < vanish_ratio · mean_abs[last layer with a gradient]`` (so
    ``first_to_last_ratio < vanish_ratio`` flags the first layer); it *explodes* when
    ``mean_abs > explode_threshold`` or is NaN/inf.
    Under an AMP ``GradScaler`` non-finite steps are skipped by the scaler, so they are counted in
    ``nonfinite_steps`` but raise no alarm. Every step is checked on the device; the checks are
    read when metrics are logged and at each epoch end. Each kind warns once per optimiser, naming
    the layers and the first step; ``on_alarm="raise"`` raises :class:`GradientFlowAlarm`,
    ``"stop"`` sets ``trainer.should_stop``. Non-finite gradients never crash the callback and are
    left out of the epoch averages.

    Under DDP the gradients are already all-reduced, so every rank computes the numbers of a
    single process with the global batch; only rank 0 logs and writes files. Sharded strategies
    (FSDP, DeepSpeed ZeRO-2/3) keep only a shard of each gradient on a rank; GradientFlow is not
    verified under them.

    Args:
        every_n_steps: log scalars every this many optimiser steps; None follows
            ``trainer.log_every_n_steps``.
        log_per_layer: also log the per-layer scalars.
        include: layers to keep: a regex (``re.search`` on the layer's qualified name), an
            ``nn.Module`` subclass (in YAML, its import path such as ``torch.nn.Conv2d``), or a
            sequence of those; None keeps all.
        exclude: layers to drop, same forms as ``include``.
        vanish_threshold: absolute mean |g| below which a layer vanishes (> 0), or None.
        vanish_ratio: mean |g| relative to the last layer below which a layer vanishes, in
            (0, 1), or None.
        explode_threshold: mean |g| above which a layer explodes (> 0), or None (non-finite
            gradients always count).
        on_alarm: ``"warn"``, ``"raise"`` or ``"stop"``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, ``vanish_threshold >= explode_threshold``, or (at
            ``setup``) ``include``/``exclude`` select no layer of the module.
        GradientFlowAlarm: with ``on_alarm="raise"``, when an alarm fires.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> flow = GradientFlow(every_n_steps=10, exclude=torch.nn.BatchNorm2d)
        >>> trainer = L.Trainer(max_epochs=3, callbacks=[flow], logger=False, enable_progress_bar=False)
        >>> trainer.fit(BoringModel())
        >>> flow.history[0].layer_names, flow.history[0].matrix.shape
        (['layer'], (1, 3))
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        log_per_layer: bool = False,
        include: LayerPatterns = None,
        exclude: LayerPatterns = None,
        vanish_threshold: float | None = 1e-8,
        vanish_ratio: float | None = 1e-5,
        explode_threshold: float | None = 1e3,
        on_alarm: Literal["warn", "raise", "stop"] = "warn",
    ) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
        ):
            raise TypeError(f"`every_n_steps` must be None or an int >= 1, got {every_n_steps!r}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be None or an int >= 1, got {every_n_steps}")
        if not isinstance(log_per_layer, bool):
            raise TypeError(f"`log_per_layer` must be a bool, got {log_per_layer!r}")
        vanish_threshold = _optional_positive("vanish_threshold", vanish_threshold)
        explode_threshold = _optional_positive("explode_threshold", explode_threshold)
        vanish_ratio = _optional_positive("vanish_ratio", vanish_ratio)
        if vanish_ratio is not None and vanish_ratio >= 1.0:
            raise ValueError(f"`vanish_ratio` must be None or in (0, 1), got {vanish_ratio}")
        if (
            vanish_threshold is not None
            and explode_threshold is not None
            and vanish_threshold >= explode_threshold
        ):
            raise ValueError(
                f"`vanish_threshold` ({vanish_threshold}) must be below "
                f"`explode_threshold` ({explode_threshold})"
            )
        if on_alarm not in ALARM_ACTIONS:
            raise ValueError(f"`on_alarm` must be one of {ALARM_ACTIONS}, got {on_alarm!r}")
        self._filter = LayerFilter(include, exclude)
        self.every_n_steps = every_n_steps
        self.log_per_layer = log_per_layer
        self.include = include
        self.exclude = exclude
        self.vanish_threshold = vanish_threshold
        self.vanish_ratio = vanish_ratio
        self.explode_threshold = explode_threshold
        self.on_alarm = on_alarm
        self._histories: dict[int, FlowHistory] = {}
        self._steps: dict[int, int] = {}
        self._alarm_counts: dict[int, dict[str, int]] = {}
        self._warned: set[tuple[int, str]] = set()
        self._restored_epochs: dict[int, dict[str, tuple[float, float]]] = {}
        self._flows: dict[int, _Flow] = {}
        self._recorder = ForwardOrderRecorder()
        self._forward_order: list[str] | None = None
        self._unknown_optimizer_warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def history(self) -> dict[int, FlowHistory]:
        """Per optimiser index, the layer × epoch average mean |g| (seed 001 Fig. 1a)."""
        return self._histories

    # ----------------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        layers = find_layers(pl_module)
        if not any(self._filter(layer) for layer in layers):
            names = ", ".join(layer.name for layer in layers[:20]) or "none"
            raise ValueError(
                f"GradientFlow(include={self.include!r}, exclude={self.exclude!r}) selects no layer of "
                f"{type(pl_module).__name__}; its {len(layers)} layers are: {names}"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flows = {}
        self._recorder = ForwardOrderRecorder()
        self._forward_order = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._forward_order is None and not self._recorder.recording:
            inner = (
                (layer.name, layer.module)
                for layer in find_layers(pl_module)
                if layer.module is not pl_module
            )
            self._recorder.start(inner)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder.recording:
            self._recorder.stop()
            self._forward_order = list(self._recorder.order)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        index = self._optimizer_index(trainer, optimizer)
        if index is None:
            return
        flow = self._flow(trainer, pl_module, optimizer, index)
        step = self._steps.get(index, 0)
        self._steps[index] = step + 1
        stats = flow.stats.compute()
        if stats is None:
            return
        flow.epoch = trainer.current_epoch
        flow.update(stats, self._alarm_rule(trainer), offset=step - flow.window_start)
        if self._should_log(trainer, step):
            self._log_step(trainer, index, flow, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir
        for index, flow in sorted(self._flows.items()):
            if flow.steps_in_epoch > 0 and flow.current is not None:
                self._end_epoch(trainer, index, flow, log_dir)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recorder.stop()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._recorder.stop()

    def state_dict(self) -> dict[str, Any]:
        partial = dict(self._restored_epochs)
        partial.update({index: (flow.epoch, flow.partial_epoch()) for index, flow in self._flows.items()})
        return {
            "steps": dict(self._steps),
            "alarm_counts": {i: dict(c) for i, c in self._alarm_counts.items()},
            "warned": sorted(self._warned),
            "history": {i: h.state_dict() for i, h in self._histories.items()},
            "partial_epoch": {
                i: {"epoch": epoch, "layers": {name: list(v) for name, v in layers.items()}}
                for i, (epoch, layers) in partial.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = {int(i): int(s) for i, s in state_dict["steps"].items()}
        self._alarm_counts = {int(i): dict(c) for i, c in state_dict["alarm_counts"].items()}
        self._warned = {(int(i), str(kind)) for i, kind in state_dict["warned"]}
        self._histories = {int(i): FlowHistory.from_state_dict(h) for i, h in state_dict["history"].items()}
        self._restored_epochs = {
            int(i): (int(p["epoch"]), {name: (float(s), float(c)) for name, (s, c) in p["layers"].items()})
            for i, p in state_dict["partial_epoch"].items()
        }

    # ----------------------------------------------------------------------------------- steps

    def _optimizer_index(self, trainer: pl.Trainer, optimizer: Optimizer) -> int | None:
        """Position of ``optimizer`` (unwrapped from a LightningOptimizer) in ``trainer.optimizers``."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        for index, candidate in enumerate(trainer.optimizers):
            if candidate is optimizer:
                return index
        if not self._unknown_optimizer_warned:
            self._unknown_optimizer_warned = True
            rank_zero_warn(
                "GradientFlow: an optimiser that is not in `trainer.optimizers` stepped; it is not tracked."
            )
        return None

    def _flow(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, index: int
    ) -> _Flow:
        """The flow of optimiser ``index``, (re)built when its parameter list changed; a rebuilt or
        resumed flow carries over the partial epoch sums."""
        flow = self._flows.get(index)
        num_params = sum(len(group["params"]) for group in optimizer.param_groups)
        if flow is not None and flow.num_optimizer_params == num_params:
            return flow
        params = [p for group in optimizer.param_groups for p in group["params"]]
        order = self._forward_order if self._forward_order is not None else self._recorder.order
        layers = sort_by_forward_order(
            [layer for layer in find_layers(pl_module, params) if self._filter(layer)], order
        )
        stats = LayerGradientStats(layers, other_parameters=params)
        new_flow = _Flow(stats, len(params), self._steps.get(index, 0), trainer.current_epoch)
        epoch, partial = (
            (flow.epoch, flow.partial_epoch())
            if flow is not None
            else self._restored_epochs.pop(index, (0, {}))
        )
        if epoch == trainer.current_epoch:
            new_flow.restore_epoch(partial)
        else:
            self._close_restored_epoch(index, epoch, partial)
        self._flows[index] = new_flow
        return new_flow

    def _close_restored_epoch(self, index: int, epoch: int, partial: dict[str, tuple[float, float]]) -> None:
        """Append a checkpointed epoch whose end hook never ran (checkpoint saved after its last
        step, before ``on_train_epoch_end``) to the history."""
        if not any(count > 0 for _, count in partial.values()):
            return
        names = list(partial)
        average = np.array([s / c if c > 0 else math.nan for s, c in partial.values()])
        self._histories.setdefault(index, FlowHistory()).add_epoch(epoch, names, average)

    def _alarm_rule(self, trainer: pl.Trainer) -> AlarmRule:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return AlarmRule(
            self.vanish_threshold, self.vanish_ratio, self.explode_threshold, nonfinite_alarms=scaler is None
        )

    def _should_log(self, trainer: pl.Trainer, step: int) -> bool:
        every = self.every_n_steps if self.every_n_steps is not None else trainer.log_every_n_steps
        return every > 0 and (step + 1) % every == 0

    def _prefix(self, trainer: pl.Trainer, index: int) -> str:
        return METRIC_PREFIX if len(trainer.optimizers) <= 1 else f"{METRIC_PREFIX}/opt{index}"

    def _log_step(self, trainer: pl.Trainer, index: int, flow: _Flow, step: int) -> None:
        """Read the step and alarm window back (one transfer), log the scalars, handle alarms."""
        values = flow.read_step()
        window_start = flow.window_start
        flow.reset_window(step + 1)
        counts = self._update_alarm_counts(index, values["counts"])
        prefix = self._prefix(trainer, index)
        metrics = {f"{prefix}/global_norm": float(values["global_norm"][0])}
        metrics.update({f"{prefix}/{kind}_steps": float(n) for kind, n in counts.items()})
        metrics.update(self._layer_summary(prefix, flow.names, values))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._handle_alarms(trainer, index, flow.names, values, window_start)

    def _layer_summary(
        self, prefix: str, names: list[str], values: dict[str, np.ndarray]
    ) -> dict[str, float]:
        """Min/max layer mean |g|, first-to-last ratio and, with ``log_per_layer``, every layer's scalars."""
        with_gradient = np.flatnonzero(values["present"] > 0)
        mean_abs = values["mean_abs"]
        metrics: dict[str, float] = {}
        if with_gradient.size:
            metrics[f"{prefix}/min_layer_mean"] = float(mean_abs[with_gradient].min())
            metrics[f"{prefix}/max_layer_mean"] = float(mean_abs[with_gradient].max())
            metrics[f"{prefix}/first_to_last_ratio"] = _ratio(
                mean_abs[with_gradient[0]], mean_abs[with_gradient[-1]]
            )
        if self.log_per_layer:
            for i in with_gradient:
                for stat in ("mean_abs", "l2", "max_abs"):
                    metrics[f"{prefix}/layers/{names[i]}/{stat}"] = float(values[stat][i])
        return metrics

    def _update_alarm_counts(self, index: int, window_counts: np.ndarray) -> dict[str, int]:
        counts = self._alarm_counts.setdefault(index, {"vanishing": 0, "exploding": 0, "nonfinite": 0})
        for kind, n in zip(("vanishing", "exploding", "nonfinite"), window_counts, strict=True):
            counts[kind] += int(n)
        return counts

    def _handle_alarms(
        self,
        trainer: pl.Trainer,
        index: int,
        names: list[str],
        values: dict[str, np.ndarray],
        window_start: int,
    ) -> None:
        """Warn once per kind, raise or stop, for the flags raised since ``window_start``."""
        for row, kind in enumerate(ALARM_KINDS):
            layers = [names[i] for i in np.flatnonzero(values["flags"][row])]
            if not layers:
                continue
            first_step = window_start + int(values["first"][row])
            where = f" (optimiser {index})" if len(trainer.optimizers) > 1 else ""
            shown = ", ".join(layers[:12]) + (f" and {len(layers) - 12} more" if len(layers) > 12 else "")
            message = f"GradientFlow: {kind} gradients{where} at step {first_step} in layers: {shown}."
            if self.on_alarm == "raise":
                raise GradientFlowAlarm(message)
            if (index, kind) not in self._warned:
                self._warned.add((index, kind))
                suffix = " Stopping training (on_alarm='stop')." if self.on_alarm == "stop" else ""
                rank_zero_warn(message + suffix)
            if self.on_alarm == "stop":
                trainer.should_stop = True

    # ----------------------------------------------------------------------------------- epochs

    def _end_epoch(self, trainer: pl.Trainer, index: int, flow: _Flow, log_dir: str | None) -> None:
        """Append the epoch's column to the history, handle alarms, log the figure, write files."""
        values = flow.read_epoch()
        counts = values["epoch_count"]
        average = np.where(counts > 0, values["epoch_sum"] / np.maximum(counts, 1), np.nan)
        flow.reset_epoch()
        if flow.num_layers == 0:
            return
        history = self._histories.setdefault(index, FlowHistory())
        history.add_epoch(trainer.current_epoch, flow.names, average)
        if trainer.is_global_zero:
            self._log_figure(trainer, index, history)
            if log_dir is not None:
                self._write_files(log_dir, self._file_stem(trainer, index), history)
        self._update_alarm_counts(index, values["counts"])
        window_start = flow.window_start
        flow.reset_window(self._steps.get(index, 0))
        self._handle_alarms(trainer, index, flow.names, values, window_start)

    def _log_figure(self, trainer: pl.Trainer, index: int, history: FlowHistory) -> None:
        writers = [getattr(logger.experiment, "add_figure", None) for logger in trainer.loggers]
        writers = [w for w in writers if callable(w)]
        if not writers:
            return
        title = "Gradient flow" + (f" (optimiser {index})" if len(trainer.optimizers) > 1 else "")
        figure = plot_gradient_flow(
            history.matrix,
            history.layer_names,
            history.epochs,
            vanish_threshold=self.vanish_threshold,
            explode_threshold=self.explode_threshold,
            title=title,
        )
        for add_figure in writers:
            add_figure(f"{self._prefix(trainer, index)}/figure", figure, global_step=trainer.current_epoch)

    def _file_stem(self, trainer: pl.Trainer, index: int) -> str:
        return METRIC_PREFIX if len(trainer.optimizers) <= 1 else f"{METRIC_PREFIX}_opt{index}"

    @staticmethod
    def _write_files(log_dir: str, stem: str, history: FlowHistory) -> None:
        """``<stem>.npy`` (layers × epochs) and ``<stem>.csv`` (a ``layer`` column, one per epoch)."""
        os.makedirs(log_dir, exist_ok=True)
        matrix = history.matrix
        np.save(os.path.join(log_dir, f"{stem}.npy"), matrix)
        with open(os.path.join(log_dir, f"{stem}.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer"] + [f"epoch_{e}" for e in history.epochs])
            for name, row in zip(history.layer_names, matrix, strict=True):
                writer.writerow([name] + [repr(float(v)) for v in row])


def _optional_positive(argument: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{argument}` must be None or a positive float, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{argument}` must be None or a finite float > 0, got {value}")
    return float(value)


def _ratio(numerator: float, denominator: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(numerator) / np.float64(denominator))
