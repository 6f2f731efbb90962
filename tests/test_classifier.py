"""ImageClassifier, its learning-rate schedules and the LightningCLI entry point."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import LearningRates, cli_fit

from lightning_tricks.cli import main
from lightning_tricks.models import ImageClassifier
from lightning_tricks.models.classifier import lr_factor

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


def test_learning_rate_follows_training_progress(trainer_for):
    """Multistep at 50 % / 75 % of 4 epochs: the LR in force during epoch e is known exactly."""
    from lightning_tricks.datamodules import DigitsDataModule

    model = ImageClassifier("mlp", 10, 1, net_kwargs={"image_size": 8}, lr=0.1, schedule="multistep")
    recorder = LearningRates()
    data = DigitsDataModule(image_size=8, batch_size=512)
    trainer_for([recorder], max_epochs=4, limit_val_batches=0).fit(model, datamodule=data)
    last_lr_of_epoch = dict(zip(recorder.epochs, recorder.lrs))
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
    shrunk = {"model.init_args.arch": "resnet8", "data.init_args.image_size": 8}
    main(
        cli_fit(
            CONFIGS / "demo.yaml",
            {"trainer.max_epochs": 6, "trainer.logger.init_args.save_dir": tmp_path, **shrunk},
        )
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


# -- the LR every optimiser step runs at ------------------------------------------------------


def closed_form_factor(progress: float, schedule: str, warmup: float) -> float:
    """The schedules written out (milestones 0.5/0.75 ×0.1, cosine floor 0.01, poly 0.9)."""
    factor = {
        "multistep": 0.1 ** ((progress >= 0.5) + (progress >= 0.75)),
        "cosine": 0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2,
        "poly": (1 - progress) ** 0.9,
        "constant": 1.0,
    }[schedule]
    return factor * (progress / warmup if progress < warmup else 1.0)


def records_lr(module_class: type[L.LightningModule]) -> type[L.LightningModule]:
    """``module_class`` whose training_step records (epoch, batch_idx, batches, lr)."""

    class Recording(module_class):
        def training_step(self, batch, batch_idx):
            lr = self.optimizers().param_groups[0]["lr"]
            self.seen.append((self.current_epoch, batch_idx, self.trainer.num_training_batches, lr))
            return super().training_step(batch, batch_idx)

    return Recording


def window_start_progress(seen, max_epochs: int, accumulation: dict[int, int]) -> list[float]:
    """Progress at the start of the optimiser step each recorded micro-batch belongs to."""
    return [
        (epoch + (batch_idx - batch_idx % accumulation.get(epoch, 1)) / batches) / max_epochs
        for epoch, batch_idx, batches, _ in seen
    ]


def digits_like(samples: int = 16) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(samples, 1, 4, 4, generator=generator),
        torch.randint(0, 10, (samples,), generator=generator),
    )


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("warmup", [0.0, 0.3])
@pytest.mark.parametrize("schedule", ["multistep", "cosine", "poly", "constant"])
def test_every_step_runs_at_the_lr_its_schedule_defines_for_it(trainer_for, schedule, warmup):
    """4 epochs of 4 batches: step k runs at lr · f(k/16) (the step after a milestone at the new LR;
    the old code ran every step at the previous step's value)."""
    model = records_lr(ImageClassifier)(
        "mlp", 10, 1, net_kwargs={"image_size": 4}, lr=0.1, schedule=schedule, eta_min=0.001, warmup=warmup
    )
    model.seen = []
    loader = torch.utils.data.DataLoader(digits_like(), batch_size=4)
    trainer_for(max_epochs=4, limit_val_batches=0).fit(model, loader)
    assert len(model.seen) == 16
    expected = [0.1 * closed_form_factor(k / 16, schedule, warmup) for k in range(16)]
    assert [lr for *_, lr in model.seen] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.usefixtures("single_thread")
def test_lr_follows_the_step_when_the_batch_size_and_accumulation_change(trainer_for):
    """BatchSizeScheduler: 13 samples in batches of 2 (7 steps/epoch) then 4 as 2 × 2 micro-batches
    (4 steps: 3 full windows and one of a single 1-sample batch); each step at f(its start)."""
    from lightning_tricks import BatchSizeScheduler

    class Module(records_lr(ImageClassifier)):
        batch_size = 2

        def train_dataloader(self):
            return torch.utils.data.DataLoader(digits_like(13), batch_size=self.batch_size)

    model = Module("mlp", 10, 1, net_kwargs={"image_size": 4}, lr=0.1, schedule="multistep", warmup=0.2)
    model.seen = []
    scheduler = BatchSizeScheduler(sizes=[2, 4], max_physical_batch_size=2)
    trainer_for([scheduler], max_epochs=4, limit_val_batches=0).fit(model)
    progress = window_start_progress(model.seen, 4, {2: 2, 3: 2})
    expected = [0.1 * closed_form_factor(p, "multistep", 0.2) for p in progress]
    assert [lr for *_, lr in model.seen] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert len(model.seen) == 28 and {batches for _, _, batches, _ in model.seen} == {7}


@pytest.mark.usefixtures("single_thread")
def test_lr_by_steps_when_training_is_bounded_by_max_steps(trainer_for):
    model = records_lr(ImageClassifier)("mlp", 10, 1, net_kwargs={"image_size": 4}, lr=0.1, schedule="poly")
    model.seen = []
    loader = torch.utils.data.DataLoader(digits_like(), batch_size=4)
    trainer_for(max_epochs=-1, max_steps=10, limit_val_batches=0).fit(model, loader)
    expected = [0.1 * (1 - k / 10) ** 0.9 for k in range(10)]
    assert [lr for *_, lr in model.seen] == pytest.approx(expected, rel=1e-12)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("power", [0.9, 0.0])
def test_segmentation_poly_lr_follows_the_step_when_the_batch_size_changes(trainer_for, power):
    from lightning_tricks import BatchSizeScheduler
    from lightning_tricks.datamodules import ShapesSegmentationDataModule
    from lightning_tricks.models import SegmentationModule

    model = records_lr(SegmentationModule)(
        "fcn", num_classes=4, backbone="resnet18", base_width=4, aux_loss=False, lr=0.02, power=power
    )
    model.seen = []
    data = ShapesSegmentationDataModule(image_size=16, batch_size=2, train_size=10, val_size=4, test_size=4)
    scheduler = BatchSizeScheduler(sizes=[2, 4], max_physical_batch_size=2)
    trainer_for([scheduler], max_epochs=2, limit_val_batches=0).fit(model, datamodule=data)
    progress = window_start_progress(model.seen, 2, {1: 2})
    expected = [0.02 * (1 - p) ** power for p in progress]
    assert [lr for *_, lr in model.seen] == pytest.approx(expected, rel=1e-12)
