"""Overhead of GradientFlow over a plain Lightning training step.

CIFAR ResNet-20 (``lightning_tricks.models.build_net("resnet20", 10)``), batch 128 of 3x32x32
random images, SGD with momentum, on CPU, one process.

Runs with and without the callback alternate at the finest grain: inside every run the callback's
per-step hook is on for every other optimiser step (odd steps in one round, even steps in the
next), so each step with the callback has a plain neighbour that ran under the same machine load.
The table gives, per configuration, the median step time with and without the hook, the median
over neighbouring pairs of the overhead ``t_on / t_off - 1``, and the hook's own median wall time
(timed directly) as a fraction of the plain step.

    python benchmarks/bench_gradient_flow.py [--rounds 3] [--steps 12] [--batch-size 128] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import ResNet20Classifier, StepTimer, quiet_trainer, random_image_loader, silence_lightning
from torch.utils.data import DataLoader

from lightning_tricks.callbacks.gradient_flow import GradientFlow

CONFIGS: dict[str, dict] = {
    "GradientFlow() (logs every 50 steps)": {},
    "GradientFlow(every_n_steps=1)": {"every_n_steps": 1},
    "GradientFlow(every_n_steps=1, log_per_layer=True)": {"every_n_steps": 1, "log_per_layer": True},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per run, the first two not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    silence_lightning()
    loader = random_image_loader(args.steps, args.batch_size)

    pairs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds):
            for name, config in CONFIGS.items():
                pairs[name].extend(run(config, round_index % 2, args.steps, loader, root))

    print(
        f"ResNet-20, batch {args.batch_size}x3x32x32, CPU ({torch.get_num_threads()} threads), "
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
