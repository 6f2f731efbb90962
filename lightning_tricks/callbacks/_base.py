"""The one way every lightning-tricks callback logs, saves, resumes and draws.

:class:`TrickCallback` gives the callbacks of this package, and any callback built on it:

- **one step axis**: :meth:`TrickCallback.training_step` is the 0-based index of the training step
  (the batch whose optimiser step is running), the value Lightning itself logs ``train_loss`` at;
  "every n steps" always means the steps with ``step % n == 0`` (:func:`is_due`), so step 0 is
  measured and the phase is the same in every callback;
- **logging that is never gated**: :meth:`TrickCallback.log_scalars` sends the values to every logger
  at the step they were measured, whatever ``Trainer(log_every_n_steps=...)`` says, with one host
  transfer, and mirrors them into ``trainer.callback_metrics`` so that ``EarlyStopping`` and
  ``ModelCheckpoint`` can monitor them;
- **a run folder** (:func:`run_directory`): every file goes into the current run's versioned
  folder, the one Lightning's ``ModelCheckpoint`` writes under — ``<save_dir>/<name>/<version>`` of
  the first logger (TensorBoard, CSV, W&B, MLflow), or ``<default_root_dir>/lightning_tricks_logs/version_N``
  without a logger — written by rank 0 only;
- **figures for every logger** (:meth:`TrickCallback.log_figure`): TensorBoard ``add_figure``, W&B
  ``log_image``, MLflow ``log_figure``, and always a PNG in the run folder; loggers that cannot
  show images get one notice;
- **knobs declared once**: the constructor's signature is the declaration. Every argument is
  stored under its own name (``self.every_n_steps = checks.integer("every_n_steps", ...)``, the
  checks of :mod:`lightning_tricks.checks`); :meth:`TrickCallback.hyperparameters` reads them back
  by the signature, and :attr:`TrickCallback.identity_arguments` names those that tell two
  instances apart;
- **state**: ``state_key`` from the identity arguments (like ``EarlyStopping``), the knobs stored
  inside the state and a warning when a checkpoint's knobs differ from the callback's; per-fit
  state reset at ``setup("fit")``, before Lightning restores a checkpoint.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from .. import checks
from ..outputs import RUN_FILE, read_run_file
from ._dashboard import finish_sessions, send_metrics, write_dashboard

NO_LOGGER_FOLDER = "lightning_tricks_logs"

_RUN_DIRS: WeakKeyDictionary[pl.Trainer, str] = WeakKeyDictionary()
_IMAGE_NOTICES: set[str] = set()


def is_due(step: int, every_n_steps: int | None) -> bool:
    """Whether training step ``step`` (0-based) is one of every ``every_n_steps``: ``step % n == 0``.

    The one phase all our callbacks share; ``None`` means never."""
    return every_n_steps is not None and step % every_n_steps == 0


@cache
def constructor_arguments(cls: type) -> tuple[str, ...]:
    """The names of ``cls.__init__``'s arguments (not ``self``, ``*args`` or ``**kwargs``)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind not in variadic)


def run_directory(trainer: pl.Trainer) -> str:
    """The current run's versioned folder, agreed by every rank (a collective: call it on all ranks).

    ``<save_dir>/<name>/<version>`` of the first logger — for TensorBoard and CSV exactly their
    ``log_dir`` — as Lightning's ``ModelCheckpoint`` resolves it; without a logger, the next free
    ``<default_root_dir>/lightning_tricks_logs/version_N``. Resolved once per trainer, so all callbacks of
    a run share it.
    """
    if trainer in _RUN_DIRS:
        return _RUN_DIRS[trainer]
    path = _logger_run_dir(trainer.loggers[0], trainer) if trainer.loggers else None
    if path is None:
        path = _next_version_dir(os.path.join(trainer.default_root_dir, NO_LOGGER_FOLDER), trainer)
    path = trainer.strategy.broadcast(path)
    _RUN_DIRS[trainer] = path
    return path


def _logger_run_dir(logger: Logger, trainer: pl.Trainer) -> str | None:
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return logger.log_dir
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(save_dir, str(logger.name), version)


