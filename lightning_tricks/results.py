"""Read a run folder back into tidy tables and arrays, across resumes, without TensorBoard.

Every lightning-tricks callback writes into its run's versioned folder (see
``lightning_tricks.callbacks._base.run_directory``): CSV tables, ``.npy`` arrays, PNG figures and
``lightning_tricks.json``, which records for a resumed fit the run folder it continued; the logger
writes the scalars beside them (TensorBoard event files, or CSVLogger's ``metrics.csv``). The
readers here follow that chain, so a notebook gets one table for the whole training::

    from lightning_tricks.plotting import plot_gradient_flow
    from lightning_tricks.results import load_gradient_flow, load_random_gradient

    draws = load_random_gradient("lightning_logs/version_3")  # [{"step": 0, "backward": 0, "r": 0.97}, ...]
    figure = plot_gradient_flow(*load_gradient_flow("lightning_logs/version_3"))
    accuracy = scalar_series(load_scalars("lightning_logs/version_3"), "val/acc", by="epoch")

Tables are lists of records (``dict`` per row, numbers parsed); with ``as_frame=True`` a pandas
``DataFrame`` instead (pandas is optional and only imported then). A row written more than once —
by a resumed fit into a later folder, or into the same file by versions before the writers
continued their tables — is read once, as last written (:func:`continue_rows`). A file cut or
edited by hand gives an error naming the file and the line; a CSV row cut mid-write (the last,
without its line end) is left out with a warning.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .outputs import (
    BATCH_SIZE_SCHEDULER,
    FISHER_SPECTRUM,
    GRADIENT_FLOW,
    MINIBATCH_HEATMAP,
    RANDOM_GRADIENT,
    RUN_FILE,
    read_run_file,
)

EVENTS_PREFIX = "events.out.tfevents."
"""TensorBoard event files start with this."""
METRICS_FILE = "metrics.csv"
"""CSVLogger's scalars."""

Record = dict[str, Any]
PathLike = str | os.PathLike


class GradientFlowTable(NamedTuple):
    """Gradient flow of a run, in the argument order of
    :func:`lightning_tricks.plotting.plot_gradient_flow` (``plot_gradient_flow(*table)``)."""

    matrix: np.ndarray
    """``(layers, epochs)``: the epoch average of each layer's mean ``|∂L/∂θ|``; NaN where absent."""
    layer_names: list[str]
    epochs: list[int]


# -- generic readers --------------------------------------------------------------------------


def read_table(path: PathLike) -> list[Record]:
    """A CSV file with a header as records; cells that are integers or floats (``nan``, ``inf``
    included) become numbers, empty cells ``None``, others stay strings.

    A last row without its line end was cut mid-write (a killed run): it is dropped with a warning
    naming the file and the line, never returned with a truncated value.

    Raises:
        ValueError: a row (other than a cut last one) whose cell count differs from the header's,
            naming the file and the line.
    """
    with open(path, newline="") as handle:
        lines = handle.readlines()
    if lines and not lines[-1].endswith(("\n", "\r")):
        warnings.warn(
            f"{path}, line {len(lines)}: the last row has no line end (cut mid-write); it is left out.",
            stacklevel=2,
        )
        lines.pop()
    reader = csv.reader(lines)
    header = next(reader, None)
    records = []
    for cells in reader:
        if not cells:  # a blank line, as csv.DictReader skips it
            continue
        if len(cells) != len(header):
            raise ValueError(
                f"{path}, line {reader.line_num}: {len(cells)} cells where the header has {len(header)} "
                f"({header}); the file was edited or corrupted."
            )
        records.append({name: _parse_cell(cell) for name, cell in zip(header, cells)})
    return records


def read_array(path: PathLike) -> np.ndarray:
    """An ``.npy`` file (no pickled objects).

    Raises:
        ValueError: the file is not a whole ``.npy`` array (cut, or pickled objects), naming it.
    """
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise ValueError(f"{path}: not a readable .npy array without pickled objects ({error}).") from error


