"""GradientFlow on your own LightningModule: per-layer mean |dL/dW|, in depth order, every epoch.

A deep MLP with sigmoid activations (the textbook case of vanishing gradients, seed 001) trains
for three epochs on scikit-learn's 8x8 handwritten digits. Run it from any folder::

    python examples/gradient_flow.py

It writes ``runs/gradient_flow/version_N`` and prints what to look at there.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import GradientFlow
from lightning_tricks.results import load_gradient_flow


class DeepSigmoidNet(L.LightningModule):
    """Your model: nothing in it knows about lightning-tricks."""

    def __init__(self, depth: int = 8, width: int = 32) -> None:
        super().__init__()
        layers = [nn.Linear(64, width), nn.Sigmoid()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def digits_loader(batch_size: int = 64) -> DataLoader:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package), scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=3,
        logger=TensorBoardLogger("runs", name="gradient_flow"),
        callbacks=[GradientFlow()],  # the one line
        accelerator="cpu",
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(DeepSigmoidNet(), digits_loader())

    run = trainer.logger.log_dir
    flow = load_gradient_flow(run)  # layer x epoch matrix of mean |dL/dW|, with its layer names
    print(f"run folder: {run}")
    print("  grad_flow.figure.png  the layer x epoch heatmap, input layer at the top")
    print("  grad_flow.csv         one row per epoch and layer: epoch, optimizer, layer, mean_abs")
    print("read it back in Python:")
    print(f"    from lightning_tricks.results import load_gradient_flow; load_gradient_flow({run!r})")
    print("last epoch, input layer first (values falling towards the input = vanishing gradients):")
    for name, value in zip(flow.layer_names, flow.matrix[:, -1]):
        print(f"  {name:>8}  {value:.2e}")
    print("the same figure and the grad_flow/* scalars in TensorBoard: lightning-tricks dashboard runs")
