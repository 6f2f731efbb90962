"""Pix2Pix: networks, one training step against a hand-written reference, the frozen discriminator,
learning on the embedded shapes, the TensorBoard image grid, and the callbacks on this task."""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_tricks import FisherSpectrum, GradientFlow, RandomGradient
from lightning_tricks.datamodules import PairedShapesDataModule
from lightning_tricks.models import Pix2Pix
from lightning_tricks.models.nets.pix2pix_nets import PatchDiscriminator, UNetGenerator
from lightning_tricks.models.pix2pix import DISCRIMINATOR, GENERATOR, gan_loss, sample_figure, sample_grid

pytestmark = pytest.mark.usefixtures("single_thread")


TINY = dict(depth=3, generator_channels=4, discriminator_channels=4, discriminator_layers=1, dropout_layers=0)


def one_batch_data(**overrides) -> PairedShapesDataModule:
    """Eight 16×16 pairs, one training batch, no augmentation: a step is deterministic."""
    options = dict(image_size=16, batch_size=8, train_size=8, val_size=4, test_size=4, augment=False)
    return PairedShapesDataModule(**{**options, **overrides})


@pytest.mark.parametrize(("depth", "size"), [(2, 8), (3, 8), (5, 64)])
def test_unet_keeps_the_image_size_and_refuses_sizes_it_cannot_halve(depth, size):
    net = UNetGenerator(3, 2, depth=depth, base_channels=4)
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 2, size, size) and out.abs().max() <= 1
    with pytest.raises(ValueError, match=f"multiples of {2**depth}"):
        net(torch.randn(1, 3, size + 2, size))


@pytest.mark.parametrize(("n_layers", "size", "patches"), [(1, 8, 2), (3, 64, 6), (3, 256, 30)])
def test_patchgan_gives_one_logit_per_patch(n_layers, size, patches):
    net = PatchDiscriminator(6, base_channels=4, n_layers=n_layers)
    assert net(torch.randn(1, 6, size, size)).shape == (1, 1, patches, patches)
    with pytest.raises(ValueError, match="n_layers"):
        net(torch.randn(1, 6, 3 * 2**n_layers - 1, size))


def test_gan_losses_against_their_formulas():
    logits = torch.tensor([[-2.0, 0.5], [1.0, 3.0]], dtype=torch.float64)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(gan_loss(logits, True, "vanilla"), -torch.log(p).mean())
    torch.testing.assert_close(gan_loss(logits, False, "vanilla"), -torch.log(1 - p).mean())
    torch.testing.assert_close(gan_loss(logits, True, "lsgan"), ((logits - 1) ** 2).mean())
    torch.testing.assert_close(gan_loss(logits, False, "lsgan"), (logits**2).mean())


