"""Matplotlib figures of the callbacks' numbers; no logger code (the callbacks log the figures).

Figures are built on :class:`matplotlib.figure.Figure` directly, without pyplot, so they need no
GUI backend, hold no global state and can be made from any thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

FLOW_MAX_COLUMNS = 64
FLOW_MAX_LINES = 5
FLOW_MAX_LABELS = 48


def plot_gradient_flow(
    matrix: np.ndarray,
    layer_names: Sequence[str],
    epochs: Sequence[float] | None = None,
    *,
    edges: Sequence[float] | None = None,
    lines: np.ndarray | None = None,
    line_epochs: Sequence[int] | None = None,
    max_columns: int = FLOW_MAX_COLUMNS,
    max_lines: int = FLOW_MAX_LINES,
    vanish_threshold: float | None = None,
    explode_threshold: float | None = None,
    title: str = "Gradient flow",
) -> Figure:
    """Seed ``001_0184062a2e770d9a.txt`` §2, Fig. 1a/Fig. 2 as a layer × epoch heatmap plus the last
    epochs as lines; bounded in size and drawing time whatever the number of epochs.

    Left: the average mean ``|∂L/∂W|`` of every layer (rows, forward order, input at the top) in
    every epoch (columns), on a logarithmic colour scale; beyond ``max_columns`` columns, adjacent
    columns are averaged (NaN left out) into at most ``max_columns`` bins. Right, sharing the layer
    axis: the last ``max_lines`` epochs as lines on a logarithmic axis (seed 001's "gradient flow"
    curves), the thresholds dashed. At most ``FLOW_MAX_LABELS`` layer names are written (every
    k-th layer beyond that) and the figure's height is capped, so its cost depends on neither the
    epoch count nor, beyond a few dozen, the layer count. Non-finite and non-positive entries (no
    gradient) are left blank.

    Args:
        matrix: ``(layers, columns)`` array: per layer, the average over a column's epochs of its
            per-epoch average mean |g|.
        layer_names: one name per row of ``matrix``.
        epochs: the first epoch of every column (default ``0 … C-1``); ignored with ``edges``.
        edges: ``C + 1`` epoch edges, column j covering ``[edges[j], edges[j+1])``.
        lines: ``(layers, K)`` per-epoch columns to draw as lines (default: the last columns of
            ``matrix``); only the last ``max_lines`` are drawn.
        line_epochs: epoch numbers of ``lines``' columns.
        max_columns: the most heatmap columns (>= 1).
        max_lines: the most lines (>= 0).
        vanish_threshold, explode_threshold: drawn dashed when given.
        title: the figure's title.

    Raises:
        ValueError: shapes that do not match ``layer_names``/``epochs``/``edges``.

    Example::

        >>> fig = plot_gradient_flow(np.array([[1e-6, 1e-5], [1e-3, 1e-3]]), ["conv1", "fc"])
        >>> fig.axes[1].get_xscale()
        'log'
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != len(layer_names):
        raise ValueError(
            f"`matrix` must have shape (len(layer_names), columns) = ({len(layer_names)}, C), got {matrix.shape}"
        )
    edges = _column_edges(matrix.shape[1], epochs, edges)
    if lines is None:
        lines, line_epochs = matrix[:, -max_lines:], [int(e) for e in edges[:-1][-max_lines:]]
    lines = np.asarray(lines, dtype=float).reshape(len(layer_names), -1)
    line_epochs = list(range(lines.shape[1])) if line_epochs is None else list(line_epochs)
    if len(line_epochs) != lines.shape[1]:
        raise ValueError(
            f"`line_epochs` has {len(line_epochs)} entries but `lines` has {lines.shape[1]} columns"
        )
    matrix, edges = _bin_columns(matrix, edges, max_columns)
    lines, line_epochs = lines[:, lines.shape[1] - min(max_lines, lines.shape[1]) :], line_epochs[-max_lines:]

    num_layers = len(layer_names)
    step = max(1, math.ceil(num_layers / FLOW_MAX_LABELS))
    labelled = range(0, num_layers, step)
    height = min(9.0, 3.0 + 0.12 * len(labelled))
    figure = Figure(figsize=(10.0, height))
    label_width = 0.08 * max((len(layer_names[i]) for i in labelled), default=1)  # inches at 7 pt
    figure.subplots_adjust(  # fixed margins in inches: constrained layout would triple the cost
        left=min(0.45, (0.5 + label_width) / 10.0), right=0.98, top=1 - 0.6 / height, bottom=0.5 / height
    )
    heat_axes, line_axes = figure.subplots(
        1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2], "wspace": 0.3}
    )
    _draw_flow_heatmap(figure, heat_axes, _positive(matrix), edges)
    _draw_flow_lines(line_axes, _positive(lines), line_epochs, vanish_threshold, explode_threshold)
    heat_axes.set_yticks(np.asarray(labelled), [layer_names[i] for i in labelled], fontsize=7)
    heat_axes.set_ylim(num_layers - 0.5, -0.5)
    heat_axes.set_ylabel("layer (forward order, input at top)")
    figure.suptitle(title)
    return figure


