"""The beacon-guided batch-size policy: seed 004's closed loop (Fig. 1d) on the policy protocol.

:class:`BeaconGuidedPolicy` is a :class:`~lightning_tricks.batch_size_policies.BatchSizePolicy` for
:class:`~lightning_tricks.BatchSizeScheduler`: at each stage's start it reads the run's live
(C̄_K, L_K) from FisherSpectrum's ``fisher/C_bar`` and ``fisher/L`` and lets
:func:`lightning_tricks.beacons.decide_batch_size` choose the next stage's size from a
:class:`~lightning_tricks.beacons.Landscape` of beacon runs. :func:`landscape_from_runs` builds that
landscape from the run folders of a beacon sweep (``configs/experiments/seed004_beacon.grid.yaml``),
read with :mod:`lightning_tricks.results`.

A module of its own, beside :mod:`lightning_tricks.batch_size_policies`: the built-in policies there
are pure arithmetic on the context, while this one reads run folders (``results``, YAML) and holds
a landscape. Like them it imports no Lightning.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from . import checks
from .batch_size_policies import PolicyContext
from .beacons import (
    DEFAULT_TOP_K,
    FisherPoint,
    Landscape,
    beacon_from_records,
    decide_batch_size,
    target_region,
)
from .outputs import FISHER_SPECTRUM, RUN_FILE
from .results import load_fisher_spectrum, load_scalars, run_info, scalar_series

C_BAR_TAG = f"{FISHER_SPECTRUM.namespace}/C_bar"
"""FisherSpectrum's live C̄_K in ``trainer.callback_metrics``."""
L_TAG = f"{FISHER_SPECTRUM.namespace}/L"
"""FisherSpectrum's live L_K in ``trainer.callback_metrics``."""
CONFIG_FILE = "config.yaml"
"""LightningCLI's copy of a run's config, in its run folder (the beacons' ``trainer.max_epochs``)."""

PathLike = str | os.PathLike