def _next_version_dir(root: str, trainer: pl.Trainer) -> str:
    """``root/version_N`` with N one above the highest existing, created on rank 0 to reserve it."""
    numbers = [int(m.group(1)) for m in map(re.compile(r"version_(\d+)$").match, _listdir(root)) if m]
    path = os.path.join(root, f"version_{max(numbers, default=-1) + 1}")
    if trainer.is_global_zero:
        os.makedirs(path, exist_ok=True)
    return path


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def resolve_loss_fn(
    pl_module: pl.LightningModule, loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None, user: str
) -> Callable[[pl.LightningModule, Any], Tensor]:
    """The loss a callback evaluates by itself (DESIGN rule 1): the module's ``compute_loss(batch)``
    (a scalar, mean-reduced) if it has one, else the ``loss_fn(module, batch)`` the callback was given;
    one clear error naming what is missing otherwise (``user`` says which callback needs it).
    Callbacks check ``loss_fn`` with :func:`lightning_tricks.checks.loss_fn` at construction; it is
    checked here again."""
    checks.loss_fn(loss_fn)
    if callable(getattr(pl_module, "compute_loss", None)):
        return lambda module, batch: module.compute_loss(batch)
    if loss_fn is not None:
        return loss_fn
    raise ValueError(
        f"{user} evaluates the loss itself, but {type(pl_module).__name__} defines no "
        "`compute_loss(batch) -> scalar mean loss` and no `loss_fn(module, batch)` was given: define "
        "the method or pass `loss_fn=`."
    )


def first_learning_rate(trainer: pl.Trainer, default: float | None = None) -> float | None:
    """α of the first optimiser's first param group (what the callbacks report as "the" LR);
    ``default`` without an optimiser."""
    groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
    return groups[0].get("lr", default) if groups else default


