"""``lightning-tricks compare``: how soon each run of a sweep reached a target, and where it ended.

For every run folder of a sweep's output (``lightning-tricks sweep --out``), read back with
:mod:`lightning_tricks.results`: the first logged value of a metric that meets a target (e.g.
``val/acc >= 0.98``, logged at each epoch's end) — after how many epochs, optimizer steps and
seconds — and the last value of a final metric (e.g. ``test/acc`` of ``test_after_fit``). Runs that
differ only in their seed (names ending in ``-seed<N>``, as the grids name them) form one group,
summarised as mean ± standard deviation over its runs; a group's time to target is over the runs
that reached it (the ``reached`` column says how many did).

Seconds are wall time from the logger's start (:func:`~lightning_tricks.results.logger_start_time`,
before the sanity check) to the event that met the target, within one folder (NaN for a resumed run:
each folder has its own clock). They depend on the machine and on what else it ran: compare runs of
one sweep on one machine, and read the epochs and steps beside them.

Example::

    lightning-tricks compare logs/seed004_guided --target val/acc=0.98 --final test/acc
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .results import load_scalars, logger_start_time, run_chain

SEED_SUFFIX = r"-seed\d+$"
"""What tells the runs of one group apart: the sweep's ``{...}-seed{seed_everything}`` names."""

PathLike = str | os.PathLike


@dataclass(frozen=True)
class RunOutcome:
    """One run's answer: when it first met the target (NaN: never) and its final metric."""

    name: str
    group: str
    epochs: float
    """Epochs trained when the target was first met (the metric's epoch + 1)."""
    steps: float
    """Optimizer steps by then: the metric's logged step + 1 (Lightning logs an epoch's metrics at the
    index of its last step)."""
    seconds: float
    """Wall seconds from the logger's start to that metric's event."""
    final: float
    """The last logged value of the final metric (NaN if the run logged none)."""

    @property
    def reached(self) -> bool:
        return not math.isnan(self.steps)


@dataclass(frozen=True)
class GroupSummary:
    """Mean and standard deviation over a group's runs (``(mean, std)`` pairs; std 0 for one run)."""

    group: str
    runs: int
    reached: int
    epochs: tuple[float, float]
    steps: tuple[float, float]
    seconds: tuple[float, float]
    final: tuple[float, float]


def run_outcome(
    run_dir: PathLike,
    target_tag: str,
    target: float,
    final_tag: str,
    higher_is_better: bool = True,
    group_pattern: str = SEED_SUFFIX,
) -> RunOutcome:
    """The outcome of the run in ``run_dir`` (resumes followed for epochs, steps and the final metric).

    Raises:
        KeyError: the run never logged ``target_tag`` (the message lists what it logged).
    """
    records = load_scalars(run_dir)
    rows = [row for row in records if row["tag"] == target_tag]
    if not rows:
        tags = sorted({row["tag"] for row in records})
        raise KeyError(f"{run_dir}: no scalar {target_tag!r} was logged; tags: {tags}.")
    met = next((row for row in rows if _meets(row["value"], target, higher_is_better)), None)
    finals = [row["value"] for row in records if row["tag"] == final_tag]
    name = Path(run_dir).name
    return RunOutcome(
        name=name,
        group=re.sub(group_pattern, "", name) or name,
        epochs=math.nan if met is None or met["epoch"] is None else met["epoch"] + 1.0,
        steps=math.nan if met is None else met["step"] + 1.0,
        seconds=_seconds_to(met, run_dir),
        final=finals[-1] if finals else math.nan,
    )


