"""Overhead of GradientFlow: per training step, and over 1,000 short epochs (figures, files).

**Steps** (default): CIFAR ResNet-20 (``lightning_tricks.models.build_net("resnet20", 10)``), batch
128 of 3x32x32 random images, SGD with momentum, on CPU, one process.

Runs with and without the callback alternate at the finest grain: inside every run the callback's
per-step hook is on for every other optimiser step (odd steps in one round, even steps in the
next), so each step with the callback has a plain neighbour that ran under the same machine load.
The table gives, per configuration, the median step time with and without the hook, the median
over neighbouring pairs of the overhead ``t_on / t_off - 1``, and the hook's own median wall time
(timed directly) as a fraction of the plain step.

**Epochs** (``--epochs 1000``): a small CNN (3 convolutions and a linear head) on 4 batches of 16
random 3x16x16 images an epoch, with a TensorBoardLogger, ``--epochs`` epochs with and without
``GradientFlow()`` (its defaults: scalars every 50 steps, the epoch figure on its logarithmic
schedule), runs alternating. It reports the fit's wall time both ways, the time spent drawing and
saving figures (with ``grad_flow.npy``) and appending ``grad_flow.csv`` (timed inside the callback), the number of
figures and the size of the TensorBoard event file and the run folder.

    python benchmarks/bench_gradient_flow.py [--rounds 3] [--steps 12] [--batch-size 128] [--threads N]
    python benchmarks/bench_gradient_flow.py --epochs 1000 [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import (
    ResNet20Classifier,
    StepTimer,
    machine_description,
    quiet_fit_trainer,
    quiet_trainer,
    random_image_loader,
    silence_lightning,
)
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks.gradient_flow import GradientFlow

CONFIGS: dict[str, dict] = {
    "GradientFlow() (logs every 50 steps)": {},
    "GradientFlow(log_every_n_steps=1)": {"log_every_n_steps": 1},
    "GradientFlow(log_every_n_steps=1, log_per_layer=True)": {"log_every_n_steps": 1, "log_per_layer": True},
}
WARMUP_STEPS = 2


class AlternatingGradientFlow(GradientFlow):
    """GradientFlow whose per-step hook runs only on steps of parity ``active_parity`` and records
    its own wall time there."""

    def __init__(self, active_parity: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.active_parity = active_parity
        self.hook_times: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % 2 != self.active_parity:
            return
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_times[trainer.global_step] = time.perf_counter() - start


def run(
    config: dict, active_parity: int, steps: int, loader: DataLoader, root: str
) -> list[tuple[float, float, float]]:
    """Train ``steps`` steps; per neighbouring pair after warm-up: (time on, time off, hook time)."""
    timer = StepTimer()
    flow = AlternatingGradientFlow(active_parity, **config)
    trainer = quiet_trainer(steps, [timer, flow], root)
    torch.manual_seed(0)
    trainer.fit(ResNet20Classifier(), loader)
    pairs = []
    for first in range(WARMUP_STEPS, steps - 1, 2):
        on = first if first % 2 == active_parity else first + 1
        off = first + 1 if on == first else first
        pairs.append((timer.times[on], timer.times[off], flow.hook_times[on]))
    return pairs


class SmallCNN(pl.LightningModule):
    """3 convolutions and a linear head on 3x16x16 images, cross-entropy, SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TimedGradientFlow(GradientFlow):
    """GradientFlow that times its figures (drawing, logging, PNG, ``grad_flow.npy``) and the
    writing of its per-epoch ``grad_flow.csv`` rows."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.figure_seconds = 0.0
        self.file_seconds = 0.0
        self.figures = 0

    def _draw(self, *args, **kwargs):
        start = time.perf_counter()
        super()._draw(*args, **kwargs)
        self.figure_seconds += time.perf_counter() - start
        self.figures += 1

    def _write_rows(self, *args, **kwargs):
        start = time.perf_counter()
        super()._write_rows(*args, **kwargs)
        self.file_seconds += time.perf_counter() - start


def fit_epochs(epochs: int, with_flow: bool, root: str) -> dict[str, float]:
    """One fit of ``epochs`` short epochs; wall time, figure/file time, sizes."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(64, 3, 16, 16, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    )
    logger = TensorBoardLogger(root, name="with" if with_flow else "without")
    flow = TimedGradientFlow() if with_flow else None
    trainer = quiet_fit_trainer([flow] if flow else [], max_epochs=epochs, logger=logger)
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer.fit(SmallCNN(), DataLoader(data, batch_size=16))
    seconds = time.perf_counter() - start
    files = [os.path.join(logger.log_dir, name) for name in os.listdir(logger.log_dir)]
    events = sum(os.path.getsize(f) for f in files if os.path.basename(f).startswith("events."))
    return {
        "seconds": seconds,
        "figure_seconds": flow.figure_seconds if flow else 0.0,
        "file_seconds": flow.file_seconds if flow else 0.0,
        "figures": flow.figures if flow else 0,
        "events_mb": events / 2**20,
        "folder_mb": sum(os.path.getsize(f) for f in files) / 2**20,
    }


