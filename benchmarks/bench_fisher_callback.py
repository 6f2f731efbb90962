"""Overhead of the FisherSpectrum callback over a plain Lightning training step.

The whole step as a user runs it: Lightning's loop, the exact Gram matrix from the step's own
backward, float64 eigenvalues and the logged statistics. CIFAR ResNet-20,
batch 128 of 3x32x32 random images, SGD, CPU, one process. Each round runs every configuration
once, in an order that rotates between rounds, for ``--steps`` steps; a run's cost is its mean step
time after the first step, so with ``every_n_steps=20`` and 21 steps exactly one measured step
falls in the 20 timed ones (seed 004 measured every 50 mini-batches, ≈ 2 % of the data). Each
configuration runs in lockstep beside a plain fit (``common.fit_in_lockstep``: two threads taking
turns, one step each, so both meet the same machine), which of the two first alternating between
rounds; a step is the wall time from one ``on_train_batch_start`` to the next. The ratio is the
median over rounds of (run with the callback) / (its plain run); its range over the rounds is
printed beside it (the plain row's: plain against plain, the control), and the header names the
CPU and thread count.

    python benchmarks/bench_fisher_callback.py [--rounds 3] [--steps 21] [--batch-size 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from functools import partial

import torch
from common import (
    ResNet20Classifier,
    fit_in_lockstep,
    machine_description,
    quiet_trainer,
    random_image_loader,
    silence_lightning,
)
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_tricks.callbacks.fisher_spectrum import FisherSpectrum

CONFIGS: dict[str, int | None] = {
    "plain step": None,
    "FisherSpectrum(every_n_steps=1)": 1,
    "FisherSpectrum(every_n_steps=20)": 20,
}


def fit(every_n_steps: int | None, steps: int, loader: DataLoader, root: str, timer: Callback) -> None:
    """A fresh run of ``steps`` steps with ``timer`` first among its callbacks."""
    callbacks = [timer] if every_n_steps is None else [timer, FisherSpectrum(every_n_steps=every_n_steps)]
    torch.manual_seed(0)
    quiet_trainer(steps, callbacks, root).fit(ResNet20Classifier(), loader)


def paired_step_times(
    name: str, first: bool, steps: int, loader: DataLoader, root: str
) -> tuple[float, float]:
    """Mean step time over steps 2..``steps`` of ``name``'s run and of the plain run beside it in
    lockstep (``first``: ``name``'s run goes first)."""
    runs = [
        partial(fit, CONFIGS[name], steps, loader, f"{root}/0"),
        partial(fit, None, steps, loader, f"{root}/1"),
    ]
    times = fit_in_lockstep(tuple(runs if first else runs[::-1]))
    measured, plain = times if first else times[::-1]
    timed = range(1, steps)
    return statistics.fmean(measured[s] for s in timed), statistics.fmean(plain[s] for s in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=21, help="steps per run; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    silence_lightning()
    loader = random_image_loader(args.steps, args.batch_size)

    names = list(CONFIGS)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds):
            for name in names:
                times[name].append(paired_step_times(name, round_index % 2 == 0, args.steps, loader, root))

    print(
        f"FisherSpectrum overhead: CIFAR ResNet-20, B={args.batch_size}, 3x32x32, "
        f"{args.rounds} rounds x {args.steps - 1} timed steps; {machine_description()}"
    )
    print(f"{'configuration':<36}{'mean step [ms]':>16}{'ratio':>9}{'range':>14}")
    for name in names:
        ratios = [measured / plain for measured, plain in times[name]]
        step = statistics.median(measured for measured, _ in times[name])
        spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
        print(f"{name:<36}{step * 1e3:>16.1f}{statistics.median(ratios):>9.3f}{spread:>14}")


if __name__ == "__main__":
    main()
