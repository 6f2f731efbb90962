"""Host overhead of the callbacks where a GPU's step is host-bound, reproduced on the CPU.

On a GPU, a small model's step costs what the host spends launching it: Python, Lightning's loop,
and one dispatch per aten op, not the arithmetic. Tiny tensors give the CPU the same profile: a
CIFAR ResNet-20 (``lightning_tricks.models.build_net("resnet20", 10)``) on batches of 8 random
3x8x8 images, SGD with momentum, one intra-op thread, through a quiet Lightning Trainer.

**Ratios.** Each configuration runs beside a plain fit in one process, the two in lockstep: two
threads that take turns, one training step each (:class:`Lockstep`), so both meet the same
machine within milliseconds and the drift between separate runs (±20 % on a shared VM) cancels.
A step is timed in thread CPU time from one ``on_train_batch_start`` to the next, so every
callback's hooks are inside; a run's cost over a set of steps is its median step there after
``--warmup`` steps (``--statistic min``: its fastest), against the plain run's over the same
steps. Which of the two goes first alternates between rounds; a ratio is the median over rounds,
its range beside it. The plain row's ratio is the control: plain against plain (A/A).
``FisherSpectrum(every_n_steps=20)`` is split into its measured steps (``step % 20 == 0``) and the
others, and its ``all steps`` row is what it costs over whole cycles of 20 steps: the run's total
time over them against the plain run's over the same steps (a mean; ``--steps`` sets the cycles).

**Counts** (exact, per step, medians over steps 10 to 29 of separate runs; see
``common.StepCounter``): top-level aten ops, kernel-like aten ops, Python function calls, hook
calls (Python that torch calls back), host syncs (device-to-host reads asked for from Python).
The plain row gives totals, the others what the callback adds.

    python benchmarks/bench_host_overhead.py [--rounds 7] [--steps 60] [--warmup 10] [--statistic min]
        [--quick] [--counts-only] [--only FisherSpectrum]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
from common import (
    Lockstep,
    ResNet20Classifier,
    count_table,
    fit_in_lockstep,
    format_count_table,
    machine_description,
    quiet_trainer,
    random_image_loader,
    silence_lightning,
    step_kinds,
)
from lightning.pytorch.callbacks import Callback

from lightning_tricks import FisherSpectrum, GradientFlow, RandomGradient

BATCH_SIZE, IMAGE_SIZE = 8, 8
SPARSE_EVERY = 20
CONFIGS: dict[str, Callable[[], Callback] | None] = {
    "plain": None,
    "Callback() (does nothing: what any callback costs)": Callback,
    "FisherSpectrum(every_n_steps=1)": lambda: FisherSpectrum(every_n_steps=1),
    f"FisherSpectrum(every_n_steps={SPARSE_EVERY})": lambda: FisherSpectrum(every_n_steps=SPARSE_EVERY),
    "GradientFlow()": GradientFlow,
    "RandomGradient()": lambda: RandomGradient(seed=0),
}
SPARSE_PERIODS = {f"FisherSpectrum(every_n_steps={SPARSE_EVERY})": SPARSE_EVERY}
COUNT_STEPS = range(10, 30)
STATISTICS: dict[str, Callable] = {"median": statistics.median, "min": min}


def fit(steps: int, root: str, config: str, first: Callback) -> None:
    """One fit of ``steps`` steps of ``config`` with ``first`` first among the callbacks."""
    make = CONFIGS[config]
    callbacks = [first] if make is None else [first, make()]
    loader = random_image_loader(steps, BATCH_SIZE, IMAGE_SIZE)
    torch.manual_seed(0)
    quiet_trainer(steps, callbacks, root).fit(ResNet20Classifier(), loader)


def fit_pair(
    configs: tuple[str, str], steps: int, root: str, lockstep: Lockstep | None = None
) -> tuple[dict[int, float], dict[int, float]]:
    """Per-step thread CPU times of the fits of two configurations run in lockstep, the first of
    ``configs`` first."""
    return fit_in_lockstep(
        tuple(partial(fit, steps, f"{root}/{player}", config) for player, config in enumerate(configs)),
        time.thread_time,
        lockstep,
        cpu=min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    )


def time_rounds(
    names: list[str], rounds: int, steps: int, warmup: int, root: str, statistic: str
) -> dict[str, list[float]]:
    """Per table row, its ratio in each round: every configuration of ``names`` (plain first, whose
    row is the A/A control: plain against plain) runs in lockstep beside a plain fit, which of
    the two goes first alternating between rounds; a run's step is the ``statistic`` (median or
    min) of its steps after ``warmup``, over the steps of the row's kind in both runs."""
    reduce = STATISTICS[statistic]
    ratios: dict[str, list[float]] = {}
    for round_index in range(rounds):
        for config in names:
            pair = ("plain", config) if round_index % 2 else (config, "plain")
            first, second = fit_pair(pair, steps, root)
            measured, plain = (second, first) if pair[0] == "plain" else (first, second)
            timed = sorted(s for s in measured if warmup <= s < steps - 1)
            for row, kind_steps in step_kinds(config, timed, SPARSE_PERIODS.get(config)).items():
                ratio = reduce(measured[s] for s in kind_steps) / reduce(plain[s] for s in kind_steps)
                ratios.setdefault(row, []).append(ratio)
            if config in SPARSE_PERIODS:
                ratio = cycle_ratio(measured, plain, SPARSE_PERIODS[config], warmup)
                ratios.setdefault(f"{config}, all steps", []).append(ratio)
    return ratios


