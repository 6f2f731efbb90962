"""Matplotlib figures of the callbacks' numbers; no logger code (the callbacks log the figures).

Figures are built on :class:`matplotlib.figure.Figure` directly, without pyplot, so they need no
GUI backend, hold no global state and can be made from any thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator
from matplotlib.tri import TriAnalyzer, Triangulation

FLOW_MAX_COLUMNS = 64
FLOW_MAX_LINES = 5
FLOW_MAX_LABELS = 16
"""Most layer names the gradient-flow figure writes (first and last always); more are illegible at
TensorBoard's card size."""


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
    curves), the thresholds dashed. Every layer keeps its row and point, but at most
    :data:`FLOW_MAX_LABELS` layer names are written, spread evenly over the depth and always the
    first and last layer (VGG38's 37 names would be illegible at TensorBoard's card size); the
    figure's height is capped, so its cost depends on neither the
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
    labelled = _spread_ticks(num_layers, FLOW_MAX_LABELS)
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
BEACON_MAX_LABELS = 12
"""Most runs whose names the beacon map writes at their final points (more would overlap)."""
BEACON_LOG_SPAN = 100.0
"""``log_l=None``: L_K on a logarithmic axis when the runs' final L_K span more than this factor."""
CONTOUR_MIN_RUNS = 6
"""Fewest runs (final points with an error) the beacon map's error contour is drawn from."""
CONTOUR_MIN_DISTINCT = 3
"""Fewest distinct final C̄_K values, and L_K values, the error contour is drawn from."""
CONTOUR_MAX_EDGE = 3.0
"""A triangle with an edge longer than this many times the median edge is masked (a gap)."""
CONTOUR_MIN_CIRCLE_RATIO = 0.1
"""A border triangle whose in-/circumcircle radius ratio is below this is masked (a sliver)."""
_COLOR_LABELS = {"batch_size": "mini-batch size |B_k|", "lr": "learning rate α_k"}
_REQUIRED = ("C_bar", "L")

FisherRun = str | os.PathLike | Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]]
"""One run's FisherSpectrum table: a ``fisher_spectrum.csv`` / ``fisher_history.csv`` path, the
records :func:`lightning_tricks.results.load_fisher_history` returns, or ``{column: values}``."""


class ContourSupport(NamedTuple):
    """Whether the runs' final points support an error contour, and why not."""

    triangulation: Triangulation | None
    """The masked Delaunay triangulation of the final (C̄_K, L_K) points, or ``None``."""
    reason: str
    """Why there is no contour (empty when there is one)."""


