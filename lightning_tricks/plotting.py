"""Matplotlib figures of the callbacks' numbers; no logger code (the callbacks log the figures).

Figures are built on :class:`matplotlib.figure.Figure` directly, without pyplot, so they need no
GUI backend, hold no global state and can be made from any thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure


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
    norm = Normalize(
        vmin=min(epochs, default=0), vmax=max(max(epochs, default=0), min(epochs, default=0) + 1)
    )
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
    return figure


def _draw_thresholds(axes, vanish_threshold: float | None, explode_threshold: float | None) -> None:
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