def run_info(run_dir: PathLike) -> dict[str, Any]:
    """``lightning_tricks.json`` of a run folder: ``{"callbacks": {namespace: {"class",
    "hyperparameters", "resumed_from"?}}}``; an empty record if the folder has none.

    Raises:
        ValueError: the file is not valid JSON (cut or hand-edited), naming the file and the line.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {"callbacks": {}}
    return read_run_file(path)


def run_chain(run_dir: PathLike, namespace: str | None = None) -> list[Path]:
    """The run folders of a training, earliest first, ending with ``run_dir``.

    Follows ``resumed_from`` in each folder's ``lightning_tricks.json`` (the entry of callback
    ``namespace``, or the first entry that has one). A recorded folder that is not found as
    written (a relative path read from another working directory, or a moved tree) is looked
    for beside the later folder under its own name.

    Raises:
        FileNotFoundError: ``run_dir``, or a folder the chain names, does not exist.
    """
    current = Path(run_dir)
    if not current.is_dir():
        raise FileNotFoundError(f"`run_dir` {str(run_dir)!r} is not a folder; pass a run's versioned folder.")
    chain = [current]
    while (previous := _resumed_from(current, namespace)) is not None:
        found = _locate(previous, current)
        if any(found.resolve() == seen.resolve() for seen in chain):
            break
        chain.append(found)
        current = found
    return chain[::-1]


def concatenate_runs(
    run_dir: PathLike,
    file_name: str,
    key: str,
    namespace: str | None = None,
    follow_resumes: bool = True,
    unique: Sequence[str] | None = None,
    group: Sequence[str] = (),
) -> list[Record]:
    """The records of CSV ``file_name`` over the folders of :func:`run_chain`, earliest first, with
    every rewrite applied (:func:`continue_rows`). Folders without the file are skipped."""
    folders = run_chain(run_dir, namespace) if follow_resumes else [Path(run_dir)]
    paths = [folder / file_name for folder in folders if (folder / file_name).is_file()]
    records = [row for path in paths for row in read_table(path)]
    return continue_rows(records, key, (key,) if unique is None else unique, group)


def continue_rows(
    records: Sequence[Record], key: str, unique: Sequence[str], group: Sequence[str] = ()
) -> list[Record]:
    """Records in the order written, as the training that wrote them ends: the last write wins.

    A resumed fit restarts at some ``key`` (a step, an epoch) and writes again what the earlier fit
    wrote from there on — into a later folder, or (written by older versions) the same file. Within
    each ``group`` (e.g. a tag), a row whose ``key`` is below the previous row's, or whose ``unique``
    columns repeat a row kept so far, starts such a rewrite: the kept rows with ``key`` at or after
    its own are dropped."""
    kept: dict[tuple, list[Record]] = {}
    seen: dict[tuple, set[tuple]] = {}
    order: list[Record] = []
    for row in records:
        name = tuple(row[c] for c in group)
        rows, ids = kept.setdefault(name, []), seen.setdefault(name, set())
        ident = tuple(row[c] for c in unique)
        if rows and (row[key] < rows[-1][key] or ident in ids):
            dropped = {id(r) for r in rows if r[key] >= row[key]}
            rows[:] = [r for r in rows if id(r) not in dropped]
            ids.clear()
            ids.update(tuple(r[c] for c in unique) for r in rows)
            order = [r for r in order if id(r) not in dropped]
        rows.append(row)
        ids.add(ident)
        order.append(row)
    return order


# -- per-callback readers (one small function per file format) ---------------------------------


def load_random_gradient(run_dir: PathLike, follow_resumes: bool = True, as_frame: bool = False) -> Any:
    """RandomGradient's draws, ``{"step", "backward", "r"}`` per backward, across resumes
    (``random_gradient.csv``; ``backward`` is the index t of the r stream)."""
    records = concatenate_runs(
        run_dir, RANDOM_GRADIENT.files["history"], "backward", RANDOM_GRADIENT.namespace, follow_resumes
    )
    return _maybe_frame(records, as_frame)


def load_fisher_spectrum(run_dir: PathLike, follow_resumes: bool = True, as_frame: bool = False) -> Any:
    """FisherSpectrum's per-epoch records ``{"epoch", "step", "C_bar", "L", "lr", "batch_size"}``
    across resumes (``fisher_spectrum.csv``)."""
    records = concatenate_runs(
        run_dir, FISHER_SPECTRUM.files["epochs"], "epoch", FISHER_SPECTRUM.namespace, follow_resumes
    )
    return _maybe_frame(records, as_frame)


def load_fisher_history(run_dir: PathLike, follow_resumes: bool = True, as_frame: bool = False) -> Any:
    """FisherSpectrum's measurements, one record per measured step (``step``, ``epoch``, ``lr``,
    ``c_k``, ``l_k``, ``C_bar``, ``L``, ``trace``, ``lambda_max``, ``rank``, ``noise_scale``,
    ``trace_sigma``, ``grad_sq_norm``, ``batch_size``) across resumes (``fisher_history.csv``)."""
    records = concatenate_runs(
        run_dir, FISHER_SPECTRUM.files["history"], "step", FISHER_SPECTRUM.namespace, follow_resumes
    )
    return _maybe_frame(records, as_frame)


def load_batch_size(run_dir: PathLike, follow_resumes: bool = True, as_frame: bool = False) -> Any:
    """BatchSizeScheduler's changes ``{"epoch", "step", "size", "physical", "accumulation", "lr"}``
    across resumes (``batch_size.csv``)."""
    records = concatenate_runs(
        run_dir,
        BATCH_SIZE_SCHEDULER.files["history"],
        "epoch",
        BATCH_SIZE_SCHEDULER.namespace,
        follow_resumes,
        unique=("epoch", "step"),
    )
    return _maybe_frame(records, as_frame)


def load_minibatch_heatmap(
    run_dir: PathLike,
    follow_resumes: bool = True,
    as_frame: bool = False,
    namespace: str = MINIBATCH_HEATMAP.namespace,
) -> Any:
    """MinibatchHeatmap's distances ``{"epoch", "lr", "lr_first", "lr_last", "phase", "batch",
    "metric", "distance"}``, one record per measured epoch and batch rank (``heatmap.csv``), across
    resumes; ``lr`` is the learning rate most of the epoch's steps used (``lr_first``/``lr_last``
    its first and last step's) and ``phase`` numbers the learning-rate phases (seed 002 §3.1) as the
    callback's figures do. A second heatmap on the same Trainer writes under its own namespace
    (``heatmap_<metric>…``, the callback's ``namespace``): pass it to read that one's records."""
    records = concatenate_runs(
        run_dir,
        MINIBATCH_HEATMAP.files["history"].replace(MINIBATCH_HEATMAP.namespace, namespace, 1),
        "epoch",
        namespace,
        follow_resumes,
        unique=("epoch", "batch"),
    )
    return _maybe_frame(records, as_frame)


def fisher_columns(records: Sequence[Record]) -> dict[str, np.ndarray]:
    """Records as ``{column: array}``, the table form :func:`lightning_tricks.plotting.beacon_map`
    draws from."""
    names = list(records[0]) if records else []
    return {name: np.array([row[name] for row in records], dtype=float) for name in names}


def load_gradient_flow(
    run_dir: PathLike, optimizer: int = 0, follow_resumes: bool = True
) -> GradientFlowTable:
    """GradientFlow's layer × epoch matrix of optimiser ``optimizer``, with its layer names, across
    resumes (``grad_flow.csv``: one row ``epoch, optimizer, layer, mean_abs`` per epoch and layer).

    Layers keep their first-seen order (forward order); missing entries are NaN.

    Raises:
        FileNotFoundError: no folder of the chain has ``grad_flow.csv``, or it has no row of ``optimizer``.
    """
    records = concatenate_runs(
        run_dir,
        GRADIENT_FLOW.files["history"],
        "epoch",
        GRADIENT_FLOW.namespace,
        follow_resumes,
        ("epoch", "layer"),
        ("optimizer",),
    )
    rows = [row for row in records if row["optimizer"] == optimizer]
    if not rows:
        raise FileNotFoundError(
            f"No {GRADIENT_FLOW.files['history']} rows of optimizer {optimizer} under {str(run_dir)!r}; is GradientFlow attached?"
        )
    epochs = sorted({row["epoch"] for row in rows})
    names = list(dict.fromkeys(row["layer"] for row in rows))
    matrix = np.full((len(names), len(epochs)), math.nan)
    for row in rows:
        matrix[names.index(row["layer"]), epochs.index(row["epoch"])] = row["mean_abs"]
    return GradientFlowTable(matrix, names, epochs)


def load_scalars(run_dir: PathLike, follow_resumes: bool = True, as_frame: bool = False) -> Any:
    """Every scalar the logger wrote (the model's ``self.log`` values and the callbacks' metrics),
    ``{"tag", "step", "epoch", "value", "wall_time"}`` per logged value, across resumes.

    Read from the folder's TensorBoard event files (with the ``tensorboard`` package, no
    TensorFlow), else from CSVLogger's ``metrics.csv``. ``epoch`` is the ``epoch`` scalar Lightning
    logs with every step (``None`` where there is none); the ``epoch`` tag itself is not a record.
    ``wall_time`` is when the value was written, in seconds since the epoch (TensorBoard's event
    time; ``None`` from ``metrics.csv``, which has none) — :func:`logger_start_time` gives the start.
    Records keep the order they were written in. A resumed fit restarts each tag at some step:
    the rows of that tag it wrote again (from that step on, in a later folder or the same one)
    replace the earlier ones — the last write per tag and step wins (:func:`continue_rows`).
    """
    folders = run_chain(run_dir) if follow_resumes else [Path(run_dir)]
    records = [row for folder in folders for row in _read_scalars(folder)]
    return _maybe_frame(continue_rows(records, "step", ("step",), ("tag",)), as_frame)


def logger_start_time(run_dir: PathLike) -> float | None:
    """When the logger opened the folder's first TensorBoard event file (its file-version event),
    in seconds since the epoch: the fit's start, before the sanity check. ``None`` without event
    files (resumes are not followed: each folder has its own clock)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = sorted(path for path in Path(run_dir).iterdir() if path.name.startswith(EVENTS_PREFIX))
    for path in events:
        for event in EventFileLoader(str(path)).Load():
            return float(event.wall_time)
    return None


