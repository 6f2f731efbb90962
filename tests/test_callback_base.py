"""The shared callback base with every logger: run folder, figures, values at their own step,
monitoring by EarlyStopping, and DDP (only rank 0 writes, every rank agrees on the run folder)."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import pytest
from helpers import LOGGER_KINDS
from lightning.pytorch.callbacks import Callback, EarlyStopping
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_tricks import (
    BatchSizeScheduler,
    FisherSpectrum,
    GradientFlow,
    MinibatchHeatmap,
    RandomGradient,
)
from lightning_tricks.callbacks._base import RUN_FILE, run_directory
from lightning_tricks.callbacks.random_gradient import HISTORY_FILE, METRIC_NAME

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS_PER_EPOCH, EPOCHS = 4, 2


def read_tensorboard(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def read_csv_logger(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as handle:
        return [(int(row["step"]), float(row[tag])) for row in csv.DictReader(handle) if row.get(tag)]


def read_mlflow(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """MLflow's file store: ``<run>/metrics/<tag>`` lines ``timestamp value step``."""
    lines = (run_dir / "metrics" / tag).read_text().split()
    return [(int(step), float(value)) for _, value, step in zip(lines[::3], lines[1::3], lines[2::3])]


def logged(kind: str, run_dir: Path, tag: str) -> list[tuple[int, float]] | None:
    readers = {"tensorboard": read_tensorboard, "csv": read_csv_logger, "mlflow": read_mlflow}
    return readers[kind](run_dir, tag) if kind in readers else None


def wandb_offline_run(save_dir: Path) -> Path:
    (run,) = (save_dir / "wandb").glob("offline-run-*")
    return run


@pytest.fixture
def logged_run(request, tmp_path, monkeypatch, make_logger, trainer_for, tiny_module, probe_callback):
    """Two epochs of four steps with RandomGradient and the probe, run from inside ``tmp_path``
    with the logger of ``request.param`` saving under ``tmp_path/logs``."""
    kind = request.param
    monkeypatch.chdir(tmp_path)
    logger = make_logger(kind, tmp_path / "logs")
    random_gradient, probe = RandomGradient(seed=1), probe_callback()
    trainer = trainer_for(
        [random_gradient, probe], logger=logger, max_epochs=EPOCHS, default_root_dir=tmp_path / "root"
    )
    assert trainer.log_every_n_steps == 50, "the Trainer's default, larger than the run"
    trainer.fit(tiny_module(samples=4 * STEPS_PER_EPOCH))
    if kind == "wandb":
        logger.experiment.finish()
    return kind, trainer, random_gradient


@pytest.mark.parametrize("logged_run", LOGGER_KINDS, indirect=True)
def test_files_go_to_the_run_folder_and_nothing_to_the_working_directory(logged_run, tmp_path):
    kind, trainer, _ = logged_run
    run_dir = Path(run_directory(trainer))
    expected_top = {"root"} if kind == "none" else {"logs"}
    assert {p.name for p in tmp_path.iterdir()} == expected_top
    assert run_dir.is_relative_to(tmp_path / next(iter(expected_top)))
    assert {HISTORY_FILE, "probe.figure.png", RUN_FILE} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "probe.figure.png").read_bytes().startswith(b"\x89PNG")
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert set(record["callbacks"]) == {"random_gradient", "probe"}


@pytest.mark.parametrize("logged_run", LOGGER_KINDS, indirect=True)
def test_every_value_reaches_the_logger_at_its_own_step(logged_run, probe_callback):
    kind, trainer, random_gradient = logged_run
    run_dir = Path(run_directory(trainer))
    probe = logged(kind, run_dir, probe_callback.TAG)
    if probe is None:
        return
    steps = range(STEPS_PER_EPOCH * EPOCHS)
    assert probe == [(step, 1.0 + step / 2) for step in steps], "every step, not every 50"
    ((step, r),) = logged(kind, run_dir, METRIC_NAME)
    assert step == 0 and r == pytest.approx(random_gradient.history[0]["r"], rel=1e-6), "step 0 of every 50"


@pytest.mark.parametrize("logged_run", ["tensorboard", "wandb", "mlflow"], indirect=True)
def test_figures_reach_loggers_that_show_images(logged_run, tmp_path, probe_callback):
    kind, trainer, _ = logged_run
    run_dir = Path(run_directory(trainer))
    if kind == "tensorboard":
        events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
        events.Reload()
        assert [e.step for e in events.Images(probe_callback.FIGURE)] == [4, 8]
    elif kind == "mlflow":
        figures = sorted(p.name for p in (run_dir / "artifacts" / "probe").iterdir())
        assert figures == ["figure_step4.png", "figure_step8.png"]
    else:
        offline = wandb_offline_run(tmp_path / "logs")
        assert len(list(offline.rglob("media/images/probe/figure_*.png"))) == 2
        (records,) = offline.glob("run-*.wandb")
        assert probe_callback.TAG.encode() in records.read_bytes(), "the metrics are in the offline run"


