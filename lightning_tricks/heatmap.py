r"""The mini-batch heatmap of seed ``002_696f8026b30a9c31.txt`` §3 (Algorithm 1), without Lightning:
the measured rows D_{e,k}, their epochs and learning rates, the phase rule, the per-epoch summaries,
the history table, the figure of a phase and the names of several heatmaps' files.
:class:`~lightning_tricks.callbacks.MinibatchHeatmap` fills a :class:`HeatmapTable` one measured
epoch at a time; its checkpoint state is :meth:`HeatmapTable.state_dict`. What the callback does in
full:

**Batches.** The training set is scored once by an image metric (seed §3.2: ``"intensity"``,
``"color"``, ``"edges"``, ``"perceptual"``, see :mod:`lightning_tricks.image_metrics`, or any
callable ``images -> scores``), sorted (``descending`` or not) and cut into the same mini-batches
every epoch (:class:`~lightning_tricks.samplers.MetricSortedBatchSampler`, batch size and
``drop_last`` of the Trainer's training loader). Batch rank k = 0 … K−1 is the metric order. The
metric scores the images as stored, not the standardised tensors a loader gives:
``metric_transform="auto"`` passes them through the datamodule's ``denormalize(images)`` (``x · std +
mean`` per channel, as ``lightning_tricks.datamodules.ClassificationDataModule`` defines it)
and scores its ``unaugmented_train_set()`` (the ``train_set`` without random augmentation, same
samples in the same order) where it has them; with your own loader pass ``metric_transform=``, or
``None`` to score what the loader gives. ``color`` on grey images warns: hue and saturation are all
0, so it orders by mean value, the order of ``intensity``.

**Several heatmaps** (to compare metrics on one run): the first in ``Trainer(callbacks=...)``
decides the training order; every other one forms its own fixed batches (same data, batch size and
``drop_last``) and, after each measured epoch's last batch, takes their gradients at the same θ_e
(one extra forward/backward per batch, RNG forked, shown in the Trainer's progress bar): training is
as with the first alone. Their files and tags use :func:`heatmap_namespace` instead of ``heatmap``
(e.g. ``heatmap_edges_l2_matrix.npy``, ``heatmap_edges_l2/distance_min``). Two with the same metric,
``descending`` and ``distance`` are refused by Lightning (same ``state_key``).

**Measurement.** At the start of every ``every_n_epochs``-th epoch e (0, n, 2n, …) the parameters
θ_e and buffers are copied; after each training batch k, the gradient ∇_k of the batch's mean loss
at θ_e is taken with one extra forward/backward (the seed's ``net_compare`` without a second module:
``torch.func.functional_call`` on the copies, under ``torch.random.fork_rng``; BatchNorm's
train-mode updates go to the copied buffers). At the epoch end ∇_e = Σ_k m_k ∇_k / Σ_k m_k (eq. 3,
m_k the batch sizes) and D_{e,k} = ‖∇_k − ∇_e‖ (``"l2"``) or 1 − cos(∇_k, ∇_e) (``"cosine"``),
see :class:`~lightning_tricks.gradients.minibatch_distance.MinibatchDistances`. Parameters, buffers,
optimiser state and RNG evolve bit for bit as without the callback (on the same batches).

**Storage.** ``mode="exact"`` keeps the K gradients (K×P float32) on the module's device up to
``memory_budget`` bytes and the rest in a memory-mapped file in the run folder, removed after the
epoch. ``mode="sketch"`` keeps a seeded CountSketch of each (O(P) per batch, K×``sketch_dim``
memory): each distance is within relative error ε of the exact one with probability at least
1 − 2/(``sketch_dim``·ε²) (e.g. ``sketch_dim=4096``: ±10 % with probability ≥ 95 %). ``"auto"`` is
exact when K×P×4 bytes fit the budget.

**Output.** The matrix (measured epochs × K) with the epoch numbers as ``heatmap_matrix.npy`` /
``heatmap_matrix.csv``; the history, one record per epoch and batch (:data:`HISTORY_COLUMNS`,
``heatmap.csv``; with ``Trainer(limit_train_batches=...)`` ∇_e is the mean over the visited batches
and the others are NaN); one figure per phase (``heatmap/phase_<p>``, x batch rank with the batch's
mean metric value on the top axis, y epoch; a short last batch, the remainder of the data, hatched
and labelled with its size). Phases (seed §3.1, "epochs with the same learning rate",
:func:`phase_indices`): with ``"lr"`` an epoch's learning rate is the first param group's as its
optimiser steps used it, the value most of its steps used (:func:`epoch_learning_rates`), and a
phase is a maximal run of measured epochs with the same one; ``lr_first``/``lr_last`` and the
figure title show an LR that changed inside an epoch. A schedule that changes the LR every step
makes each epoch its own phase: pass a list of epochs then. Scalars per measured epoch:
:func:`epoch_summary`.

**Resume and DDP.** The matrix, epochs, learning rates and the batches' fingerprint are saved in
checkpoints, not θ_e nor the gradients taken so far (checkpoints stay small). An epoch's row is
recorded at its last batch, so a checkpoint of that batch or of the epoch's end holds it: resume is
exact from a checkpoint saved at an epoch's end. A checkpoint saved inside a measured epoch loses
that epoch's row: the resumed fit warns once, naming the epoch, trains the rest of it on the batches
the uninterrupted fit would (the fixed batches go on with the epoch's next one) and measures the next
epochs exactly as the uninterrupted fit. An epoch the fit stops inside (``max_steps``, a stop
requested mid-epoch) has no row either, with a warning: no half row is ever recorded. To keep every
row, save checkpoints at epoch ends (``ModelCheckpoint(save_on_train_epoch_end=True)`` or
``every_n_epochs``) or on an epoch's last batch. Under DDP each process takes its contiguous share of every
global batch (``batch_size × world size``), the per-process gradients are summed with their batch
sizes before storage (one all-reduce of P values, or ``sketch_dim``, per batch), rank 0 stores and
computes the row and broadcasts it: the matrix equals one process training with the global batch. A
last global batch with fewer samples than processes is dropped there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from . import checks
from .outputs import MINIBATCH_HEATMAP
from .plotting import plot_minibatch_heatmap

HISTORY_COLUMNS = ("epoch", "lr", "lr_first", "lr_last", "phase", "batch", "metric", "distance")
"""The fields of a history record and the columns of ``heatmap.csv``."""
PHASES_EXPECTED = "'lr', None or a list of epochs (ints >= 0) where phases start"


def same_lr(a: float, b: float) -> bool:
    """Two learning rates are one phase's when equal within a relative 1e-9."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def epoch_learning_rates(step_lrs: Sequence[float]) -> tuple[float, float, float]:
    """``(lr, first, last)`` of an epoch from the LRs its optimiser steps used, in order: the value
    most steps used (ties: the one used last; the LR by which seed ``002_696f8026b30a9c31.txt`` §3.1
    groups epochs into phases), the first step's and the last step's."""
    values = [float(lr) for lr in step_lrs]
    counts = {value: values.count(value) for value in values}
    last_use = {value: index for index, value in enumerate(values)}
    lr = max(counts, key=lambda value: (counts[value], last_use[value]))
    return lr, values[0], values[-1]


