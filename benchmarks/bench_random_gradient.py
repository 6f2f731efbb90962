"""Overhead of RandomGradient over a plain Lightning training step.

CIFAR ResNet-20, batch 128 of 3x32x32 random images, SGD with momentum 0.5 (seed
000_e58e526c3e6fcb5b.txt §5.1), on CPU. Runs with and without the callback alternate (the order
flips every round) inside one process; the table reports the median step time of each and their
ratio, plus the callback's own time per step (its hooks, timed directly), which is immune to
machine noise.

    python benchmarks/bench_random_gradient.py [--rounds 5] [--steps 6] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ResNet20Classifier, StepTimer, quiet_trainer, random_image_loader, silence_lightning
from torch.utils.data import DataLoader

from lightning_tricks.callbacks.random_gradient import RandomGradient


class TimedRandomGradient(RandomGradient):
    """RandomGradient whose per-backward hooks add their own wall time to ``self.hook_time``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_time = 0.0

    def on_before_backward(self, trainer, pl_module, loss):
        start = time.perf_counter()
        super().on_before_backward(trainer, pl_module, loss)
        self.hook_time += time.perf_counter() - start

    def on_after_backward(self, trainer, pl_module):
        start = time.perf_counter()
        super().on_after_backward(trainer, pl_module)
        self.hook_time += time.perf_counter() - start


def run(with_callback: bool, steps: int, loader: DataLoader) -> tuple[list[float], float]:
    """Train ``steps`` steps; return the step times after the first and the callback's hook time per step."""
    timer = StepTimer()
    random_gradient = TimedRandomGradient(seed=0) if with_callback else None
    trainer = quiet_trainer(steps, [timer] + ([random_gradient] if random_gradient else []))
    torch.manual_seed(0)
    trainer.fit(ResNet20Classifier(lr=0.1, momentum=0.5), loader)
    hook_time = random_gradient.hook_time / steps if random_gradient else 0.0
    return timer.times[1:], hook_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    silence_lightning()
    loader = random_image_loader(args.steps, args.batch_size)

    times: dict[bool, list[float]] = {False: [], True: []}
    hook_times: list[float] = []
    for round_index in range(args.rounds):
        order = (False, True) if round_index % 2 == 0 else (True, False)
        for with_callback in order:
            step_times, hook_time = run(with_callback, args.steps, loader)
            times[with_callback].extend(step_times)
            if with_callback:
                hook_times.append(hook_time)

    plain, randomised = statistics.median(times[False]), statistics.median(times[True])
    hooks = statistics.median(hook_times)
    print(
        f"RandomGradient overhead: CIFAR ResNet-20, B={args.batch_size}, 3x32x32, CPU "
        f"({torch.get_num_threads()} threads), {args.rounds} alternating rounds x {args.steps - 1} timed steps"
    )
    print(f"{'configuration':<28}{'median step [ms]':>18}{'ratio':>9}")
    print(f"{'plain step':<28}{plain * 1e3:>18.1f}{1.0:>9.3f}")
    print(f"{'RandomGradient()':<28}{randomised * 1e3:>18.1f}{randomised / plain:>9.3f}")
    share = 100 * hooks / plain
    print(f"callback hooks, timed directly: {hooks * 1e6:.0f} us per step = {share:.4f} % of a plain step")


if __name__ == "__main__":
    main()