def host_values(metrics: Mapping[str, Tensor | float]) -> dict[str, float]:
    """The metrics as Python floats, with one device-to-host transfer for all tensor values."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, Tensor)}
    values = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    if tensors:
        stacked = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors.values()])
        values.update(zip(tensors, stacked.cpu().tolist()))
    return {name: values[name] for name in metrics}


class TrickCallback(Callback):
    """Base of the lightning-tricks callbacks: step axis, logging, run folder, figures, state.

    Subclasses set :attr:`namespace` (the metric prefix, e.g. ``"fisher"``) and
    :attr:`identity_arguments`, store each constructor argument under its own name, override
    :meth:`reset_fit_state`, :meth:`get_state` and :meth:`set_state`, and call :meth:`log_scalars`,
    :meth:`log_figure`, :meth:`write_table` and :meth:`write_array` from their hooks.
    """

    namespace: ClassVar[str] = "tricks"
    identity_arguments: ClassVar[tuple[str, ...]] = ()
    """The constructor arguments that tell two instances apart (``state_key`` is built from them)."""

    def __init__(self) -> None:
        self._run_dir: str | None = None
        self._resumed_from: str | None = None
        self._continued_tables: set[str] = set()

    # -- identity and state -----------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The values of :attr:`identity_arguments`, by name (the ``state_key`` is built from them)."""
        return {name: getattr(self, name) for name in self.identity_arguments}

    def hyperparameters(self) -> dict[str, Any]:
        """Every constructor argument by its name in the signature, read from the attribute of the
        same name (as checked and stored): saved with the state, compared on load, written to
        ``lightning_tricks.json`` and shown in TensorBoard's HParams."""
        return {name: getattr(self, name) for name in constructor_arguments(type(self))}

    def dashboard_layout(self) -> dict[str, list[str]]:
        """Charts of TensorBoard's Custom Scalars tab: ``{"chart title": [tag, ...]}``, each chart
        one multi-line plot of the tags (TensorBoard matches them as regular expressions).

        The layouts of all the run's ``TrickCallback`` instances are gathered into one layout at
        fit start, one category per callback class."""
        return {}

    def metric_descriptions(self) -> dict[str, str]:
        """``{tag: description}`` (Markdown) shown beside the tag in TensorBoard's Scalars tab."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        """Built from :meth:`identity` once, on first use: Lightning reads ``state_key`` at every
        hook call, and the identity is the constructor's arguments, fixed from then on."""
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(**self.identity())
        return key

    def reset_fit_state(self) -> None:
        """Forget what a previous ``fit`` accumulated; called at ``setup("fit")``, before a checkpoint
        is restored (Lightning calls ``load_state_dict`` after ``setup``)."""

    def get_state(self) -> dict[str, Any]:
        """What a resumed run needs (bounded: counters, running sums, generator states)."""
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`'s dict."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "hyperparameters": _plain(self.hyperparameters()),
            "run_dir": self._run_dir,
            **self.get_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("hyperparameters", None)
        self._resumed_from = state.pop("run_dir", None)
        if saved is not None:
            self._warn_if_changed(saved)
        self.set_state(state)

    def _warn_if_changed(self, saved: Mapping[str, Any]) -> None:
        current = _plain(self.hyperparameters())
        changed = {k: (saved[k], current[k]) for k in current if k in saved and saved[k] != current[k]}
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            rank_zero_warn(
                f"{type(self).__name__}: resuming with changed settings ({listed}); the state saved in the "
                "checkpoint is kept and the new settings apply from here on."
            )

    # -- lifecycle ----------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.reset_fit_state()
        self._resumed_from = None
        self._continued_tables = set()
        self._run_dir = run_directory(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_run_file(trainer)
        tricks = [callback for callback in trainer.callbacks if isinstance(callback, TrickCallback)]
        write_dashboard(trainer, tricks, self._run_dir)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last of the run's ``TrickCallback`` instances closes TensorBoard's HParams session,
        after every one of them logged its final values (subclasses call ``super().on_fit_end``)."""
        if self is _last_trick(trainer):
            finish_sessions(trainer, succeeded=True)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Mark the HParams session failed (subclasses call ``super().on_exception``)."""
        if self is _last_trick(trainer):
            finish_sessions(trainer, succeeded=False)

    @property
    def run_dir(self) -> str | None:
        """The run folder files go to (set at ``setup("fit")``)."""
        return self._run_dir

    # -- the step axis ----------------------------------------------------------------------

    @staticmethod
    def training_step(trainer: pl.Trainer) -> int:
        """0-based index of the current training step (batches that stepped the optimisers so far):
        the step Lightning logs ``self.log(..., on_step=True)`` values at."""
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    # -- scalars -------------------------------------------------------------------------------

    def log_scalars(
        self, trainer: pl.Trainer, metrics: Mapping[str, Tensor | float], step: int
    ) -> dict[str, float]:
        """Send ``metrics`` to every logger at ``step`` and into ``trainer.callback_metrics``;
        return them as Python floats.

        Never gated by ``log_every_n_steps``; one host transfer for all tensor values, and one
        float64 tensor made for ``callback_metrics`` (its 0-d entries are views of it). Under DDP
        every rank must pass the same values (ours reduce before they log): ``callback_metrics``
        is set on every rank so that monitors agree, loggers are written by rank 0."""
        if not metrics:
            return {}
        values = host_values(metrics)
        mirrored = torch.tensor(list(values.values()), dtype=torch.float64).unbind(0)  # one tensor, 0-d views
        trainer.callback_metrics.update(zip(values, mirrored))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                send_metrics(logger, values, step)
        return values

    # -- figures and files ---------------------------------------------------------------------

    def log_figure(self, trainer: pl.Trainer, tag: str, figure: Figure, step: int) -> None:
        """Show ``figure`` in every logger that can (TensorBoard, W&B, MLflow) and save it as
        ``<tag>.png`` (``/`` → ``.``) in the run folder; rank 0 only."""
        if not trainer.is_global_zero:
            return
        png = _png_bytes(figure)
        self._write_bytes(tag.replace("/", ".") + ".png", png)
        image = _png_array(png) if trainer.loggers else None
        for logger in trainer.loggers:
            if not _send_figure(logger, tag, image, step):
                _notice_no_images(logger)

    def write_table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Iterable[Mapping[str, Any] | Sequence[Any]],
        append: bool = False,
    ) -> str | None:
        """Write ``rows`` to the CSV ``name`` in the run folder, replacing it or, with ``append``,
        adding to it (the header is written once); rank 0 only. Returns the path, or ``None``.

        An appended table is ordered by its first column (a step, an epoch). The first append of a
        fit continues the file: the rows it already has from that first row's key on (a resumed fit
        redoes them, into the same folder) and a last row cut mid-write are dropped first, so a
        table never holds a row twice, whatever the resumes."""
        path = self._file_path(name)
        if path is None:
            return None
        rows = [[row[c] for c in columns] if isinstance(row, Mapping) else list(row) for row in rows]
        if append and rows and name not in self._continued_tables:
            self._continued_tables.add(name)
            _truncate_table(path, rows[0][0])
            _widen_table(path, columns)
        header = not (append and os.path.exists(path))
        with open(path, "a" if append else "w", newline="") as handle:
            writer = csv.writer(handle)
            if header:
                writer.writerow(columns)
            writer.writerows(rows)
        return path

    def write_array(self, name: str, array: np.ndarray) -> str | None:
        """Save ``array`` as the ``.npy`` file ``name`` in the run folder; rank 0 only."""
        path = self._file_path(name)
        if path is not None:
            np.save(path, array)
        return path

    def _write_bytes(self, name: str, data: bytes) -> None:
        path = self._file_path(name)
        if path is not None:
            with open(path, "wb") as handle:
                handle.write(data)

    def _file_path(self, name: str) -> str | None:
        """``run_dir/name`` (folders created), or ``None`` off rank 0 or before ``setup``."""
        if self._run_dir is None or not _is_global_zero():
            return None
        os.makedirs(self._run_dir, exist_ok=True)
        return os.path.join(self._run_dir, name)

    def _write_run_file(self, trainer: pl.Trainer) -> None:
        """Record in ``lightning_tricks.json`` this callback's settings and the run it resumed."""
        path = self._file_path(RUN_FILE)
        if path is None:
            return
        record = read_run_file(path) if os.path.exists(path) else {"callbacks": {}}
        entry = {"class": type(self).__name__, "hyperparameters": _plain(self.hyperparameters())}
        if self._resumed_from and os.path.abspath(self._resumed_from) != os.path.abspath(self._run_dir):
            entry["resumed_from"] = self._resumed_from
        record["callbacks"][self.namespace] = entry
        with open(path, "w") as handle:
            json.dump(record, handle, indent=2)


def _last_trick(trainer: pl.Trainer) -> TrickCallback | None:
    """The run's last ``TrickCallback`` in hook order (Lightning calls callbacks in list order)."""
    return next((c for c in reversed(trainer.callbacks) if isinstance(c, TrickCallback)), None)


def _truncate_table(path: str, start: Any) -> None:
    """Keep the header and the rows of CSV ``path`` whose first cell is below ``start``, and no
    last row cut mid-write (one without its line end); remove the file if not even its header is
    whole."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as handle:
        lines = handle.readlines()
    whole = lines[:-1] if lines and not lines[-1].endswith(("\n", "\r")) else lines
    kept = whole[:1] + [line for line in whole[1:] if _below((next(csv.reader([line])) or [""])[0], start)]
    if len(kept) == len(lines):
        return
    if not kept:  # not even a whole header line
        os.remove(path)
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w", newline="") as handle:
        handle.writelines(kept)
    os.replace(temporary, path)


def _widen_table(path: str, columns: Sequence[str]) -> None:
    """Give CSV ``path`` the header ``columns`` when its own is a shorter prefix of it (a table of
    an earlier version that logged fewer values), its rows padded with empty cells; refuse another
    header, naming the file, rather than append rows that do not match it."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as handle:
        table = list(csv.reader(handle))
    header = table[0] if table else []
    if header == list(columns):
        return
    if header != list(columns[: len(header)]):
        raise ValueError(
            f"{path} has the columns {header}, not {list(columns)}: it was written by another callback or "
            "version. Move it away to start a new table."
        )
    padding = [""] * (len(columns) - len(header))
    temporary = f"{path}.tmp"
    with open(temporary, "w", newline="") as handle:
        csv.writer(handle).writerows([list(columns), *(row + padding for row in table[1:])])
    os.replace(temporary, path)


def _below(cell: str, start: Any) -> bool:
    """Whether a row keyed ``cell`` comes before ``start``; a row whose key is no number is kept as
    it is (the readers report it)."""
    try:
        return float(cell) < float(start)
    except ValueError:
        return True


def _is_global_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _send_figure(logger: Logger, tag: str, image: np.ndarray, step: int) -> bool:
    """Hand the rendered figure (an ``(H, W, 3)`` uint8 image) to a logger that can show images;
    ``False`` if it cannot. The figure is rendered once, for the PNG, and reused here."""
    experiment = logger.experiment
    if isinstance(logger, TensorBoardLogger):
        experiment.add_image(tag, image, global_step=step, dataformats="HWC")
    elif hasattr(logger, "log_image"):  # W&B
        logger.log_image(key=tag, images=[image], step=step)
    elif hasattr(experiment, "log_image") and hasattr(logger, "run_id"):  # MLflow
        experiment.log_image(logger.run_id, image, artifact_file=f"{tag}_step{step}.png")
    else:
        return False
    return True


def _png_array(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return (imread(io.BytesIO(png), format="png")[..., :3] * 255).astype(np.uint8)


def _notice_no_images(logger: Logger) -> None:
    kind = type(logger).__name__
    if kind not in _IMAGE_NOTICES:
        _IMAGE_NOTICES.add(kind)
        rank_zero_info(
            f"lightning-tricks: {kind} cannot show figures; they are saved as PNG in the run folder."
        )


def _plain(value: Any) -> Any:
    """``value`` in plain, picklable, JSON-able form (checkpoints, ``lightning_tricks.json``): numbers,
    strings, lists and dicts as they are, a callable or an object without a repr of its own by its
    qualified name, anything else by ``repr``."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if type(value).__repr__ is object.__repr__:  # "<… object at 0x…>" would differ at every resume
        return f"{type(value).__module__}.{type(value).__qualname__}"
    return repr(value)
