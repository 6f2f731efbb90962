"""The gradient-flow engine of seed ``001_0184062a2e770d9a.txt`` (§2, Fig. 1–2): pure torch + numpy.

Seed 001 plots, per layer in depth order, the *average* over training of the *mean absolute value*
of the loss gradient ("gradient flow"), and reads vanishing gradients off it. The per-step,
per-layer statistics come from :class:`~lightning_tricks.gradients.layer_stats.LayerGradientStats`;
this module holds what is built on them, each formula in one named function:

- :func:`vanishing_flags` / :func:`exploding_flags` (gathered in :class:`AlarmRule`): which layers
  alarm at one step;
- :func:`epoch_average`: the seed's per-layer average over an epoch's optimiser steps;
- :func:`layer_summary` and :func:`log10_magnitude`: the scalars logged per step;
- :class:`RunningFlow`: the on-device accumulators of one optimiser between host reads (epoch sums,
  alarm window), exact across checkpoints;
- :class:`EpochBins` and :class:`FlowHistory`: the layer × epoch matrix, in full for the current
  fit and in a bounded form (at most ``max_columns`` epoch bins, the last ``max_recent`` epochs)
  for figures and checkpoints; :func:`figure_due`, when a figure of it is drawn.

:mod:`lightning_tricks.gradients.flow_tracking` keeps these per optimiser through a fit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import checks
from .layer_stats import GradientStats, LayerGradientStats

ALARM_KINDS = ("vanishing", "exploding")
COUNT_KINDS = ("vanishing", "exploding", "nonfinite")
LAYER_STATS = ("mean_abs", "l2", "max_abs")
SCALAR_DESCRIPTIONS = {
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
"""What each scalar of :func:`step_scalars` measures (by its name after the prefix)."""
DASHBOARD_CHARTS = {
    "Gradient flow: norms": ["global_norm"],
    "Gradient flow: layer extremes (log10)": ["log10_min_layer_mean", "log10_max_layer_mean"],
    "Gradient flow: first / last layer (log10)": ["log10_first_to_last_ratio"],
    "Gradient flow: alarm steps": [f"{kind}_steps" for kind in COUNT_KINDS],
}
"""Charts of the scalars (names after the prefix), ``{chart title: [scalar, ...]}``."""
WINDOW_STEPS = 64
"""The most optimiser steps :class:`RunningFlow` keeps as per-parameter norms before folding them."""


# -- formulas ------------------------------------------------------------------------------------


def vanishing_flags(
    mean_abs: Tensor, valid: Tensor, last: int, threshold: float | None, ratio: float | None
) -> Tensor:
    """``(..., L)`` bool: layer ℓ vanishes when ``m_ℓ < threshold`` or ``m_ℓ < ratio · m_last``.

    ``m_ℓ`` is layer ℓ's mean |g| and ``last`` the deepest layer with a gradient: seed
    001_0184062a2e770d9a.txt §2, eq. 1–2 (the product of Jacobians shrinks the gradient towards the
    input, Fig. 1a). Only ``valid`` layers (a finite gradient) can vanish.
    """
    flags = torch.zeros_like(valid)
    if threshold is not None:
        flags = flags | (mean_abs < threshold)
    if ratio is not None and last >= 0:
        flags = flags | (mean_abs < ratio * mean_abs[..., last : last + 1])
    return flags & valid


def exploding_flags(
    mean_abs: Tensor, valid: Tensor, nonfinite: Tensor, threshold: float | None, nonfinite_alarms: bool
) -> Tensor:
    """``(..., L)`` bool: layer ℓ explodes when ``m_ℓ > threshold``, or its gradient is NaN/inf and
    ``nonfinite_alarms`` (no AMP GradScaler skips such steps); seed 001_0184062a2e770d9a.txt §2."""
    flags = valid & (mean_abs > threshold) if threshold is not None else torch.zeros_like(valid)
    return flags | nonfinite if nonfinite_alarms else flags


def check_alarm_thresholds(
    vanish_threshold: Any, vanish_ratio: Any, explode_threshold: Any
) -> tuple[float | None, float | None, float | None]:
    """The three thresholds of :class:`AlarmRule`, checked: each None or a finite number > 0,
    ``vanish_ratio < 1`` and ``vanish_threshold < explode_threshold``."""
    vanish = checks.real("vanish_threshold", vanish_threshold, above=0.0, allow_none=True)
    ratio = checks.real("vanish_ratio", vanish_ratio, above=0.0, allow_none=True)
    explode = checks.real("explode_threshold", explode_threshold, above=0.0, allow_none=True)
    if ratio is not None and ratio >= 1.0:
        raise ValueError(f"`vanish_ratio` must be None or in (0, 1), got {ratio}.")
    if vanish is not None and explode is not None and vanish >= explode:
        raise ValueError(
            f"`vanish_threshold` ({vanish}) must be below `explode_threshold` ({explode}); lower the"
            " first or raise the second."
        )
    return vanish, ratio, explode


class AlarmRule(NamedTuple):
    """When a layer's gradient counts as vanishing or exploding (:func:`vanishing_flags`,
    :func:`exploding_flags`)."""

    vanish_threshold: float | None
    vanish_ratio: float | None
    explode_threshold: float | None
    nonfinite_alarms: bool

    def flags(self, stats: GradientStats, valid: Tensor, nonfinite: Tensor) -> Tensor:
        """``(..., 2, L)`` bool: row 0 vanishing, row 1 exploding."""
        vanishing = vanishing_flags(
            stats.mean_abs, valid, stats.last_present, self.vanish_threshold, self.vanish_ratio
        )
        exploding = exploding_flags(
            stats.mean_abs, valid, nonfinite, self.explode_threshold, self.nonfinite_alarms
        )
        return torch.stack([vanishing, exploding], dim=-2)


def epoch_average(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per layer, ``Σ_t m_ℓ(t) / n_ℓ``: the average over an epoch's optimiser steps t (those with a
    finite gradient of the layer, ``n_ℓ`` of them) of the layer's mean |g| — seed
    001_0184062a2e770d9a.txt Fig. 1a, "per layer average mean absolute value of the gradient".
    NaN where ``n_ℓ = 0``."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    return np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)


def log10_magnitude(value: float) -> float:
    """``log10(value)`` for the log-scale copies of vanishing-size scalars: ``-inf`` at 0, NaN for
    NaN or negative values (a linear chart shows 5e-19 as 0; its log10, -18.3, is readable)."""
    if not value > 0:
        return -math.inf if value == 0 else math.nan
    return math.log10(value)


def layer_summary(mean_abs: np.ndarray, present: np.ndarray) -> dict[str, float]:
    """Min and max layer mean |g| and ``first_to_last_ratio = m_first / m_last`` over the layers
    with a gradient (first and last in forward order; seed 001_0184062a2e770d9a.txt §2: a ratio
    many decades below 1 is the vanishing-gradient signature), with their log10 copies. Empty
    when no layer has a gradient."""
    with_gradient = np.flatnonzero(present)
    if not with_gradient.size:
        return {}
    values = mean_abs[with_gradient].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(values[0] / values[-1])
    summary = {
        "min_layer_mean": float(values.min()),
        "max_layer_mean": float(values.max()),
        "first_to_last_ratio": ratio,
    }
    summary.update({f"log10_{name}": log10_magnitude(v) for name, v in list(summary.items())})
    return summary


def step_scalars(
    values: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    names: Sequence[str],
    prefix: str,
    layer_sections: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """The scalars of a logged step from :meth:`RunningFlow.read_step`'s ``values``:
    ``<prefix>/global_norm``, the :func:`layer_summary`, the alarm totals ``<prefix>/<kind>_steps``
    (``counts``) and, with ``layer_sections = {statistic: section}``, each layer's statistic as
    ``<section>/<layer>`` (``names``: the layers, rows of ``values``)."""
    metrics = {f"{prefix}/global_norm": float(values["global_norm"][0])}
    summary = layer_summary(values["mean_abs"], values["present"])
    metrics.update({f"{prefix}/{name}": value for name, value in summary.items()})
    metrics.update({f"{prefix}/{kind}_steps": float(n) for kind, n in counts.items()})
    for stat, section in (layer_sections or {}).items():
        for i in np.flatnonzero(values["present"]):
            metrics[f"{section}/{names[i]}"] = float(values[stat][i])
    return metrics


# -- running statistics of one optimiser ----------------------------------------------------------


class AlarmWindow(NamedTuple):
    """Alarms not yet read back: per kind the layers flagged, the first step flagged (-1: none),
    and the steps counted (``vanishing``, ``exploding``, ``nonfinite``) since ``start``."""

    flags: np.ndarray
    first: np.ndarray
    counts: np.ndarray


class RunningFlow:
    """One optimiser's gradient flow between host reads: a window of per-step norms on the device,
    the epoch sums and the alarm window.

    At each step, :meth:`update` stores every gradient's ``‖g‖₁, ‖g‖₂, ‖g‖_∞`` into a row of an
    on-device window (:meth:`LayerGradientStats.norms`: four device ops, five on the CPU, whatever
    the number of layers, no host synchronisation). When the window is read (:meth:`read_step`,
    :meth:`read_epoch`), full (``capacity`` steps) or the present gradients change, it is folded
    (:meth:`fold`) on the device in a constant number of batched ops: per step the layers'
    statistics (:meth:`LayerGradientStats.reduce`), their mean |g| into the epoch's per-layer sum
    and count of finite values (:func:`epoch_average` reads them), the alarm flags
    (:class:`AlarmRule`) into the window's per-layer flags, the first flagged step, and the
    numbers of steps with a vanishing, exploding or non-finite gradient. Each read brings
    everything back in one transfer.

    :meth:`state_dict` folds nothing: it holds the partial epoch, the unread alarm window and the
    window's unfolded rows as they are, and :meth:`load_state_dict` puts the rows back, so that a
    resumed run groups its sums as the uninterrupted one does and its epoch averages are the same
    to the bit (and taking a checkpoint changes nothing in the run that takes it).

    Args:
        stats: the optimiser's layers and parameters (its ``names`` are the rows).
        rule: when a layer's gradient alarms.
        capacity: the most steps the window holds before it is folded.
    """

    def __init__(self, stats: LayerGradientStats, rule: AlarmRule, capacity: int = WINDOW_STEPS) -> None:
        self.names = list(stats.names)
        self.rule = rule
        self.capacity = capacity
        self.current: GradientStats | None = None
        self.steps_in_epoch = 0
        self._stats = stats
        self._restored: dict[str, Any] = {}
        self._sum = self._count = self._flags = self._counts = self._first = None
        self._segment: tuple | None = None
        self._buffer: Tensor | None = None
        self._rows: list[Tensor] = []
        self._steps: list[int] = []  # the window's steps, not yet folded
        self._unread_steps: list[int] = []  # the folded steps since the alarm window was last read
        self._restored_first = [-1, -1]

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def update(self, step: int) -> bool:
        """Store the current ``.grad`` norms of training step ``step`` (device ops only); False when
        no parameter has a gradient."""
        gradients = self._stats.gradients()
        if gradients is None:
            return False
        segment = (gradients.present, gradients.dtype, gradients.device)
        if self._sum is None:
            self._resume(gradients.dtype, gradients.device)
        if segment != self._segment or len(self._steps) == self.capacity:
            self.fold()
            self._start(segment)
        self._stats.norms(gradients, out=self._rows[len(self._steps)])
        self._steps.append(step)
        self.steps_in_epoch += 1
        return True

    def read_step(self) -> tuple[dict[str, np.ndarray], AlarmWindow]:
        """The last step's statistics and the alarm window, in one host transfer; the window is
        emptied."""
        self.fold()
        s = self.current
        assert s is not None
        last = [s.mean_abs[-1], s.l2[-1], s.max_abs[-1], s.present.to(s.mean_abs.dtype), s.global_norm[-1:]]
        values = self._transfer(last + self._window_parts())
        sizes = [self.num_layers] * 4 + [1]
        keys = ("mean_abs", "l2", "max_abs", "present", "global_norm")
        step = dict(zip(keys, np.split(values[: sum(sizes)], np.cumsum(sizes)[:-1])))
        step["present"] = step["present"] > 0
        return step, self._take_window(values[sum(sizes) :])

    def read_epoch(self) -> tuple[np.ndarray, AlarmWindow]:
        """The epoch's :func:`epoch_average` and the alarm window, in one host transfer; both are
        emptied."""
        self.fold()
        values = self._transfer([self._sum, self._count, *self._window_parts()])
        return self._take_epoch(values), self._take_window(values[2 * self.num_layers :])

    def read_restored_epoch(self, dtype: torch.dtype, device: torch.device) -> np.ndarray | None:
        """The :func:`epoch_average` of the partial epoch :meth:`load_state_dict` restored, its
        unfolded rows folded first (on ``device``, the sums in ``dtype`` unless the rows say
        otherwise, as the uninterrupted run would), and emptied; the alarm window stays unread.
        None when the restored epoch had no step. For a checkpoint whose epoch ended without its
        end hook (saved after its last step)."""
        if self._sum is None:
            self._resume(dtype, device)
        if not self.steps_in_epoch:
            return None
        self.fold()
        return self._take_epoch(self._transfer([self._sum, self._count]))

    def fold(self) -> None:
        """Fold the window's steps into the epoch sums and the alarm window (device ops only)."""
        if not self._steps:
            return
        present, dtype, device = self._segment
        rows, offset = len(self._steps), len(self._unread_steps)
        stats = self._stats.reduce(self._buffer[:rows], present)
        self._unread_steps += self._steps
        self._steps = []
        self.current = stats
        finite = torch.isfinite(stats.mean_abs) & torch.isfinite(stats.l2)
        valid, nonfinite = stats.present & finite, stats.present & ~finite
        self._sum += torch.where(valid, stats.mean_abs, 0.0).sum(0)
        self._count += valid.sum(0)
        flags = self.rule.flags(stats, valid, nonfinite)
        raised = flags.any(dim=2)
        self._flags |= flags.any(dim=0)
        self._counts += torch.cat([raised, nonfinite.any(dim=1, keepdim=True)], dim=1).sum(0)
        unread_rows = torch.arange(offset, offset + rows, dtype=dtype, device=device).unsqueeze(1)
        flagged_at = torch.where(raised, unread_rows, math.inf).amin(0)
        self._first.copy_(torch.where((self._first < 0) & raised.any(0), flagged_at, self._first))

    def state_dict(self) -> dict[str, Any]:
        """The partial epoch ``{layer: [sum, count]}``, steps so far, the unread alarm window and,
        when the window holds steps not folded yet, ``"unfolded"``: their rows of norms as they
        are (a CPU tensor copy), steps, present gradients and the layers and number of parameters
        they belong to (at most ``capacity × 3·P`` numbers). Two host transfers; nothing is folded
        or emptied."""
        if self._sum is None:
            return dict(self._restored)
        values = self._transfer([self._sum, self._count, *self._window_parts()])
        n = self.num_layers
        window = self._unpack_window(values[2 * n :])
        state = {
            "epoch_partial": {
                name: [float(s), float(c)] for name, s, c in zip(self.names, values[:n], values[n : 2 * n])
            },
            "steps_in_epoch": self.steps_in_epoch,
            "window": {
                "layers": {kind: self._flagged(window, row) for row, kind in enumerate(ALARM_KINDS)},
                "first": window.first.tolist(),
                "counts": window.counts.tolist(),
            },
        }
        if self._steps:
            state["unfolded"] = {
                "steps": list(self._steps),
                "rows": self._buffer[: len(self._steps)].to("cpu", copy=True),
                "present": list(self._segment[0]),
                "layers": list(self.names),
                "parameters": self._stats.num_parameters,
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take :meth:`state_dict`'s (or the earlier format's, without ``"unfolded"``: its window was
        folded when saved); applied on the device at the next :meth:`update`. Unfolded rows of
        other layers or parameters than this flow's are dropped (the model changed)."""
        self._restored = dict(state)
        self.steps_in_epoch = int(state.get("steps_in_epoch", 0))

    def _start(self, segment: tuple) -> None:
        """An empty window for the norms of ``segment = (present, dtype, device)`` (its buffer
        reused when the row size, dtype and device are unchanged)."""
        present, dtype, device = segment
        shape = (self.capacity, 3 * len(present))
        buffer = self._buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            self._buffer = torch.empty(shape, dtype=dtype, device=device)
            self._rows = list(self._buffer.unbind(0))
        self._segment = segment

    def _flagged(self, window: AlarmWindow, row: int) -> list[str]:
        return [self.names[i] for i in np.flatnonzero(window.flags[row])]

    def _resume(self, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the accumulators on ``device``, seeded with :meth:`load_state_dict`'s state, and
        put its unfolded rows back into the window (their dtype then that of the sums)."""
        unfolded = self._restored.get("unfolded")
        if unfolded and self._fits(unfolded):
            rows = unfolded["rows"]
            dtype = rows.dtype
            self._start((tuple(unfolded["present"]), dtype, device))
            self._buffer[: len(rows)].copy_(rows)
            self._steps = [int(step) for step in unfolded["steps"]]
        self._allocate(dtype, device)

    def _fits(self, unfolded: dict[str, Any]) -> bool:
        """Whether saved unfolded rows are of this flow's layers and parameters, and fit the window."""
        same = unfolded["layers"] == self.names and unfolded["parameters"] == self._stats.num_parameters
        return same and len(unfolded["steps"]) <= self.capacity

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        partial = self._restored.get("epoch_partial", {})
        sums, counts = (
            zip(*(partial.get(name, (0.0, 0.0)) for name in self.names)) if self.names else ((), ())
        )
        self._sum = torch.tensor(sums, dtype=dtype, device=device)
        self._count = torch.tensor(counts, dtype=dtype, device=device)
        window = self._restored.get("window", {})
        layers = window.get("layers", {})
        flags = [[name in layers.get(kind, ()) for name in self.names] for kind in ALARM_KINDS]
        self._flags = torch.tensor(flags, dtype=torch.bool, device=device).reshape(2, self.num_layers)
        self._counts = torch.tensor(window.get("counts", [0.0] * 3), dtype=dtype, device=device)
        self._first = torch.full((2,), -1.0, dtype=dtype, device=device)
        self._restored_first = [int(step) for step in window.get("first", [-1, -1])]
        self._restored = {}

    def _take_epoch(self, values: np.ndarray) -> np.ndarray:
        """The :func:`epoch_average` of transferred ``values`` (sums, then counts); the sums emptied."""
        n = self.num_layers
        self._sum.zero_()
        self._count.zero_()
        self.steps_in_epoch = 0
        return epoch_average(values[:n], values[n : 2 * n])

    def _window_parts(self) -> list[Tensor]:
        return [self._flags.flatten().to(self._counts.dtype), self._counts, self._first]

    @staticmethod
    def _transfer(parts: list[Tensor]) -> np.ndarray:
        dtype = parts[0].dtype
        same = [p if p.dtype == dtype else p.to(dtype) for p in parts]
        return torch.cat(same).cpu().numpy().astype(np.float64)

    def _unpack_window(self, values: np.ndarray) -> AlarmWindow:
        """The window read back; its first flagged rows (counted since the last read, on the
        device: a step number would be a host-to-device copy) become steps here."""
        n = self.num_layers
        rows = np.rint(values[2 * n + 3 : 2 * n + 5]).astype(np.int64)
        first = [
            restored if restored >= 0 else (self._unread_steps[row] if row >= 0 else -1)
            for restored, row in zip(self._restored_first, rows)
        ]
        return AlarmWindow(
            flags=values[: 2 * n].reshape(2, n) > 0,
            counts=np.rint(values[2 * n : 2 * n + 3]).astype(np.int64),
            first=np.array(first, dtype=np.int64),
        )

    def _take_window(self, values: np.ndarray) -> AlarmWindow:
        window = self._unpack_window(values)
        self._flags.zero_()
        self._counts.zero_()
        self._first.fill_(-1.0)
        self._unread_steps, self._restored_first = [], [-1, -1]
        return window


# -- layer × epoch history -----------------------------------------------------------------------


class EpochBins:
    """A bounded layer × epoch matrix: epochs averaged into at most ``max_columns`` bins.

    Bin b covers epochs ``[b·w, (b+1)·w)``; the width ``w`` starts at 1 and doubles (adjacent bins
    merge pairwise) whenever an epoch falls beyond ``max_columns`` bins, so the size stays
    ``layers × max_columns`` whatever the number of epochs, and the merge is exact: each bin holds
    the sum and count of the per-epoch averages that fell in it, NaN (no gradient) left out.

    Args:
        max_columns: the most bins kept, an integer >= 2.
    """

    def __init__(self, max_columns: int) -> None:
        self.max_columns = max_columns
        self.width = 1
        self.last_epoch = -1
        self.names: list[str] = []
        self._sum = np.zeros((0, 0))
        self._count = np.zeros((0, 0))

    def add(self, epoch: int, names: Sequence[str], values: np.ndarray) -> None:
        """Fold the per-layer averages ``values`` (row i: layer ``names[i]``) of ``epoch`` in."""
        while epoch // self.width >= self.max_columns:
            self._merge_pairs()
        rows, column = self._rows(names), epoch // self.width
        if column >= self._sum.shape[1]:
            padding = np.zeros((self._sum.shape[0], column + 1 - self._sum.shape[1]))
            self._sum, self._count = np.hstack([self._sum, padding]), np.hstack([self._count, padding])
        finite = np.isfinite(values)
        self._sum[rows[finite], column] += values[finite]
        self._count[rows[finite], column] += 1
        self.last_epoch = max(self.last_epoch, epoch)

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """``(layers, bins)`` averages (NaN where empty) and the ``bins + 1`` epoch edges (the last
        one just after the last epoch added)."""
        edges = np.arange(self._sum.shape[1] + 1, dtype=np.float64) * self.width
        edges[-1] = min(edges[-1], self.last_epoch + 1) if self.last_epoch >= 0 else edges[-1]
        return epoch_average(self._sum, self._count), edges

    def _merge_pairs(self) -> None:
        self._sum, self._count = _pairwise_sum(self._sum), _pairwise_sum(self._count)
        self.width *= 2

    def _rows(self, names: Sequence[str]) -> np.ndarray:
        known = {name: i for i, name in enumerate(self.names)}
        new = [name for name in names if name not in known]
        if new:
            known.update({name: len(self.names) + i for i, name in enumerate(new)})
            self.names.extend(new)
            padding = np.zeros((len(new), self._sum.shape[1]))
            self._sum, self._count = np.vstack([self._sum, padding]), np.vstack([self._count, padding])
        return np.array([known[name] for name in names], dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        """The bins' width, last epoch, layer names and per-bin sums and counts."""
        return {
            "width": self.width,
            "last_epoch": self.last_epoch,
            "names": list(self.names),
            "sum": self._sum.tolist(),
            "count": self._count.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s bins (merged further if ``max_columns`` is now smaller)."""
        self.width, self.names = int(state["width"]), list(state["names"])
        self.last_epoch = int(state["last_epoch"])
        shape = (len(self.names), -1) if self.names else (0, 0)
        self._sum = np.asarray(state["sum"], dtype=np.float64).reshape(shape)
        self._count = np.asarray(state["count"], dtype=np.float64).reshape(shape)
        while self._sum.shape[1] > self.max_columns:
            self._merge_pairs()


def _pairwise_sum(array: np.ndarray) -> np.ndarray:
    """Columns ``2b`` and ``2b + 1`` summed into column b (a missing last partner counts as 0)."""
    if array.shape[1] % 2:
        array = np.hstack([array, np.zeros((array.shape[0], 1))])
    return array[:, 0::2] + array[:, 1::2]


class FlowHistory:
    """Per-epoch gradient flow of one optimiser: seed 001_0184062a2e770d9a.txt Fig. 1a's layer × epoch
    matrix.

    Three views of the same columns (per epoch, :func:`epoch_average` of each layer's mean |g|):

    - :attr:`matrix` / :attr:`epochs`: every epoch of the **current fit** (memory grows by one
      column per epoch; not saved in checkpoints — the run folder's ``grad_flow.csv`` holds them);
    - :attr:`bins`: every epoch of the **run**, across resumes, in at most ``max_columns`` bins
      (:class:`EpochBins`; saved in checkpoints);
    - :attr:`recent`: the last ``max_recent`` epochs of the run, unbinned (saved in checkpoints).
    """

    def __init__(self, max_columns: int, max_recent: int) -> None:
        self.layer_names: list[str] = []
        """Rows of :attr:`matrix`, in forward order; when the tracked layers change (e.g. a parameter
        group is added for fine-tuning) the latest order comes first, then the layers no longer
        tracked."""
        self.epochs: list[int] = []
        """Epoch number of every column of :attr:`matrix`."""
        self._columns: list[tuple[list[str], np.ndarray]] = []
        self.bins = EpochBins(max_columns)
        """Every epoch of the run, binned."""
        self.recent: deque[tuple[int, list[str], np.ndarray]] = deque(maxlen=max_recent)
        """``(epoch, layer names, values)`` of the last ``max_recent`` epochs."""

    def add_epoch(self, epoch: int, names: Sequence[str], values: np.ndarray) -> None:
        """Append the column of ``epoch``; ``values[i]`` belongs to layer ``names[i]``."""
        names = list(names)
        if names != self.layer_names[: len(names)]:
            self.layer_names = names + [name for name in self.layer_names if name not in names]
        values = np.asarray(values, dtype=np.float64)
        self.epochs.append(epoch)
        self._columns.append((names, values))
        self.bins.add(epoch, names, values)
        self.recent.append((epoch, names, values))

    @property
    def matrix(self) -> np.ndarray:
        """``(layers, epochs)`` float64 array of this fit; NaN where a layer had no finite gradient."""
        return _assemble(self.layer_names, self._columns)

    def recent_matrix(self) -> tuple[np.ndarray, list[int]]:
        """``(layers, ≤ max_recent)`` array of the last epochs (rows :attr:`layer_names`) and their
        epoch numbers."""
        return _assemble(self.layer_names, [(n, v) for _, n, v in self.recent]), [
            e for e, _, _ in self.recent
        ]

    def binned_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """``(layers, ≤ max_columns)`` binned averages (rows :attr:`layer_names`) and bin edges."""
        binned, edges = self.bins.matrix()
        index = {name: i for i, name in enumerate(self.bins.names)}
        rows = [index.get(name) for name in self.layer_names]
        out = np.full((len(rows), binned.shape[1]), np.nan)
        for i, row in enumerate(rows):
            if row is not None:
                out[i] = binned[row]
        return out, edges

    def records(self, optimizer: int) -> list[dict[str, Any]]:
        """This fit's columns as ``{"epoch", "optimizer", "layer", "mean_abs"}`` records."""
        return [
            {"epoch": epoch, "optimizer": optimizer, "layer": name, "mean_abs": float(value)}
            for epoch, (names, values) in zip(self.epochs, self._columns)
            for name, value in zip(names, values)
        ]

    def state_dict(self) -> dict[str, Any]:
        """The bounded views (bins, recent epochs) and the layer order; not this fit's full matrix."""
        return {
            "layer_names": list(self.layer_names),
            "bins": self.bins.state_dict(),
            "recent": [[epoch, list(names), values.tolist()] for epoch, names, values in self.recent],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layer_names = list(state["layer_names"])
        self.bins.load_state_dict(state["bins"])
        self.recent.clear()
        for epoch, names, values in state["recent"]:
            self.recent.append((int(epoch), list(names), np.asarray(values, dtype=np.float64)))


def _assemble(layer_names: Sequence[str], columns: Sequence[tuple[Sequence[str], np.ndarray]]) -> np.ndarray:
    index = {name: i for i, name in enumerate(layer_names)}
    matrix = np.full((len(layer_names), len(columns)), np.nan)
    for j, (names, values) in enumerate(columns):
        matrix[[index[name] for name in names], j] = values
    return matrix


def figure_due(epoch: int) -> bool:
    """Whether the figure is drawn after epoch ``epoch`` (0-based): after ``c = epoch + 1`` epochs
    with ``c <= 4`` or ``c`` a power of two — 1, 2, 3, 4, 8, 16, 32, … (11 figures for 1,000 epochs,
    21 for a million), so the figures' cost grows with the logarithm of the run's length."""
    done = epoch + 1
    return done <= 4 or done & (done - 1) == 0