def epochs_benchmark(epochs: int, rounds: int) -> None:
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(rounds):
            for with_flow in (round_index % 2 == 0, round_index % 2 == 1):
                runs[with_flow].append(fit_epochs(epochs, with_flow, root))
    print(
        f"{machine_description()}; {epochs} epochs x 4 steps of a small CNN"
        f" (batch 16x3x16x16), TensorBoardLogger; {rounds} runs each way, alternating; medians"
    )
    without = statistics.median(r["seconds"] for r in runs[False])
    with_flow = statistics.median(r["seconds"] for r in runs[True])
    figure = statistics.median(r["figure_seconds"] for r in runs[True])
    files = statistics.median(r["file_seconds"] for r in runs[True])
    last = runs[True][-1]
    print(
        f"{'fit without GradientFlow':<44} {without:>8.2f} s   events {runs[False][-1]['events_mb']:.2f} MB"
    )
    print(
        f"{'fit with GradientFlow()':<44} {with_flow:>8.2f} s   overhead {100 * (with_flow / without - 1):+.1f} %"
    )
    print(
        f"{'  figures ({} drawn)'.format(int(last['figures'])):<44} {figure:>8.2f} s   = {100 * figure / without:.1f} % of the fit without"
    )
    print(
        f"{'  grad_flow.csv rows':<44} {files:>8.2f} s   = {100 * files / without:.1f} % of the fit without"
    )
    print(
        f"{'  TensorBoard events / run folder':<44} {last['events_mb']:>8.2f} MB / {last['folder_mb']:.2f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (steps), 2 (epochs)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run, the first two not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=None, help="run the short-epochs benchmark instead")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    silence_lightning()
    if args.epochs is not None:
        epochs_benchmark(args.epochs, args.rounds or 2)
        return
    args.rounds = args.rounds or 3
    loader = random_image_loader(args.steps, args.batch_size)

    pairs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds):
            for name, config in CONFIGS.items():
                pairs[name].extend(run(config, round_index % 2, args.steps, loader, root))

    print(
        f"ResNet-20, batch {args.batch_size}x3x32x32, {machine_description()}, "
        f"{args.rounds} rounds x {(args.steps - WARMUP_STEPS) // 2} step pairs per configuration"
    )
    header = (
        f"{'configuration':<52} {'on ms':>8} {'off ms':>8} {'overhead':>9} {'hook ms':>8} {'hook/off':>9}"
    )
    print(header)
    for name, measured in pairs.items():
        on, off, hook = (statistics.median(values) for values in zip(*measured, strict=True))
        overhead = statistics.median(t_on / t_off - 1.0 for t_on, t_off, _ in measured)
        print(
            f"{name:<52} {1e3 * on:>8.1f} {1e3 * off:>8.1f} {100 * overhead:>8.2f}% "
            f"{1e3 * hook:>8.2f} {100 * hook / off:>8.2f}%"
        )


if __name__ == "__main__":
    main()
