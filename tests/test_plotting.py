"""The beacon map's promises, checked on the Figure's artists: the error contour only where the
runs support it, colour bars without invented ranges, labelled axes and runs."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Annotation
from matplotlib.tri import TriContourSet

from lightning_tricks.plotting import (
    BEACON_MAX_LABELS,
    CONTOUR_MIN_RUNS,
    FLOW_MAX_LABELS,
    beacon_map,
    error_contour_support,
    plot_gradient_flow,
)

BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
LEARNING_RATES = (0.025, 0.05, 0.1, 0.2, 0.4)


def run_table(batch_size: int, lr: float, rows: int = 10) -> dict[str, np.ndarray]:
    """A FisherSpectrum-like table: C̄ grows with the batch size, L with α/|B| (seed 004 §4.1)."""
    t = np.arange(1, rows + 1)
    return {
        "C_bar": 5 + np.log2(batch_size) * (1 + lr) + 0.1 * t,
        "L": 3 * lr / batch_size * t,
        "batch_size": np.full(rows, float(batch_size)),
        "lr": np.full(rows, lr),
    }


def error_of(batch_size: int, lr: float) -> float:
    return 0.05 + 0.01 * abs(np.log2(batch_size / 32)) + 0.02 * abs(np.log2(lr / 0.1))


def grid(batch_sizes=BATCH_SIZES, learning_rates=LEARNING_RATES):
    runs = {f"s{b}-lr{lr:g}": run_table(b, lr) for b in batch_sizes for lr in learning_rates}
    errors = {f"s{b}-lr{lr:g}": error_of(b, lr) for b in batch_sizes for lr in learning_rates}
    return runs, errors


def contours(figure):
    return [c for c in figure.axes[0].collections if isinstance(c, TriContourSet)]


def title(figure) -> str:
    return figure.axes[0].get_title()


def test_contour_is_drawn_from_a_full_grid_and_stays_inside_the_points_hull():
    runs, errors = grid()
    figure = beacon_map(runs, errors=errors)
    (contour,) = contours(figure)
    assert "no error contour" not in title(figure)
    assert contour.levels.min() <= min(errors.values()) and contour.levels.max() >= max(errors.values())
    x = [table["C_bar"][-1] for table in runs.values()]
    y = [table["L"][-1] for table in runs.values()]
    for path in contour.get_paths():
        if len(path.vertices):
            assert path.vertices[:, 0].min() >= min(x) - 1e-9 and path.vertices[:, 0].max() <= max(x) + 1e-9
            assert path.vertices[:, 1].min() >= min(y) - 1e-12 and path.vertices[:, 1].max() <= max(y) + 1e-12
    labels = [axes.get_ylabel() for axes in figure.axes[1:]]
    assert any("test error" in label and "35 runs" in label for label in labels), labels


@pytest.mark.parametrize("count", [1, 3, CONTOUR_MIN_RUNS - 1])
def test_contour_is_absent_with_too_few_runs_and_the_title_says_so(count):
    runs, errors = grid()
    names = list(runs)[:: len(runs) // count][:count]
    figure = beacon_map({n: runs[n] for n in names}, errors={n: errors[n] for n in names})
    assert not contours(figure)
    assert f"it needs ≥ {CONTOUR_MIN_RUNS} runs with an error; have {count}" in title(figure)


def test_min_contour_runs_moves_the_threshold():
    runs, errors = grid(batch_sizes=(16, 64, 256), learning_rates=(0.05, 0.2))
    assert not contours(beacon_map(runs, errors=errors, min_contour_runs=7))
    assert len(contours(beacon_map(runs, errors=errors, min_contour_runs=6))) == 1


def test_contour_is_absent_when_the_final_points_are_collinear():
    """One learning rate's beacons s8 … s512 (seed 004 Fig. 5) placed on a line: nothing to span."""
    runs, errors = {}, {}
    for i, batch_size in enumerate(BATCH_SIZES):
        table = run_table(batch_size, 0.1)
        table["C_bar"][-1], table["L"][-1] = 6 + i, 0.5 - 0.05 * i
        runs[f"s{batch_size}-lr0.1"], errors[f"s{batch_size}-lr0.1"] = table, error_of(batch_size, 0.1)
    figure = beacon_map(runs, errors=errors)
    assert not contours(figure)
    assert "collinear" in title(figure)


