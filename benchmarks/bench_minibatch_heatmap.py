"""Overhead of the MinibatchHeatmap callback over a plain Lightning training epoch, and its memory.

The callback adds one forward/backward per batch at the epoch-start weights (seed 002 Algorithm 1's
``net_compare``), so twice the plain epoch is the floor; the goal is <= 2.1x. Workload: CIFAR
ResNet-20, batches of 128 random 3x32x32 images already sorted by intensity (the same fixed batches
for every configuration, so the one-off scoring is not timed), SGD, CPU, one process. Each run
trains ``--epochs`` epochs of ``--steps`` batches; its cost is the mean wall time of the epochs after
the first (from the first callback's epoch start to the last callback's epoch end, so the heatmap's
epoch-end work — distances, files, figure — is included). Each round runs every configuration once
in a rotating order; the ratio is the median over rounds of (with callback) / (plain, same round).
Memory is what the callback holds during an epoch: the stored gradients (exact: K×P float32;
sketch: K×d), the running sum and the sketch's hash tables, plus the frozen copy of the weights.

    python benchmarks/bench_minibatch_heatmap.py [--rounds 3] [--steps 10] [--epochs 3] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from common import (
    ResNet20Classifier,
    machine_description,
    quiet_trainer,
    random_image_loader,
    silence_lightning,
)
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_tricks import MinibatchHeatmap
from lightning_tricks.image_metrics import intensity
from lightning_tricks.samplers import MetricSortedBatchSampler

CONFIGS: dict[str, dict | None] = {
    "plain epoch": None,
    "MinibatchHeatmap(mode='exact')": {"mode": "exact"},
    "MinibatchHeatmap(mode='sketch', d=4096)": {"mode": "sketch", "sketch_dim": 4096},
}


class ResNet20WithLoss(ResNet20Classifier):
    """The benchmark's ResNet-20 with the ``compute_loss`` protocol."""

    def compute_loss(self, batch):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.net(images), labels)


class EpochClock:
    """Two callbacks sharing a clock: ``start`` goes first in the list, ``stop`` last."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.held_bytes = 0
        clock = self

        class Start(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                clock._t0 = time.perf_counter()

        class Stop(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock.held_bytes = max(clock.held_bytes, _held_bytes(trainer))

            def on_train_epoch_end(self, trainer, pl_module):
                clock.times.append(time.perf_counter() - clock._t0)

        self.start, self.stop = Start(), Stop()


def _held_bytes(trainer: pl.Trainer) -> int:
    """Bytes of the tensors the heatmap holds during the epoch (store, sums, sketch, frozen copy)."""
    for callback in trainer.callbacks:
        if isinstance(callback, MinibatchHeatmap) and callback._epoch is not None:
            engine = callback._epoch.engine
            tensors = [engine._store._memory, engine._sum, engine._weights]
            if engine.sketch is not None:
                tensors += [engine.sketch.buckets, engine.sketch.signs]
            params, buffers = callback._epoch.frozen
            tensors += list(params.values()) + list(buffers.values())
            return sum(t.numel() * t.element_size() for t in tensors)
    return 0


def sorted_loader(steps: int, batch_size: int) -> DataLoader:
    """The benchmarks' random images (:func:`common.random_image_loader`), in fixed batches sorted by intensity."""
    data = random_image_loader(steps, batch_size).dataset
    return DataLoader(data, batch_sampler=MetricSortedBatchSampler(intensity(data.tensors[0]), batch_size))


def run(config: dict | None, epochs: int, loader: DataLoader, root: str) -> tuple[float, int]:
    """Mean epoch time after the first epoch, and the bytes the callback held."""
    clock = EpochClock()
    middle = [] if config is None else [MinibatchHeatmap(**config)]
    torch.manual_seed(0)
    trainer = quiet_trainer(epochs * len(loader), [clock.start, *middle, clock.stop], root, max_epochs=epochs)
    trainer.fit(ResNet20WithLoss(), loader)
    return statistics.fmean(clock.times[1:]), clock.held_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    silence_lightning()
    loader = sorted_loader(args.steps, args.batch_size)

    names = list(CONFIGS)
    times: dict[str, list[float]] = {name: [] for name in names}
    held: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, held[name] = run(CONFIGS[name], args.epochs, loader, root)
                times[name].append(seconds)

    plain = times["plain epoch"]
    print(
        f"MinibatchHeatmap overhead: CIFAR ResNet-20, B={args.batch_size}, K={args.steps} batches/epoch, "
        f"3x32x32, {args.rounds} rounds x {args.epochs - 1} timed epochs; {machine_description()}"
    )
    print(f"{'configuration':<42}{'epoch [s]':>11}{'ratio':>8}{'held [MiB]':>12}")
    for name in names:
        ratio = statistics.median(t / p for t, p in zip(times[name], plain))
        print(
            f"{name:<42}{statistics.median(times[name]):>11.2f}{ratio:>8.3f}{held.get(name, 0) / 2**20:>12.2f}"
        )


if __name__ == "__main__":
    main()