def _column_edges(columns: int, epochs: Sequence[float] | None, edges: Sequence[float] | None) -> np.ndarray:
    if edges is not None:
        edges = np.asarray(edges, dtype=float)
        if edges.shape != (columns + 1,):
            raise ValueError(
                f"`edges` must have {columns + 1} entries for {columns} columns, got {edges.shape}"
            )
        return edges
    starts = np.arange(columns, dtype=float) if epochs is None else np.asarray(epochs, dtype=float)
    if starts.shape != (columns,):
        raise ValueError(f"`epochs` has {starts.size} entries but `matrix` has {columns} columns")
    return np.append(starts, starts[-1] + 1 if columns else 1.0)


def _bin_columns(matrix: np.ndarray, edges: np.ndarray, max_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_columns`` columns: groups of ``ceil(C / max_columns)`` adjacent columns averaged."""
    columns = matrix.shape[1]
    if columns <= max_columns:
        return matrix, edges
    group = math.ceil(columns / max_columns)
    starts = np.arange(0, columns, group)
    finite = np.isfinite(matrix)
    sums = np.add.reduceat(np.where(finite, matrix, 0.0), starts, axis=1)
    counts = np.add.reduceat(finite.astype(float), starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        binned = np.where(counts > 0, sums / counts, np.nan)
    return binned, np.append(edges[starts], edges[-1])


def _positive(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def _draw_flow_heatmap(figure: Figure, axes: Axes, matrix: np.ndarray, edges: np.ndarray) -> None:
    """Layers × epoch bins on a log colour scale (one image: cheap whatever its size), colour bar."""
    axes.set_xlabel("epoch")
    width = int(np.max(np.diff(edges))) if len(edges) > 1 else 1
    per = "per epoch" if width <= 1 else f"per bin of {width} epochs"
    axes.set_title(f"average mean |∂L/∂W| {per}", fontsize=9)
    if not np.isfinite(matrix).any():
        axes.text(0.5, 0.5, "no finite positive gradient", ha="center", va="center", transform=axes.transAxes)
        return
    low, high = np.nanmin(matrix), np.nanmax(matrix)
    norm = LogNorm(low, high if high > low else low * 10)
    extent = (edges[0], edges[-1], matrix.shape[0] - 0.5, -0.5)
    image = axes.imshow(
        np.ma.masked_invalid(matrix),
        norm=norm,
        cmap="viridis",
        aspect="auto",
        interpolation="nearest",
        extent=extent,
    )
    colourbar = figure.colorbar(image, ax=axes, pad=0.02, fraction=0.06, label="mean |∂L/∂W| (log scale)")
    _plain_log_ticks(colourbar.ax.yaxis)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))


def _plain_log_ticks(axis: Axis) -> None:
    """At most 7 log-axis ticks, written ``1e-18`` without mathtext and without minor ticks (mathtext
    parsing and tick objects dominate a figure's drawing time)."""
    axis.set_major_locator(LogLocator(numticks=7))
    axis.set_major_formatter(
        FuncFormatter(lambda value, _: f"1e{math.log10(value):.0f}" if value > 0 else "")
    )
    axis.set_minor_locator(NullLocator())


def _draw_flow_lines(
    axes: Axes,
    lines: np.ndarray,
    epochs: Sequence[int],
    vanish_threshold: float | None,
    explode_threshold: float | None,
) -> None:
    """The given epochs' per-layer values against depth (layers on the shared y axis), log x."""
    depth = np.arange(lines.shape[0])
    shades = colormaps["Greys"](np.linspace(0.35, 1.0, max(len(epochs), 1)))
    for column, (epoch, shade) in enumerate(zip(epochs, shades)):
        axes.plot(
            lines[:, column],
            depth,
            marker="o",
            markersize=2,
            linewidth=1.0,
            color=shade,
            label=f"epoch {epoch}",
        )
    axes.set_title(f"last {len(epochs)} epoch(s)", fontsize=9)
    axes.set_xlabel("average mean |∂L/∂W|")
    axes.grid(True, axis="x", which="major", alpha=0.3)
    if not np.isfinite(lines).any():
        return
    axes.set_xscale("log")
    _plain_log_ticks(axes.xaxis)
    low, high = np.nanmin(lines), np.nanmax(lines)
    for value, colour, label in (
        (vanish_threshold, "tab:blue", "vanishing threshold"),
        (explode_threshold, "tab:red", "exploding threshold"),
    ):
        if value is not None and low / 10 <= value <= high * 10:
            axes.axvline(value, color=colour, linestyle="--", linewidth=0.8, label=label)
    axes.legend(loc="best", fontsize=7)


BEACON_PROGRESS = (0.05, 0.2, 0.4, 0.6, 0.8, 1.0)


def beacon_map(
    runs: Mapping[str, str | os.PathLike],
    *,
    color_by: str = "batch_size",
    errors: Mapping[str, float] | None = None,
    progress: Sequence[float] = BEACON_PROGRESS,
) -> Figure:
    """C̄_K (x) against L_K (y) trajectories of several runs (seed 004_e5d92837cb57ce8a.txt Fig. 5).

    Each run is the per-epoch CSV that :class:`~lightning_tricks.FisherSpectrum` writes
    (``fisher_spectrum.csv``: epoch, step, C_bar, L, lr, batch_size). Its trajectory is drawn with
    markers at the given fractions of training (seed 004 marks 5, 20, 40, 60, 80 and 100 %) and
    coloured by the run's final ``color_by`` column (``"batch_size"`` or ``"lr"``, log scale).
    With ``errors`` (run → final test error) for at least three runs, the error interpolated over
    the runs' final (C̄, L) points is drawn as a filled contour behind them (seed 004 Fig. 1b).

    Raises:
        ValueError: no runs, an unknown ``color_by``, or ``progress`` outside (0, 1].
    """
    if not runs:
        raise ValueError("`runs` must name at least one FisherSpectrum CSV file.")
    if color_by not in ("batch_size", "lr"):
        raise ValueError(f"`color_by` must be 'batch_size' or 'lr'; got {color_by!r}.")
    if any(not 0 < p <= 1 for p in progress):
        raise ValueError(f"`progress` fractions must be in (0, 1]; got {progress}.")
    tables = {label: _read_fisher_csv(path) for label, path in runs.items()}
    figure = Figure(figsize=(7, 5.5), layout="constrained")
    axes = figure.add_subplot()
    if errors is not None and len(errors) >= 3:
        _draw_error_contour(figure, axes, tables, errors)
    values = np.array([table[color_by][-1] for table in tables.values()])
    norm = _color_norm(values)
    cmap = colormaps["plasma"]
    for (label, table), value in zip(tables.items(), values):
        color = cmap(norm(value))
        axes.plot(table["C_bar"], table["L"], color=color, linewidth=1.2, alpha=0.8)
        marks = _progress_indices(len(table["C_bar"]), progress)
        sizes = np.linspace(12, 48, len(marks))
        axes.scatter(table["C_bar"][marks], table["L"][marks], color=color, s=sizes, zorder=3)
        final = (table["C_bar"][-1], table["L"][-1])
        axes.annotate(label, final, xytext=(4, 4), textcoords="offset points", fontsize=8)
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label=color_by)
    axes.set_xlabel("C̄_K  (running mean truncated condition number, eq. 7)")
    axes.set_ylabel("L_K  (cumulative Fisher energy, eq. 8)")
    marks = ", ".join(f"{p:.0%}" for p in progress)
    axes.set_title(f"Beacon map (markers at {marks} of training)", fontsize=9)
    axes.grid(True, alpha=0.3)
    return figure


def _color_norm(values: np.ndarray) -> Normalize:
    """Log scale over the runs' values (batch sizes and learning rates span decades)."""
    low, high = float(values.min()), float(values.max())
    return LogNorm(low, high) if 0 < low < high else Normalize(low - 1, high + 1)


def _read_fisher_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    rows = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
    if rows.size == 0:
        raise ValueError(f"{path} has no epoch rows yet.")
    return {name: np.atleast_1d(rows[name]) for name in rows.dtype.names}


def _progress_indices(length: int, progress: Sequence[float]) -> np.ndarray:
    """Row index reached after each fraction of training (the last row is 100 %)."""
    return np.unique([max(math.ceil(p * length) - 1, 0) for p in progress])


def _draw_error_contour(
    figure: Figure, axes: Axes, tables: Mapping[str, dict[str, np.ndarray]], errors: Mapping[str, float]
) -> None:
    labels = [label for label in tables if label in errors]
    x = np.array([tables[label]["C_bar"][-1] for label in labels])
    y = np.array([tables[label]["L"][-1] for label in labels])
    z = np.array([errors[label] for label in labels])
    contour = axes.tricontourf(x, y, z, levels=12, cmap="Greys", alpha=0.5)
    figure.colorbar(contour, ax=axes, label="test error")


def plot_minibatch_heatmap(
    matrix: np.ndarray,
    epochs: Sequence[int],
    batch_values: Sequence[float] | None = None,
    *,
    metric: str = "metric",
    distance: str = "l2",
    log_scale: bool = False,
    title: str = "Mini-batch gradient distance to the full gradient",
    cmap: str = "magma_r",
) -> Figure:
    """Heatmap of D_{e,k}, the distance of mini-batch k's gradient to the full-batch gradient at
    epoch e's starting parameters (seed ``002_696f8026b30a9c31.txt`` §3.1, Algorithm 1; one figure per
    training phase as in Figs. 1–4).

    Batch rank (metric order) runs along the x axis, with the batches' mean metric value on a top
    axis; epochs run down the y axis; light cells are short distances, dark ones long (the seed's
    colour scheme), with a colour bar, logarithmic with ``log_scale``. Non-finite cells are blank.

    Args:
        matrix: ``(epochs, batches)`` distances.
        epochs: the epoch of each row.
        batch_values: each batch's mean metric value (top axis), or ``None``.
        metric: metric name for the axis label.
        distance: ``"l2"`` or ``"cosine"`` for the colour-bar label.
        log_scale: logarithmic colour scale (non-positive cells blank).
        title: axes title.
        cmap: matplotlib colormap name.

    Raises:
        ValueError: ``matrix`` is not 2-D or does not match ``epochs``/``batch_values``.

    Example::

        >>> fig = plot_minibatch_heatmap(np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 0.5]]), [0, 1], [0.1, 0.5, 0.9])
        >>> heatmap, colour_bar = fig.axes
        >>> heatmap.get_ylabel(), colour_bar.get_ylabel()
        ('epoch', '‖∇_k − ∇_e‖')
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != len(epochs):
        raise ValueError(
            f"`matrix` must have shape (len(epochs), batches) = ({len(epochs)}, K); got {matrix.shape}"
        )
    if batch_values is not None and len(batch_values) != matrix.shape[1]:
        raise ValueError(
            f"`batch_values` has {len(batch_values)} entries but `matrix` has {matrix.shape[1]} columns"
        )
    usable = np.isfinite(matrix) & ((matrix > 0) if log_scale else True)
    shown = np.ma.masked_where(~usable, matrix)
    values = matrix[usable]
    low, high = (values.min(), values.max()) if values.size else (1.0, 10.0)
    high = high if high > low else low * 1.01 + 1e-12
    norm = LogNorm(vmin=low, vmax=high) if log_scale else Normalize(vmin=low, vmax=high)

    figure = Figure(
        figsize=(max(5.0, 2.5 + 0.06 * matrix.shape[1]), max(3.2, 1.8 + 0.12 * matrix.shape[0])),
        layout="constrained",
    )
    axes = figure.add_subplot()
    rows = np.arange(matrix.shape[0] + 1) - 0.5
    image = axes.pcolormesh(np.arange(matrix.shape[1] + 1) - 0.5, rows, shown, cmap=cmap, norm=norm)
    axes.set_ylim(rows[-1], rows[0])  # first epoch at the top
    ticks = _spread_ticks(len(epochs), 10)
    axes.set_yticks(ticks, [str(epochs[t]) for t in ticks])
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    axes.set_xlabel(f"batch rank (sorted by {metric})")
    axes.set_ylabel("epoch")
    axes.set_title(title)
    label = "‖∇_k − ∇_e‖" if distance == "l2" else "1 − cos(∇_k, ∇_e)"
    figure.colorbar(image, ax=axes, label=label)
    if batch_values is not None:
        _draw_metric_axis(axes, np.asarray(batch_values, dtype=float), metric)
    return figure


def _draw_metric_axis(axes: Axes, batch_values: np.ndarray, metric: str) -> None:
    """A top x axis labelling a few batch ranks with the batches' mean metric value."""
    top = axes.secondary_xaxis("top")
    ticks = _spread_ticks(len(batch_values), 6)
    top.set_xticks(ticks, [f"{batch_values[t]:.3g}" for t in ticks])
    top.set_xlabel(f"batch mean {metric}")


def _spread_ticks(length: int, most: int) -> list[int]:
    """Up to ``most`` integer positions spread evenly over ``0 … length-1``."""
    if length <= 0:
        return []
    return sorted({round(x) for x in np.linspace(0, length - 1, num=min(most, length))})
