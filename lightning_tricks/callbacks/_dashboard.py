"""The TensorBoard dashboard of the lightning-tricks callbacks, written once per run.

Serve it with ``lightning-tricks dashboard LOGDIR`` (:mod:`lightning_tricks.dashboard`): TensorBoard's
default fast loader drops the tag descriptions.

- **Custom Scalars**: one layout, written at fit start: a ``model`` category (the module's training
  loss, validation loss and accuracy, matched by name) and one category per callback class with
  that callback's :meth:`~lightning_tricks.callbacks._base.TrickCallback.dashboard_layout` charts
  (TensorBoard matches each entry as a regular expression against the tags), less the charts of
  tags the callback's configuration never logs (:func:`unlogged_tags`), and with every chart split
  so that one chart holds one scale (:data:`SCALE_GROUPS`);
- **tag descriptions**: TensorBoard shows a tag's description from the summary metadata of its
  *first* event, so the first value of every tag a callback describes
  (:meth:`~lightning_tricks.callbacks._base.TrickCallback.metric_descriptions`) is written as a
  scalar summary carrying ``summary_description``; later values go through the logger as usual;
- **HParams**: the callbacks' hyper-parameters, as ``<namespace>/<name>``, logged to every logger
  and, for TensorBoard, merged with the module's and datamodule's ``hparams`` (without LightningCLI's
  ``_class_path``/``_instantiator`` or any other ``_``-name) into the run's HParams session, written
  at fit start in place of Lightning's placeholder (``hp_metric = -1``); at fit end (or on an
  exception) the experiment summary registers the outcome metrics (:func:`outcome_metrics`: what
  the module logged under ``val/`` or ``val_``, their ``test`` twins, the callbacks' headline
  metrics), whose last logged values are the HParams tab's metric columns.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol
from weakref import WeakKeyDictionary

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.scalar.metadata import create_summary_metadata

_WRITTEN: WeakKeyDictionary[pl.Trainer, str] = WeakKeyDictionary()
_PENDING_DESCRIPTIONS: WeakKeyDictionary[Logger, dict[str, str]] = WeakKeyDictionary()
_PENDING_SESSIONS: WeakKeyDictionary[Logger, tuple[dict[str, Any], tuple[DashboardSource, ...]]] = (
    WeakKeyDictionary()
)
_PREFIX_JOIN = TensorBoardLogger.LOGGER_JOIN_CHAR

MODEL_CATEGORY = "model"
MODEL_CHARTS: dict[str, list[str]] = {
    "training loss": [r"train[/_]loss(_[a-z])?(_step|_epoch)?$"],
    "validation loss": [r"val[/_]loss(_epoch)?$"],
    "validation accuracy": [r"val[/_]\w*(acc|iou)"],
}
"""The module's own curves beside the diagnostics, as tag regexes: ``train_loss``, ``train/loss``
or one loss per network (pix2pix's ``train/loss_d``, ``train/loss_g``, not their weighted parts),
``val/loss``, ``val/acc``, ``val/acc_top5``, ``val/miou``, ...; a chart matching nothing stays empty."""

SCALE_GROUPS: dict[str, str] = {
    "fisher/L": "L_K",
    "fisher/rank": "rank",
    "fisher/noise_scale": "B_noise",
    "fisher/trace_sigma": "tr Σ",
    "fisher/grad_sq_norm": "|G|²",
    "heatmap/best_batch": "rank",
    "heatmap/best_batch_metric": "batch metric",
}
"""Tags of our callbacks whose scale differs from the other tags of the callback's chart (L_K sums
every l_k; a rank counts eigenvalues or batches; B_noise, tr Σ and |G|² are a ratio and its two
parts): a chart is split into one chart per group (unlisted tags form one group), so no series
reads as zero beside a larger one."""

PER_OPTIMIZER_NAMESPACES = ("grad_flow",)
"""Callbacks whose tags gain ``opt<i>/`` after the namespace when the module has several
optimisers (their layouts name the single-optimiser tags); their charts match both."""

HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "fisher": ("C_bar", "L"),
    "batch_size": ("size",),
    "grad_flow": ("vanishing_steps", "exploding_steps", "nonfinite_steps"),
    "heatmap": ("distance_mean",),
}
"""Per callback namespace, the metrics whose final value is an HParams column (with several
optimisers, ``grad_flow/opt<i>/...`` each)."""

EVALUATION_PREFIXES = ("val/", "val_", "test/", "test_")


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
    """``{category: {chart title: ["Multiline", [tag regexes]]}}``, the form of
    ``SummaryWriter.add_custom_scalars``: :data:`MODEL_CHARTS` as ``"model"``, then one category
    per callback class (callbacks of one class share it) with the charts of the tags the callback
    logs (:func:`unlogged_tags`), each split by :data:`SCALE_GROUPS`, matching the per-optimiser
    tags of :data:`PER_OPTIMIZER_NAMESPACES`. Empty without callback charts."""
    layout: dict[str, dict[str, list[Any]]] = {}
    for callback in callbacks:
        skipped = unlogged_tags(callback)
        for title, tags in _checked_layout(callback).items():
            logged = [tag for tag in tags if tag not in skipped]
            for part_title, part in split_by_scale(title, logged).items():
                patterns = [_per_optimizer_pattern(callback.namespace, tag) for tag in part]
                layout.setdefault(type(callback).__name__, {})[part_title] = ["Multiline", patterns]
    if not layout:
        return {}
    model = {title: ["Multiline", list(tags)] for title, tags in MODEL_CHARTS.items()}
    return {MODEL_CATEGORY: model, **layout}


def unlogged_tags(callback: DashboardSource) -> frozenset[str]:
    """Tags of ``callback``'s layout that its configuration never logs: the noise scale of a
    ``BatchSizeScheduler`` without the adaptive policy."""
    if callback.namespace == "batch_size" and not getattr(callback, "adaptive", False):
        return frozenset({"batch_size/noise_scale"})
    return frozenset()


def split_by_scale(title: str, tags: Sequence[str]) -> dict[str, list[str]]:
    """``{title: tags}``, or, when the tags fall into several :data:`SCALE_GROUPS`, one chart per
    group titled ``"<title>: <its tags' last names>"``; no tags, no chart."""
    groups: dict[str, list[str]] = {}
    for tag in tags:
        groups.setdefault(SCALE_GROUPS.get(tag, ""), []).append(tag)
    if len(groups) <= 1:
        return {title: list(tags)} if tags else {}
    return {f"{title}: {', '.join(t.rsplit('/', 1)[-1] for t in part)}": part for part in groups.values()}


def _per_optimizer_pattern(namespace: str, tag: str) -> str:
    """``grad_flow/x`` → ``grad_flow/(opt\\d+/)?x`` for :data:`PER_OPTIMIZER_NAMESPACES`, else ``tag``."""
    prefix = f"{namespace}/"
    if namespace not in PER_OPTIMIZER_NAMESPACES or not tag.startswith(prefix):
        return tag
    return prefix + r"(opt\d+/)?" + tag[len(prefix) :]


def metric_descriptions(callbacks: Iterable[DashboardSource]) -> dict[str, str]:
    """Every callback's ``{tag: description}``, merged."""
    descriptions: dict[str, str] = {}
    for callback in callbacks:
        descriptions.update(callback.metric_descriptions())
    return descriptions