def cycle_ratio(times: dict[int, float], plain: dict[int, float], every: int, warmup: int) -> float:
    """What a sparse callback costs over whole cycles of ``every`` steps (its measured step and the
    ``every - 1`` others after it): the run's total time over those steps against the plain run's
    over the same steps (a mean, not a median: the measured step counts as often as it occurs)."""
    first = min(s for s in times if s >= warmup and s % every == 0)
    cycles = (max(times) - first) // every  # the last step (train-end hooks in its window) left out
    steps = range(first, first + cycles * every)
    return sum(times[s] for s in steps) / sum(plain[s] for s in steps)


def print_table(ratios: dict[str, list[float]], table: dict[str, dict[str, float]], args) -> None:
    print(
        f"\nResNet-20, B={BATCH_SIZE}, 3x{IMAGE_SIZE}x{IMAGE_SIZE}, SGD, 1 thread; {args.rounds} rounds x "
        f"{args.steps - args.warmup} timed steps (thread CPU time, a run's {args.statistic} step)"
    )
    counts = format_count_table(table)
    print(f"{counts[0]}{'ratio':>8}{'range':>12}")
    for line, row in zip(counts[1:], table, strict=True):
        print(f"{line}{_ratio_cells(ratios[row])}")
    for row in ratios.keys() - table.keys():  # ratios without counts: whole cycles of a sparse callback
        print(f"{row:<{len(counts[0]) - 1}} {_ratio_cells(ratios[row])}")


def _ratio_cells(values: list[float]) -> str:
    return f"{statistics.median(values):>8.3f}{f'{min(values):.2f}-{max(values):.2f}':>12}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 42 steps: a smoke test")
    parser.add_argument("--counts-only", action="store_true", help="the exact count table, no timing")
    parser.add_argument(
        "--only", default="", help="count/time only configurations whose name contains this (and plain)"
    )
    parser.add_argument(
        "--statistic",
        choices=list(STATISTICS),
        default="median",
        help="a run's step time: the median of its steps, or the min (the least disturbed one)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 42, 10
    if args.steps <= max(args.warmup, SPARSE_EVERY):
        parser.error(f"--steps must exceed --warmup and {SPARSE_EVERY}")
    silence_lightning()
    torch.set_num_threads(1)
    print(machine_description())
    with tempfile.TemporaryDirectory() as root:
        names = [c for c in CONFIGS if c == "plain" or args.only in c]
        configs = {config: SPARSE_PERIODS.get(config) for config in names}
        table = count_table(partial(fit, COUNT_STEPS.stop + 1, root), configs, COUNT_STEPS)
        if args.counts_only:
            print("\n".join(format_count_table(table)))
            return
        ratios = time_rounds(names, args.rounds, args.steps, args.warmup, root, args.statistic)
    print_table(ratios, table, args)


if __name__ == "__main__":
    main()