def beacon_map(
    runs: Mapping[str, FisherRun],
    *,
    color_by: str = "batch_size",
    errors: Mapping[str, float] | None = None,
    progress: Sequence[float] = BEACON_PROGRESS,
    min_contour_runs: int = CONTOUR_MIN_RUNS,
    error_label: str = "test error",
    log_l: bool | None = None,
    guided: Mapping[str, FisherRun] | None = None,
) -> Figure:
    """C̄_K (x) against L_K (y) trajectories of several runs, over their error contour where the runs
    support one (seed ``004_e5d92837cb57ce8a.txt`` Fig. 5 trajectories, Fig. 1b / Fig. 3 contour).

    ``guided`` runs are drawn over the map, for the closed loop of seed 004 Fig. 1d (the beacons
    are ``runs``, a run steered by them is guided): a black-edged line coloured row by row by the
    ``color_by`` value it trained at (the beacons' palette, so a change of batch size shows as a change
    of colour), always named at its end. They take no part in the contour nor in the label budget.

    Each run is FisherSpectrum's table (:data:`FisherRun`: per epoch, ``fisher_spectrum.csv``, or
    per measured step, ``fisher_history.csv``); its trajectory is drawn with markers growing at the
    ``progress`` fractions of its rows (seed 004 marks 5, 20, 40, 60, 80 and 100 % of training) and
    its name written at its final point (name runs as the sweep does, ``s32-lr0.1``), followed by
    its error when ``errors`` has one — for at most :data:`BEACON_MAX_LABELS` runs; beyond that the
    names would overlap, so none is written and the title says so. L_K is drawn on a logarithmic
    axis with ``log_l=True``, or by default when the runs' final L_K span more than
    :data:`BEACON_LOG_SPAN` (a grid of batch sizes 8 … 512 spans three decades).

    **Colours.** Runs are coloured by their first row's ``color_by`` (``"batch_size"`` or ``"lr"``:
    the initial value, which names a run and is where a dynamic-sampling run starts, seed 004
    Fig. 5), one colour per distinct value; the colour bar has one band and one tick per value that
    occurs, so it never shows a range no run has. With a single value there is no colour bar: the
    value is written in the title.

    **Error contour — the rule.** With ``errors`` (run → final error), the error is interpolated
    linearly over the runs' final (C̄_K, L_K) points (log L_K on a logarithmic axis) and drawn as filled contours only when

    1. at least ``min_contour_runs`` runs (default :data:`CONTOUR_MIN_RUNS` = 6) have a finite
       error and final point,
    2. their final points have at least :data:`CONTOUR_MIN_DISTINCT` = 3 distinct C̄_K values and
       3 distinct L_K values (6 significant digits), and the errors are not all equal,
    3. the points are not collinear (in coordinates scaled to the points' span on each axis, the
       smaller singular value of the centred points is at least 1e-3 of the larger),
    4. on their Delaunay triangulation (in those scaled coordinates), after masking border slivers
       (in-/circumcircle ratio < :data:`CONTOUR_MIN_CIRCLE_RATIO`) and triangles with an edge longer
       than :data:`CONTOUR_MAX_EDGE` × the median edge (gaps between clusters of runs), at least
       two triangles remain.

    The contour then covers only the unmasked triangles, i.e. never leaves the convex hull of the
    points nor bridges a gap. Otherwise no contour is drawn and the title says why (e.g. "no error
    contour: it needs ≥ 6 runs with an error; have 3"). (The seed averages the five nearest errors
    on a grid; interpolating over triangles draws nothing the runs do not span.)

    Args:
        runs: run name → its FisherSpectrum table.
        color_by: ``"batch_size"`` or ``"lr"``.
        errors: run name → final error (e.g. test error), for the contour and the labels.
        progress: fractions of training in (0, 1] marked on each trajectory.
        min_contour_runs: fewest runs with an error for a contour (>= 3).
        error_label: what ``errors`` are, for the colour bar.
        log_l: logarithmic L_K axis; ``None`` decides by the final L_K's span.
        guided: run name → FisherSpectrum table of runs drawn over the beacons (``errors`` may name
            them, for their labels); per-epoch tables (``fisher_spectrum.csv``), whose rows carry
            the epoch's batch size — a per-step row carries its own, a ragged last batch's too.

    Raises:
        ValueError: no runs, an unknown ``color_by``, ``progress`` outside (0, 1], ``min_contour_runs``
            < 3, ``errors`` naming a run in neither ``runs`` nor ``guided``, a name in both, or a table
            without rows or without the ``C_bar``, ``L`` or ``color_by`` column.

    Example::

        >>> run = {"C_bar": [9.0, 8.0, 8.5], "L": [0.1, 0.3, 0.4], "batch_size": [32] * 3, "lr": [0.1] * 3}
        >>> figure = beacon_map({"s32-lr0.1": run}, errors={"s32-lr0.1": 0.05})
        >>> print(figure.axes[0].get_title())
        Beacon map: markers at 5%, 20%, 40%, 60%, 80%, 100% of training; labels: run: test error
        all runs: mini-batch size |B_k| = 32
        no error contour: it needs ≥ 6 runs with an error; have 1
    """
    guided = dict(guided or {})
    _check_beacon_arguments(runs, color_by, errors, progress, min_contour_runs, guided)
    tables = {label: _fisher_table(label, run, color_by) for label, run in runs.items()}
    guided_tables = {label: _fisher_table(label, run, color_by) for label, run in guided.items()}
    errors = dict(errors or {})
    log = _wants_log_l({**tables, **guided_tables}) if log_l is None else log_l
    figure = Figure(figsize=(8, 6), layout="constrained")
    axes = figure.add_subplot()
    if log:
        axes.set_yscale("log")
    contour_note = ""
    beacon_errors = {label: error for label, error in errors.items() if label in tables}
    if beacon_errors:
        contour_note = _draw_error_contour(
            figure, axes, tables, beacon_errors, min_contour_runs, error_label, log
        )
    first_values = {label: table[color_by][0] for label, table in tables.items()}
    guided_values = {value for table in guided_tables.values() for value in table[color_by]}
    palette, colour_note = _palette(figure, axes, {*first_values.values(), *guided_values}, color_by)
    named = len(tables) <= BEACON_MAX_LABELS
    for label, table in tables.items():
        colour = palette[first_values[label]]
        _draw_trajectory(axes, label if named else None, table, colour, progress, errors.get(label))
    for index, (label, table) in enumerate(guided_tables.items()):
        colours = [palette[value] for value in table[color_by]]
        _draw_guided(axes, label, table, colours, progress, errors.get(label), index)
    axes.set_xlabel("C̄_K: mean truncated condition number of F̃_k (seed 004 eq. 7)")
    axes.set_ylabel("L_K: cumulative l_k = Σ (α_k/|B_k|)·√Tr F̃_k (eq. 8)" + (", log scale" if log else ""))
    marks = ", ".join(f"{p:.0%}" for p in progress)
    labels = f"labels: run: {error_label}" if errors else "labels: run"
    if not named:
        labels = f"no run labels for {len(tables)} runs (more than {BEACON_MAX_LABELS})"
    head = f"Beacon map: markers at {marks} of training; {labels}"
    guided_note = (
        f"black-edged: {', '.join(guided_tables)}, coloured by the value trained at" if guided else ""
    )
    title = "\n".join([head, *filter(None, [colour_note, guided_note, contour_note])])
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    return figure


