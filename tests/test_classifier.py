"""ImageClassifier, its learning-rate schedules and the LightningCLI entry point."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning_tricks.models import ImageClassifier
from lightning_tricks.models.classifier import lr_factor

from lightning_tricks.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.5, 0.74, 0.75, 0.9, 1.0])
def test_schedules_follow_their_formulas(progress):
    steps = (progress >= 0.5) + (progress >= 0.75)
    assert lr_factor(progress, "multistep", milestones=(0.5, 0.75), gamma=0.1) == pytest.approx(0.1**steps)
    cosine = 0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2
    assert lr_factor(progress, "cosine", eta_min_ratio=0.01) == pytest.approx(cosine)
    assert lr_factor(progress, "poly", power=0.9) == pytest.approx((1 - progress) ** 0.9)
    assert lr_factor(progress, "constant") == 1.0


def test_warmup_ramps_linearly_then_hands_over():
    assert lr_factor(0.05, "constant", warmup=0.1) == pytest.approx(0.5)
    assert lr_factor(0.2, "poly", warmup=0.1) == pytest.approx(0.8**0.9)


def test_compute_loss_is_the_mean_cross_entropy_of_the_forward():
    torch.manual_seed(0)
    model = ImageClassifier("mlp", num_classes=4, in_channels=1, net_kwargs={"image_size": 8})
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    assert model.compute_loss((x, y)).item() == pytest.approx(F.cross_entropy(model(x), y).item())


def test_learning_rate_follows_training_progress(tmp_path):
    """Multistep at 50 % / 75 % of 4 epochs: the LR in force during epoch e is known exactly."""
    from lightning_tricks.datamodules import DigitsDataModule

    model = ImageClassifier("mlp", 10, 1, net_kwargs={"image_size": 8}, lr=0.1, schedule="multistep")
    seen: list[tuple[int, float]] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))

    data = DigitsDataModule(image_size=8, batch_size=512)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordLR()],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    last_lr_of_epoch = {epoch: lr for epoch, lr in seen}
    assert last_lr_of_epoch[1] == pytest.approx(0.1)
    assert last_lr_of_epoch[2] == pytest.approx(0.01)
    assert last_lr_of_epoch[3] == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"arch": "resnet19"}, "arch"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"schedule": "exponential"}, "schedule"),
        ({"lr": -1.0}, "lr"),
        ({"milestones": (0.75, 0.5)}, "milestones"),
        ({"warmup": 1.0}, "warmup"),
    ],
)
def test_bad_arguments_name_the_argument_and_allowed_values(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ImageClassifier(**kwargs)


@pytest.mark.usefixtures("single_thread")  # the demo config pins torch threads; restore them
def test_cli_trains_and_tests_digits_above_90_percent(tmp_path):
    """The demo config, shrunk (8×8 digits, ResNet-8): fit, then test the best checkpoint."""
    main(
        [
            "fit",
            "-c",
            str(CONFIGS / "demo.yaml"),
            "--trainer.max_epochs",
            "6",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--model.init_args.arch",
            "resnet8",
            "--data.init_args.image_size",
            "8",
        ]
    )
    version = tmp_path / "demo" / "version_0"
    assert (version / "config.yaml").exists()
    checkpoints = list((version / "checkpoints").glob("*.ckpt"))
    assert any(c.name == "last.ckpt" for c in checkpoints) and len(checkpoints) >= 2
    best = [c for c in checkpoints if c.name != "last.ckpt"][0]
    val_acc = float(best.stem.split("val_acc")[1])
    assert val_acc >= 0.9
    config = yaml.safe_load((version / "config.yaml").read_text())
    assert config["model"]["init_args"]["arch"] == "resnet8"