class RecordsGradients(L.Callback):
    """The gradients each optimiser is about to apply, ``(optimiser index, [grad per parameter])``."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[torch.Tensor]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
        grads = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
        self.steps.append((index, grads))


def reference_step(model: Pix2Pix, a, b, r_d: float = 1.0, r_g: float = 1.0):
    """pix2pix's step written out (Isola et al. 2017): D on ``(loss_d · r_d)``, then G on ``(loss_g · r_g)``;
    returns the gradients D and G applied."""
    mode, weight = model.hparams.gan_mode, model.hparams.l1_weight
    g, d = model.generator.train(), model.discriminator.train()
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    fake = g(a)
    real_loss = gan_loss(d(torch.cat([a, b], 1)), True, mode)
    loss_d = 0.5 * (real_loss + gan_loss(d(torch.cat([a, fake.detach()], 1)), False, mode))
    (loss_d * r_d).backward()
    grads_d = [p.grad.clone() for p in d.parameters()]
    opt_d.step()
    d.requires_grad_(False)
    loss_g = gan_loss(d(torch.cat([a, fake], 1)), True, mode) + weight * F.l1_loss(fake, b)
    (loss_g * r_g).backward()
    grads_g = [p.grad.clone() for p in g.parameters()]
    opt_g.step()
    d.requires_grad_(True)
    return grads_d, grads_g


def run_one_step(trainer_for, callbacks, **options) -> tuple[Pix2Pix, Pix2Pix, PairedShapesDataModule]:
    """A model after one fitted step and an untouched copy of its initial state."""
    torch.manual_seed(0)
    model = Pix2Pix(**{**TINY, **options})
    initial = copy.deepcopy(model)
    data = one_batch_data()
    trainer_for(callbacks, max_epochs=1, limit_val_batches=0).fit(model, datamodule=data)
    return model, initial, data


def assert_same_step(model, reference, recorder, grads_d, grads_g) -> None:
    assert [index for index, _ in recorder.steps] == [DISCRIMINATOR, GENERATOR]
    for recorded, expected in zip((recorder.steps[0][1], recorder.steps[1][1]), (grads_d, grads_g)):
        for got, want in zip(recorded, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for (name, trained), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("gan_mode", ["vanilla", "lsgan"])
def test_one_training_step_matches_the_hand_written_pix2pix_step(gan_mode, trainer_for):
    recorder = RecordsGradients()
    model, reference, data = run_one_step(trainer_for, [recorder], gan_mode=gan_mode)
    grads_d, grads_g = reference_step(reference, *data.train_set.tensors)
    assert_same_step(model, reference, recorder, grads_d, grads_g)


class RecordsTrainable(L.Callback):
    """At every backward: which optimisers' parameters require grad."""

    def __init__(self) -> None:
        self.trainable: list[set[int]] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.trainable.append(
            {
                index
                for index, optimizer in enumerate(trainer.optimizers)
                if all(p.requires_grad for group in optimizer.param_groups for p in group["params"])
            }
        )


def test_discriminator_step_then_generator_step_with_the_other_network_frozen(trainer_for):
    recorder = RecordsTrainable()
    model = Pix2Pix(**TINY)
    trainer_for([recorder], max_steps=4, limit_val_batches=0).fit(
        model, datamodule=one_batch_data(train_size=16)
    )
    assert recorder.trainable == [{DISCRIMINATOR}, {GENERATOR}] * 2
    assert all(p.requires_grad for p in model.parameters())


def test_validation_l1_drops_and_the_grid_goes_to_tensorboard(tmp_path, trainer_for):
    L.seed_everything(0)
    data = PairedShapesDataModule(image_size=32, batch_size=8, train_size=128, val_size=16, test_size=16)
    model = Pix2Pix(
        depth=3, generator_channels=16, discriminator_channels=16, discriminator_layers=1, dropout_layers=0
    )
    before = trainer_for(inference_mode=False).validate(model, datamodule=data, verbose=False)
    l1_before = before[0]["val/l1"]
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = trainer_for(max_epochs=5, logger=[logger, CSVLogger(tmp_path, name="csv")])
    trainer.fit(model, datamodule=data)
    l1_after = trainer.callback_metrics["val/l1"].item()
    print(f"val L1 {l1_before:.4f} -> {l1_after:.4f}")
    assert l1_after < 0.6 * l1_before, (l1_before, l1_after)
    assert math.isfinite(trainer.callback_metrics["train/loss_d"].item())

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    images = events.Images("pix2pix/samples")
    assert [image.step for image in images] == [32, 64, 96, 128, 160]  # two optimiser steps a batch
    figure = sample_figure(*(torch.zeros(4, 3, 32, 32),) * 3)  # the grid is 4 pairs of 32 × 32 images
    width, height = figure.get_size_inches() * figure.dpi
    assert (images[-1].height, images[-1].width) == (round(height), round(width))


def test_sample_grid_rows_are_input_generated_target():
    a, g, b = (torch.full((2, 3, 4, 4), v) for v in (-1.0, 0.0, 1.0))
    grid = sample_grid(a, g, b)
    assert grid.shape == (3, 2 * 4 + 3 * 2, 3 * 4 + 4 * 2)
    row = grid[:, 2:6]
    assert row[:, :, 2:6].eq(0).all() and row[:, :, 8:12].eq(0.5).all() and row[:, :, 14:18].eq(1).all()
    assert sample_grid(a[:, :1], g, b).shape == grid.shape