def phase_indices(
    epochs: Sequence[int], lrs: Sequence[float], phases: str | Sequence[int] | None
) -> list[int]:
    """Phase of each measured epoch (seed ``002_696f8026b30a9c31.txt`` §3.1: "training phases based on
    epochs with the same learning rate").

    ``"lr"``: a phase is a maximal run of consecutive measured epochs with the same learning rate
    ``lrs`` (each epoch's, the one most of its optimiser steps used; equal within a relative 1e-9).
    A list of epochs starts a phase at each; ``None``: one phase, 0."""
    if phases is None:
        return [0] * len(epochs)
    if phases == "lr":
        out, phase = [], 0
        for i, lr in enumerate(lrs):
            if i and not same_lr(lr, lrs[i - 1]):
                phase += 1
            out.append(phase)
        return out
    return [sum(epoch >= boundary for boundary in phases) for epoch in epochs]


def checked_phases(phases: Any) -> str | tuple[int, ...] | None:
    """The ``phases`` argument: ``"lr"``, ``None`` or the sorted epochs where phases start."""
    if phases is None or phases == "lr":
        return phases
    epochs = checks.sequence("phases", phases, what=PHASES_EXPECTED)
    return tuple(sorted(checks.integer(f"phases[{i}]", epoch, minimum=0) for i, epoch in enumerate(epochs)))


def heatmap_namespace(metric: str, descending: bool, distance: str) -> str:
    """The namespace of a heatmap that does not order the training batches (several on one
    Trainer): ``heatmap_<metric>[_descending]_<distance>``, characters outside ``[A-Za-z0-9_.-]``
    replaced by ``_``."""
    suffix = [metric] + (["descending"] if descending else []) + [distance]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join([MINIBATCH_HEATMAP.namespace, *suffix]))


