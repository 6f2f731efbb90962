"""What :class:`~lightning_tricks.callbacks.gradient_flow.GradientFlow` keeps through a fit, per
optimiser: pure torch + numpy, over the engine :mod:`lightning_tricks.gradients.gradient_flow`.

- :class:`FlowTracker`: every optimiser's :class:`OptimizerFlow` (its layers' statistics, running
  flow, history and alarm totals), built at its first step, rebuilt when its parameter groups
  change, resumed from a checkpoint, with the resume repair (a checkpoint's partial epoch of an
  earlier epoch is closed, not lost);
- :class:`DepthOrder`: the order of the layers (seed 001 plots them by depth);
- :class:`FigureBudget`: the share of the fit's wall time figures may take;
- :class:`FlowNames`, :func:`alarm_messages`, :func:`figure_title` and the history rows
  (:data:`HISTORY_COLUMNS`): where values go and what the warnings and figures say.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .gradient_flow import (
    ALARM_KINDS,
    COUNT_KINDS,
    LAYER_STATS,
    AlarmRule,
    AlarmWindow,
    FlowHistory,
    RunningFlow,
    figure_due,
    step_scalars,
)
from .layer_stats import (
    ForwardOrderRecorder,
    Layer,
    LayerFilter,
    LayerGradientStats,
    find_layers,
    first_uses,
    sort_by_first_use,
)


class FlowNames(NamedTuple):
    """Where one optimiser's values go. With one optimiser: the scalars ``grad_flow/<name>``, the
    per-layer ``grad_flow_<statistic>/<layer>``, the figure ``grad_flow/figure``, the matrix
    ``grad_flow.npy``; with several, optimiser i's go to ``grad_flow/opt{i}/<name>``,
    ``grad_flow_opt{i}_<statistic>/<layer>``, ``grad_flow/opt{i}/figure``, ``grad_flow_opt{i}.npy``
    (``grad_flow``: the namespace)."""

    prefix: str
    stem: str
    optimizer: int | None

    @classmethod
    def of(cls, namespace: str, index: int, several: bool) -> FlowNames:
        """The names of optimiser ``index``, one of ``several`` or the only one."""
        if not several:
            return cls(namespace, namespace, None)
        return cls(f"{namespace}/opt{index}", f"{namespace}_opt{index}", index)

    @property
    def sections(self) -> dict[str, str]:
        """``{statistic: section}`` of the per-layer scalars."""
        return {stat: f"{self.stem}_{stat}" for stat in LAYER_STATS}

    @property
    def where(self) -> str:
        """`` (optimiser i)`` where there are several, for messages."""
        return "" if self.optimizer is None else f" (optimiser {self.optimizer})"


def figure_title(edges: np.ndarray, optimizer: int | None = None) -> str:
    """The figure's title: "Gradient flow", the optimiser (given where there are several) and the
    epochs the bin ``edges`` span."""
    title = "Gradient flow" + (f" (optimiser {optimizer})" if optimizer is not None else "")
    return f"{title}, epochs {int(edges[0])}–{int(edges[-1]) - 1}" if len(edges) > 1 else title


def alarm_messages(window: AlarmWindow, names: Sequence[str], where: str = "") -> Iterator[tuple[str, str]]:
    """``(kind, message)`` for each alarm kind ``window`` flags: the first step flagged and the
    layers (``names``: rows of the window; 12 shown, the rest counted). ``where`` says which
    optimiser, if needed."""
    for row, kind in enumerate(ALARM_KINDS):
        layers = [names[i] for i in np.flatnonzero(window.flags[row])]
        if layers:
            more = f" and {len(layers) - 12} more" if len(layers) > 12 else ""
            where_when = f"{where} at step {window.first[row]}"
            yield (
                kind,
                f"GradientFlow: {kind} gradients{where_when} in layers: {', '.join(layers[:12])}{more}.",
            )


HISTORY_COLUMNS = ("epoch", "optimizer", "layer", "mean_abs")
"""The columns of the history file (``grad_flow.csv``): one row per epoch, optimiser and layer."""
HistoryRow = tuple[int, int, str, str]
"""A row of the history file (:data:`HISTORY_COLUMNS`): ``(epoch, optimizer, layer, repr(mean_abs))``."""


@dataclass
class OptimizerFlow:
    """One optimiser's gradient flow: its layers' statistics, the running flow, the history, the
    alarm totals (``counts``, every step, across resumes) and what was already warned, logged and
    drawn. :meth:`state_dict` is what a checkpoint keeps of it (bounded).

    The methods returning :data:`HistoryRow` lists add epoch columns to :attr:`history`; the rows
    are the caller's to write (the run folder's history file)."""

    index: int
    names: FlowNames
    stats: LayerGradientStats
    running: RunningFlow
    history: FlowHistory
    """The optimiser's layer × epoch history (the columns of :meth:`end_epoch`)."""
    group_sizes: list[int]
    epoch: int
    """The epoch of the last step folded in."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KINDS, 0))
    warned: set[str] = field(default_factory=set)
    last_logged_step: int = -1
    last_drawn_epoch: int = -1
    figure_pending: bool = False

    def update(self, step: int, epoch: int, due: bool) -> tuple[dict[str, np.ndarray], AlarmWindow] | None:
        """Fold the current gradients of training step ``step`` of ``epoch`` in
        (:meth:`RunningFlow.update`) and, when the step is ``due`` to be logged and was not read
        yet (the optimiser may step twice in one training step), read it back (:meth:`read_step`)."""
        if not self.running.update(step):
            return None
        self.epoch = epoch
        if not due or step == self.last_logged_step:
            return None
        self.last_logged_step = step
        return self.read_step()

    def read_step(self) -> tuple[dict[str, np.ndarray], AlarmWindow]:
        """:meth:`RunningFlow.read_step`, its alarm window added to the totals."""
        values, window = self.running.read_step()
        self._add_counts(window)
        return values, window

    def step_scalars(self, values: Mapping[str, np.ndarray], per_layer: bool) -> dict[str, float]:
        """:func:`step_scalars` of :meth:`read_step`'s ``values``, under this optimiser's names."""
        sections = self.names.sections if per_layer else None
        return step_scalars(values, self.counts, self.running.names, self.names.prefix, sections)

    def end_epoch(self, epoch: int) -> tuple[list[HistoryRow], AlarmWindow]:
        """Close ``epoch``: its :func:`~lightning_tricks.gradients.gradient_flow.epoch_average` column added to the history (with layers to
        add), a figure then due (:func:`figure_due`) marked pending, and the alarm window read."""
        average, window = self.running.read_epoch()
        self._add_counts(window)
        if not self.running.num_layers:
            return [], window
        self.figure_pending |= figure_due(epoch)
        return self._add_epoch(epoch, self.running.names, average), window

    def alarms(self, window: AlarmWindow) -> Iterator[tuple[str, str, bool]]:
        """``(kind, message, first)`` per alarm kind ``window`` flags (:func:`alarm_messages`);
        ``first`` the first time this kind fires for this optimiser (across resumes)."""
        for kind, message in alarm_messages(window, self.running.names, self.names.where):
            yield kind, message, kind not in self.warned
            self.warned.add(kind)

    def mark_drawn(self) -> None:
        """The figure of the last epoch is drawn (or skipped off rank 0)."""
        self.last_drawn_epoch, self.figure_pending = (self.history.epochs or [-1])[-1], False

    def figure_inputs(self) -> dict[str, Any]:
        """The bounded figure's arguments (of ``lightning_tricks.plotting.plot_gradient_flow``): the
        binned matrix, layer names, bin edges, the last epochs as lines, their bounds, the alarm
        thresholds and the title."""
        (binned, edges), (lines, line_epochs) = self.history.binned_matrix(), self.history.recent_matrix()
        rule = self.running.rule
        return {
            "matrix": binned,
            "layer_names": self.history.layer_names,
            "edges": edges,
            "lines": lines,
            "line_epochs": line_epochs,
            "max_columns": self.history.bins.max_columns,
            "max_lines": self.history.recent.maxlen,
            "vanish_threshold": rule.vanish_threshold,
            "explode_threshold": rule.explode_threshold,
            "title": figure_title(edges, self.names.optimizer),
        }

    @property
    def drawn(self) -> bool:
        """Whether the last epoch's figure was drawn (or there is no epoch)."""
        return not self.history.epochs or self.last_drawn_epoch == self.history.epochs[-1]

    def _add_epoch(self, epoch: int, names: list[str], average: np.ndarray) -> list[HistoryRow]:
        self.history.add_epoch(epoch, names, average)
        return [(epoch, self.index, name, repr(float(value))) for name, value in zip(names, average)]

    def _add_counts(self, window: AlarmWindow) -> None:
        for kind, n in zip(COUNT_KINDS, window.counts):
            self.counts[kind] += int(n)

    def state_dict(self) -> dict[str, Any]:
        """The bounded history, alarm totals, warnings given, epoch and running flow (for
        :meth:`continue_from`)."""
        return {
            "history": self.history.state_dict(),
            "counts": dict(self.counts),
            "warned": sorted(self.warned),
            "epoch": self.epoch,
            "running": self.running.state_dict(),
        }

    def continue_from(self, previous: OptimizerFlow | None, saved: dict[str, Any] | None) -> list[HistoryRow]:
        """Carry over the flow this one replaces (``previous``, rebuilt because the optimiser's
        parameters changed: its history and last logged step too) or a checkpoint's
        :meth:`state_dict` (``saved``): the alarm totals, the warnings given, the unread alarm
        window and the partial epoch.

        The resume repair: a partial epoch of another epoch than :attr:`epoch` (a checkpoint saved
        after that epoch's last step, before its end hook) is not continued but closed
        (:meth:`RunningFlow.read_restored_epoch`: as that end hook would have), its column added to
        the history (and returned), so that it is not lost."""
        if previous is not None:
            previous.running.fold()  # its unfolded rows are of the parameters it tracked
            saved = previous.state_dict()
            self.history, self.last_logged_step = previous.history, previous.last_logged_step
        elif saved is not None:
            self.history.load_state_dict(saved["history"])
        else:
            return []
        self.counts.update({kind: int(n) for kind, n in saved["counts"].items()})
        self.warned = set(saved["warned"])
        self.running.load_state_dict(saved["running"])
        if int(saved["epoch"]) == self.epoch:
            return []
        gradients = self.stats.gradients()  # fold where, and in the dtype, the uninterrupted run did
        if gradients is None:
            average = self.running.read_restored_epoch(torch.float32, torch.device("cpu"))
        else:
            average = self.running.read_restored_epoch(gradients.dtype, gradients.device)
        return [] if average is None else self._add_epoch(int(saved["epoch"]), self.running.names, average)


