"""The TensorBoard dashboard of the lightning-tricks callbacks, written once per run at fit start.

- **Custom Scalars**: one layout gathering every callback's
  :meth:`~lightning_tricks.callbacks._base.TrickCallback.dashboard_layout`, one category per
  callback class, one multi-line chart per entry (TensorBoard matches each entry as a regular
  expression against the tags, so ``"grad_flow/layers/.*/mean_abs"`` draws every layer);
- **tag descriptions**: TensorBoard shows a tag's description from the summary metadata of its
  *first* event, so the first value of every tag a callback describes
  (:meth:`~lightning_tricks.callbacks._base.TrickCallback.metric_descriptions`) is written as a
  scalar summary carrying ``summary_description``; later values go through the logger as usual;
- **HParams**: the callbacks' hyper-parameters, as ``<namespace>/<name>``, logged to every logger
  and, for TensorBoard, merged with the module's and datamodule's ``hparams`` into the one
  hyper-parameter record the HParams tab reads (it keeps the first record of a run; Lightning
  logs its own one right after ``on_fit_start``, so ours, a superset of it, is the one shown).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol
from weakref import WeakKeyDictionary

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.scalar.metadata import create_summary_metadata

_WRITTEN: WeakKeyDictionary[pl.Trainer, str] = WeakKeyDictionary()
_PENDING_DESCRIPTIONS: WeakKeyDictionary[Logger, dict[str, str]] = WeakKeyDictionary()
_PREFIX_JOIN = TensorBoardLogger.LOGGER_JOIN_CHAR


class DashboardSource(Protocol):
    """What the dashboard reads from a callback (every ``TrickCallback`` provides it)."""

    namespace: str

    def dashboard_layout(self) -> Mapping[str, Sequence[str]]: ...

    def metric_descriptions(self) -> Mapping[str, str]: ...

    def hyperparameters(self) -> Mapping[str, Any]: ...


def write_dashboard(trainer: pl.Trainer, callbacks: Sequence[DashboardSource], run_dir: str | None) -> None:
    """Write the layout, register the tag descriptions and log the hyper-parameters, once per run.

    Called from every callback's ``on_fit_start``; the first call of a run (a trainer and its run
    folder) does the work for all ``callbacks``, later ones return. Rank 0 only."""
    if not trainer.is_global_zero or not callbacks or _WRITTEN.get(trainer) == run_dir:
        return
    _WRITTEN[trainer] = str(run_dir)
    hparams = callback_hyperparameters(callbacks)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _write_tensorboard_dashboard(trainer, logger, callbacks, hparams)
        elif hparams:
            logger.log_hyperparams(hparams)


def custom_scalars_layout(callbacks: Iterable[DashboardSource]) -> dict[str, dict[str, list[Any]]]:
    """``{callback class: {chart title: ["Multiline", [tag regexes]]}}``, the form of
    ``SummaryWriter.add_custom_scalars``; callbacks of one class share a category."""
    layout: dict[str, dict[str, list[Any]]] = {}
    for callback in callbacks:
        charts = _checked_layout(callback)
        if charts:
            category = layout.setdefault(type(callback).__name__, {})
            for title, tags in charts.items():
                category[title] = ["Multiline", list(tags)]
    return layout


def metric_descriptions(callbacks: Iterable[DashboardSource]) -> dict[str, str]:
    """Every callback's ``{tag: description}``, merged."""
    descriptions: dict[str, str] = {}
    for callback in callbacks:
        descriptions.update(callback.metric_descriptions())
    return descriptions


def callback_hyperparameters(callbacks: Iterable[DashboardSource]) -> dict[str, Any]:
    """``{"<namespace>/<name>": value}`` over the callbacks; a second callback of the same
    namespace gets ``<namespace>_1``. Values other than numbers, strings, booleans and ``None``
    become their ``repr``."""
    merged: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for callback in callbacks:
        count = seen.get(callback.namespace, 0)
        seen[callback.namespace] = count + 1
        prefix = callback.namespace if count == 0 else f"{callback.namespace}_{count}"
        for name, value in callback.hyperparameters().items():
            merged[f"{prefix}/{name}"] = (
                value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
            )
    return merged


