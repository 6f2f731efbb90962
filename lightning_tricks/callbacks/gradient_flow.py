"""GradientFlow (seed ``001_0184062a2e770d9a.txt`` §2): the Lightning adapter over the pure-torch engines
``lightning_tricks.gradients.layer_stats``, ``.gradient_flow`` (formulas) and ``.flow_tracking`` (state)."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from .. import checks
from ..gradients import gradient_flow as engine
from ..gradients.flow_tracking import HISTORY_COLUMNS, FigureBudget, FlowTracker, HistoryRow, OptimizerFlow
from ..gradients.layer_stats import LayerFilter, LayerPatterns
from ..outputs import GRADIENT_FLOW
from ..plotting import plot_gradient_flow
from ._base import TrickCallback, is_due

ALARM_ACTIONS = ("warn", "raise", "stop")
HISTORY_FILE = GRADIENT_FLOW.files["history"]


class GradientFlowAlarm(RuntimeError):
    """Raised by ``GradientFlow(on_alarm="raise")`` when gradients vanish or explode."""


class GradientFlow(TrickCallback):
    r"""Per-layer mean |∂L/∂W| in depth order ("gradient flow"), with vanishing/exploding alarms.

    Seed ``001_0184062a2e770d9a.txt`` (§2, Fig. 1–2) plots per layer, in depth order, the average
    mean |∂L/∂W| over the layer's weights; falling by decades towards the input, it vanishes.

    **Measured** at every optimiser step on the final gradient (after accumulation, DDP all-reduce,
    AMP unscaling), **before clipping** (``after_clipping``: after the optimiser step). Per layer (a
    module owning parameters) ``mean_abs = Σ|g| / numel``, ``l2``, ``max_abs``, and ``global_norm``
    over all the optimiser's parameters, in a constant number of batched device ops per step, one
    host transfer per logged step and epoch; layers in depth order
    (:class:`~lightning_tricks.gradients.flow_tracking.DepthOrder`).

    **Logged** at the training steps with ``step % n == 0`` (``n = log_every_n_steps``) to every
    logger and ``trainer.callback_metrics``: ``grad_flow/global_norm``, ``min_layer_mean``,
    ``max_layer_mean``, ``first_to_last_ratio`` and their ``log10_`` copies, the steps so far with
    an alarm (``vanishing_steps``, ``exploding_steps``, ``nonfinite_steps``) and, with
    ``log_per_layer``, ``grad_flow_mean_abs/<layer>``, ``grad_flow_l2/…``, ``grad_flow_max_abs/…``
    (several optimisers: :class:`~lightning_tricks.gradients.flow_tracking.FlowNames`).

    **Per epoch** each layer's mean |g| over the epoch (finite values) is a column of the layer ×
    epoch matrix (seed 001 Fig. 1a) in ``grad_flow.csv`` and :attr:`history`. The figure (a
    log-scale heatmap of ≤ ``max_figure_columns`` epoch bins, the last ``figure_lines`` epochs) goes
    to the loggers and run folder after 1, 2, 3, 4, 8, … epochs and the last, within ``figure_time_share``.

    **Alarms.** A layer *vanishes* when ``mean_abs < vanish_threshold`` or ``< vanish_ratio ·
    mean_abs[last layer]``, *explodes* when ``mean_abs > explode_threshold`` or is NaN/inf (not
    under a GradScaler). Each kind warns once per optimiser, naming the layers and the first step;
    ``on_alarm="raise"`` raises :class:`GradientFlowAlarm`, ``"stop"`` stops training.

    **Resume** is exact to the bit. ``state_key``: ``include``, ``exclude``, ``include_bias``; checkpoints
    keep (bounded) the alarm totals, unread steps, partial epoch and figure bins. DDP: rank 0 logs.

    Args:
        log_every_n_steps: log at the steps with ``step % n == 0``; None: ``Trainer(log_every_n_steps)``.
        log_per_layer: also log the per-layer scalars.
        include: layers to keep: a regex (``re.search`` on the qualified name), an ``nn.Module``
            subclass (or its import path, e.g. ``torch.nn.Conv2d``), or a sequence of those.
        exclude: layers to drop, same forms as ``include``.
        include_bias: pool biases with the weights (default: weights only, as the seed).
        vanish_threshold: absolute mean |g| below which a layer vanishes (> 0), or None.
        vanish_ratio: mean |g| relative to the last layer below which it vanishes, in (0, 1), or None.
        explode_threshold: mean |g| above which a layer explodes (> 0), or None.
        on_alarm: ``"warn"``, ``"raise"`` or ``"stop"``.
        max_figure_columns: the most epoch columns of the figure's heatmap (>= 2).
        figure_lines: the number of last epochs drawn as lines (>= 0).
        figure_time_share: the most of the fit's wall time figures may take, in (0, 1].
        after_clipping: read the gradients after the optimiser step (after clipping).

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (named in the message),
            or (at ``setup``) ``include``/``exclude`` select no layer of the module.
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

    namespace = GRADIENT_FLOW.namespace
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
        self.log_every_n_steps = checks.integer("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        self.log_per_layer = checks.boolean("log_per_layer", log_per_layer)
        self.include_bias = checks.boolean("include_bias", include_bias)
        self.after_clipping = checks.boolean("after_clipping", after_clipping)
        thresholds = engine.check_alarm_thresholds(vanish_threshold, vanish_ratio, explode_threshold)
        self.vanish_threshold, self.vanish_ratio, self.explode_threshold = thresholds
        self.on_alarm = checks.choice("on_alarm", on_alarm, ALARM_ACTIONS)
        self.max_figure_columns = checks.integer("max_figure_columns", max_figure_columns, minimum=2)
        self.figure_lines = checks.integer("figure_lines", figure_lines, minimum=0)
        self.figure_time_share = checks.real("figure_time_share", figure_time_share, above=0.0, maximum=1.0)
        self.include, self.exclude, self._filter = include, exclude, LayerFilter(include, exclude)
        self._step_hooks: list = []
        self.reset_fit_state()

    @property
    def flows(self) -> dict[int, engine.FlowHistory]:
        """Per optimiser index, its layer × epoch history (``.matrix``, ``.layer_names``, ``.epochs``)."""
        return {flow.index: flow.history for flow in self._tracker}

    @property
    def alarm_counts(self) -> dict[int, dict[str, int]]:
        """Per optimiser index, its steps so far (across resumes) with each kind of alarm."""
        return {flow.index: dict(flow.counts) for flow in self._tracker}

    @property
    def history(self) -> list[dict[str, Any]]:
        """This fit's ``{"epoch", "optimizer", "layer", "mean_abs"}`` records, by epoch then optimiser."""
        return self._tracker.records()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._tracker.check_selection(pl_module, self.include, self.exclude)

    @override
    def reset_fit_state(self) -> None:
        thresholds = (self.vanish_threshold, self.vanish_ratio, self.explode_threshold)
        bounds = (self.max_figure_columns, self.figure_lines)
        self._tracker = FlowTracker(self.namespace, self._filter, self.include_bias, thresholds, bounds)
        self._budget = FigureBudget(self.figure_time_share)
        self._unknown_optimizer_warned = False
        self._remove_hooks()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.after_clipping:  # the optimiser stepped with the `.grad` fields it leaves in place
            hook = partial(self._measure, trainer, pl_module)
            self._step_hooks = [optimizer.register_step_post_hook(hook) for optimizer in trainer.optimizers]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._budget.restart()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._tracker.order.watch(pl_module)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._tracker.order.see_backward(loss)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._tracker.order.end_step()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not self.after_clipping:
            self._measure(trainer, pl_module, optimizer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close each optimiser's epoch column, draw the figure when due and allowed, handle alarms."""
        for flow in self._tracker:
            if flow.running.steps_in_epoch > 0:
                rows, window = flow.end_epoch(trainer.current_epoch)
                self._write_rows(rows)
                if flow.figure_pending and self._budget.allows():
                    self._draw(trainer, flow)
                self._handle_alarms(trainer, flow, window)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for flow in self._tracker:
            if not flow.drawn:
                self._draw(trainer, flow)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()
        for flow in self._tracker:
            self._save_matrix(flow)
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        self._tracker.order.stop()
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    @override
    def get_state(self) -> dict[str, Any]:
        return self._tracker.state_dict()

    @override
    def set_state(self, state: dict[str, Any]) -> None:
        self._tracker.load_state_dict(state)

    @override
    def dashboard_layout(self) -> dict[str, list[str]]:
        """Chart title → tags (single-optimiser names; with several, insert ``opt{i}/``)."""
        charts = engine.DASHBOARD_CHARTS.items()
        return {title: [f"{self.namespace}/{name}" for name in names] for title, names in charts}

    @override
    def metric_descriptions(self) -> dict[str, str]:
        """Tag → what it measures (single-optimiser names)."""
        return {f"{self.namespace}/{name}": text for name, text in engine.SCALAR_DESCRIPTIONS.items()}

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, *_: Any
    ) -> None:
        """Fold the optimiser's ``.grad`` into its flow, log when due (also a step post-hook)."""
        index = self._optimizer_index(trainer, optimizer)
        if index is None:
            return
        nonfinite_alarms = getattr(trainer.precision_plugin, "scaler", None) is None  # no GradScaler
        epoch, step = trainer.current_epoch, self.training_step(trainer)
        flow, rows = self._tracker.flow(index, trainer.optimizers, pl_module, epoch, nonfinite_alarms)
        self._write_rows(rows)  # a resumed partial epoch of an earlier epoch, closed
        due = is_due(step, self.log_every_n_steps or trainer.log_every_n_steps or None)
        read = flow.update(step, epoch, due)
        if read is not None:
            values, window = read
            self.log_scalars(trainer, flow.step_scalars(values, self.log_per_layer), step)
            self._handle_alarms(trainer, flow, window)

    def _optimizer_index(self, trainer: pl.Trainer, optimizer: Optimizer) -> int | None:
        """Position of ``optimizer`` (unwrapped from a LightningOptimizer) in ``trainer.optimizers``."""
        optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        index = next((i for i, candidate in enumerate(trainer.optimizers) if candidate is optimizer), None)
        if index is None and not self._unknown_optimizer_warned:
            self._unknown_optimizer_warned = True
            rank_zero_warn("GradientFlow: an optimiser not in `trainer.optimizers` stepped; not tracked.")
        return index

    def _handle_alarms(self, trainer: pl.Trainer, flow: OptimizerFlow, window: engine.AlarmWindow) -> None:
        """Warn once per kind, raise or stop, for the layers flagged in ``window``."""
        stop = self.on_alarm == "stop"
        for _, message, first in flow.alarms(window):
            if self.on_alarm == "raise":
                raise GradientFlowAlarm(message)
            if first:
                rank_zero_warn(message + (" Stopping training (on_alarm='stop')." if stop else ""))
            if stop:
                trainer.should_stop = True

    def _write_rows(self, rows: list[HistoryRow]) -> None:
        if rows:
            self.write_table(HISTORY_FILE, HISTORY_COLUMNS, rows, append=True)

    def _draw(self, trainer: pl.Trainer, flow: OptimizerFlow) -> None:
        """The bounded figure to every logger and the run folder, the matrix to ``grad_flow.npy``."""
        with self._budget.timing():
            flow.mark_drawn()
            if trainer.is_global_zero:
                figure = plot_gradient_flow(**flow.figure_inputs())
                step = max(self.training_step(trainer) - 1, 0)
                self.log_figure(trainer, f"{flow.names.prefix}/figure", figure, step)
                self._save_matrix(flow)

    def _save_matrix(self, flow: OptimizerFlow) -> None:
        if flow.history.epochs:
            self.write_array(f"{flow.names.stem}.npy", flow.history.matrix)
