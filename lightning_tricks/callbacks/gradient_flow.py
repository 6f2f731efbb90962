"""GradientFlow: per-layer mean |∂L/∂W| in depth order, with vanishing/exploding alarms.

Seed ``001_0184062a2e770d9a.txt`` (§2, Fig. 1–2, §5.3) diagnoses the vanishing-gradient problem by
plotting, per layer in depth order, the average mean absolute value of the loss gradient: VGG38
without BatchNorm falls to 1e-20 near the input and does not train; with BatchNorm the values
stay within [1e-4, 1e-1]. This callback is the Lightning adapter over the pure-torch engines
:mod:`lightning_tricks.gradients.layer_stats` and :mod:`lightning_tricks.gradients.gradient_flow`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from .. import checks
from ..gradients.gradient_flow import (
    ALARM_KINDS,
    COUNT_KINDS,
    AlarmRule,
    AlarmWindow,
    FlowHistory,
    RunningFlow,
    epoch_average,
    figure_due,
    layer_summary,
)
from ..gradients.layer_stats import (
    ForwardOrderRecorder,
    LayerFilter,
    LayerGradientStats,
    LayerPatterns,
    find_layers,
    first_uses,
    sort_by_first_use,
)
from ..outputs import GRADIENT_FLOW
from ..plotting import plot_gradient_flow
from ._base import TrickCallback, is_due

ALARM_ACTIONS = ("warn", "raise", "stop")
METRIC_PREFIX = GRADIENT_FLOW.namespace
LAYER_STATS = ("mean_abs", "l2", "max_abs")
HISTORY_FILE = GRADIENT_FLOW.files["history"]
HISTORY_COLUMNS = ("epoch", "optimizer", "layer", "mean_abs")
SUMMARY_DESCRIPTIONS = {
    "global_norm": "L2 norm of the optimiser's whole gradient (all its parameters), before clipping",
    "min_layer_mean": "smallest mean |dL/dW| over the layers",
    "max_layer_mean": "largest mean |dL/dW| over the layers",
    "first_to_last_ratio": "mean |dL/dW| of the first layer over the last (forward order)",
    "log10_min_layer_mean": "log10 of min_layer_mean (readable where it vanishes)",
    "log10_max_layer_mean": "log10 of max_layer_mean",
    "log10_first_to_last_ratio": "log10 of first_to_last_ratio (decades lost from output to input)",
    "vanishing_steps": "optimiser steps so far with a vanishing layer",
    "exploding_steps": "optimiser steps so far with an exploding layer",
    "nonfinite_steps": "optimiser steps so far with a NaN/inf gradient",
}


class GradientFlowAlarm(RuntimeError):
    """Raised by ``GradientFlow(on_alarm="raise")`` when gradients vanish or explode."""


@dataclass
class _Tracked:
    """What GradientFlow keeps for one optimiser: engines, history, alarm totals."""

    stats: LayerGradientStats
    running: RunningFlow
    history: FlowHistory
    group_sizes: list[int]
    epoch: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KINDS, 0))
    warned: set[str] = field(default_factory=set)
    last_logged_step: int = -1
    last_drawn_epoch: int = -1
    figure_pending: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.state_dict(),
            "counts": dict(self.counts),
            "warned": sorted(self.warned),
            "epoch": self.epoch,
            "running": self.running.state_dict(),
        }


class GradientFlow(TrickCallback):
    r"""Per-layer mean |∂L/∂W| in depth order ("gradient flow"), with vanishing/exploding alarms.

    Seed ``001_0184062a2e770d9a.txt`` (§2, Fig. 1–2) plots, for each layer in depth order, the
    average over training steps of the mean absolute value of the loss gradient with respect to
    the layer's weights (biases omitted, §2); a network whose values fall by orders of magnitude
    towards the input suffers from vanishing gradients.

    **What is measured.** At every optimiser step, in ``on_before_optimizer_step`` — on the final
    gradient after accumulation, DDP all-reduce and AMP unscaling, and **before gradient
    clipping** (Lightning 2.6 calls ``on_before_optimizer_step`` and then
    ``configure_gradient_clipping``; under manual optimisation, whatever ``training_step`` did to
    the gradients before ``opt.step()``, ``self.clip_gradients`` included, is seen). With
    ``after_clipping=True`` the gradient is read right after the optimiser stepped with it (a
    ``register_step_post_hook`` on each optimiser, removed at fit end), so after clipping; steps an
    AMP GradScaler skips (inf/NaN) are then not seen at all. Per layer (a module that owns
    parameters directly):

    - ``mean_abs = Σ|g| / numel`` over the layer's weights (with ``include_bias=True``, weights
      and biases pooled) — the seed's quantity;
    - ``l2 = ‖g‖₂`` and ``max_abs = ‖g‖_∞`` over the same parameters;
    - and ``global_norm``, the L2 norm over *all* the optimiser's parameters (biases and excluded
      layers included: the norm ``clip_grad_norm_`` would clip).

    Each step costs a constant number of batched device ops whatever the number of layers (the
    per-parameter norms wait in an on-device window; the per-layer arithmetic and the alarm checks
    run in batch when the window is read or full), no host synchronisation; one host transfer per
    logged step and epoch end. Layers are in depth order: by when the forward pass first used
    their parameters, read off the autograd graph of the first training batch's backwards, so a
    module whose weight its parent uses functionally (``nn.MultiheadAttention``'s ``out_proj``, a
    parametrization's ``original``) sits where it is used; a layer that graph does not reach
    (frozen then) keeps its place by when its module first ran; layers that never ran follow in
    registration order.

    **Logged scalars** at the training steps with ``step % n == 0`` (``n = log_every_n_steps``;
    ``step`` the 0-based training step, the axis Lightning logs ``self.log`` values at), to every
    logger and ``trainer.callback_metrics`` (so ``EarlyStopping(monitor="grad_flow/global_norm")``
    works), whatever the Trainer's logging interval: the statistics of the optimiser step at that
    training step — ``grad_flow/global_norm``, ``min_layer_mean``, ``max_layer_mean``,
    ``first_to_last_ratio`` (first over last layer with a gradient), their ``log10_`` copies
    (``grad_flow/log10_min_layer_mean`` shows 5e-19 as -18.3 where a linear chart shows 0), and
    the cumulative counts of optimiser steps with an alarm, ``vanishing_steps``,
    ``exploding_steps``, ``nonfinite_steps`` (every step counts, logged or not). With
    ``log_per_layer``, per layer ``grad_flow_mean_abs/<layer>``, ``grad_flow_l2/<layer>`` and
    ``grad_flow_max_abs/<layer>``: one TensorBoard section per statistic, one chart per layer.

    **Several optimisers** (GANs, manual optimisation): each optimiser ``i`` (its index in
    ``trainer.optimizers``) has its own flow, logged as ``grad_flow/opt{i}/…`` and
    ``grad_flow_opt{i}_mean_abs/<layer>``, still at the training step: at a due training step,
    the statistics of optimiser ``i``'s first step within it. Epoch averages and alarm counts
    include all of its steps.

    **Per epoch.** At each training epoch end, each layer's mean |g| averaged over the epoch's
    optimiser steps (finite values only) becomes one column of the layer × epoch matrix (seed 001
    Fig. 1a), appended to ``grad_flow.csv`` in the run folder (columns ``epoch, optimizer, layer,
    mean_abs``; one row per layer and epoch) and to :attr:`history`. The figure
    ``grad_flow/figure`` (``grad_flow/opt{i}/figure``) goes to TensorBoard, W&B and MLflow at the
    epoch's last training step and is saved as ``grad_flow.figure.png``: a layer × epoch heatmap
    on a log colour scale, epochs averaged into at most ``max_figure_columns`` bins, and the last
    ``figure_lines`` epochs as lines. **Bounded**: it is drawn after 1, 2, 3, 4, 8, 16, 32, …
    epochs (11 figures for 1,000 epochs, 21 for a million) and after the last epoch, and neither
    its size nor its drawing time depends on the epoch count. A due figure waits (until a later
    epoch end) while the figures drawn so far took more than ``figure_time_share`` of the fit's
    wall time, so runs of very short epochs lose at most that share plus two figures (the first
    and the last, always drawn). This fit's matrix is also saved as ``grad_flow.npy``
    (``grad_flow_opt{i}.npy``; rows ``flows[i].layer_names``, columns ``flows[i].epochs``) when a
    figure is drawn and when training ends.

    **Alarms.** A layer *vanishes* when ``mean_abs < vanish_threshold`` or ``mean_abs <
    vanish_ratio · mean_abs[last layer with a gradient]``; it *explodes* when ``mean_abs >
    explode_threshold`` or is NaN/inf (under an AMP ``GradScaler``, which skips non-finite steps,
    those count in ``nonfinite_steps`` only). Every step is checked on the device; the checks are
    read at logged steps and epoch ends. Each kind warns once per optimiser, naming the layers
    and the first step; ``on_alarm="raise"`` raises :class:`GradientFlowAlarm`, ``"stop"`` sets
    ``trainer.should_stop``. Non-finite gradients never crash the callback and are left out of
    the epoch averages.

    **Resume.** ``state_key`` depends on ``include``, ``exclude`` and ``include_bias`` only; the
    other arguments are saved in the checkpoint and a change warns. Checkpoints hold what resume
    needs, bounded whatever the run's length: the alarm totals and the steps not yet read back
    (exact counts across resume), the partial epoch's sums (a checkpoint taken on an epoch's last
    batch keeps that epoch's column), and for the figure the binned matrix and the last epochs.
    This fit's full matrix is not in the checkpoint; ``grad_flow.csv`` holds it.

    Under DDP the gradients are already all-reduced, so every rank computes the numbers of a
    single process with the global batch; rank 0 logs and writes. Sharded strategies (FSDP,
    DeepSpeed ZeRO-2/3) keep a shard of each gradient on a rank; GradientFlow is not verified
    under them.

    Args:
        log_every_n_steps: log the scalars at the training steps with ``step % n == 0``; None
            takes n from ``Trainer(log_every_n_steps=...)``. The statistics are computed every step.
        log_per_layer: also log the per-layer scalars.
        include: layers to keep: a regex (``re.search`` on the layer's qualified name), an
            ``nn.Module`` subclass (in YAML, its import path such as ``torch.nn.Conv2d``), or a
            sequence of those; None keeps all.
        exclude: layers to drop, same forms as ``include``.
        include_bias: pool biases with the weights in the per-layer statistics (default: weights
            only, as the seed).
        vanish_threshold: absolute mean |g| below which a layer vanishes (> 0), or None.
        vanish_ratio: mean |g| relative to the last layer below which a layer vanishes, in
            (0, 1), or None.
        explode_threshold: mean |g| above which a layer explodes (> 0), or None (non-finite
            gradients always count).
        on_alarm: ``"warn"``, ``"raise"`` or ``"stop"``.
        max_figure_columns: the most epoch columns of the figure's heatmap (>= 2).
        figure_lines: the number of last epochs drawn as lines (>= 0).
        figure_time_share: the most of the fit's wall time the figures may take, in (0, 1]
            (1: the schedule alone decides).
        after_clipping: read the gradients after the optimiser step (so after gradient clipping)
            instead of in ``on_before_optimizer_step``.

    Attributes:
        history: this fit's per-epoch values, one record ``{"epoch", "optimizer", "layer",
            "mean_abs"}`` per epoch, optimiser and layer (``pandas.DataFrame(flow.history)``).
        flows: per optimiser index, its :class:`~lightning_tricks.gradients.gradient_flow.FlowHistory`
            (``flows[0].matrix``: layers × epochs of this fit; ``flows[0].layer_names``).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, ``vanish_threshold >= explode_threshold``, or (at
            ``setup``) ``include``/``exclude`` select no layer of the module.
        GradientFlowAlarm: with ``on_alarm="raise"``, when an alarm fires.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> flow = GradientFlow(log_every_n_steps=10)
        >>> trainer = L.Trainer(max_epochs=3, callbacks=[flow], logger=False, enable_progress_bar=False)
        >>> trainer.fit(BoringModel())
        >>> flow.flows[0].layer_names, flow.flows[0].matrix.shape, flow.history[0]["layer"]
        (['layer'], (1, 3), 'layer')
    """

    namespace = METRIC_PREFIX
    identity_arguments = ("include", "exclude", "include_bias")

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        log_per_layer: bool = False,
        include: LayerPatterns = None,
        exclude: LayerPatterns = None,
        include_bias: bool = False,
        vanish_threshold: float | None = 1e-8,
        vanish_ratio: float | None = 1e-5,
        explode_threshold: float | None = 1e3,
        on_alarm: Literal["warn", "raise", "stop"] = "warn",
        max_figure_columns: int = 64,
        figure_lines: int = 5,
        figure_time_share: float = 0.02,
        after_clipping: bool = False,
    ) -> None:
        super().__init__()
        self.log_every_n_steps = checks.integer(
            "log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True
        )
        self.log_per_layer = _check_bool("log_per_layer", log_per_layer)
        self.include_bias = _check_bool("include_bias", include_bias)
        self.after_clipping = _check_bool("after_clipping", after_clipping)
        self.vanish_threshold = _optional_positive("vanish_threshold", vanish_threshold)
        self.explode_threshold = _optional_positive("explode_threshold", explode_threshold)
        self.vanish_ratio = _optional_positive("vanish_ratio", vanish_ratio)
        _check_thresholds(self.vanish_threshold, self.vanish_ratio, self.explode_threshold)
        if on_alarm not in ALARM_ACTIONS:
            raise ValueError(f"`on_alarm` must be one of {ALARM_ACTIONS}, got {on_alarm!r}.")
        self.on_alarm = on_alarm
        self.max_figure_columns = _check_int("max_figure_columns", max_figure_columns, minimum=2)
        self.figure_lines = _check_int("figure_lines", figure_lines, minimum=0)
        self.figure_time_share = _optional_positive("figure_time_share", figure_time_share)
        if self.figure_time_share is None or self.figure_time_share > 1:
            raise ValueError(f"`figure_time_share` must be in (0, 1], got {figure_time_share!r}.")
        self._filter = LayerFilter(include, exclude)
        self.include, self.exclude = include, exclude
        self.reset_fit_state()

    @property
    def flows(self) -> dict[int, FlowHistory]:
        """Per optimiser index, its layer × epoch history (``.matrix``, ``.layer_names``, ``.epochs``)."""
        return {index: tracked.history for index, tracked in sorted(self._tracked.items())}

    @property
    def alarm_counts(self) -> dict[int, dict[str, int]]:
        """Per optimiser index, the optimiser steps so far (across resumes) with a vanishing,
        exploding or non-finite gradient, read back at the last logged step or epoch end."""
        return {index: dict(tracked.counts) for index, tracked in sorted(self._tracked.items())}

    @property
    def history(self) -> list[dict[str, Any]]:
        """This fit's ``{"epoch", "optimizer", "layer", "mean_abs"}`` records, by epoch then optimiser."""
        records = [r for index, history in self.flows.items() for r in history.records(index)]
        return sorted(records, key=lambda r: (r["epoch"], r["optimizer"]))

    # -- Lightning hooks -----------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        layers = find_layers(pl_module, include_bias=self.include_bias)
        if not any(self._filter(layer) for layer in layers):
            names = ", ".join(layer.name for layer in layers[:20]) or "none"
            raise ValueError(
                f"GradientFlow(include={self.include!r}, exclude={self.exclude!r}, include_bias={self.include_bias})"
                f" selects no layer of {type(pl_module).__name__}; its {len(layers)} layers are: {names}."
            )

    @override
    def reset_fit_state(self) -> None:
        self._tracked: dict[int, _Tracked] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._recorder = ForwardOrderRecorder()
        self._forward_order: list[str] | None = None
        self._first_uses: dict[int, int] = {}
        self._unknown_optimizer_warned = False
        self._fit_started = time.perf_counter()
        self._figure_seconds = 0.0
        for handle in getattr(self, "_step_hooks", []):
            handle.remove()
        self._step_hooks: list[RemovableHandle] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._figure_seconds = 0.0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._forward_order is None and not self._recorder.recording:
            layers = find_layers(pl_module)
            self._recorder.start(
                (layer.name, layer.module) for layer in layers if layer.module is not pl_module
            )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._forward_order is None:  # the first training step's backwards
            for leaf, number in first_uses(loss).items():
                self._first_uses[leaf] = min(self._first_uses.get(leaf, number), number)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder.recording:
            self._recorder.stop()
            self._forward_order = list(self._recorder.order)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.after_clipping:
            self._measure(trainer, pl_module, optimizer)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        """Fold the optimiser's current ``.grad`` fields into its flow; log when the step is due."""
        index = self._optimizer_index(trainer, optimizer)
        if index is None:
            return
        tracked = self._track(trainer, pl_module, optimizer, index)
        step = self.training_step(trainer)
        if not tracked.running.update(step):
            return
        tracked.epoch = trainer.current_epoch
        every = self.log_every_n_steps or trainer.log_every_n_steps or None
        if step != tracked.last_logged_step and is_due(step, every):
            tracked.last_logged_step = step
            self._log_step(trainer, index, tracked, step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = max(self.training_step(trainer) - 1, 0)
        for index, tracked in sorted(self._tracked.items()):
            if tracked.running.steps_in_epoch > 0:
                self._end_epoch(trainer, index, tracked, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = max(self.training_step(trainer) - 1, 0)
        for index, tracked in sorted(self._tracked.items()):
            epochs = tracked.history.epochs
            if epochs and tracked.last_drawn_epoch != epochs[-1]:
                self._draw(trainer, index, tracked, step)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.after_clipping:
            self._step_hooks = [
                optimizer.register_step_post_hook(partial(self._after_step, trainer, pl_module))
                for optimizer in trainer.optimizers
            ]

    def _after_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, args: Any, kwargs: Any
    ) -> None:
        """``after_clipping``: the optimiser stepped with the ``.grad`` fields it leaves in place."""
        self._measure(trainer, pl_module, optimizer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        super().on_fit_end(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()
        for index, tracked in self._tracked.items():
            self._save_matrix(trainer, index, tracked)
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        self._recorder.stop()
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    # -- state ---------------------------------------------------------------------------------

    @override
    def get_state(self) -> dict[str, Any]:
        states = {index: dict(state) for index, state in self._pending.items()}
        states.update({index: tracked.state_dict() for index, tracked in self._tracked.items()})
        return {"optimizers": states}

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._pending = {int(index): dict(s) for index, s in state.get("optimizers", {}).items()}

    # -- dashboard -----------------------------------------------------------------------------

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        """Chart title → tags (single-optimiser names; with several, insert ``opt{i}/``)."""
        tag = f"{METRIC_PREFIX}/{{}}".format
        return {
            "Gradient flow: norms": [tag("global_norm")],
            "Gradient flow: layer extremes (log10)": [
                tag("log10_min_layer_mean"),
                tag("log10_max_layer_mean"),
            ],
            "Gradient flow: first / last layer (log10)": [tag("log10_first_to_last_ratio")],
            "Gradient flow: alarm steps": [tag(f"{kind}_steps") for kind in COUNT_KINDS],
        }

    @override
    def metric_descriptions(self) -> dict[str, str]:
        """Tag → what it measures (single-optimiser names)."""
        return {f"{METRIC_PREFIX}/{name}": text for name, text in SUMMARY_DESCRIPTIONS.items()}

    # -- steps ---------------------------------------------------------------------------------

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

    def _track(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, index: int
    ) -> _Tracked:
        """The flow of optimiser ``index``, (re)built when its parameter list changed; a rebuilt or
        resumed flow carries over the totals, the unread alarm window and the partial epoch."""
        tracked = self._tracked.get(index)
        sizes = [len(group["params"]) for group in optimizer.param_groups]
        if tracked is not None and tracked.group_sizes == sizes:
            return tracked
        params = [p for group in optimizer.param_groups for p in group["params"]]
        order = self._forward_order if self._forward_order is not None else self._recorder.order
        layers = [
            layer
            for layer in find_layers(pl_module, params, include_bias=self.include_bias)
            if self._filter(layer)
        ]
        ordered = sort_by_first_use(layers, self._first_uses, order)
        stats = LayerGradientStats(ordered, other_parameters=params)
        new = _Tracked(
            stats,
            RunningFlow(stats, self._alarm_rule(trainer)),
            FlowHistory(self.max_figure_columns, self.figure_lines),
            sizes,
            trainer.current_epoch,
        )
        saved = tracked.state_dict() if tracked is not None else self._pending.pop(index, None)
        if tracked is not None:
            new.history, new.last_logged_step = tracked.history, tracked.last_logged_step
        elif saved is not None:
            new.history.load_state_dict(saved["history"])
        if saved is not None:
            self._carry_over(trainer, index, new, saved)
        self._tracked[index] = new
        return new

    def _carry_over(self, trainer: pl.Trainer, index: int, new: _Tracked, saved: dict[str, Any]) -> None:
        """Restore totals and the unread window; keep the partial epoch if it is this epoch, else
        close it (a checkpoint saved after an epoch's last step, before its end hook)."""
        new.counts.update({kind: int(n) for kind, n in saved["counts"].items()})
        new.warned = set(saved["warned"])
        running = dict(saved["running"])
        partial = running.get("epoch_partial", {})
        if int(saved["epoch"]) != trainer.current_epoch:
            running.pop("epoch_partial", None)
            running["steps_in_epoch"] = 0
            if any(count > 0 for _, count in partial.values()):
                sums, counts = np.array(list(partial.values()), dtype=np.float64).reshape(-1, 2).T
                self._add_epoch(index, new, int(saved["epoch"]), list(partial), epoch_average(sums, counts))
        new.running.load_state_dict(running)

    def _alarm_rule(self, trainer: pl.Trainer) -> AlarmRule:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return AlarmRule(self.vanish_threshold, self.vanish_ratio, self.explode_threshold, scaler is None)

    @staticmethod
    def _prefix(trainer: pl.Trainer, index: int) -> str:
        return METRIC_PREFIX if len(trainer.optimizers) <= 1 else f"{METRIC_PREFIX}/opt{index}"

    @staticmethod
    def _layer_section(trainer: pl.Trainer, index: int, stat: str) -> str:
        return (
            f"{METRIC_PREFIX}_{stat}"
            if len(trainer.optimizers) <= 1
            else f"{METRIC_PREFIX}_opt{index}_{stat}"
        )

    def _log_step(self, trainer: pl.Trainer, index: int, tracked: _Tracked, step: int) -> None:
        """Read the step and the alarm window back (one transfer), log, handle alarms."""
        values, window = tracked.running.read_step()
        self._add_counts(tracked, window)
        prefix = self._prefix(trainer, index)
        metrics = {f"{prefix}/global_norm": float(values["global_norm"][0])}
        summary = layer_summary(values["mean_abs"], values["present"])
        metrics.update({f"{prefix}/{name}": value for name, value in summary.items()})
        metrics.update({f"{prefix}/{kind}_steps": float(n) for kind, n in tracked.counts.items()})
        if self.log_per_layer:
            for stat in LAYER_STATS:
                section = self._layer_section(trainer, index, stat)
                for i in np.flatnonzero(values["present"]):
                    metrics[f"{section}/{tracked.running.names[i]}"] = float(values[stat][i])
        self.log_scalars(trainer, metrics, step)
        self._handle_alarms(trainer, index, tracked, window)

    @staticmethod
    def _add_counts(tracked: _Tracked, window: AlarmWindow) -> None:
        for kind, n in zip(COUNT_KINDS, window.counts):
            tracked.counts[kind] += int(n)

    def _handle_alarms(self, trainer: pl.Trainer, index: int, tracked: _Tracked, window: AlarmWindow) -> None:
        """Warn once per kind, raise or stop, for the layers flagged in ``window``."""
        for row, kind in enumerate(ALARM_KINDS):
            layers = [tracked.running.names[i] for i in np.flatnonzero(window.flags[row])]
            if not layers:
                continue
            where = f" (optimiser {index})" if len(trainer.optimizers) > 1 else ""
            shown = ", ".join(layers[:12]) + (f" and {len(layers) - 12} more" if len(layers) > 12 else "")
            message = f"GradientFlow: {kind} gradients{where} at step {window.first[row]} in layers: {shown}."
            if self.on_alarm == "raise":
                raise GradientFlowAlarm(message)
            if kind not in tracked.warned:
                tracked.warned.add(kind)
                suffix = " Stopping training (on_alarm='stop')." if self.on_alarm == "stop" else ""
                rank_zero_warn(message + suffix)
            if self.on_alarm == "stop":
                trainer.should_stop = True

    # -- epochs --------------------------------------------------------------------------------

    def _end_epoch(self, trainer: pl.Trainer, index: int, tracked: _Tracked, step: int) -> None:
        """Close the epoch's column (history, CSV), handle the alarms, draw the figure when due."""
        average, window = tracked.running.read_epoch()
        self._add_counts(tracked, window)
        if tracked.running.num_layers:
            self._add_epoch(index, tracked, trainer.current_epoch, tracked.running.names, average)
            tracked.figure_pending |= figure_due(trainer.current_epoch)
            if tracked.figure_pending and self._figure_budget_allows():
                self._draw(trainer, index, tracked, step)
        self._handle_alarms(trainer, index, tracked, window)

    def _figure_budget_allows(self) -> bool:
        """Whether the figures so far took at most ``figure_time_share`` of the fit's wall time."""
        return self._figure_seconds <= self.figure_time_share * (time.perf_counter() - self._fit_started)

    def _add_epoch(
        self, index: int, tracked: _Tracked, epoch: int, names: list[str], average: np.ndarray
    ) -> None:
        tracked.history.add_epoch(epoch, names, average)
        rows = [(epoch, index, name, repr(float(value))) for name, value in zip(names, average)]
        self.write_table(HISTORY_FILE, HISTORY_COLUMNS, rows, append=True)

    def _draw(self, trainer: pl.Trainer, index: int, tracked: _Tracked, step: int) -> None:
        """The bounded figure (binned heatmap + last epochs) to every logger and the run folder, and
        this fit's matrix to ``grad_flow.npy``; timed for the figure budget."""
        started = time.perf_counter()
        tracked.last_drawn_epoch = tracked.history.epochs[-1] if tracked.history.epochs else -1
        tracked.figure_pending = False
        if trainer.is_global_zero:
            self._log_flow_figure(trainer, index, tracked, step)
            self._save_matrix(trainer, index, tracked)
        self._figure_seconds += time.perf_counter() - started

    def _log_flow_figure(self, trainer: pl.Trainer, index: int, tracked: _Tracked, step: int) -> None:
        history = tracked.history
        binned, edges = history.binned_matrix()
        lines, line_epochs = history.recent_matrix()
        title = "Gradient flow" + (f" (optimiser {index})" if len(trainer.optimizers) > 1 else "")
        figure = plot_gradient_flow(
            binned,
            history.layer_names,
            edges=edges,
            lines=lines,
            line_epochs=line_epochs,
            max_columns=self.max_figure_columns,
            max_lines=self.figure_lines,
            vanish_threshold=self.vanish_threshold,
            explode_threshold=self.explode_threshold,
            title=f"{title}, epochs {int(edges[0])}–{int(edges[-1]) - 1}" if len(edges) > 1 else title,
        )
        self.log_figure(trainer, f"{self._prefix(trainer, index)}/figure", figure, step)

    def _save_matrix(self, trainer: pl.Trainer, index: int, tracked: _Tracked) -> None:
        stem = METRIC_PREFIX if len(trainer.optimizers) <= 1 else f"{METRIC_PREFIX}_opt{index}"
        if tracked.history.epochs:
            self.write_array(f"{stem}.npy", tracked.history.matrix)


def _check_bool(argument: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be True or False, got {value!r}.")
    return value


def _check_int(argument: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{argument}` must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{argument}` must be an integer >= {minimum}, got {value}.")
    return value


def _optional_positive(argument: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{argument}` must be None or a positive float, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{argument}` must be None or a finite float > 0, got {value}.")
    return float(value)


def _check_thresholds(vanish: float | None, ratio: float | None, explode: float | None) -> None:
    if ratio is not None and ratio >= 1.0:
        raise ValueError(f"`vanish_ratio` must be None or in (0, 1), got {ratio}.")
    if vanish is not None and explode is not None and vanish >= explode:
        raise ValueError(
            f"`vanish_threshold` ({vanish}) must be below `explode_threshold` ({explode}); lower the"
            " first or raise the second."
        )