def error_contour_support(
    x: Sequence[float], y: Sequence[float], errors: Sequence[float], min_runs: int = CONTOUR_MIN_RUNS
) -> ContourSupport:
    """The masked triangulation the beacon map's error contour is drawn on, or why there is none
    (the rule in :func:`beacon_map`); ``x``, ``y``, ``errors`` are the runs' final C̄_K, L_K and
    error, non-finite entries left out."""
    x, y, errors = (np.asarray(v, dtype=float) for v in (x, y, errors))
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(errors)
    x, y, errors = x[keep], y[keep], errors[keep]
    if len(x) < min_runs:
        return ContourSupport(
            None, f"no error contour: it needs ≥ {min_runs} runs with an error; have {len(x)}"
        )
    distinct = [len({float(f"{v:.6g}") for v in axis}) for axis in (x, y)]
    if min(distinct) < CONTOUR_MIN_DISTINCT:
        return ContourSupport(
            None,
            f"no error contour: it needs ≥ {CONTOUR_MIN_DISTINCT} distinct C̄_K and L_K values; "
            f"have {distinct[0]} and {distinct[1]}",
        )
    if np.ptp(errors) == 0:
        return ContourSupport(None, "no error contour: every run has the same error")
    scaled = np.column_stack([(x - x.min()) / np.ptp(x), (y - y.min()) / np.ptp(y)])
    singular = np.linalg.svd(scaled - scaled.mean(axis=0), compute_uv=False)
    if singular[-1] < 1e-3 * singular[0]:
        return ContourSupport(None, f"no error contour: the {len(x)} runs' final points are collinear")
    triangulation = Triangulation(scaled[:, 0], scaled[:, 1])
    mask = TriAnalyzer(triangulation).get_flat_tri_mask(CONTOUR_MIN_CIRCLE_RATIO) | _long_triangles(
        scaled, triangulation
    )
    if np.count_nonzero(~mask) < 2:
        return ContourSupport(
            None,
            "no error contour: fewer than 2 triangles between the runs' final points are not gaps or slivers",
        )
    return ContourSupport(Triangulation(x, y, triangulation.triangles, mask=mask), "")


def _long_triangles(points: np.ndarray, triangulation: Triangulation) -> np.ndarray:
    """Triangles with an edge longer than ``CONTOUR_MAX_EDGE`` × the median edge."""
    corners = points[triangulation.triangles]  # (T, 3, 2)
    lengths = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2)  # (T, 3)
    edges = np.linalg.norm(np.diff(points[triangulation.edges], axis=1)[:, 0], axis=1)
    return lengths.max(axis=1) > CONTOUR_MAX_EDGE * np.median(edges)


