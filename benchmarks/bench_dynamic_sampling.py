"""Seed 004's Table 1 on digits: dynamic sampling against the best fixed batch size.

Seed ``004_e5d92837cb57ce8a.txt`` Table 1 (CIFAR-10, ResNet): s32-to-128 trains in 7.0 h against
7.7 h for s32 at a competitive test error. Here a ResNet-20 trains on scikit-learn's digits (16×16,
1,258 training images) for ``--epochs`` epochs with SGD (lr 0.1, momentum 0.9, weight decay 5e-4,
×0.1 at 50 % and 75 % of training, as in seed 004 §4) under each policy, for several seeds, in
alternating order; the table gives the wall time of ``fit`` and the test accuracy of the final
model (mean ± standard deviation over seeds) and the time relative to s32 of the same seed.

    python benchmarks/bench_dynamic_sampling.py [--seeds 3] [--epochs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from common import machine_description, quiet_fit_trainer, silence_lightning

from lightning_tricks import BatchSizeScheduler
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.models import ImageClassifier

POLICIES: dict[str, dict | None] = {
    "s32": None,
    "s32-to-512": {"sizes": [32, 64, 128, 256, 512]},
    "s512-to-32": {"sizes": [512, 256, 128, 64, 32]},
    "s32-to-128": {"sizes": [32, 32, 64, 64, 128]},
    "s32-to-512-MS": {"sizes": [32, 64, 128, 256, 512], "multistep": True, "lr_milestones": [0.5, 0.75]},
    "adaptive (norm test, θ=1)": {"max_size": 512, "adaptive": True},
}


def run(policy: dict | None, seed: int, epochs: int, root: str) -> tuple[float, float]:
    """(wall seconds of fit, test accuracy) of one run."""
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier("resnet20", 10, in_channels=1, lr=0.1, momentum=0.9, weight_decay=5e-4)
    data = DigitsDataModule(batch_size=32, image_size=16, channels=1, seed=0)
    callbacks = [] if policy is None else [BatchSizeScheduler(**policy)]
    trainer = quiet_fit_trainer(callbacks, root, max_epochs=epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    return seconds, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)  # -MS: LR stages of 10, 5, 5 epochs
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    silence_lightning()
    torch.set_num_threads(args.threads)

    names = list(POLICIES)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as root:
        for seed in range(args.seeds):
            shift = seed % len(names)
            for name in names[shift:] + names[:shift]:
                results[name].append(run(POLICIES[name], seed, args.epochs, root))

    print(f"# {machine_description()}; ResNet-20 on digits 16x16,")
    print(f"# {args.epochs} epochs, {args.seeds} seeds (mean ± std); time ratio = median over seeds vs s32\n")
    print("| policy | fit time (s) | vs s32 | test accuracy |")
    print("|---|---|---|---|")
    baseline = [seconds for seconds, _ in results["s32"]]
    for name in names:
        seconds = [s for s, _ in results[name]]
        accuracy = [100 * a for _, a in results[name]]
        ratio = statistics.median(s / b for s, b in zip(seconds, baseline))
        print(
            f"| {name} | {statistics.fmean(seconds):.1f} ± {_std(seconds):.1f} | {ratio:.2f}× "
            f"| {statistics.fmean(accuracy):.2f} ± {_std(accuracy):.2f} % |"
        )


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