class BeaconGuidedPolicy:
    """Steer the batch size so the run's (C̄_K, L_K) moves toward where the best beacons were.

    Seed 004 (``004_e5d92837cb57ce8a.txt``, Fig. 1d): the beacons "guide the dynamic sampling
    training, i.e., we tune the runtime mini-batch size during the training in order to push the
    C̄_K and L_K values close to the optimum region"; §4.3: after a change of batch size a run
    travels like the beacon of its new size. The rule, at the start of every stage of
    ``stage_epochs`` epochs (epochs 0, s, 2s, …; inside a stage the size stays):

    1. epoch 0, or no measurement yet: the loader's own (initial) size;
    2. the run's point (C̄_K, L_K, K): C̄_K and L_K are FisherSpectrum's live ``fisher/C_bar`` and
       ``fisher/L``; K = ⌈step / n⌉, the measured steps 0, n, 2n, … before the stage's first step
       ``step``, n the beacons' FisherSpectrum ``every_n_steps`` — the count
       :func:`~lightning_tricks.beacons.beacon_from_records` gives a beacon (last measured step // n + 1);
    3. :func:`~lightning_tricks.beacons.decide_batch_size`: among the candidate ``sizes`` within a
       factor ``max_change`` of the current size that have a beacon (at ``lr``), the one whose
       beacon, trained over the stage, would bring the point nearest the centre of the ``top_k``
       lowest-error beacons at the stage's end in (ln C̄_K, ln L_K); ties keep the size.

    C̄_K and L_K are running measures of the whole run, so the rule steers the run's cumulative
    point, not its current size: a run that started below the best beacons' size has gathered too
    much L_K and too little C̄_K, and may pass beyond that size to catch up (and one that started
    above may dip below it); the distance to the region falls at every decision all the same.
    Only the batch size is steered; the learning rate follows the run's own schedule, which should
    be the beacons' (``lr_scaling="none"``: a scaled LR changes the L_K increments the beacons predict).

    The run must share the beacons' ``max_epochs``, learning-rate schedule and FisherSpectrum
    ``every_n_steps`` (L_K and K depend on them; both are checked at fit start), and must
    not accumulate gradients (FisherSpectrum refuses it): keep the sizes within one batch. Decisions
    (with the point each read) are in :attr:`decisions` and ``state_dict()`` with the beacons'
    names, so a resumed fit replays them; a resume whose checkpoint preceded a decision reads the
    C̄_K and L_K that FisherSpectrum put back at the fit's start, and decides as the uninterrupted
    run did (without them — a FisherSpectrum added at the resume — it keeps the size there).

    Args:
        beacons: a :class:`~lightning_tricks.beacons.Landscape`, or beacon run folders / sweep output
            folders (:func:`landscape_from_runs`, with ``metric``, ``higher_is_better`` and
            ``max_epochs``).
        sizes: the candidate batch sizes; default every beacon size (at ``lr``).
        max_change: the largest factor between consecutive sizes (``>= 1``).
        stage_epochs: epochs between decisions (``>= 1``).
        top_k: the lowest-error beacons that form the target region.
        lr: the run's initial learning rate, choosing the beacons (needed when the landscape has
            several learning rates per size).
        metric, higher_is_better, max_epochs: how :func:`landscape_from_runs` reads folders.

    Raises:
        ValueError, TypeError: bad arguments or beacon folders; at fit start (:meth:`validate`) a run
            whose ``max_epochs`` differs from the beacons', an empty target region or a candidate
            without a finished beacon; at a decision, no FisherSpectrum reading (attach one).

    Example: beacons at 8, 16 and 32 where 16 reached the lowest error; a run at 8 moves to 16::

        >>> from lightning_tricks.beacons import Beacon
        >>> def beacon(size, error):  # 4 epochs of 64 samples, one measurement a step
        ...     steps = [64 // size * (e + 1) for e in range(4)]
        ...     return Beacon(f"s{size}", size, 0.1, error, progress=[0.25, 0.5, 0.75, 1.0],
        ...                   C_bar=[size] * 4, L=[k / size for k in steps], count=steps)
        >>> landscape = Landscape((beacon(8, 0.3), beacon(16, 0.1), beacon(32, 0.2)), max_epochs=4)
        >>> policy = BeaconGuidedPolicy(landscape, top_k=1)
        >>> live = {"fisher/C_bar": 8.0, "fisher/L": 1.0}  # one epoch at 8, as its beacon: 8 steps
        >>> policy.size_for(1, 8, PolicyContext(max_epochs=4, initial_size=8, size=8, metrics=live))
        16
    """

    def __init__(
        self,
        beacons: Landscape | PathLike | Sequence[PathLike],
        sizes: Sequence[int] | None = None,
        max_change: float = 2.0,
        stage_epochs: int = 1,
        top_k: int = DEFAULT_TOP_K,
        lr: float | None = None,
        metric: str = "test/acc",
        higher_is_better: bool = True,
        max_epochs: int | None = None,
    ) -> None:
        self.max_change = checks.real("max_change", max_change, minimum=1)
        self.stage_epochs = checks.integer("stage_epochs", stage_epochs, minimum=1)
        self.top_k = checks.integer("top_k", top_k, minimum=1)
        self.lr = checks.real("lr", lr, above=0, allow_none=True)
        if not isinstance(metric, str) or not metric:
            raise TypeError(f"`metric` must be the tag of the beacons' final metric (a str); got {metric!r}.")
        self.metric = metric
        self.higher_is_better = checks.boolean("higher_is_better", higher_is_better)
        self.max_epochs = checks.integer("max_epochs", max_epochs, minimum=1, allow_none=True)
        self.landscape = (
            beacons
            if isinstance(beacons, Landscape)
            else landscape_from_runs(
                beacons, metric=metric, higher_is_better=higher_is_better, max_epochs=max_epochs
            )
        )
        self.beacons = tuple(beacon.name for beacon in self.landscape.beacons)
        self.sizes = self._candidates(sizes)
        self.decisions: list[dict[str, Any]] = []
        """One record per decided stage: ``epoch``, ``step``, ``size`` and the point read (``C_bar``,
        ``L``, ``K``: NaN where there was no reading)."""
        self._resumed = False

    def __repr__(self) -> str:  # short and stable: the scheduler stores it with its hyper-parameters
        return (
            f"BeaconGuidedPolicy(beacons={list(self.beacons)}, sizes={list(self.sizes)}, "
            f"max_change={self.max_change}, stage_epochs={self.stage_epochs}, top_k={self.top_k}, lr={self.lr})"
        )

    def _candidates(self, sizes: Sequence[int] | None) -> tuple[int, ...]:
        if sizes is None:
            return tuple(sorted({b.batch_size for b in self.landscape.beacons if self._at_lr(b.lr)}))
        sizes = checks.sequence("sizes", sizes, what="a list of batch sizes")
        if not sizes:
            raise ValueError("`sizes` must list at least one batch size.")
        for i, size in enumerate(sizes):
            checks.integer(f"sizes[{i}]", size, minimum=1)
        return tuple(sorted(set(sizes)))

    def _at_lr(self, lr: float) -> bool:
        return self.lr is None or math.isclose(lr, self.lr)

    # -- the policy protocol ------------------------------------------------------------------

    def known_sizes(self) -> dict[str, int]:
        return {f"sizes[{i}]": size for i, size in enumerate(self.sizes)}

    def validate(self, context: PolicyContext) -> None:
        """Refuse, at fit start, a run the beacons cannot guide: no ``max_epochs`` or another one than
        the beacons', an empty target region, a candidate size without a finished beacon at ``lr``,
        or an initial size with no candidate within ``max_change``."""
        expected = self.landscape.max_epochs
        if context.max_epochs is None:
            raise ValueError(
                "BeaconGuidedPolicy places the run on the beacons' epochs: set Trainer(max_epochs=...)."
            )
        if expected is not None and context.max_epochs != expected:
            raise ValueError(
                f"BeaconGuidedPolicy: the beacons trained {expected} epochs but this run trains "
                f"max_epochs={context.max_epochs}; C̄_K and L_K are only comparable at the same point of "
                f"the same schedule. Set Trainer(max_epochs={expected}) or run the beacons for "
                f"{context.max_epochs} epochs."
            )
        self._check_fisher_spectrum(context)
        target_region(self.landscape, 1.0, self.top_k)  # empty region, unfinished best beacons
        for size in self.sizes:
            beacon = self.landscape.guide(size, self.lr)
            if beacon is None:
                raise ValueError(
                    f"BeaconGuidedPolicy: candidate size {size} has no beacon"
                    + (f" at lr {self.lr}" if self.lr is not None else "")
                    + f"; beacons: {list(self.beacons)}. Pass `sizes` among the beacons' sizes."
                )
            beacon.at(1.0)  # a beacon run must have finished
        initial = context.initial_size
        if not any(initial / self.max_change <= s <= initial * self.max_change for s in self.sizes):
            raise ValueError(
                f"BeaconGuidedPolicy: no candidate size {list(self.sizes)} is within ×{self.max_change} of "
                f"the initial batch size {initial}."
            )

    def _check_fisher_spectrum(self, context: PolicyContext) -> None:
        """The run has a FisherSpectrum (it logs C̄_K and L_K), measuring every ``every_n_steps`` as
        the beacons did (K counts its measured steps)."""
        fisher = context.callbacks.get(FISHER_SPECTRUM.namespace)
        expected = self.landscape.every_n_steps
        if fisher is None:
            raise ValueError(
                "BeaconGuidedPolicy reads the run's C̄_K and L_K from FisherSpectrum: attach "
                f"FisherSpectrum(every_n_steps={expected or 1}) (the beacons' setting) to the Trainer's callbacks."
            )
        if expected is not None and fisher.get("every_n_steps") != expected:
            raise ValueError(
                f"BeaconGuidedPolicy: the beacons measured every {expected} steps but this run's FisherSpectrum "
                f"measures every {fisher.get('every_n_steps')}; K and L_K are only comparable at the same "
                f"setting. Use FisherSpectrum(every_n_steps={expected})."
            )

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        """The size of ``epoch`` by the rule above (a decided epoch again: the size decided then)."""
        replayed = next((d["size"] for d in self.decisions if d["epoch"] == epoch), None)
        if replayed is not None:
            return replayed
        if context.size is None:
            return context.initial_size
        if epoch % self.stage_epochs or context.max_epochs is None or epoch >= context.max_epochs:
            return context.size  # inside a stage, or the epoch after training
        point = self._live_point(step, context.metrics)
        if point is None:
            size = context.size
        else:
            size = decide_batch_size(
                self.landscape,
                point,
                epoch,
                self.sizes,
                context.size,
                self.max_change,
                max_epochs=context.max_epochs,
                stage_epochs=self.stage_epochs,
                lr=self.lr,
                top_k=self.top_k,
            ).size
        self._resumed = False
        read = (point.C_bar, point.L, point.count) if point else (math.nan, math.nan, math.nan)
        self.decisions.append(
            dict(zip(("epoch", "step", "size", "C_bar", "L", "K"), (epoch, step, size, *read)))
        )
        return size

    def _live_point(self, step: int, metrics: Any) -> FisherPoint | None:
        """(C̄_K, L_K, K) of the run from ``metrics``; ``None`` when not finite or, right after a
        resume, absent (no FisherSpectrum state in the checkpoint)."""
        if C_BAR_TAG not in metrics or L_TAG not in metrics:
            if self._resumed:
                return None
            raise ValueError(
                f"BeaconGuidedPolicy reads the run's C̄_K and L_K from `{C_BAR_TAG}` and `{L_TAG}`, but "
                "nothing logged them: attach FisherSpectrum (with the beacons' every_n_steps) to the "
                "Trainer's callbacks."
            )
        C_bar, total = float(metrics[C_BAR_TAG]), float(metrics[L_TAG])
        every = self.landscape.every_n_steps or 1
        count = -(-step // every)  # ⌈step / n⌉: the measured steps 0, n, 2n, … < step
        if not (math.isfinite(C_bar) and C_bar > 0 and math.isfinite(total) and total >= 0 and count > 0):
            return None
        return FisherPoint(C_bar, total, count)

    def state_dict(self) -> dict[str, Any]:
        return {"beacons": list(self.beacons), "decisions": [dict(d) for d in self.decisions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the decisions; refuse those of another landscape (by beacon names)."""
        if list(state["beacons"]) != list(self.beacons):
            raise ValueError(
                f"BeaconGuidedPolicy: the checkpoint was steered by beacons {state['beacons']} but this "
                f"policy has {list(self.beacons)}; resume with the same beacon runs."
            )
        self.decisions = [dict(d) for d in state["decisions"]]
        self._resumed = True


def landscape_from_runs(
    runs: PathLike | Sequence[PathLike],
    *,
    metric: str = "test/acc",
    higher_is_better: bool = True,
    max_epochs: int | None = None,
) -> Landscape:
    """The landscape of beacon run folders, or of every run in sweep output folders.

    A folder holding ``lightning_tricks.json`` or ``fisher_spectrum.csv`` is one run (its beacon is
    named by its path); any other folder is a sweep's output (``lightning-tricks sweep --out``):
    each sub-folder is a run named by it, read from its latest folder holding
    ``fisher_spectrum.csv`` (resumes followed). Each run gives
    :func:`~lightning_tricks.beacons.beacon_from_records` of its FisherSpectrum table with
    ``every_n_steps`` from its ``lightning_tricks.json``, ``max_epochs`` (else its ``config.yaml``'s
    ``trainer.max_epochs``) and the error 1 − the last value of ``metric`` (the value itself when
    ``higher_is_better=False``; only the ranking matters).

    Raises:
        FileNotFoundError: a folder that does not exist.
        ValueError: no runs, a run without FisherSpectrum records, without ``metric``, without a known
            ``max_epochs``, not trained to its end, or runs that disagree on ``max_epochs`` or
            ``every_n_steps``.
    """
    paths = (
        [runs]
        if isinstance(runs, (str, os.PathLike))
        else list(checks.sequence("runs", runs, what="folders"))
    )
    if not paths:
        raise ValueError("`beacons` must name at least one beacon run or sweep folder.")
    found = [run for path in paths for run in _runs_in(Path(path))]
    beacons, layouts = [], {}
    for name, folder in found:
        records = load_fisher_spectrum(folder)
        if not records:
            raise ValueError(
                f"beacon run {str(folder)!r} has no FisherSpectrum records ({FISHER_SPECTRUM.files['epochs']}); "
                "attach FisherSpectrum to the beacon runs."
            )
        epochs = max_epochs or _configured_max_epochs(folder)
        every = _every_n_steps(folder)
        last = max(int(row["epoch"]) for row in records)
        if last != epochs - 1:
            raise ValueError(
                f"beacon run {str(folder)!r} recorded epochs up to {last} of max_epochs={epochs}; a beacon "
                "must have finished (or pass the right `max_epochs`)."
            )
        error = _final_error(folder, metric, higher_is_better)
        beacons.append(
            beacon_from_records(name, records, error=error, max_epochs=epochs, every_n_steps=every)
        )
        layouts[name] = (epochs, every)
    if len(set(layouts.values())) > 1:
        listed = ", ".join(f"{n}: max_epochs={e}, every_n_steps={k}" for n, (e, k) in sorted(layouts.items()))
        raise ValueError(
            f"the beacon runs disagree on max_epochs or FisherSpectrum's every_n_steps ({listed})."
        )
    epochs, every = next(iter(layouts.values()))
    return Landscape(tuple(beacons), max_epochs=epochs, every_n_steps=every)


def _is_run(folder: Path) -> bool:
    return (folder / RUN_FILE).is_file() or (folder / FISHER_SPECTRUM.files["epochs"]).is_file()


def _runs_in(path: Path) -> list[tuple[str, Path]]:
    """``(beacon name, run folder)`` of a run folder, or of each run of a sweep output folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"beacon folder {str(path)!r} does not exist.")
    if _is_run(path):
        return [(str(path), path)]
    runs = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        tables = [t.parent for t in child.rglob(FISHER_SPECTRUM.files["epochs"])]
        if not tables:
            raise ValueError(
                f"beacon run {str(child)!r} has no FisherSpectrum records ({FISHER_SPECTRUM.files['epochs']}); "
                "attach FisherSpectrum to the beacon runs."
            )
        runs.append((child.name, max(tables, key=_natural_key)))
    if not runs:
        raise ValueError(f"{str(path)!r} is neither a beacon run folder nor a sweep folder of runs.")
    return runs


def _natural_key(path: Path) -> list[Any]:
    """``version_10`` after ``version_9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _configured_max_epochs(folder: Path) -> int:
    config = folder / CONFIG_FILE
    trainer = yaml.safe_load(config.read_text()).get("trainer", {}) if config.is_file() else {}
    epochs = trainer.get("max_epochs") if isinstance(trainer, dict) else None
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(
            f"beacon run {str(folder)!r}: no trainer.max_epochs in its {CONFIG_FILE}; pass `max_epochs`."
        )
    return epochs


def _every_n_steps(folder: Path) -> int:
    entry = run_info(folder)["callbacks"].get(FISHER_SPECTRUM.namespace, {})
    every = entry.get("hyperparameters", {}).get("every_n_steps")
    if not isinstance(every, int):
        raise ValueError(
            f"beacon run {str(folder)!r}: its {RUN_FILE} records no FisherSpectrum every_n_steps; "
            "pass a folder FisherSpectrum wrote."
        )
    return every


def _final_error(folder: Path, metric: str, higher_is_better: bool) -> float:
    try:
        _, values = scalar_series(load_scalars(folder), metric)
    except KeyError as missing:
        raise ValueError(
            f"beacon run {str(folder)!r}: {missing.args[0]} `metric` names the run's final score."
        ) from None
    return 1.0 - float(values[-1]) if higher_is_better else float(values[-1])