def _check_beacon_arguments(
    runs: Mapping[str, FisherRun],
    color_by: str,
    errors: Mapping[str, float] | None,
    progress: Sequence[float],
    min_contour_runs: int,
    guided: Mapping[str, FisherRun],
) -> None:
    if not runs:
        raise ValueError("`runs` must name at least one run's FisherSpectrum table (or CSV file).")
    if color_by not in _COLOR_LABELS:
        raise ValueError(f"`color_by` must be 'batch_size' or 'lr'; got {color_by!r}.")
    if any(not 0 < p <= 1 for p in progress):
        raise ValueError(f"`progress` fractions must be in (0, 1]; got {progress}.")
    if isinstance(min_contour_runs, bool) or not isinstance(min_contour_runs, int) or min_contour_runs < 3:
        raise ValueError(
            f"`min_contour_runs` must be an int >= 3 (a triangle needs three points); got {min_contour_runs!r}."
        )
    unknown = sorted(set(errors or {}) - set(runs) - set(guided))
    if unknown:
        raise ValueError(f"`errors` names runs that are not in `runs`: {unknown}; runs: {sorted(runs)}.")
    both = sorted(set(runs) & set(guided))
    if both:
        raise ValueError(f"runs {both} are in both `runs` and `guided`; name each once.")


def _fisher_table(label: str, run: FisherRun, color_by: str) -> dict[str, np.ndarray]:
    """A run's table as ``{column: float array}`` with at least one row and the needed columns."""
    if isinstance(run, (str, os.PathLike)):
        table = _read_fisher_csv(run)
    elif isinstance(run, Mapping):
        table = {str(name): np.atleast_1d(np.asarray(values, dtype=float)) for name, values in run.items()}
    else:
        names = list(run[0]) if len(run) else []
        table = {name: np.array([row[name] for row in run], dtype=float) for name in names}
    missing = [name for name in (*_REQUIRED, color_by) if name not in table]
    if missing:
        raise ValueError(
            f"run {label!r}: its FisherSpectrum table has no column {missing} (columns: {sorted(table)}); "
            "pass fisher_spectrum.csv / fisher_history.csv or what lightning_tricks.results reads from them."
        )
    if len(table["C_bar"]) == 0:
        raise ValueError(f"run {label!r}: its FisherSpectrum table has no rows yet.")
    return table


def _read_fisher_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    rows = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
    if rows.size == 0:
        raise ValueError(f"{path} has no rows yet.")
    return {name: np.atleast_1d(rows[name]).astype(float) for name in rows.dtype.names}


def _palette(figure: Figure, axes: Axes, values: set[float], color_by: str) -> tuple[dict[float, tuple], str]:
    """One colour per distinct value, a colour bar with one band and tick per value (none for a
    single value); returns value → colour and a title note."""
    distinct = sorted(values)
    label = _COLOR_LABELS[color_by]
    if len(distinct) == 1:
        return {distinct[0]: colormaps["plasma"](0.2)}, f"all runs: {label} = {distinct[0]:g}"
    cmap = ListedColormap(colormaps["plasma"](np.linspace(0.0, 0.85, len(distinct))))
    norm = BoundaryNorm(np.arange(len(distinct) + 1) - 0.5, len(distinct))
    colourbar = figure.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=axes,
        ticks=np.arange(len(distinct)),
        label=f"{label} (at the start)",
    )
    colourbar.ax.set_yticklabels([f"{value:g}" for value in distinct])
    colourbar.ax.minorticks_off()
    return {value: cmap(index) for index, value in enumerate(distinct)}, ""


def _wants_log_l(tables: Mapping[str, dict[str, np.ndarray]]) -> bool:
    """Whether the positive final L_K span more than ``BEACON_LOG_SPAN``."""
    final = np.array([table["L"][-1] for table in tables.values()], dtype=float)
    final = final[np.isfinite(final) & (final > 0)]
    return len(final) > 1 and final.max() > BEACON_LOG_SPAN * final.min()


