"""RandomGradient on your own LightningModule: every backward uses ``loss * r``, r ~ U(0, 1).

Seed 000 multiplies each training loss by a fresh random number before the backward (the
learning rate is untouched) and pairs it with momentum (about 0.5 for classification). A small
CNN trains for two epochs on scikit-learn's 8x8 handwritten digits. Run it from any folder::

    python examples/random_gradient.py

It writes ``runs/random_gradient/version_N`` and prints what to look at there.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import RandomGradient
from lightning_tricks.results import load_random_gradient, load_scalars, scalar_series


class SmallCNN(L.LightningModule):
    """Your model: nothing in it knows about lightning-tricks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
        )

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train/loss", loss)  # the loss as computed: RandomGradient scales only its gradient
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


def digits_loader(batch_size: int = 64) -> DataLoader:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package), scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return DataLoader(TensorDataset(images, torch.tensor(labels)), batch_size=batch_size, shuffle=True)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=2,
        logger=TensorBoardLogger("runs", name="random_gradient"),
        callbacks=[RandomGradient(low=0.0, high=1.0, seed=0)],  # the one line
        accelerator="cpu",
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(SmallCNN(), digits_loader())

    run = trainer.logger.log_dir
    draws = load_random_gradient(run)  # one record per backward: step, backward, r
    steps, loss = scalar_series(load_scalars(run), "train/loss")
    print(f"run folder: {run}")
    print("  random_gradient.csv   every r drawn: step, backward (the index of the r stream), r")
    print("  events.out.tfevents.* the scalars: random_gradient/r (every 5th step) and your train/loss")
    print("read it back in Python:")
    print("    from lightning_tricks.results import load_random_gradient, load_scalars, scalar_series")
    print(f"    draws = load_random_gradient({run!r})")
    print(f"    steps, loss = scalar_series(load_scalars({run!r}), 'train/loss')")
    mean_r = sum(row["r"] for row in draws) / len(draws)
    print(f"{len(draws)} backward passes, mean r = {mean_r:.3f} (U(0, 1): 0.5); first: {draws[0]}")
    print(f"train/loss: {loss[0]:.3f} at step {steps[0]:.0f} -> {loss[-1]:.3f} at step {steps[-1]:.0f}")
    print("the scalars in TensorBoard: lightning-tricks dashboard runs")
