"""``lightning-tricks compare``: time to a target and the final metric per group of a sweep's runs."""

from __future__ import annotations

import math
import re
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from lightning_tricks import cli
from lightning_tricks.comparison import (
    markdown_table,
    parse_target,
    run_outcome,
    summarise,
    sweep_outcomes,
)
from lightning_tricks.results import load_scalars, logger_start_time

# -- runs written event by event, with known wall times -------------------------------------------------


def write_run(
    folder: Path, accuracies: list[float], steps_per_epoch: int, final: float, seconds_per_epoch: float
):
    """A run's event file as Lightning writes it: ``epoch`` and ``val/acc`` at each epoch's last step,
    ``test/acc`` after fit; the values' wall times are ``seconds_per_epoch`` apart from the writer's start."""
    writer = SummaryWriter(str(folder))
    start = time.time()
    for epoch, accuracy in enumerate(accuracies):
        step = (epoch + 1) * steps_per_epoch - 1
        wall = start + (epoch + 1) * seconds_per_epoch
        writer.add_scalar("epoch", float(epoch), step, walltime=wall)
        writer.add_scalar("val/acc", accuracy, step, walltime=wall)
    writer.add_scalar("test/acc", final, len(accuracies) * steps_per_epoch, walltime=start + 99.0)
    writer.close()
    return start


RUNS = {  # name: (val/acc per epoch, steps per epoch, final test/acc, seconds per epoch)
    "fast-seed0": ([0.5, 0.9, 0.97, 0.99], 10, 0.98, 2.0),
    "fast-seed1": ([0.6, 0.96, 0.99, 0.99], 10, 0.97, 3.0),
    "slow-seed0": ([0.4, 0.7, 0.8, 0.96], 40, 0.95, 5.0),
    "slow-seed1": ([0.4, 0.7, 0.8, 0.9], 40, 0.90, 5.0),
}


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, dict[str, float]]:
    root = tmp_path / "sweep"
    starts = {name: write_run(root / name, *spec) for name, spec in RUNS.items()}
    return root, starts


def expected(name: str, target: float) -> tuple[float, float, float]:
    """(epochs, steps, seconds) to the first val/acc >= target, counted from RUNS directly."""
    accuracies, per_epoch, _, seconds = RUNS[name]
    epoch = next((e for e, a in enumerate(accuracies) if a >= target), None)
    if epoch is None:
        return math.nan, math.nan, math.nan
    return epoch + 1.0, (epoch + 1.0) * per_epoch, (epoch + 1) * seconds


def test_each_run_reports_when_it_first_met_the_target_and_its_final_metric(sweep):
    root, _ = sweep
    for name, (_, _, final, _) in RUNS.items():
        outcome = run_outcome(root / name, "val/acc", 0.95, "test/acc")
        epochs, steps, seconds = expected(name, 0.95)
        assert outcome.name == name and outcome.group == name.rsplit("-seed", 1)[0]
        assert (outcome.epochs, outcome.steps) == (epochs, steps) or (
            math.isnan(epochs) and not outcome.reached
        )
        assert outcome.final == pytest.approx(final, rel=1e-6)  # float32 in the event file
        if outcome.reached:  # the writer's own start is the logger's start, within its construction time
            assert outcome.seconds == pytest.approx(seconds, abs=0.5)


def test_the_clock_starts_when_the_logger_opened_its_first_event_file(sweep):
    root, starts = sweep
    for name, start in starts.items():
        recorded = logger_start_time(root / name)
        assert start - 0.5 <= recorded <= start + 0.5
        file_stamp = int(next((root / name).glob("events.out.tfevents.*")).name.split(".")[3])
        assert abs(recorded - file_stamp) < 1.5  # the event file's name carries its creation second


def test_a_lower_is_better_target(sweep):
    root, _ = sweep
    outcome = run_outcome(root / "slow-seed0", "val/acc", 0.45, "test/acc", higher_is_better=False)
    assert (outcome.epochs, outcome.steps) == (1.0, 40.0)