def send_metrics(logger: Logger, values: Mapping[str, float], step: int) -> None:
    """``logger.log_metrics(values, step)``, except that a described tag's first value on a
    TensorBoard logger is written with its description in the summary metadata."""
    pending = _PENDING_DESCRIPTIONS.get(logger)
    if pending:
        first = {name: value for name, value in values.items() if name in pending}
        if first:
            _write_described_scalars(logger, first, {name: pending.pop(name) for name in first}, step)
            values = {name: value for name, value in values.items() if name not in first}
    if values:
        logger.log_metrics(dict(values), step=step)


def _write_tensorboard_dashboard(
    trainer: pl.Trainer,
    logger: TensorBoardLogger,
    callbacks: Sequence[DashboardSource],
    hparams: dict[str, Any],
) -> None:
    layout = custom_scalars_layout(callbacks)
    if layout:
        logger.experiment.add_custom_scalars(_prefixed_layout(logger, layout))
    descriptions = metric_descriptions(callbacks)
    if descriptions:
        _PENDING_DESCRIPTIONS[logger] = descriptions
    if hparams and _tensorboard_hparams_are_ours(trainer, logger):
        logger.log_hyperparams({**_module_hyperparameters(trainer), **hparams})
    elif hparams and isinstance(logger.hparams, dict):
        logger.hparams.update(hparams)  # hparams.yaml only: the user writes the HParams record


def _tensorboard_hparams_are_ours(trainer: pl.Trainer, logger: TensorBoardLogger) -> bool:
    """Whether Lightning writes the HParams record itself (``hp_metric`` on, autolog on); if the
    user writes it (``default_hp_metric=False``), a record of ours would hide theirs."""
    return bool(getattr(trainer, "enable_autolog_hparams", True)) and bool(
        getattr(logger, "_default_hp_metric", True)
    )


def _module_hyperparameters(trainer: pl.Trainer) -> dict[str, Any]:
    """The hyper-parameters Lightning logs right after ``on_fit_start``: the module's and the
    datamodule's ``hparams_initial`` (where they save them), without LightningCLI's class path."""
    merged: dict[str, Any] = {}
    for owner in (trainer.lightning_module, trainer.datamodule):
        if owner is not None and getattr(owner, "_log_hyperparams", False):
            merged.update(owner.hparams_initial)
    merged.pop("_class_path", None)
    return merged


def _write_described_scalars(
    logger: TensorBoardLogger, values: Mapping[str, float], descriptions: Mapping[str, str], step: int
) -> None:
    """One summary event of ``simple_value`` scalars whose metadata carries the description
    (TensorBoard migrates it into the scalars plugin's metadata, keeping the description)."""
    summary = Summary(
        value=[
            Summary.Value(
                tag=_prefixed(logger, name),
                simple_value=float(value),
                metadata=create_summary_metadata(
                    display_name=_prefixed(logger, name), description=descriptions[name]
                ),
            )
            for name, value in values.items()
        ]
    )
    logger.experiment._get_file_writer().add_summary(summary, step)


def _prefixed(logger: TensorBoardLogger, tag: str) -> str:
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{_PREFIX_JOIN}{tag}" if prefix else tag


def _prefixed_layout(
    logger: TensorBoardLogger, layout: dict[str, dict[str, list[Any]]]
) -> dict[str, dict[str, list[Any]]]:
    return {
        category: {
            title: [kind, [_prefixed(logger, tag) for tag in tags]] for title, (kind, tags) in charts.items()
        }
        for category, charts in layout.items()
    }


def _checked_layout(callback: DashboardSource) -> Mapping[str, Sequence[str]]:
    charts = callback.dashboard_layout()
    for title, tags in charts.items():
        if not isinstance(title, str) or isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise TypeError(
                f"{type(callback).__name__}.dashboard_layout() must return {{chart title: [tag, ...]}} with "
                f"string titles and lists of tag strings; got {title!r}: {tags!r}."
            )
    return charts
