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
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_gradient_flow(
    matrix: np.ndarray,
    layer_names: Sequence[str],
    epochs: Sequence[int] | None = None,
    *,
    vanish_threshold: float | None = None,
    explode_threshold: float | None = None,
    title: str = "Gradient flow",
    cmap: str = "viridis",
) -> Figure:
    """Mean ``|∂L/∂θ|`` per layer against depth, one line per epoch (seed
    ``001_0184062a2e770d9a.txt`` §2, Fig. 1a–b and Fig. 2).

    Layers run along the x axis in forward order (input left, output right) and are labelled by
    name; the y axis is logarithmic; epochs are coloured along ``cmap`` with a colour bar.
    Non-finite and non-positive entries (no gradient, NaN) leave gaps. Thresholds inside the
    plotted range are drawn as dashed lines.

    Args:
        matrix: ``(layers, epochs)`` array, entry ``[ℓ, e]`` the average over epoch ``e``'s steps
            of layer ℓ's mean absolute gradient.
        layer_names: one name per row of ``matrix``.
        epochs: epoch numbers of the columns (default ``0 … E-1``).
        vanish_threshold: drawn as a dashed line when given.
        explode_threshold: drawn as a dashed line when given.
        title: axes title.
        cmap: matplotlib colormap name for the epoch ramp.

    Raises:
        ValueError: ``matrix`` is not 2-D or its shape does not match ``layer_names``/``epochs``.

    Example::

        >>> fig = plot_gradient_flow(np.array([[1e-6, 1e-5], [1e-3, 1e-3]]), ["conv1", "fc"])
        >>> fig.axes[0].get_yscale()
        'log'
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != len(layer_names):
        raise ValueError(
            f"`matrix` must have shape (len(layer_names), epochs) = ({len(layer_names)}, E), "
            f"got {matrix.shape}"
        )
    epochs = list(range(matrix.shape[1])) if epochs is None else list(epochs)
    if len(epochs) != matrix.shape[1]:
        raise ValueError(f"`epochs` has {len(epochs)} entries but `matrix` has {matrix.shape[1]} columns")

    num_layers = len(layer_names)
    figure = Figure(figsize=(max(6.0, 2.5 + 0.22 * num_layers), 4.8), layout="constrained")
    axes = figure.add_subplot()
    plotted = np.where(np.isfinite(matrix) & (matrix > 0), matrix, np.nan)
    depth = np.arange(num_layers)
    low, high = (min(epochs), max(epochs)) if epochs else (0, 0)
    norm = Normalize(vmin=low, vmax=max(high, low + 1))
    colours = colormaps[cmap]
    for column, epoch in enumerate(epochs):
        axes.plot(
            depth, plotted[:, column], marker="o", markersize=2.5, linewidth=1.2, color=colours(norm(epoch))
        )

    if np.isfinite(plotted).any():
        axes.set_yscale("log")
        _draw_thresholds(axes, vanish_threshold, explode_threshold)
    else:
        axes.text(0.5, 0.5, "no finite positive gradient", ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks(
        depth, list(layer_names), rotation=90, fontsize=max(4.0, min(8.0, 400.0 / max(num_layers, 1)))
    )
    axes.set_xlim(-0.5, num_layers - 0.5)
    axes.set_xlabel("layer, in forward order (input → output)")
    axes.set_ylabel("average mean |∂L/∂θ|")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    if epochs:
        colourbar = figure.colorbar(ScalarMappable(norm=norm, cmap=colours), ax=axes, pad=0.01)
        colourbar.set_label("epoch")
        colourbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def _draw_thresholds(axes: Axes, vanish_threshold: float | None, explode_threshold: float | None) -> None:
    """Dashed horizontal lines at the thresholds that fall inside the current y range."""
    low, high = axes.get_ylim()
    thresholds = (
        (vanish_threshold, "tab:blue", "vanishing threshold"),
        (explode_threshold, "tab:red", "exploding threshold"),
    )
    drawn = False
    for value, colour, label in thresholds:
        if value is not None and low <= value <= high:
            axes.axhline(value, color=colour, linestyle="--", linewidth=0.8, label=label)
            drawn = True
    if drawn:
        axes.legend(loc="best", fontsize=7)
    axes.set_ylim(low, high)


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