class FlowTracker:
    """The flows of a fit's optimisers, by index: each built at its optimiser's first step,
    rebuilt when its parameter groups change (a group added for fine-tuning) and resumed from a
    checkpoint's :meth:`state_dict` (:meth:`OptimizerFlow.continue_from`).

    Args:
        namespace: the prefix of the names (:class:`FlowNames`).
        layer_filter: the layers kept (of :func:`find_layers` over the optimiser's parameters).
        include_bias: pool biases with the weights of a layer.
        thresholds: ``(vanish_threshold, vanish_ratio, explode_threshold)`` of :class:`AlarmRule`.
        bounds: ``(max_columns, max_recent)`` of each :class:`FlowHistory`.
    """

    def __init__(
        self,
        namespace: str,
        layer_filter: LayerFilter,
        include_bias: bool,
        thresholds: tuple[float | None, float | None, float | None],
        bounds: tuple[int, int],
    ) -> None:
        self.namespace = namespace
        self.order = DepthOrder()
        self._flows: dict[int, OptimizerFlow] = {}
        self._filter, self._include_bias, self._thresholds = layer_filter, include_bias, thresholds
        self._bounds = bounds
        self._pending: dict[int, dict[str, Any]] = {}

    def check_selection(self, model: nn.Module, include: Any, exclude: Any) -> None:
        """``ValueError`` when the layer filter (made of ``include`` and ``exclude``) keeps no layer
        of ``model``, listing its layers."""
        layers = find_layers(model, include_bias=self._include_bias)
        if not any(self._filter(layer) for layer in layers):
            names = ", ".join(layer.name for layer in layers[:20]) or "none"
            raise ValueError(
                f"GradientFlow(include={include!r}, exclude={exclude!r}, include_bias={self._include_bias})"
                f" selects no layer of {type(model).__name__}; its {len(layers)} layers are: {names}."
            )

    def flow(
        self,
        index: int,
        optimizers: Sequence[torch.optim.Optimizer],
        model: nn.Module,
        epoch: int,
        nonfinite_alarms: bool,
    ) -> tuple[OptimizerFlow, list[HistoryRow]]:
        """The flow of ``optimizers[index]`` in ``epoch``, and the history rows a resumed partial
        epoch closed (:meth:`OptimizerFlow.continue_from`), for the caller to write."""
        previous, groups = self._flows.get(index), optimizers[index].param_groups
        sizes = [len(group["params"]) for group in groups]
        if previous is not None and previous.group_sizes == sizes:
            return previous, []
        params = [p for group in groups for p in group["params"]]
        layers = [layer for layer in find_layers(model, params, self._include_bias) if self._filter(layer)]
        stats = LayerGradientStats(self.order.sort(layers), other_parameters=params)
        rule = AlarmRule(*self._thresholds, nonfinite_alarms)
        names = FlowNames.of(self.namespace, index, several=len(optimizers) > 1)
        history = FlowHistory(*self._bounds)
        flow = OptimizerFlow(index, names, stats, RunningFlow(stats, rule), history, sizes, epoch)
        rows = flow.continue_from(previous, self._pending.pop(index, None) if previous is None else None)
        self._flows[index] = flow
        return flow, rows

    def __iter__(self) -> Iterator[OptimizerFlow]:
        """The flows by optimiser index."""
        return iter([self._flows[index] for index in sorted(self._flows)])

    def records(self) -> list[dict[str, Any]]:
        """This fit's ``{"epoch", "optimizer", "layer", "mean_abs"}`` records, by epoch then optimiser."""
        records = [r for flow in self for r in flow.history.records(flow.index)]
        return sorted(records, key=lambda r: (r["epoch"], r["optimizer"]))

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": {index: OptimizerFlow.state_dict()}}``, with the checkpoint's states of
        optimisers that have not stepped since it was loaded."""
        states = {index: dict(state) for index, state in self._pending.items()}
        states.update({index: flow.state_dict() for index, flow in self._flows.items()})
        return {"optimizers": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's states until each optimiser's first step."""
        self._pending = {int(index): dict(s) for index, s in state.get("optimizers", {}).items()}