def test_contour_is_absent_with_fewer_than_three_distinct_values_on_an_axis():
    x = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    y = [0.1, 0.2, 0.3, 0.1, 0.2, 0.3]
    support = error_contour_support(x, y, [0.1, 0.2, 0.3, 0.2, 0.3, 0.4])
    assert support.triangulation is None and "have 2 and 3" in support.reason


def test_contour_is_absent_when_every_run_has_the_same_error():
    runs, _ = grid(batch_sizes=(16, 64, 256), learning_rates=(0.05, 0.1, 0.2))
    figure = beacon_map(runs, errors=dict.fromkeys(runs, 0.1))
    assert not contours(figure) and "same error" in title(figure)


def test_triangles_bridging_a_gap_and_border_slivers_are_masked():
    rng = np.random.default_rng(0)
    cluster = rng.uniform(0, 1, size=(12, 2))
    points = np.vstack([cluster, [[8.0, 8.0]]])  # one far run: its triangles span a gap
    support = error_contour_support(points[:, 0], points[:, 1], rng.uniform(0, 1, 13))
    triangulation = support.triangulation
    far = np.any(triangulation.triangles == 12, axis=1)
    assert far.any() and triangulation.mask[far].all(), "every triangle reaching the far run is masked"
    assert not triangulation.mask[~far].all(), "the cluster keeps its triangles"


def test_non_finite_errors_and_points_are_left_out():
    runs, errors = grid(batch_sizes=(16, 64, 256), learning_rates=(0.05, 0.2))
    errors["s16-lr0.05"] = float("nan")
    figure = beacon_map(runs, errors=errors)
    assert not contours(figure) and "have 5" in title(figure)


def test_one_run_has_no_colour_bar_and_its_value_is_written():
    runs, _ = grid(batch_sizes=(32,), learning_rates=(0.1,))
    figure = beacon_map(runs)
    assert len(figure.axes) == 1, "no colour bar"
    assert "all runs: mini-batch size |B_k| = 32" in title(figure)
    figure = beacon_map(runs, color_by="lr")
    assert len(figure.axes) == 1 and "learning rate α_k = 0.1" in title(figure)


def test_colour_bar_has_one_tick_per_value_that_occurs():
    runs, errors = grid(batch_sizes=(32, 512), learning_rates=(0.1,))
    figure = beacon_map(runs, errors=errors)
    assert len(figure.axes) == 2, "the batch-size colour bar; no error colour bar without a contour"
    colour_bar = figure.axes[1]
    assert [t.get_text() for t in colour_bar.get_yticklabels()] == ["32", "512"]
    assert "mini-batch size" in colour_bar.get_ylabel()
    runs, _ = grid(batch_sizes=(64,), learning_rates=(0.05, 0.1, 0.4))
    colour_bar = beacon_map(runs, color_by="lr").axes[1]
    assert [t.get_text() for t in colour_bar.get_yticklabels()] == ["0.05", "0.1", "0.4"]


def test_runs_are_coloured_by_their_first_value():
    """A dynamic-sampling run s32-to-512 takes the colour of the s32 beacon (seed 004 Fig. 5)."""
    beacon = run_table(32, 0.1)
    dynamic = run_table(32, 0.1)
    dynamic["batch_size"] = np.repeat([32.0, 64, 128, 256, 512], 2)
    figure = beacon_map({"s32-lr0.1": beacon, "s32-to-512": dynamic, "s512-lr0.1": run_table(512, 0.1)})
    lines = figure.axes[0].get_lines()
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()