def heatmap_file(kind: str, namespace: str) -> str:
    """A heatmap's file of ``kind`` (``"matrix"``, ``"history"``, ``"spill"``, see
    :data:`~lightning_tricks.outputs.MINIBATCH_HEATMAP`) with ``heatmap`` replaced by ``namespace``."""
    return MINIBATCH_HEATMAP.files[kind].replace(MINIBATCH_HEATMAP.namespace, namespace, 1)


def limited_batches(length: int, limit: int | float) -> int:
    """Batches per epoch of a loader of ``length`` batches under ``Trainer(limit_train_batches=limit)``,
    as Lightning counts them."""
    return min(length, int(limit)) if isinstance(limit, int) else int(length * limit)


def epoch_summary(row: Tensor, full_norm: Tensor, batch_values: Sequence[float]) -> dict[str, Any]:
    """One measured epoch's scalars: ``distance_mean``/``_min``/``_max`` over the finite D_{e,k},
    ``best_batch`` (rank of the smallest, −1 if none is finite), ``best_batch_metric`` (its mean
    metric value) and ``full_gradient_norm`` ‖∇_e‖."""
    finite = row[torch.isfinite(row)]
    best = int(torch.argmin(torch.where(torch.isfinite(row), row, math.inf))) if len(finite) else -1
    return {
        "distance_mean": finite.mean() if len(finite) else math.nan,
        "distance_min": finite.min() if len(finite) else math.nan,
        "distance_max": finite.max() if len(finite) else math.nan,
        "best_batch": float(best),
        "best_batch_metric": batch_values[best] if best >= 0 else math.nan,
        "full_gradient_norm": full_norm,
    }


def summary_charts(namespace: str, which: str = "") -> dict[str, list[str]]:
    """TensorBoard Custom Scalars charts of :func:`epoch_summary`'s scalars under ``namespace``
    (``which`` appended to each title, to tell several heatmaps apart)."""
    return {
        f"mini-batch distance to the full gradient (seed 002 Alg. 1){which}": [
            f"{namespace}/distance_{kind}" for kind in ("min", "mean", "max")
        ],
        f"closest mini-batch{which}": [f"{namespace}/best_batch", f"{namespace}/best_batch_metric"],
        f"full-batch gradient norm{which}": [f"{namespace}/full_gradient_norm"],
    }


def summary_descriptions(metric: str, distance: str) -> dict[str, str]:
    """What each of :func:`epoch_summary`'s scalars is, for a heatmap of ``metric`` and ``distance``."""
    what = "‖∇_k − ∇_e‖" if distance == "l2" else "1 − cos(∇_k, ∇_e)"
    return {
        "distance_mean": f"Mean over the epoch's fixed mini-batches of D_ek = {what} at the epoch-start parameters (seed 002 Alg. 1).",
        "distance_min": f"Smallest D_ek = {what} of the epoch.",
        "distance_max": f"Largest D_ek = {what} of the epoch.",
        "best_batch": f"Rank (in {metric} order) of the mini-batch closest to the full gradient.",
        "best_batch_metric": f"Mean {metric} of the mini-batch closest to the full gradient.",
        "full_gradient_norm": "‖∇_e‖, the norm of the batch-size-weighted mean of the mini-batch gradients.",
    }