def _draw_trajectory(
    axes: Axes,
    label: str | None,
    table: Mapping[str, np.ndarray],
    colour: tuple,
    progress: Sequence[float],
    error: float | None,
) -> None:
    """The run's (C̄_K, L_K) curve, growing markers at the ``progress`` rows, its name (unless
    ``None``) at the end."""
    c_bar, total = table["C_bar"], table["L"]
    axes.plot(c_bar, total, color=colour, linewidth=1.2, alpha=0.8)
    marks = _progress_indices(len(c_bar), progress)
    axes.scatter(c_bar[marks], total[marks], color=colour, s=np.linspace(12, 48, len(marks)), zorder=3)
    if label is None:
        return
    text = label if error is None else f"{label}: {error:.3g}"
    axes.annotate(text, (c_bar[-1], total[-1]), xytext=(4, 4), textcoords="offset points", fontsize=7)


def _draw_guided(
    axes: Axes,
    label: str,
    table: Mapping[str, np.ndarray],
    colours: Sequence[tuple],
    progress: Sequence[float],
    error: float | None,
    index: int,
) -> None:
    """A guided run over the beacons: black-edged segments coloured by the value each row trained
    at, black-edged markers at the ``progress`` rows, its name at the end (the ``index``-th guided
    run's a line lower, so runs ending close together stay legible)."""
    c_bar, total = table["C_bar"], table["L"]
    points = np.column_stack([c_bar, total])
    axes.plot(c_bar, total, color="black", linewidth=4.0, zorder=4, solid_capstyle="round")
    segments = np.stack([points[:-1], points[1:]], axis=1)
    axes.add_collection(LineCollection(segments, colors=colours[1:], linewidths=2.2, zorder=5))
    marks = _progress_indices(len(c_bar), progress)
    sizes = np.linspace(16, 60, len(marks))
    marked = [colours[i] for i in marks]
    axes.scatter(c_bar[marks], total[marks], color=marked, edgecolors="black", s=sizes, zorder=6)
    text = label if error is None else f"{label}: {error:.3g}"
    offset = (5, -10 - 11 * index)
    axes.annotate(
        text, (c_bar[-1], total[-1]), xytext=offset, textcoords="offset points", fontsize=8, weight="bold"
    )


def _progress_indices(length: int, progress: Sequence[float]) -> np.ndarray:
    """Row index reached after each fraction of training (the last row is 100 %)."""
    return np.unique([max(math.ceil(p * length) - 1, 0) for p in progress])


def _draw_error_contour(
    figure: Figure,
    axes: Axes,
    tables: Mapping[str, dict[str, np.ndarray]],
    errors: Mapping[str, float],
    min_runs: int,
    error_label: str,
    log_l: bool,
) -> str:
    """Filled error contours over the masked triangulation of the final points (triangulated in
    log L_K on a log axis), with a colour bar ticked at the levels; returns the title note saying
    why there is none."""
    x, y, z = (
        np.array([value(label) for label in errors], dtype=float)
        for value in (lambda r: tables[r]["C_bar"][-1], lambda r: tables[r]["L"][-1], errors.get)
    )
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(z) & ((y > 0) if log_l else True)
    x, y, used = x[keep], y[keep], z[keep]
    support = error_contour_support(x, np.log10(y) if log_l else y, used, min_runs)
    if support.triangulation is None:
        return support.reason
    triangulation = Triangulation(x, y, support.triangulation.triangles, mask=support.triangulation.mask)
    levels = MaxNLocator(nbins=min(8, len(used) - 1)).tick_values(used.min(), used.max())
    contour = axes.tricontourf(triangulation, used, levels=levels, cmap="Greys", alpha=0.5)
    figure.colorbar(contour, ax=axes, label=f"{error_label} (linear between {len(used)} runs' final points)")
    return ""


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