def test_a_guided_run_is_drawn_over_the_beacons_coloured_by_the_size_it_trained_at():
    """Seed 004 Fig. 1d: the closed loop's run over its beacons; each segment (one epoch's travel) takes
    the colour of the size of the row it ends at, from the beacons' palette; no part in the contour."""
    runs, errors = grid(batch_sizes=(16, 32, 64, 128), learning_rates=(0.05, 0.1, 0.2))
    steered = run_table(16, 0.1, rows=6)
    steered["batch_size"] = np.array([16.0, 32, 32, 64, 64, 64])
    alone = beacon_map(runs, errors=errors)
    figure = beacon_map(runs, errors={**errors, "guided": 0.01}, guided={"guided": steered})
    (segments,) = [c for c in figure.axes[0].collections if type(c).__name__ == "LineCollection"]
    ticks = [float(t.get_text()) for t in figure.axes[-1].get_yticklabels()]
    assert ticks == [16.0, 32.0, 64.0, 128.0]
    beacon_colours = dict(zip(runs, (line.get_color() for line in figure.axes[0].get_lines())))
    expected = [to_rgba(beacon_colours[f"s{size:g}-lr0.1"]) for size in steered["batch_size"][1:]]
    np.testing.assert_allclose(segments.get_colors(), expected)  # the colour of that size's beacon
    (alone_contour,), (contour,) = contours(alone), contours(figure)
    np.testing.assert_array_equal(alone_contour.levels, contour.levels)  # the guided error 0.01 is not in it
    names = [a.get_text() for a in figure.axes[0].texts]
    assert "guided: 0.01" in names and "black-edged: guided" in title(figure)
    twins = beacon_map(runs, guided={"guided-seed0": steered, "guided-seed1": steered})
    offsets = [a.xyann for a in twins.axes[0].texts if a.get_text().startswith("guided-seed")]
    assert len(offsets) == 2 and offsets[0] != offsets[1], "runs ending at one point keep legible labels"
    with pytest.raises(ValueError, match="in both `runs` and `guided`"):
        beacon_map(runs, guided={"s16-lr0.1": steered})
    with pytest.raises(ValueError, match="not in `runs`"):
        beacon_map(runs, errors={"other": 0.1}, guided={"guided": steered})


def test_axes_name_the_measures_and_each_run_is_labelled_at_its_end():
    runs, errors = grid(batch_sizes=(16, 128), learning_rates=(0.1,))
    figure = beacon_map(runs, errors=errors)
    axes = figure.axes[0]
    assert axes.get_xlabel().startswith("C̄_K") and "truncated condition number" in axes.get_xlabel()
    assert axes.get_ylabel().startswith("L_K") and "cumulative l_k" in axes.get_ylabel()
    annotations = [child for child in axes.get_children() if isinstance(child, Annotation)]
    assert [a.get_text() for a in annotations] == [f"{name}: {errors[name]:.3g}" for name in runs]
    assert [a.xy for a in annotations] == [(t["C_bar"][-1], t["L"][-1]) for t in runs.values()]


def test_progress_markers_fall_on_the_rows_reached(tmp_path):
    """10 rows: 5 %, 20 %, …, 100 % fall on rows 0, 1, 3, 5, 7, 9."""
    runs = {}
    for batch_size in (32, 128, 512):
        table = run_table(batch_size, 0.1)
        runs[f"s{batch_size}"] = path = tmp_path / f"s{batch_size}.csv"
        columns = ["C_bar", "L", "lr", "batch_size"]
        np.savetxt(
            path,
            np.column_stack([table[c] for c in columns]),
            delimiter=",",
            header=",".join(columns),
            comments="",
        )
    figure = beacon_map(runs)
    markers = [c for c in figure.axes[0].collections if c.get_offsets().shape[0]]
    assert [m.get_offsets().shape[0] for m in markers] == [6, 6, 6]
    expected = run_table(32, 0.1)["C_bar"][[0, 1, 3, 5, 7, 9]]
    np.testing.assert_allclose(markers[0].get_offsets()[:, 0], expected)