def test_early_stopping_monitors_a_callback_metric(trainer_for, tiny_module, probe_callback):
    """The probe's value grows every step, so with ``mode="min"`` the second epoch is no improvement."""
    stopper = EarlyStopping(monitor=probe_callback.TAG, mode="min", patience=0, check_on_train_epoch_end=True)
    trainer = trainer_for([probe_callback(), stopper], max_epochs=5)
    trainer.fit(tiny_module(samples=16))
    assert stopper.stopped_epoch == 1 and trainer.current_epoch == 2
    assert float(trainer.callback_metrics[probe_callback.TAG]) == 1.0 + 7 / 2


class SaveRunDir(Callback):
    """Each rank writes the run folder it resolved to a file of its own, outside the run folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        path = self.directory / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(run_directory(trainer)))


def test_ddp_only_rank_zero_writes_and_ranks_agree_on_the_run_folder(
    tmp_path, trainer_for, tiny_module, make_logger, probe_callback
):
    (tmp_path / "ranks").mkdir()
    random_gradient = RandomGradient(seed=2, log_every_n_steps=1)
    callbacks = [random_gradient, probe_callback(), SaveRunDir(tmp_path / "ranks")]
    trainer = trainer_for(
        callbacks, logger=make_logger("tensorboard", tmp_path / "logs"), strategy="ddp_fork", devices=2
    )
    trainer.fit(tiny_module(samples=16))  # 2 steps a rank

    rank0, rank1 = (json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    run_dir = Path(rank0)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert read_tensorboard(run_dir, probe_callback.TAG) == [(0, 1.0), (1, 1.5)], "one event a step, not two"
    with open(run_dir / HISTORY_FILE) as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["0", "1"], "one row a draw, not two"
    written = sorted(p.name for p in (tmp_path / "logs").rglob("*") if p.is_file())
    assert [name for name in written if not name.startswith("events.")] == sorted(
        ["hparams.yaml", "probe.figure.png", HISTORY_FILE, RUN_FILE]
    )


# -- loss_fn: resolve_loss_fn's contract checked at construction (issue 19, finding 8) ------------


def _two_arguments(module, batch):
    return module(batch)


@pytest.mark.parametrize("bad", ["mse", 3, lambda batch: batch, lambda module, batch, extra: batch])
@pytest.mark.parametrize("make", ["heatmap", "scheduler"])
def test_callbacks_taking_a_loss_fn_reject_a_bad_one_at_construction(make, bad):
    from lightning_tricks import BatchSizeScheduler, MinibatchHeatmap

    constructors = {
        "heatmap": lambda loss_fn: MinibatchHeatmap(loss_fn=loss_fn),
        "scheduler": lambda loss_fn: BatchSizeScheduler(max_size=64, adaptive=True, loss_fn=loss_fn),
    }
    with pytest.raises(TypeError, match=r"`loss_fn`.*(module, batch)"):
        constructors[make](bad)
    for good in (None, _two_arguments, lambda module, batch, scale=1.0: batch):
        assert constructors[make](good).loss_fn is good


# -- appended tables continue across resumes (issue 19, finding 11) -------------------------------


def test_the_first_append_of_a_fit_continues_the_table(tmp_path):
    """A fit's first append drops the rows from its first key on (a resumed fit redoes them) and a
    last row cut mid-write (a killed run); later appends of the fit only append."""
    from lightning_tricks.callbacks._base import TrickCallback

    callback = TrickCallback()
    callback._run_dir = str(tmp_path)
    path = tmp_path / "t.csv"
    path.write_text("step,value\r\n0,a\r\n\r\n4,b\r\n8,c\r\n12,d\r\n16,e")  # a blank line; 16 cut mid-write
    callback.write_table("t.csv", ["step", "value"], [{"step": 8, "value": "C"}], append=True)
    callback.write_table("t.csv", ["step", "value"], [(12, "D"), (16, "E")], append=True)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["step", "value"], ["0", "a"], [], ["4", "b"], ["8", "C"], ["12", "D"], ["16", "E"]]
    path.write_text("ste")  # not even the header survived
    callback._continued_tables.clear()
    callback.write_table("t.csv", ["step", "value"], [(0, "x")], append=True)
    assert path.read_text().splitlines() == ["step,value", "0,x"]


def test_a_cut_run_file_stops_the_fit_naming_the_file_and_the_line(tmp_path, trainer_for, tiny_module):
    random_gradient = RandomGradient(seed=1)
    trainer = trainer_for([random_gradient])
    run_dir = Path(run_directory(trainer))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text('{"callbacks": {')
    with pytest.raises(ValueError, match=rf"{RUN_FILE}, line 1, column \d+: not valid JSON"):
        trainer.fit(tiny_module(samples=8))


def test_state_key_is_built_once_not_at_every_hook(trainer_for, tiny_module, probe_callback):
    """Lightning reads ``state_key`` at every hook call; the identity behind it is computed a fixed
    number of times per fit, whatever the number of steps (it was once per hook call)."""

    class Counting(probe_callback):
        calls = 0

        def identity(self):
            type(self).calls += 1
            return super().identity()

    calls = []
    for samples in (8, 32):  # 2 and 8 steps
        Counting.calls = 0
        probe = Counting()
        trainer_for([probe]).fit(tiny_module(samples=samples))
        assert probe.logged_steps == list(range(samples // 4))
        calls.append(Counting.calls)
    assert calls[0] == calls[1] <= 3
    assert probe.state_key == Counting().state_key != probe_callback(label="b").state_key


@pytest.mark.parametrize(
    "callback_class", [FisherSpectrum, GradientFlow, MinibatchHeatmap, RandomGradient, BatchSizeScheduler]
)
def test_knobs_are_declared_once_by_the_signature(callback_class):
    """``hyperparameters()`` is every constructor argument by name, read from the attribute the
    constructor stored it under; the identity is a subset of them; neither is written by hand."""
    arguments = [p for p in inspect.signature(callback_class.__init__).parameters if p != "self"]
    callback = callback_class(**({"sizes": [4, 8]} if callback_class is BatchSizeScheduler else {}))
    assert list(callback.hyperparameters()) == arguments
    assert set(callback_class.identity_arguments) <= set(arguments)
    assert list(callback.identity()) == list(callback_class.identity_arguments)
    for overridden in ("hyperparameters", "identity"):
        assert overridden not in vars(callback_class), (
            f"{callback_class.__name__} writes {overridden}() by hand"
        )


@pytest.mark.parametrize(
    "callback_class", [FisherSpectrum, GradientFlow, MinibatchHeatmap, RandomGradient, BatchSizeScheduler]
)
def test_overridden_fit_end_and_exception_hooks_reach_the_base(callback_class):
    """The base closes TensorBoard's HParams session in ``on_fit_end``/``on_exception``: a callback
    that overrides either calls ``super()``, or the session would stay open when it is the last."""
    for hook in ("on_fit_end", "on_exception"):
        if hook in vars(callback_class):
            assert f"super().{hook}(" in inspect.getsource(vars(callback_class)[hook]), (callback_class, hook)


def test_the_dashboard_leaves_the_trainers_callbacks_as_the_user_gave_them(
    trainer_for, tiny_module, tmp_path
):
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = trainer_for([RandomGradient(seed=0)], logger=TensorBoardLogger(tmp_path))
    before = list(trainer.callbacks)
    trainer.fit(tiny_module(samples=8))
    assert trainer.callbacks == before


def test_a_knob_without_a_repr_of_its_own_is_stored_by_its_class_not_its_address():
    """A user's policy object as a knob: the same setting reads the same after a resume."""
    from lightning_tricks.callbacks._base import _plain

    class Policy:
        pass

    assert _plain(Policy()) == _plain(Policy()) == f"{__name__}.{Policy.__qualname__}"


def test_a_table_of_an_earlier_version_gets_the_new_columns_on_resume(tmp_path):
    """FisherSpectrum's history gained columns (the gradient tests): a run resumed into a folder
    whose table has the old header continues it with the new header, old rows padded."""
    from lightning_tricks.callbacks._base import TrickCallback

    callback = TrickCallback()
    callback._run_dir = str(tmp_path)
    (tmp_path / "t.csv").write_text("step,a\n0,1.0\n1,2.0\n")
    callback.write_table("t.csv", ("step", "a", "b"), [{"step": 1, "a": 2.5, "b": 3.0}], append=True)
    assert (tmp_path / "t.csv").read_text().splitlines() == ["step,a,b", "0,1.0,", "1,2.5,3.0"]
    callback._continued_tables.clear()
    with pytest.raises(ValueError, match=r"t\.csv has the columns \['step', 'a', 'b'\], not \['x'\]"):
        callback.write_table("t.csv", ("x",), [{"x": 4}], append=True)