def scalar_series(records: Sequence[Record], tag: str, by: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """The ``(x, values)`` arrays of one tag of :func:`load_scalars`, ``x`` its ``"step"`` or ``"epoch"``.

    Raises:
        KeyError: no record has ``tag`` (the message lists the tags there are).
        ValueError: ``by`` is neither ``"step"`` nor ``"epoch"``.
    """
    if by not in ("step", "epoch"):
        raise ValueError(f"`by` must be 'step' or 'epoch', got {by!r}.")
    rows = [row for row in records if row["tag"] == tag]
    if not rows:
        tags = sorted({row["tag"] for row in records})
        raise KeyError(f"No scalar {tag!r} in these records; tags: {tags}.")
    x = np.array([math.nan if row[by] is None else row[by] for row in rows], dtype=float)
    return x, np.array([row["value"] for row in rows], dtype=float)


def load_run(run_dir: PathLike, follow_resumes: bool = True, as_frame: bool = False) -> dict[str, Any]:
    """Everything the known callbacks left in a run folder (and the folders it resumed):
    ``"folders"`` (:func:`run_chain`), ``"callbacks"`` (``lightning_tricks.json``), and where
    their files exist ``"random_gradient"``, ``"fisher_spectrum"``, ``"fisher_history"``,
    ``"batch_size"``, ``"heatmap"``, ``"scalars"`` (:func:`load_scalars`; tables) and ``"grad_flow"``
    (:class:`GradientFlowTable`)."""
    folders = run_chain(run_dir) if follow_resumes else [Path(run_dir)]
    present = {path.name for folder in folders for path in folder.iterdir()}
    loaders: dict[str, tuple[str, Callable[[], Any]]] = {
        "random_gradient": (
            RANDOM_GRADIENT.files["history"],
            lambda: load_random_gradient(run_dir, follow_resumes, as_frame),
        ),
        "fisher_spectrum": (
            FISHER_SPECTRUM.files["epochs"],
            lambda: load_fisher_spectrum(run_dir, follow_resumes, as_frame),
        ),
        "fisher_history": (
            FISHER_SPECTRUM.files["history"],
            lambda: load_fisher_history(run_dir, follow_resumes, as_frame),
        ),
        "batch_size": (
            BATCH_SIZE_SCHEDULER.files["history"],
            lambda: load_batch_size(run_dir, follow_resumes, as_frame),
        ),
        "heatmap": (
            MINIBATCH_HEATMAP.files["history"],
            lambda: load_minibatch_heatmap(run_dir, follow_resumes, as_frame),
        ),
        "grad_flow": (
            GRADIENT_FLOW.files["history"],
            lambda: load_gradient_flow(run_dir, follow_resumes=follow_resumes),
        ),
    }
    results: dict[str, Any] = {"folders": folders, "callbacks": run_info(run_dir)["callbacks"]}
    results.update({name: load() for name, (file_name, load) in loaders.items() if file_name in present})
    if METRICS_FILE in present or any(name.startswith(EVENTS_PREFIX) for name in present):
        results["scalars"] = load_scalars(run_dir, follow_resumes, as_frame)
    return results


# -- internals --------------------------------------------------------------------------------


def _resumed_from(run_dir: Path, namespace: str | None) -> str | None:
    entries = run_info(run_dir)["callbacks"]
    if namespace is not None:
        return entries.get(namespace, {}).get("resumed_from")
    return next((entry["resumed_from"] for entry in entries.values() if entry.get("resumed_from")), None)


def _locate(recorded: str, later: Path) -> Path:
    """The folder ``recorded`` as written, else its namesake beside ``later``."""
    candidates = [Path(recorded), later.parent / Path(recorded).name]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"{later / RUN_FILE} says the run resumed from {recorded!r}, which is neither there nor beside "
        f"{str(later)!r}; move it back, or pass follow_resumes=False to read this folder alone."
    )