def test_records_as_the_results_loader_returns_them_are_accepted():
    table = run_table(32, 0.1, rows=4)
    records = [{name: float(values[i]) for name, values in table.items()} for i in range(4)]
    figure = beacon_map({"s32-lr0.1": records})
    np.testing.assert_allclose(figure.axes[0].get_lines()[0].get_xdata(), table["C_bar"])


def test_bad_arguments_are_clear_errors():
    runs, errors = grid(batch_sizes=(32,), learning_rates=(0.1,))
    with pytest.raises(ValueError, match="color_by"):
        beacon_map(runs, color_by="momentum")
    with pytest.raises(ValueError, match="not in `runs`"):
        beacon_map(runs, errors={"s64-lr0.1": 0.1})
    with pytest.raises(ValueError, match="min_contour_runs"):
        beacon_map(runs, min_contour_runs=2)
    with pytest.raises(ValueError, match="progress"):
        beacon_map(runs, progress=[0.0, 1.0])
    with pytest.raises(ValueError, match="no column \\['L'\\]"):
        beacon_map({"s32": {"C_bar": [1.0], "batch_size": [32]}})
    with pytest.raises(ValueError, match="no rows"):
        beacon_map({"s32": {"C_bar": [], "L": [], "batch_size": []}})
    with pytest.raises(ValueError, match="at least one"):
        beacon_map({})


def test_names_are_left_out_beyond_the_label_limit_and_the_title_says_so():
    runs, errors = grid()
    figure = beacon_map(runs, errors=errors)
    assert len(runs) > BEACON_MAX_LABELS
    assert not [child for child in figure.axes[0].get_children() if isinstance(child, Annotation)]
    assert f"no run labels for {len(runs)} runs" in title(figure)
    few = dict(list(runs.items())[:BEACON_MAX_LABELS])
    written = [c for c in beacon_map(few).axes[0].get_children() if isinstance(c, Annotation)]
    assert len(written) == BEACON_MAX_LABELS


def test_l_axis_is_logarithmic_only_when_the_final_values_span_more_than_the_limit():
    runs, errors = grid()  # final L_K from 3·0.025/512·10 to 3·0.4/8·10: four decades
    assert beacon_map(runs, errors=errors).axes[0].get_yscale() == "log"
    linear = beacon_map(runs, errors=errors, log_l=False)
    assert linear.axes[0].get_yscale() == "linear" and contours(linear)
    narrow = {name: run_table(32, lr) for name, lr in (("a", 0.1), ("b", 0.2), ("c", 0.4))}
    assert beacon_map(narrow).axes[0].get_yscale() == "linear"  # a fourfold span


# ---------------------------------------------------------------------------------------------
# Gradient flow: legible layer labels at any depth
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [6, 16, 17, 40])
def test_gradient_flow_writes_at_most_16_layer_names_always_the_first_and_last(layers):
    names = [f"features.{i}.conv" for i in range(layers)]
    matrix = 10.0 ** -np.arange(1.0, layers + 1.0)[:, None].repeat(3, axis=1)
    figure = plot_gradient_flow(matrix, names)
    heat_axes, line_axes = figure.axes[0], figure.axes[1]
    positions = list(heat_axes.get_yticks())
    shown = [t.get_text() for t in heat_axes.get_yticklabels()]
    if layers <= FLOW_MAX_LABELS:
        assert shown == names and positions == list(range(layers))
    else:
        assert len(shown) <= 16 and shown[0] == names[0] and shown[-1] == names[-1]
        assert shown == [names[int(p)] for p in positions]  # each name at its own layer's row
    assert heat_axes.get_images()[0].get_array().shape == (layers, 3)  # every layer still drawn
    assert all(
        len(line.get_ydata()) == layers
        for line in line_axes.get_lines()
        if line.get_label().startswith("epoch")
    )
