"""FisherSpectrum on your own LightningModule: the spectrum of F = J^T J of each measured step.

Seed 004 characterises SGD training by the B x B matrix of per-sample gradient products of a
step: c_k = sqrt(lambda_max / lambda_min != 0) with its running mean C_bar, and
l_k = (lr / B) sqrt(Tr F) with its sum L. The callback computes F exactly from the training
step's own backward. A small CNN trains for two epochs on scikit-learn's 8x8 handwritten
digits, measured every 5th step. Run it from any folder::

    python examples/fisher_spectrum.py

It writes ``runs/fisher_spectrum/version_N`` and prints what to look at there.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import FisherSpectrum
from lightning_tricks.results import load_fisher_history, load_fisher_spectrum


class SmallCNN(L.LightningModule):
    """Your model: nothing in it knows about lightning-tricks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)  # mean over the batch: loss_reduction="mean"
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def digits_loader(batch_size: int = 32) -> DataLoader:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package), scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return DataLoader(TensorDataset(images, torch.tensor(labels)), batch_size=batch_size, shuffle=True)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=2,
        logger=TensorBoardLogger("runs", name="fisher_spectrum"),
        callbacks=[FisherSpectrum(every_n_steps=5)],  # the one line
        accelerator="cpu",
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(SmallCNN(), digits_loader())

    run = trainer.logger.log_dir
    history = load_fisher_history(run)  # one record per measured step
    epochs = load_fisher_spectrum(run)  # one record per epoch: C_bar and L at its end
    print(f"run folder: {run}")
    print(
        "  fisher_history.csv    one row per measured step: c_k, l_k, C_bar, L, trace, lambda_max, rank, ..."
    )
    print("  fisher_spectrum.csv   one row per epoch: epoch, step, C_bar, L, lr, batch_size")
    print("  events.out.tfevents.* the scalars fisher/c_k, fisher/C_bar, fisher/l_k, fisher/L, ...")
    print("read it back in Python:")
    print("    from lightning_tricks.results import load_fisher_history, load_fisher_spectrum")
    print(f"    history = load_fisher_history({run!r})")
    print(f"{len(history)} measured steps; at the end of each epoch:")
    for row in epochs:
        print(f"  epoch {row['epoch']}: C_bar = {row['C_bar']:.1f}, L = {row['L']:.4f}")
    last = history[-1]
    print(
        f"last measured step {last['step']}: c_k = {last['c_k']:.1f} over the {last['rank']:.0f} eigenvalues "
        "above 32 * eps * lambda_max (in float32 c_k cannot exceed (32 eps)^-1/2 = 512: FisherSpectrum's rank_rtol)"
    )
    print("the scalars in TensorBoard: lightning-tricks dashboard runs")