def outcome_metrics(callback_metrics: Iterable[str], callbacks: Iterable[DashboardSource]) -> list[str]:
    """The HParams metric columns of a run: the evaluation metrics among ``callback_metrics``
    (``val/``, ``val_``, ``test/``, ``test_`` names), the ``test`` twin of every ``val`` one (a later
    ``trainer.test`` fills it), then the :data:`HEADLINE_METRICS` of the attached callbacks that
    were logged."""
    logged = list(callback_metrics)
    evaluation = {name for name in logged if name.startswith(EVALUATION_PREFIXES)}
    evaluation |= {"test" + name[3:] for name in evaluation if name.startswith("val")}
    patterns = [
        re.compile(rf"{re.escape(c.namespace)}/(opt\d+/)?({'|'.join(HEADLINE_METRICS[c.namespace])})")
        for c in callbacks
        if c.namespace in HEADLINE_METRICS
    ]
    headline = [name for name in logged if any(p.fullmatch(name) for p in patterns)]
    return sorted(evaluation) + sorted(set(headline))


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
    if hparams and isinstance(logger.hparams, dict):
        logger.hparams.update(hparams)  # hparams.yaml; Lightning adds the module's right after
    if hparams and _tensorboard_hparams_are_ours(trainer, logger):
        record = readable_hyperparameters({**_module_hyperparameters(trainer), **hparams})
        _write_summary(logger, _session_start(record))
        logger._default_hp_metric = False  # Lightning's record would be a placeholder hp_metric = -1
        _PENDING_SESSIONS[logger] = (record, tuple(callbacks))