def plot_labelled_grid(
    grid: np.ndarray, column_labels: Sequence[str], *, title: str | None = None, width: float = 4.5
) -> Figure:
    """An image grid of equal-width columns (``(H, W, 3)`` or ``(H, W)`` in [0, 1]) with each
    column's name on top, e.g. pix2pix's input | generated | target (seed ``000_e58e526c3e6fcb5b.txt``
    Fig. 7 labels its columns the same way).

    Args:
        grid: the image, its columns side by side.
        column_labels: one name per column, left to right (>= 1).
        title: the figure's title, or ``None``.
        width: the figure's width in inches; its height follows the grid's aspect ratio.

    Raises:
        ValueError: no column label, or ``grid`` is not an image.

    Example::

        >>> fig = plot_labelled_grid(np.zeros((4, 12, 3)), ["input", "generated", "target"])
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['input', 'generated', 'target']
    """
    grid = np.asarray(grid, dtype=float)
    if grid.ndim not in (2, 3) or not column_labels:
        raise ValueError(
            f"`grid` must be an (H, W[, 3]) image and `column_labels` non-empty; got {grid.shape}, {column_labels!r}"
        )
    height, columns = grid.shape[0], len(column_labels)
    figure = Figure(
        figsize=(width, width * height / grid.shape[1] + (0.8 if title else 0.5)), layout="constrained"
    )
    axes = figure.add_subplot()
    axes.imshow(grid.clip(0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes.set_xticks((np.arange(columns) + 0.5) * grid.shape[1] / columns - 0.5, list(column_labels))
    axes.xaxis.tick_top()
    axes.tick_params(length=0)
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def plot_batch_size_schedule(
    epochs: Sequence[int], sizes: Sequence[float], lrs: Sequence[float], *, title: str = "Batch-size schedule"
) -> Figure:
    """The global batch size of every epoch as a step plot (left axis) and the learning rate at the
    epoch's start on a second, logarithmic axis (seed ``004_e5d92837cb57ce8a.txt`` §4.3's dynamic
    sampling: the batch grows while the LR stays or falls). Each value is drawn over its epoch
    ``[e, e + 1)``; an epoch absent from ``epochs`` is left as a gap. Non-positive or non-finite LRs
    are left out of the log axis.

    Args:
        epochs: the epochs (0-based) with a recorded size and LR.
        sizes: the global batch size of each epoch.
        lrs: the learning rate at each epoch's start (first param group of the first optimiser).
        title: the axes' title.

    Raises:
        ValueError: the three sequences differ in length or are empty.

    Example::

        >>> fig = plot_batch_size_schedule([0, 1, 2], [32, 64, 64], [0.1, 0.1, 0.01])
        >>> size_axes, lr_axes = fig.axes
        >>> lr_axes.get_yscale(), size_axes.get_xlabel()
        ('log', 'epoch')
    """
    epochs = np.asarray(epochs, dtype=float)
    sizes, lrs = np.asarray(sizes, dtype=float), np.asarray(lrs, dtype=float)
    if not len(epochs) or not (len(epochs) == len(sizes) == len(lrs)):
        raise ValueError(
            f"`epochs`, `sizes` and `lrs` must be non-empty and of one length, got {len(epochs)}, "
            f"{len(sizes)}, {len(lrs)}"
        )
    figure = Figure(figsize=(7.0, 3.6), layout="constrained")
    size_axes = figure.add_subplot()
    size_axes.plot(*_epoch_steps(epochs, sizes), color="tab:blue", linewidth=1.8, label="batch size")
    size_axes.set_xlabel("epoch")
    size_axes.set_ylabel("global batch size", color="tab:blue")
    size_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    size_axes.set_ylim(0, np.nanmax(sizes) * 1.1 if np.isfinite(sizes).any() else 1)
    lr_axes = size_axes.twinx()
    positive = np.where(np.isfinite(lrs) & (lrs > 0), lrs, np.nan)
    lr_axes.plot(
        *_epoch_steps(epochs, positive), color="tab:orange", linewidth=1.2, linestyle="--", label="LR"
    )
    lr_axes.set_ylabel("learning rate (log scale)", color="tab:orange")
    if np.isfinite(positive).any():
        lr_axes.set_yscale("log")
    size_axes.set_title(title)
    return figure


def _epoch_steps(epochs: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x, y of a step curve holding ``values[i]`` over ``[epochs[i], epochs[i] + 1)``, broken (NaN)
    where epochs are missing."""
    xs, ys = [], []
    for i, (epoch, value) in enumerate(zip(epochs, values)):
        if i and epoch != epochs[i - 1] + 1:
            xs.append(np.nan), ys.append(np.nan)
        xs += [epoch, epoch + 1]
        ys += [value, value]
    return np.asarray(xs), np.asarray(ys)
