"""BatchSizeScheduler on your own LightningModule: the batch size grows during training.

Seed 004's dynamic sampling trains in equal stages with their own batch sizes (s32-to-512: 32,
64, 128, 256, 512). The callback writes each stage's size into the attribute your
``train_dataloader`` reads (``self.batch_size``, as Lightning's BatchSizeFinder does) and makes
the Trainer rebuild the loader; ``lr_scaling="linear"`` scales the learning rate with it. A small
MLP trains for four epochs on scikit-learn's 8x8 digits, 16 -> 32 -> 64 -> 128. Run it from any
folder::

    python examples/batch_size_scheduler.py

It writes ``runs/batch_size_scheduler/version_N`` and prints what to look at there.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import BatchSizeScheduler
from lightning_tricks.results import load_batch_size


class DigitsMLP(L.LightningModule):
    """Your model; the one thing the scheduler needs is the attribute ``batch_size`` the loader reads."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        """scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package), scaled to [0, 1]."""
        images, labels = load_digits(return_X_y=True)
        data = TensorDataset(torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels))
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=4,  # a multiple of the number of stages: each stage lasts one epoch here
        logger=TensorBoardLogger("runs", name="batch_size_scheduler"),
        callbacks=[BatchSizeScheduler.staged([16, 32, 64, 128], lr_scaling="linear")],  # the one line
        accelerator="cpu",
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(DigitsMLP())

    run = trainer.logger.log_dir
    changes = load_batch_size(run)  # one record per change of the batch size
    print(f"run folder: {run}")
    print("  batch_size.schedule.png  the batch size of every epoch, and the learning rate on a log axis")
    print("  batch_size.csv           one row per change: epoch, step, size, physical, accumulation, lr")
    print("read it back in Python:")
    print(f"    from lightning_tricks.results import load_batch_size; load_batch_size({run!r})")
    for row in changes:
        print(f"  epoch {row['epoch']} (step {row['step']}): batch {row['size']}, lr {row['lr']:g}")
    print("the batch_size/* scalars in TensorBoard: lightning-tricks dashboard runs")