def readable_hyperparameters(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``params`` as HParams values: nested mappings flattened to ``a/b``, names starting with ``_``
    (LightningCLI's ``_class_path``, ``_instantiator``) left out, values other than numbers, strings
    and booleans as their ``repr``."""
    flat: dict[str, Any] = {}
    for name, value in params.items():
        if str(name).startswith("_"):
            continue
        if isinstance(value, Mapping):
            flat.update(readable_hyperparameters(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value if isinstance(value, (int, float, str, bool)) else repr(value)
    return flat


def finish_sessions(trainer: pl.Trainer, succeeded: bool) -> None:
    """Write the experiment summary (hyper-parameters and :func:`outcome_metrics`) and the session
    end (success or failure) of every TensorBoard session begun at fit start; once per session."""
    status = api_pb2.STATUS_SUCCESS if succeeded else api_pb2.STATUS_FAILURE
    for logger in trainer.loggers:
        pending = _PENDING_SESSIONS.pop(logger, None)
        if pending is None:
            continue
        record, callbacks = pending
        metrics = outcome_metrics(trainer.callback_metrics, callbacks)
        experiment = api_pb2.Experiment(
            hparam_infos=_hparam_infos(record),
            metric_infos=_metric_infos(metrics, logger),
            time_created_secs=time.time(),
        )
        _write_summary(logger, _hparams_summary(hparams_metadata.EXPERIMENT_TAG, experiment=experiment))
        end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        _write_summary(logger, _hparams_summary(hparams_metadata.SESSION_END_INFO_TAG, session_end_info=end))
        logger.experiment.flush()


def _session_start(record: Mapping[str, Any]) -> Summary:
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in record.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = value
    return _hparams_summary(hparams_metadata.SESSION_START_INFO_TAG, session_start_info=start)


def _hparams_summary(tag: str, **data: Any) -> Summary:
    """A value-less summary whose metadata holds one ``HParamsPluginData`` field (what TensorBoard's
    ``hparams.summary`` writes, without its TensorFlow import)."""
    metadata = hparams_metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def _hparam_infos(record: Mapping[str, Any]) -> list[api_pb2.HParamInfo]:
    def kind(value: Any) -> int:
        if isinstance(value, bool):
            return api_pb2.DATA_TYPE_BOOL
        return api_pb2.DATA_TYPE_FLOAT64 if isinstance(value, (int, float)) else api_pb2.DATA_TYPE_STRING

    return [api_pb2.HParamInfo(name=name, type=kind(value)) for name, value in record.items()]


def _metric_infos(metrics: Sequence[str], logger: TensorBoardLogger) -> list[api_pb2.MetricInfo]:
    return [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=_prefixed(logger, name)), display_name=name)
        for name in metrics
    ]


def _write_summary(logger: TensorBoardLogger, summary: Summary) -> None:
    logger.experiment._get_file_writer().add_summary(summary)


def _tensorboard_hparams_are_ours(trainer: pl.Trainer, logger: TensorBoardLogger) -> bool:
    """Whether Lightning writes the HParams record itself (``hp_metric`` on, autolog on); if the
    user writes it (``default_hp_metric=False``), a record of ours would hide theirs."""
    return bool(getattr(trainer, "enable_autolog_hparams", True)) and bool(
        getattr(logger, "_default_hp_metric", True)
    )


def _module_hyperparameters(trainer: pl.Trainer) -> dict[str, Any]:
    """The hyper-parameters Lightning logs right after ``on_fit_start``: the module's and the
    datamodule's ``hparams_initial`` (where they save them)."""
    merged: dict[str, Any] = {}
    for owner in (trainer.lightning_module, trainer.datamodule):
        if owner is not None and getattr(owner, "_log_hyperparams", False):
            merged.update(owner.hparams_initial)
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