def _read_scalars(folder: Path) -> list[Record]:
    """One folder's scalars: its event files in the order written, else its ``metrics.csv``."""
    events = sorted(path for path in folder.iterdir() if path.name.startswith(EVENTS_PREFIX))
    if events:
        cells = [cell for path in events for cell in _event_scalars(path)]
    elif (folder / METRICS_FILE).is_file():
        cells = _csv_scalars(folder / METRICS_FILE)
    else:
        return []
    epochs = {step: value for step, tag, value, _ in cells if tag == "epoch"}
    return [
        {"tag": tag, "step": step, "epoch": _as_int(epochs.get(step)), "value": value, "wall_time": wall_time}
        for step, tag, value, wall_time in cells
        if tag != "epoch"
    ]


def _event_scalars(path: Path) -> list[tuple[int, str, float, float]]:
    """``(step, tag, value, wall_time)`` of every scalar summary in one TensorBoard event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    return [
        (int(event.step), value.tag, float(make_ndarray(value.tensor)), float(event.wall_time))
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.metadata.plugin_data.plugin_name == "scalars"
    ]


def _csv_scalars(path: Path) -> list[tuple[int, str, float, None]]:
    """``(step, tag, value, None)`` of every filled cell of CSVLogger's ``metrics.csv`` (no wall time)."""
    return [
        (row["step"], tag, float(value), None)
        for row in read_table(path)
        for tag, value in row.items()
        if tag != "step" and value is not None
    ]


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _parse_cell(cell: str | None) -> Any:
    if cell is None or cell == "":
        return None
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        return cell


def _maybe_frame(records: list[Record], as_frame: bool) -> Any:
    if not as_frame:
        return records
    try:
        import pandas
    except ImportError as error:
        raise ImportError(
            "as_frame=True needs pandas (pip install pandas); as_frame=False returns records."
        ) from error
    return pandas.DataFrame.from_records(records)
