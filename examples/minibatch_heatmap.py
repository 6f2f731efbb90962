"""MinibatchHeatmap on your own LightningModule: which fixed mini-batch's gradient is closest to
the full-batch gradient, epoch by epoch.

Seed 002 sorts the training set by an image metric (here the mean intensity), cuts it into the
same mini-batches every epoch, and measures D_{e,k} = ||grad_k - grad_e|| between each batch's
gradient and the full-batch gradient at the epoch's starting parameters. The callback needs the
loss of a batch by itself: your module's ``compute_loss(batch)`` (or pass ``loss_fn=``). A small
CNN trains for three epochs on scikit-learn's 8x8 digits. Run it from any folder::

    python examples/minibatch_heatmap.py

It writes ``runs/minibatch_heatmap/version_N`` and prints what to look at there.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import MinibatchHeatmap
from lightning_tricks.results import load_minibatch_heatmap


class SmallCNN(L.LightningModule):
    """Your model, with its loss in ``compute_loss`` so that the callback can evaluate a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
        )

    def compute_loss(self, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)  # a scalar, the mean over the batch

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


def digits_loader(batch_size: int = 128) -> DataLoader:
    """scikit-learn's 1,797 handwritten digits (8x8 images, shipped inside the package) in [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return DataLoader(TensorDataset(images, torch.tensor(labels)), batch_size=batch_size, shuffle=True)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=3,
        logger=TensorBoardLogger("runs", name="minibatch_heatmap"),
        callbacks=[MinibatchHeatmap(metric="intensity", progress=False)],  # the one line
        accelerator="cpu",
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(SmallCNN(), digits_loader())

    run = trainer.logger.log_dir
    records = load_minibatch_heatmap(run)  # one record per epoch and batch rank
    print(f"run folder: {run}")
    print("  heatmap.phase_0.png    x: the batches sorted by mean intensity (top axis), y: the epoch;")
    print(
        "                         the hatched last column is the short remainder batch (1,797 = 14 x 128 + 5)"
    )
    print("  heatmap.csv            one row per epoch and batch: epoch, lr, phase, batch, metric, distance")
    print("  heatmap_matrix.npy     epochs x batches of distances (heatmap_matrix.csv with the epochs)")
    print("read it back in Python:")
    print(f"    from lightning_tricks.results import load_minibatch_heatmap; load_minibatch_heatmap({run!r})")
    for epoch in sorted({row["epoch"] for row in records}):
        rows = [row for row in records if row["epoch"] == epoch]
        best = min(rows, key=lambda row: row["distance"])
        print(
            f"  epoch {epoch}: batch {best['batch']} (mean intensity {best['metric']:.3f}) is closest "
            f"to the full gradient, distance {best['distance']:.4f}"
        )
    print("the heatmap and the heatmap/* scalars in TensorBoard: lightning-tricks dashboard runs")