def _meets(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def _seconds_to(row: dict | None, run_dir: PathLike) -> float:
    """Wall seconds from the logger's start to ``row``; NaN without a row, a wall time or one clock."""
    if row is None or row["wall_time"] is None or len(run_chain(run_dir)) > 1:
        return math.nan
    start = logger_start_time(run_dir)
    return math.nan if start is None else row["wall_time"] - start


def sweep_outcomes(
    sweep_dir: PathLike, target_tag: str, target: float, final_tag: str, **options
) -> list[RunOutcome]:
    """:func:`run_outcome` of every run folder in a sweep's output folder (sorted by name).

    Raises:
        ValueError: ``sweep_dir`` is not a folder or holds no run folder.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder (pass a sweep's --out folder).")
    runs = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not runs:
        raise ValueError(f"{str(root)!r} holds no run folder.")
    return [run_outcome(run, target_tag, target, final_tag, **options) for run in runs]


def summarise(outcomes: Sequence[RunOutcome]) -> list[GroupSummary]:
    """One :class:`GroupSummary` per group, in the order the groups first occur."""
    groups: dict[str, list[RunOutcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.group, []).append(outcome)
    summaries = []
    for group, members in groups.items():
        reached = [m for m in members if m.reached]
        summaries.append(
            GroupSummary(
                group=group,
                runs=len(members),
                reached=len(reached),
                epochs=_mean_std([m.epochs for m in reached]),
                steps=_mean_std([m.steps for m in reached]),
                seconds=_mean_std([m.seconds for m in reached if not math.isnan(m.seconds)]),
                final=_mean_std([m.final for m in members if not math.isnan(m.final)]),
            )
        )
    return summaries


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); (NaN, NaN) for none, std 0 for one value."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(summaries: Sequence[GroupSummary], target_tag: str, target: float, final_tag: str) -> str:
    """The summaries as a Markdown table, mean ± std per cell."""
    head = (
        f"| runs | reached {target_tag} {target:g} | epochs to target | steps to target "
        f"| seconds to target | final {final_tag} |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for s in summaries:
        cells = [
            f"{s.group} (×{s.runs})",
            f"{s.reached}/{s.runs}",
            _format(s.epochs, "{:.1f}"),
            _format(s.steps, "{:.0f}"),
            _format(s.seconds, "{:.0f}"),
            _format(s.final, "{:.4f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(pair: tuple[float, float], spec: str) -> str:
    mean, std = pair
    return "–" if math.isnan(mean) else f"{spec.format(mean)} ± {spec.format(std)}"


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-tricks compare`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lightning-tricks compare",
        description="Per group of runs of a sweep: time to a target and the final metric, mean ± std over seeds.",
    )
    add = parser.add_argument
    add("sweep", type=Path, help="a sweep's output folder (lightning-tricks sweep --out)")
    add(
        "--target",
        required=True,
        metavar="TAG=VALUE",
        help="the metric and the value to reach, e.g. val/acc=0.98",
    )
    add(
        "--final",
        default="test/acc",
        metavar="TAG",
        help="the metric whose last value is reported (test/acc)",
    )
    add("--lower-is-better", action="store_true", help="the target is met at or below VALUE (a loss)")
    add("--group", default=SEED_SUFFIX, metavar="REGEX", help="removed from a run's name to give its group")
    return parser


def parse_target(text: str) -> tuple[str, float]:
    """``"val/acc=0.98"`` → ``("val/acc", 0.98)``.

    Raises:
        ValueError: not ``TAG=NUMBER``.
    """
    tag, sep, value = text.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not tag or not math.isfinite(number):
        raise ValueError(f"--target must be TAG=NUMBER, e.g. val/acc=0.98; got {text!r}.")
    return tag, number


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-tricks compare``: prints the Markdown table."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        target_tag, target = parse_target(ns.target)
        re.compile(ns.group)
        outcomes = sweep_outcomes(
            ns.sweep,
            target_tag,
            target,
            ns.final,
            higher_is_better=not ns.lower_is_better,
            group_pattern=ns.group,
        )
    except (ValueError, KeyError, re.error) as error:
        parser.error(str(error).strip("'\""))
    print(markdown_table(summarise(outcomes), target_tag, target, ns.final))
    return 0