def test_sample_figure_labels_the_columns_input_generated_target_over_the_grid():
    a, g, b = (torch.full((2, 3, 4, 4), v) for v in (-1.0, 0.0, 1.0))
    figure = sample_figure(a, g, b)
    (axes,) = figure.axes
    np.testing.assert_array_equal(
        axes.get_images()[0].get_array(), sample_grid(a, g, b).permute(1, 2, 0).numpy()
    )
    labels = {t.get_text(): x for t, x in zip(axes.get_xticklabels(), axes.get_xticks())}
    assert list(labels) == ["input", "generated", "target"]
    for column, x in enumerate(labels.values()):  # each name over its column: tiles at 2 + 6 j … 5 + 6 j
        assert 2 + 6 * column <= x <= 5 + 6 * column
    assert axes.xaxis.get_ticks_position() == "top"


# ----------------------------------------------------------------------------- callbacks on this task


@pytest.mark.parametrize("optimizers", [[GENERATOR], [DISCRIMINATOR], None])
def test_random_gradient_scales_only_the_selected_networks_gradients(optimizers, trainer_for):
    """Against the hand-written step with D's loss times r_d and G's times r_g, where r is the
    callback's draw for a selected network and 1 for the other."""
    recorder = RecordsGradients()
    callback = RandomGradient(low=0.1, high=0.2, optimizers=optimizers, seed=0)
    model, reference, data = run_one_step(trainer_for, [callback, recorder])
    assert [(r["step"], r["backward"]) for r in callback.history] == [
        (0, 0),
        (0, 1),
    ]  # D's backward, then G's
    r_d, r_g = (
        record["r"] if optimizers is None or index in optimizers else 1.0
        for record, index in zip(callback.history, (DISCRIMINATOR, GENERATOR))
    )
    grads_d, grads_g = reference_step(reference, *data.train_set.tensors, r_d=r_d, r_g=r_g)
    assert_same_step(model, reference, recorder, grads_d, grads_g)


def test_gradient_flow_per_optimiser(trainer_for):
    callback = GradientFlow()
    model = Pix2Pix(**TINY)
    trainer_for([callback], max_epochs=1, limit_val_batches=0).fit(
        model, datamodule=one_batch_data(train_size=16)
    )
    flows = callback.flows
    assert sorted(flows) == [GENERATOR, DISCRIMINATOR]
    for index, network in ((GENERATOR, "generator"), (DISCRIMINATOR, "discriminator")):
        history = flows[index]
        assert history.layer_names and all(name.startswith(network) for name in history.layer_names)
        values = history.matrix.ravel()
        assert all(math.isfinite(v) and v > 0 for v in values)


def test_fisher_spectrum_refuses_manual_optimisation(trainer_for):
    with pytest.raises(ValueError, match="automatic optimisation"):
        trainer_for([FisherSpectrum()], max_steps=2).fit(Pix2Pix(**TINY), datamodule=one_batch_data())


def test_batch_size_scheduler_refuses_accumulation_under_manual_optimisation(trainer_for):
    """Lightning ignores accumulate_grad_batches under manual optimisation: size 16 as 4 × 4 would
    train as size 4 while logging 16, so it is refused before training; a size within the cap runs."""
    from lightning_tricks import BatchSizeScheduler

    model = Pix2Pix(**TINY)
    match = "manual optimisation.*sizes\\[0\\] = 16 cannot run as 4 micro-batches"
    with pytest.raises(ValueError, match=match):
        trainer_for([BatchSizeScheduler.staged([16], max_physical_batch_size=4)], max_steps=2).fit(
            model, datamodule=one_batch_data(train_size=16)
        )

    class Sizes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(len(batch[0]))

    seen: list[int] = []
    callbacks = [BatchSizeScheduler.staged([4], max_physical_batch_size=4), Sizes()]
    trainer = trainer_for(callbacks, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=one_batch_data(train_size=16))
    assert seen == [4, 4, 4, 4]
