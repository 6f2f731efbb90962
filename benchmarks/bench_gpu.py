"""Overhead of the callbacks on one CUDA GPU, at each precision.

The CPU benchmarks' workload (CIFAR ResNet-20, batches of random 3x32x32 images, SGD) on the GPU,
through Lightning's loop. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``
with ``torch.cuda.synchronize()`` at both ends; a run's cost is its mean step time after
``--warmup`` steps. Each round runs every configuration once, in an order that rotates between
rounds; a ratio is the median over rounds of (run with the callback) / (plain run of the same
round and precision), its range over the rounds printed beside it.

At the first batch size, each precision also gets the exact per-step counts of
``bench_host_overhead.py`` (medians over steps 10 to 29; totals for the plain step, what each
callback adds for the others): top-level and kernel-like aten ops, Python calls, hook calls, host
syncs asked for from Python, and the synchronisations CUDA itself reports
(``torch.cuda.set_sync_debug_mode``).

    python benchmarks/bench_gpu.py [--rounds 5] [--steps 60] [--warmup 10] [--batch-sizes 128 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from functools import partial

import torch
from common import (
    ResNet20Classifier,
    StepTimer,
    count_table,
    format_count_table,
    quiet_trainer,
    random_image_loader,
    silence_lightning,
)
from lightning.pytorch.callbacks import Callback

from lightning_tricks import FisherSpectrum, GradientFlow, RandomGradient

CONFIGS: dict[str, Callable[[], Callback] | None] = {
    "plain step": None,
    "FisherSpectrum(every_n_steps=1)": lambda: FisherSpectrum(every_n_steps=1),
    "FisherSpectrum(every_n_steps=20)": lambda: FisherSpectrum(every_n_steps=20),
    "GradientFlow()": lambda: GradientFlow(),
    "RandomGradient()": lambda: RandomGradient(),
}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
SPARSE_PERIODS = {"FisherSpectrum(every_n_steps=20)": 20}
COUNT_STEPS = range(10, 30)
COUNT_KINDS = ("ops", "python", "syncs", "cuda_syncs")


class CudaStepTimer(StepTimer):
    """:class:`StepTimer` with the GPU's queue drained at both ends of a step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def mean_step_time(config: str, precision: str, loader, steps: int, warmup: int, root: str) -> float:
    """Mean wall time of the steps after ``warmup`` of a fresh run."""
    timer = CudaStepTimer()
    make = CONFIGS[config]
    callbacks = [timer] if make is None else [timer, make()]
    torch.manual_seed(0)
    quiet_trainer(steps, callbacks, root, accelerator="gpu", precision=precision).fit(
        ResNet20Classifier(), loader
    )
    return statistics.fmean(timer.times[warmup:])


def counted_fit(precision: str, loader, root: str, config: str, first: Callback) -> None:
    """A fit of ``config`` long enough for :data:`COUNT_STEPS`, with the counter ``first``."""
    make = CONFIGS[config]
    callbacks = [first] if make is None else [first, make()]
    torch.manual_seed(0)
    trainer = quiet_trainer(COUNT_STEPS.stop + 1, callbacks, root, accelerator="gpu", precision=precision)
    trainer.fit(ResNet20Classifier(), loader)


def print_counts(batch_size: int, precision: str, loader, root: str) -> None:
    configs = {name: SPARSE_PERIODS.get(name) for name in CONFIGS}
    table = count_table(partial(counted_fit, precision, loader, root), configs, COUNT_STEPS, COUNT_KINDS)
    steps = f"steps {COUNT_STEPS.start}-{COUNT_STEPS.stop - 1}"
    print(f"\nResNet-20, B={batch_size}, {precision}: counts per step (medians over {steps})")
    print("\n".join(format_count_table(table)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU")
    silence_lightning()
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    names = list(CONFIGS)
    with tempfile.TemporaryDirectory() as root:
        for batch_size in args.batch_sizes:
            loader = random_image_loader(max(args.steps, COUNT_STEPS.stop + 1), batch_size)
            for precision in args.precisions:
                times: dict[str, list[float]] = {name: [] for name in names}
                for round_index in range(args.rounds):
                    shift = round_index % len(names)
                    for name in names[shift:] + names[:shift]:
                        times[name].append(
                            mean_step_time(name, precision, loader, args.steps, args.warmup, root)
                        )
                print_table(batch_size, precision, times, args)
                if batch_size == args.batch_sizes[0]:
                    print_counts(batch_size, precision, loader, root)


def print_table(batch_size: int, precision: str, times: dict[str, list[float]], args) -> None:
    print(
        f"\nResNet-20, B={batch_size}, {precision}, {args.rounds} rounds x "
        f"{args.steps - args.warmup} timed steps"
    )
    print(f"{'configuration':<36}{'mean step [ms]':>16}{'ratio':>9}{'range':>14}")
    plain = times["plain step"]
    for name, values in times.items():
        ratios = [t / p for t, p in zip(values, plain)]
        spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
        print(
            f"{name:<36}{statistics.median(values) * 1e3:>16.2f}{statistics.median(ratios):>9.3f}{spread:>14}"
        )


if __name__ == "__main__":
    main()