class HeatmapTable:
    """The measured epochs of one heatmap: a row D_{e,·} (batches in metric order), the epoch and its
    ``(lr, first, last)`` learning rates per measured epoch; the batches' mean metric values and their
    fingerprint (``(samples, batches, hash)``, see
    :meth:`~lightning_tricks.samplers.MetricSortedBatchSampler.fingerprint`).

    Args:
        phases: the phase rule of :func:`phase_indices`.
    """

    def __init__(self, phases: str | Sequence[int] | None = "lr") -> None:
        self.phases = phases
        self.rows: list[list[float]] = []
        self.epochs: list[int] = []
        self.lrs: list[tuple[float, float, float]] = []
        self.batch_values: list[float] | None = None
        self.fingerprint: tuple[int, int, int] | None = None

    def adopt(self, fingerprint: tuple[int, int, int], batch_values: Sequence[float]) -> None:
        """Measure the batches of ``fingerprint`` (with mean metric values ``batch_values``), refusing
        batches other than those of the epochs recorded so far (checkpoints included)."""
        if self.fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(
                "MinibatchHeatmap compares the same mini-batches across epochs, but the training batches "
                f"changed (samples, batches, hash: {self.fingerprint} -> {fingerprint}), e.g. by a reloaded "
                "loader with another batch size or dataset. Keep the training loader's batches fixed while "
                "it is attached."
            )
        self.fingerprint, self.batch_values = fingerprint, list(batch_values)

    def append(self, epoch: int, row: Sequence[float], lrs: tuple[float, float, float]) -> None:
        """Record a measured epoch; batches it did not visit (``Trainer(limit_train_batches)``) are NaN."""
        self.rows.append(list(row) + [math.nan] * (len(self.batch_values or []) - len(row)))
        self.epochs.append(epoch)
        self.lrs.append(lrs)

    @property
    def matrix(self) -> np.ndarray:
        """D_{e,k}: one row per measured epoch, one column per batch in metric order."""
        width = len(self.batch_values or [])
        return np.array(self.rows, dtype=float).reshape(len(self.rows), width)

    @property
    def phase_of_epoch(self) -> list[int]:
        """The phase of each measured epoch (:func:`phase_indices`)."""
        return phase_indices(self.epochs, [lr for lr, _, _ in self.lrs], self.phases)

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per measured epoch and batch, with the fields of :data:`HISTORY_COLUMNS`."""
        values = self.batch_values or []
        return [
            dict(zip(HISTORY_COLUMNS, (epoch, lr, first, last, phase, k, values[k], distance)))
            for epoch, (lr, first, last), phase, row in zip(
                self.epochs, self.lrs, self.phase_of_epoch, self.rows
            )
            for k, distance in enumerate(row)
        ]

    def tables(self, namespace: str) -> dict[str, tuple[Sequence[str], list[Any]]]:
        """The CSV files of a heatmap of ``namespace``, ``{file: (columns, rows)}``: the matrix
        (columns ``epoch, batch_0, …``, one row per measured epoch) and the :attr:`history`."""
        matrix = self.matrix
        columns = ["epoch", *(f"batch_{k}" for k in range(matrix.shape[1]))]
        rows = [[epoch, *row] for epoch, row in zip(self.epochs, matrix.tolist())]
        return {
            f"{heatmap_file('matrix', namespace)}.csv": (columns, rows),
            heatmap_file("history", namespace): (HISTORY_COLUMNS, self.history),
        }

    def phase_figure(
        self, phase: int, metric: str, distance: str, log_scale: bool, batch_sizes: Sequence[int]
    ) -> Figure:
        """The heatmap of one phase: its epochs × batches, titled with the phase's learning rate and
        the epochs whose LR changed between their steps; a last batch shorter than the others (the
        remainder of the data, ``batch_sizes`` the global batch sizes) is hatched and labelled."""
        rows = [i for i, p in enumerate(self.phase_of_epoch) if p == phase]
        lr = self.lrs[rows[0]][0]
        changed = [self.epochs[i] for i in rows if not same_lr(self.lrs[i][1], self.lrs[i][2])]
        note = f"\nthe LR changed inside epoch {', '.join(map(str, changed))}" if changed else ""
        figure = plot_minibatch_heatmap(
            self.matrix[rows],
            [self.epochs[i] for i in rows],
            np.array(self.batch_values or [], dtype=float),
            metric=metric,
            distance=distance,
            log_scale=log_scale,
            title=f"Mini-batch gradient distance, phase {phase} (lr {lr:.3g}){note}",
        )
        if len(batch_sizes) > 1 and batch_sizes[-1] < batch_sizes[0]:
            _mark_remainder(figure.axes[0], len(batch_sizes) - 1, batch_sizes[-1], batch_sizes[0])
        return figure

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint state: ``rows``, ``epochs``, ``lrs``, ``batch_values``, ``fingerprint``
        (MinibatchHeatmap's state, in the format its earlier releases wrote)."""
        return {
            "rows": [list(row) for row in self.rows],
            "epochs": list(self.epochs),
            "lrs": [list(lr) for lr in self.lrs],
            "batch_values": self.batch_values,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also of earlier releases, whose ``lrs`` held one LR
        per epoch)."""
        self.rows = [list(row) for row in state["rows"]]
        self.epochs = list(state["epochs"])
        self.lrs = [(lr, lr, lr) if isinstance(lr, (int, float)) else tuple(lr) for lr in state["lrs"]]
        self.batch_values = state["batch_values"]
        self.fingerprint = None if state["fingerprint"] is None else tuple(state["fingerprint"])


def _mark_remainder(axes: Any, column: int, size: int, full: int) -> None:
    """Hatch the remainder batch's column and say under the x axis how many samples it holds."""
    axes.axvspan(column - 0.5, column + 0.5, fill=False, hatch="//", edgecolor="tab:cyan", linewidth=0)
    axes.set_xlabel(f"{axes.get_xlabel()}\nhatched: batch {column}, the remainder ({size} of {full} samples)")
