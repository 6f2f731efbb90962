"""Size of every callback's checkpoint state as training grows: it must not grow with the steps.

A tiny regression module trains for each of ``--steps`` (default 1,000, 10,000 and 100,000 steps)
with RandomGradient, GradientFlow, FisherSpectrum(every_n_steps=100) and BatchSizeScheduler
attached; after the fit, each callback's ``state_dict()`` is pickled as Lightning's checkpoint
would store it and its size printed. Histories live in the run folder, not in the checkpoint.

    python benchmarks/bench_checkpoint_size.py [--steps 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import io
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import quiet_trainer, silence_lightning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import BatchSizeScheduler, FisherSpectrum, GradientFlow, RandomGradient


class TinyRegression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 4
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(400, 4, generator=generator), torch.randn(400, 1, generator=generator)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def state_sizes(steps: int, root: str) -> dict[str, int]:
    """Pickled bytes of each callback's ``state_dict()`` after ``steps`` training steps."""
    callbacks = [
        RandomGradient(seed=0),
        GradientFlow(),
        FisherSpectrum(every_n_steps=100),
        BatchSizeScheduler(schedule={0: 4, 1: 8}),
    ]
    quiet_trainer(steps, callbacks, root).fit(TinyRegression())
    sizes = {}
    for callback in callbacks:
        buffer = io.BytesIO()
        torch.save(callback.state_dict(), buffer)
        sizes[type(callback).__name__] = buffer.tell()
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    silence_lightning()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for steps in args.steps:
            results[steps] = state_sizes(steps, root)
    names = list(results[args.steps[0]])
    print("| steps | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for steps, sizes in results.items():
        print(f"| {steps:,} | " + " | ".join(f"{sizes[name]:,} B" for name in names) + " |")


if __name__ == "__main__":
    main()
