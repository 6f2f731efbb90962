"""Overhead of GradientFlow over a plain Lightning training step.

CIFAR ResNet-20 (``lightning_tricks.models.build_net("resnet20", 10)``), batch 128 of 3x32x32
random images, SGD with momentum, on CPU, one process. Each round runs every configuration once,
in an order that rotates between rounds; the table gives the median step time of each, its ratio
to the plain step, and the callback's own time per step (its hooks timed directly, which machine
noise hardly touches) as a fraction of the plain step.

    python benchmarks/bench_gradient_flow.py [--rounds 5] [--steps 8] [--batch-size 128] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks.gradient_flow import GradientFlow
from lightning_tricks.models import build_net

CONFIGS: dict[str, dict | None] = {
    "plain step": None,
    "GradientFlow() (logs every 50 steps)": {},
    "GradientFlow(every_n_steps=1)": {"every_n_steps": 1},
    "GradientFlow(every_n_steps=1, log_per_layer=True)": {"every_n_steps": 1, "log_per_layer": True},
}


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_net("resnet20", 10)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepTimer(Callback):
    """Wall time from ``on_train_batch_start`` to ``on_train_batch_end``, per step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


class TimedGradientFlow(GradientFlow):
    """GradientFlow that adds the wall time of its per-step hook to ``self.hook_times``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_times: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_times.append(time.perf_counter() - start)


def run(config: dict | None, steps: int, loader: DataLoader) -> tuple[list[float], list[float]]:
    """Train ``steps`` steps; step times and hook times, both without the first step."""
    timer = StepTimer()
    flow = TimedGradientFlow(**config) if config is not None else None
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer] + ([flow] if flow is not None else []),
    )
    torch.manual_seed(0)
    trainer.fit(Classifier(), loader)
    return timer.times[1:], (flow.hook_times[1:] if flow is not None else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps per run; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    generator = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    images = torch.randn(n, 3, 32, 32, generator=generator)
    dataset = TensorDataset(images, torch.randint(0, 10, (n,), generator=generator))
    loader = DataLoader(dataset, batch_size=args.batch_size)

    names = list(CONFIGS)
    step_times: dict[str, list[float]] = {name: [] for name in names}
    hook_times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            steps, hooks = run(CONFIGS[name], args.steps, loader)
            step_times[name].extend(steps)
            hook_times[name].extend(hooks)

    plain = statistics.median(step_times["plain step"])
    print(
        f"ResNet-20, batch {args.batch_size}x3x32x32, CPU ({torch.get_num_threads()} threads), "
        f"{args.rounds} rounds x {args.steps - 1} timed steps"
    )
    print(f"{'configuration':<52} {'median step ms':>15} {'ratio':>7} {'hook ms':>8} {'hook/plain':>11}")
    for name in names:
        median = statistics.median(step_times[name])
        hook = statistics.median(hook_times[name]) if hook_times[name] else 0.0
        ratio, hook_share = median / plain, 100 * hook / plain
        print(f"{name:<52} {1e3 * median:>15.1f} {ratio:>7.3f} {1e3 * hook:>8.2f} {hook_share:>10.2f}%")


if __name__ == "__main__":
    main()