class DepthOrder:
    """The depth order of a model's layers (seed 001_0184062a2e770d9a.txt §2 plots layers by depth).

    Layers are ordered by when the forward pass first used their parameters, read off the
    autograd graph of the first training step's backwards (:func:`first_uses`), so a module whose
    weight its parent uses functionally (``nn.MultiheadAttention``'s ``out_proj``, a
    parametrization's ``original``) sits where it is used; a layer that graph does not reach
    (frozen then) keeps its place by when its module first ran (:class:`ForwardOrderRecorder`);
    layers that never ran follow in registration order (:func:`sort_by_first_use`).
    """

    def __init__(self) -> None:
        self._recorder = ForwardOrderRecorder()
        self._forward: list[str] | None = None
        self._first_uses: dict[int, int] = {}

    def watch(self, model: nn.Module) -> None:
        """Record the order in which ``model``'s layers run until :meth:`end_step` (first step only)."""
        if self._forward is None and not self._recorder.recording:
            self._recorder.start(
                (layer.name, layer.module) for layer in find_layers(model) if layer.module is not model
            )

    def see_backward(self, loss: Tensor) -> None:
        """Note the first uses of the leaves ``loss``'s graph reaches (backwards of the first step)."""
        if self._forward is None:
            for leaf, number in first_uses(loss).items():
                self._first_uses[leaf] = min(self._first_uses.get(leaf, number), number)

    def end_step(self) -> None:
        """The first step is over: its forward order is final."""
        if self._recorder.recording:
            self._recorder.stop()
            self._forward = list(self._recorder.order)

    def sort(self, layers: Sequence[Layer]) -> list[Layer]:
        order = self._forward if self._forward is not None else self._recorder.order
        return sort_by_first_use(layers, self._first_uses, order)

    def stop(self) -> None:
        """Remove the recorder's hooks (if still recording)."""
        self._recorder.stop()


class FigureBudget:
    """Whether a due figure may be drawn now: the figures drawn so far (:meth:`timing`) took at
    most ``share`` of the wall time since :meth:`restart`, the start of training. With
    :func:`figure_due`'s schedule, runs of very short epochs lose at most that share plus the
    figures drawn whatever the budget (the first and the last)."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.restart()

    def restart(self) -> None:
        """Training starts now; no figure time spent yet."""
        self.started, self.spent = time.perf_counter(), 0.0

    def allows(self) -> bool:
        return self.spent <= self.share * (time.perf_counter() - self.started)

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Count the wall time of the ``with`` block as figure time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent += time.perf_counter() - started