def test_groups_are_summarised_over_their_seeds(sweep):
    root, _ = sweep
    summaries = {s.group: s for s in summarise(sweep_outcomes(root, "val/acc", 0.95, "test/acc"))}
    assert list(summaries) == ["fast", "slow"]
    fast, slow = summaries["fast"], summaries["slow"]
    assert (fast.runs, fast.reached, slow.runs, slow.reached) == (2, 2, 2, 1)
    fast_epochs = [expected(n, 0.95)[0] for n in ("fast-seed0", "fast-seed1")]
    assert fast.epochs == pytest.approx((np.mean(fast_epochs), np.std(fast_epochs, ddof=1)))
    assert slow.epochs == (4.0, 0.0) and slow.steps == (160.0, 0.0)  # only seed 0 reached it
    finals = [RUNS[n][2] for n in ("slow-seed0", "slow-seed1")]
    assert slow.final == pytest.approx((statistics.fmean(finals), statistics.stdev(finals)), rel=1e-6)


def test_the_table_has_a_row_per_group_and_a_dash_where_no_run_reached(sweep):
    root, _ = sweep
    table = markdown_table(
        summarise(sweep_outcomes(root, "val/acc", 0.999, "test/acc")), "val/acc", 0.999, "test/acc"
    )
    lines = table.splitlines()
    assert lines[0].startswith("| runs | reached val/acc 0.999 |") and len(lines) == 4
    assert lines[2].startswith("| fast (×2) | 0/2 | – | – | – | 0.9750 ± 0.0071 |")


def test_the_command_prints_the_table(sweep, capsys):
    root, _ = sweep
    assert cli.main(["compare", str(root), "--target", "val/acc=0.95", "--final", "test/acc"]) == 0
    out = capsys.readouterr().out
    assert "| fast (×2) | 2/2 | 2.5 ± 0.7 | 25 ± 7 |" in out and "| slow (×2) | 1/2 | 4.0 ± 0.0 |" in out


@pytest.mark.parametrize(
    "args, match",
    [
        (["--target", "val/acc"], "TAG=NUMBER"),
        (["--target", "val/acc=high"], "TAG=NUMBER"),
        (["--target", "val/loss=0.5"], "no scalar 'val/loss' was logged"),
        (["--target", "val/acc=0.9", "--group", "("], "unterminated subpattern|missing \\)"),
    ],
)
def test_bad_arguments_are_named(sweep, capsys, args, match):
    root, _ = sweep
    with pytest.raises(SystemExit):
        cli.main(["compare", str(root), *args])
    assert re.search(match, capsys.readouterr().err)


def test_a_folder_without_runs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no run folder"):
        sweep_outcomes(tmp_path, "val/acc", 0.9, "test/acc")
    with pytest.raises(ValueError, match="is not a folder"):
        sweep_outcomes(tmp_path / "missing", "val/acc", 0.9, "test/acc")
    assert parse_target("train/loss=1e-3") == ("train/loss", 1e-3)


# -- a real fit, as Lightning logs it --------------------------------------------------------------------


class ValidationLog(Callback):
    """(epoch, global step, val_loss) at each validation end, independently of the event files."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.rows.append(
                (trainer.current_epoch, trainer.global_step, float(trainer.callback_metrics["val_loss"]))
            )


def test_a_lightning_fit_reads_back_as_its_validations_happened(tmp_path, trainer_for, tiny_module):
    log = ValidationLog()
    logger = TensorBoardLogger(tmp_path / "sweep", name="tiny-seed0", version="")
    started = time.time()
    trainer_for([log], max_epochs=4, logger=logger).fit(tiny_module(samples=30, batch_size=4))
    finished = time.time()
    target = sorted(value for *_, value in log.rows)[1]  # met for the first time at some epoch
    epoch, step, _ = next(row for row in log.rows if row[2] <= target)
    outcome = run_outcome(
        tmp_path / "sweep" / "tiny-seed0", "val_loss", target * (1 + 1e-6), "train_loss", False
    )
    assert (outcome.epochs, outcome.steps) == (epoch + 1, step)
    assert 0 < outcome.seconds < finished - started
    assert {row["wall_time"] is not None for row in load_scalars(tmp_path / "sweep" / "tiny-seed0")} == {True}
