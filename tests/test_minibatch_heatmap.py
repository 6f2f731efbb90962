"""MinibatchHeatmap (seed 002 §3, Algorithm 1) against a direct two-network implementation."""

from __future__ import annotations

import colorsys
import copy
import json
import math
import os
import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_identical
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from lightning_tricks import MinibatchHeatmap
from lightning_tricks.datamodules import ClassificationDataModule
from lightning_tricks.gradients.minibatch_distance import (
    CountSketch,
    MinibatchDistances,
    sketch_failure_probability,
)
from lightning_tricks.heatmap import epoch_learning_rates, heatmap_file, heatmap_namespace, phase_indices
from lightning_tricks.image_metrics import color, edges, intensity, metric_order
from lightning_tricks.results import load_minibatch_heatmap
from lightning_tricks.samplers import MetricSortedBatchSampler

SAMPLES, BATCH = 36, 8  # 5 batches a epoch, the last one of 4 samples


pytestmark = pytest.mark.usefixtures("single_thread")


def make_data(samples: int = SAMPLES) -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    images = (
        torch.rand(samples, 1, 6, 6, generator=generator)
        * torch.linspace(0.2, 1.5, samples)[:, None, None, None]
    )
    return TensorDataset(images, torch.randint(0, 3, (samples,), generator=generator))


def small_cnn(batch_norm: bool = True, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3)]
    layers += [nn.BatchNorm2d(4)] if batch_norm else []
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


class CNNModule(pl.LightningModule):
    """A user-written module: ``compute_loss`` defines the loss, ``training_step`` uses it."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.1,
        batch_size: int = BATCH,
        sorted_by_hand: bool = False,
        optimizer: str = "sgd",
        milestones: tuple[int, ...] = (),
        samples: int = SAMPLES,
        define_loss: bool = True,
    ) -> None:
        super().__init__()
        self.net, self.lr, self.batch_size = net, lr, batch_size
        self.sorted_by_hand, self.optimizer, self.milestones = sorted_by_hand, optimizer, milestones
        self.data = make_data(samples)
        if define_loss:
            self.compute_loss = self._loss

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def train_dataloader(self):
        if self.sorted_by_hand:
            sampler = MetricSortedBatchSampler(intensity(self.data.tensors[0]), self.batch_size)
            return DataLoader(self.data, batch_sampler=sampler)
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.milestones:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.milestones), 0.1)]


def algorithm_1(net: nn.Module, data: TensorDataset, lr: float, epochs: int, distance: str = "l2"):
    """Seed 002 Algorithm 1 as written: net_normal trains (SGD, momentum 0.9), net_compare is copied at
    each epoch start and only runs forward/backward; batches are the data sorted by intensity."""
    images, labels = data.tensors
    order = torch.argsort(images.sum(dim=(1, 2, 3)), stable=True)
    batches = list(order.split(BATCH))
    net_normal = copy.deepcopy(net)
    optimizer = torch.optim.SGD(net_normal.parameters(), lr=lr, momentum=0.9)
    rows = []
    for _ in range(epochs):
        net_compare = copy.deepcopy(net_normal)
        gradients, sizes = [], []
        for index in batches:
            x, y = images[index], labels[index]
            optimizer.zero_grad()
            F.cross_entropy(net_normal(x), y).backward()
            optimizer.step()
            net_compare.zero_grad()
            F.cross_entropy(net_compare(x), y).backward()
            gradients.append(torch.cat([p.grad.reshape(-1) for p in net_compare.parameters()]).double())
            sizes.append(len(index))
        stacked, weights = torch.stack(gradients), torch.tensor(sizes, dtype=torch.float64)
        full = (weights[:, None] * stacked).sum(0) / weights.sum()
        if distance == "l2":
            rows.append([float((g - full).norm()) for g in stacked])
        else:
            rows.append([1 - float(g @ full / (g.norm() * full.norm())) for g in stacked])
    batch_means = [float(images[index].sum(dim=(1, 2, 3)).mean()) for index in batches]
    return np.array(rows), batch_means


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_exact_mode_equals_a_direct_implementation_of_algorithm_1(tmp_path, distance, trainer_for):
    net = small_cnn(batch_norm=True)
    reference, batch_means = algorithm_1(net, make_data(), lr=0.1, epochs=3, distance=distance)
    heatmap = MinibatchHeatmap(mode="exact", distance=distance, progress=False)
    trainer_for([heatmap], max_epochs=3).fit(CNNModule(copy.deepcopy(net)))
    assert heatmap.matrix.shape == (3, 5)
    np.testing.assert_allclose(heatmap.matrix, reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(heatmap.batch_values, batch_means, rtol=1e-6)
    assert heatmap.epochs == [0, 1, 2]
    assert heatmap.history[6] == {
        "epoch": 1,
        "lr": 0.1,
        "lr_first": 0.1,
        "lr_last": 0.1,
        "phase": 0,
        "batch": 1,
        "metric": pytest.approx(batch_means[1]),
        "distance": pytest.approx(reference[1, 1], abs=1e-6),
    }


def test_sketch_mode_is_within_its_stated_error_of_exact(tmp_path, trainer_for):
    net = small_cnn()
    exact, sketch = (
        MinibatchHeatmap(mode="exact", progress=False),
        MinibatchHeatmap(mode="sketch", sketch_dim=8192, seed=1, progress=False),
    )
    trainer_for([exact], max_epochs=3, default_root_dir=tmp_path / "exact").fit(CNNModule(copy.deepcopy(net)))
    trainer_for([sketch], max_epochs=3, default_root_dir=tmp_path / "sketch").fit(
        CNNModule(copy.deepcopy(net))
    )
    eps = 0.25
    assert sketch_failure_probability(8192, eps) < 0.005  # 15 entries: all within ε with prob. > 0.92
    relative = np.abs(sketch.matrix - exact.matrix) / exact.matrix
    assert relative.max() <= eps
    assert relative.max() > 0, "the sketch is an approximation, not the exact gradients"


def test_count_sketch_error_frequency_is_within_the_chebyshev_bound():
    """Over many seeds, |‖Sx‖² − ‖x‖²| > ε‖x‖² no more often than 2/(d ε²), and E‖Sx‖² = ‖x‖²."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 5000).double()
    x[:5] *= 30  # a few heavy coordinates, the hard case for a sparse sketch
    d, eps = 256, 0.2
    ratios = (
        torch.tensor([float(CountSketch(len(x), d, seed)(x).pow(2).sum()) for seed in range(400)])
        / x.pow(2).sum()
    )
    assert float((ratios - 1).abs().gt(eps).double().mean()) <= sketch_failure_probability(d, eps)
    assert float(ratios.mean()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, optimizer, mode, trainer_for):
    """BatchNorm (running statistics) and dropout (RNG) in the model; on the same fixed batches."""
    results = []
    for callbacks in ([], [MinibatchHeatmap(mode=mode, sketch_dim=64, progress=False)]):
        torch.manual_seed(5)
        module = CNNModule(small_cnn(batch_norm=True, dropout=0.3), sorted_by_hand=True, optimizer=optimizer)
        trainer = trainer_for(callbacks, max_epochs=2, default_root_dir=tmp_path / str(len(callbacks)))
        trainer.fit(module)
        optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        results.append((module.state_dict(), optimizer_state, torch.get_rng_state()))
    assert_identical(results[1], results[0], "parameters, buffers, optimiser state, RNG")
    assert all(p.grad is None or p.requires_grad for p in module.parameters())


def test_installed_sorted_batches_equal_a_hand_built_sorted_loader(tmp_path, trainer_for):
    installed, by_hand = MinibatchHeatmap(progress=False), MinibatchHeatmap(progress=False)
    net = small_cnn()
    trainer_for([installed], max_epochs=3, default_root_dir=tmp_path / "a").fit(CNNModule(copy.deepcopy(net)))
    trainer_for([by_hand], max_epochs=3, default_root_dir=tmp_path / "b").fit(
        CNNModule(copy.deepcopy(net), sorted_by_hand=True)
    )
    np.testing.assert_array_equal(installed.matrix, by_hand.matrix)


def test_exact_mode_spills_beyond_the_budget_gives_the_same_matrix_and_removes_the_file(
    tmp_path, trainer_for
):
    net = small_cnn()
    in_memory = MinibatchHeatmap(mode="exact", progress=False)
    spilled = MinibatchHeatmap(
        mode="exact", memory_budget=2 * 4 * 367, progress=False
    )  # 2 of 5 rows in memory
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if spilled._epoch is not None:
                seen.append(spilled._epoch.engine.spilled)

    trainer_for([in_memory], max_epochs=3, default_root_dir=tmp_path / "a").fit(CNNModule(copy.deepcopy(net)))
    trainer_for([spilled, Spy()], max_epochs=3, default_root_dir=tmp_path / "b").fit(
        CNNModule(copy.deepcopy(net))
    )
    assert any(seen), "rows went to the memory-mapped file"
    np.testing.assert_allclose(spilled.matrix, in_memory.matrix, rtol=0, atol=1e-12)
    assert not any(name.endswith(".tmp.npy") for _, _, files in os.walk(tmp_path) for name in files)


def test_auto_mode_picks_exact_when_the_gradients_fit():
    assert MinibatchDistances(5, 100, mode="auto", memory_budget=2000).mode == "exact"
    assert MinibatchDistances(5, 100, mode="auto", memory_budget=1999).mode == "sketch"


def test_files_figures_and_scalars(tmp_path, trainer_for):
    heatmap = MinibatchHeatmap(every_n_epochs=2, progress=False)
    trainer = trainer_for([heatmap], max_epochs=3)
    trainer.fit(CNNModule(small_cnn()))
    assert heatmap.epochs == [0, 2]
    folder = heatmap.run_dir
    np.testing.assert_array_equal(np.load(os.path.join(folder, "heatmap_matrix.npy")), heatmap.matrix)
    table = np.loadtxt(os.path.join(folder, "heatmap_matrix.csv"), delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 0], [0, 2])
    np.testing.assert_allclose(table[:, 1:], heatmap.matrix)
    assert os.path.exists(os.path.join(folder, "heatmap.phase_0.png"))
    assert len(heatmap.history) == 2 * 5
    metrics = trainer.callback_metrics
    assert float(metrics["heatmap/distance_min"]) == pytest.approx(heatmap.matrix[-1].min())
    assert int(metrics["heatmap/best_batch"]) == int(np.argmin(heatmap.matrix[-1]))


def test_batches_past_limit_train_batches_are_nan(tmp_path, trainer_for):
    heatmap = MinibatchHeatmap(progress=False)
    trainer_for([heatmap], max_epochs=1, limit_train_batches=3).fit(CNNModule(small_cnn()))
    assert heatmap.matrix.shape == (1, 5)
    assert np.isfinite(heatmap.matrix[0, :3]).all() and np.isnan(heatmap.matrix[0, 3:]).all()


def test_phases_follow_the_learning_rate(tmp_path, trainer_for):
    heatmap = MinibatchHeatmap(progress=False)
    trainer_for([heatmap], max_epochs=4).fit(CNNModule(small_cnn(), milestones=(2,)))
    assert heatmap.phase_of_epoch == [0, 0, 1, 1]
    files = os.listdir(heatmap.run_dir)
    assert "heatmap.phase_0.png" in files and "heatmap.phase_1.png" in files
    records = load_minibatch_heatmap(heatmap.run_dir)  # heatmap.csv splits by phase when read back
    assert [(row["epoch"], row["phase"]) for row in records[::5]] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert [row["lr"] for row in records[::5]] == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_phase_indices():
    assert phase_indices([0, 1, 2, 3], [0.1, 0.1, 0.01, 0.01], "lr") == [0, 0, 1, 1]
    assert phase_indices([0, 2, 4, 6], [0.1] * 4, (3, 5)) == [0, 0, 1, 2]
    assert phase_indices([0, 1], [0.1, 0.2], None) == [0, 0]


def test_resume_keeps_the_matrix(tmp_path, trainer_for):
    net = small_cnn()
    uninterrupted = MinibatchHeatmap(progress=False)
    trainer_for([uninterrupted], max_epochs=4, default_root_dir=tmp_path / "full").fit(
        CNNModule(copy.deepcopy(net))
    )

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MinibatchHeatmap(progress=False)
    trainer_for(
        [first, checkpoint], max_epochs=2, default_root_dir=tmp_path / "part", enable_checkpointing=True
    ).fit(CNNModule(copy.deepcopy(net)))
    resumed = MinibatchHeatmap(progress=False)
    trainer_for([resumed], max_epochs=4, default_root_dir=tmp_path / "part").fit(
        CNNModule(copy.deepcopy(net)), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.epochs == [0, 1, 2, 3]
    np.testing.assert_allclose(resumed.matrix, uninterrupted.matrix, rtol=0, atol=1e-6)


def test_a_module_without_compute_loss_needs_loss_fn(tmp_path, trainer_for):
    with pytest.raises(ValueError, match="compute_loss.*loss_fn"):
        trainer_for([MinibatchHeatmap(progress=False)], max_epochs=3).fit(
            CNNModule(small_cnn(), define_loss=False)
        )
    with_fn = MinibatchHeatmap(
        loss_fn=lambda module, batch: module._loss(batch), mode="exact", progress=False
    )
    with_method = MinibatchHeatmap(mode="exact", progress=False)
    net = small_cnn()
    trainer_for([with_fn], max_epochs=1, default_root_dir=tmp_path / "a").fit(
        CNNModule(copy.deepcopy(net), define_loss=False)
    )
    trainer_for([with_method], max_epochs=1, default_root_dir=tmp_path / "b").fit(
        CNNModule(copy.deepcopy(net))
    )
    np.testing.assert_array_equal(with_fn.matrix, with_method.matrix)


class CustomBatches(CNNModule):
    def train_dataloader(self):
        sampler = BatchSampler(SequentialSampler(range(SAMPLES)), BATCH, False)

        class Shuffled(BatchSampler):
            pass

        return DataLoader(self.data, batch_sampler=Shuffled(sampler.sampler, BATCH, False))


class GrowingBatches(CNNModule):
    def train_dataloader(self):
        size = BATCH * (1 + self.trainer.current_epoch)
        return DataLoader(self.data, batch_size=size, shuffle=True)


def test_loaders_whose_batches_may_change_are_refused(tmp_path, trainer_for):
    with pytest.raises(ValueError, match="Shuffled"):
        trainer_for([MinibatchHeatmap(progress=False)], max_epochs=3, default_root_dir=tmp_path / "a").fit(
            CustomBatches(small_cnn())
        )
    with pytest.raises(ValueError, match="batches changed"):
        trainer_for(
            [MinibatchHeatmap(progress=False)],
            max_epochs=3,
            default_root_dir=tmp_path / "b",
            reload_dataloaders_every_n_epochs=1,
        ).fit(GrowingBatches(small_cnn()))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mode": "fast"}, "mode"),
        ({"distance": "l1"}, "distance"),
        ({"memory_budget": -1}, "memory_budget"),
        ({"sketch_dim": 0}, "sketch_dim"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"phases": "epoch"}, "phases"),
        ({"metric": "hue"}, "metric"),
        ({"phases": 5}, "phases"),
        ({"phases": [1, "a"]}, "phases"),
        ({"seed": "a"}, "seed"),
        ({"seed": -1}, "seed"),
        ({"descending": 1}, "descending"),
        ({"log_scale": "yes"}, "log_scale"),
        ({"progress": None}, "progress"),
        ({"image_key": 1.5}, "image_key"),
        ({"metric_transform": 3}, "metric_transform"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        MinibatchHeatmap(**kwargs)


def test_non_finite_gradients_warn_and_give_nan_without_touching_training(tmp_path, trainer_for):
    heatmap = MinibatchHeatmap(loss_fn=lambda module, batch: module._loss(batch) * math.inf, progress=False)
    module = CNNModule(small_cnn(), define_loss=False)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer_for([heatmap], max_epochs=1).fit(module)
    assert np.isnan(heatmap.matrix).all()
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_ddp_two_processes_give_the_single_process_matrix_with_the_global_batch(tmp_path, mode, trainer_for):
    """Each of 2 processes takes half of every global batch of 8; the per-process gradients are summed
    with their sizes before storage, so the matrix equals one process with batches of 8."""
    net = small_cnn(batch_norm=False)  # BatchNorm's statistics would be per process
    single = MinibatchHeatmap(mode=mode, sketch_dim=512, progress=False)
    single_edges = MinibatchHeatmap(metric="edges", mode=mode, sketch_dim=512, progress=False)
    trainer_for([single, single_edges], max_epochs=2, default_root_dir=tmp_path / "single").fit(
        CNNModule(copy.deepcopy(net), samples=32)
    )

    ddp = MinibatchHeatmap(mode=mode, sketch_dim=512, progress=False)
    ddp_edges = MinibatchHeatmap(metric="edges", mode=mode, sketch_dim=512, progress=False)
    trainer_for(
        [ddp, ddp_edges], max_epochs=2, default_root_dir=tmp_path / "ddp", devices=2, strategy="ddp_fork"
    ).fit(CNNModule(copy.deepcopy(net), batch_size=4, samples=32))
    folder = tmp_path / "ddp" / "lightning_tricks_logs" / "version_0"
    for name, reference in (("heatmap", single), ("heatmap_edges_l2", single_edges)):  # a second heatmap too
        matrix = np.load(folder / f"{name}_matrix.npy")
        assert matrix.shape == reference.matrix.shape == (2, 4)
        np.testing.assert_allclose(matrix, reference.matrix, rtol=1e-5, atol=1e-6)


def test_heatmap_figure_log_scale_blanks_non_finite_cells():
    from matplotlib.colors import LogNorm

    from lightning_tricks.plotting import plot_minibatch_heatmap

    matrix = np.array([[0.1, 1.0, np.nan], [10.0, 0.5, 2.0]])
    figure = plot_minibatch_heatmap(matrix, [4, 5], [0.2, 0.4, 0.6], metric="edges", log_scale=True)
    mesh = figure.axes[0].collections[0]
    assert isinstance(mesh.norm, LogNorm) and (mesh.norm.vmin, mesh.norm.vmax) == (0.1, 10.0)
    assert np.ma.getmaskarray(mesh.get_array()).sum() == 1
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["4", "5"]
    with pytest.raises(ValueError, match="batch_values"):
        plot_minibatch_heatmap(matrix, [4, 5], [0.2])


# -- issue 19: phases from the LR the steps used (finding 1) ---------------------------------------


class ScheduledModule(CNNModule):
    """A user module with a plain torch scheduler: MultiStepLR stepped per epoch, or a LambdaLR
    stepped per optimiser step whose LR at step s is ``lr · 0.1^(number of step milestones <= s)``."""

    def __init__(self, net, interval, milestones):
        super().__init__(net)
        self.interval, self.schedule_milestones = interval, milestones

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.interval == "epoch":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.schedule_milestones), 0.1)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.1 ** sum(step >= m for m in self.schedule_milestones)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


def reference_phases(step_lrs_per_epoch):
    """Epoch LR = the LR most of its steps used (ties: the later one); a phase = a maximal run of equal LRs."""
    lrs = []
    for values in step_lrs_per_epoch:
        lrs.append(
            max(values, key=lambda v: (values.count(v), max(i for i, w in enumerate(values) if w == v)))
        )
    phases = [0]
    for previous, lr in zip(lrs, lrs[1:]):
        phases.append(phases[-1] + (not math.isclose(lr, previous, rel_tol=1e-9)))
    return lrs, phases


@pytest.mark.parametrize(
    ("interval", "milestones"),
    [
        # torch MultiStepLR: epochs 0-1, 2-3, 4-5
        ("epoch", (2, 4)),
        # per step: the second decay inside epoch 3 (steps 15-19: 2 steps at 0.001·10, 3 at 0.001)
        ("step", (10, 17)),
        # one step late (the lag of a scheduler stepped before the epoch's first step ran)
        ("step", (11, 21)),
    ],
)
def test_phases_follow_the_learning_rate_the_steps_used(tmp_path, interval, milestones, trainer_for):
    epochs, batches = 6, 5
    heatmap = MinibatchHeatmap(progress=False)
    trainer_for([heatmap], max_epochs=epochs).fit(ScheduledModule(small_cnn(), interval, milestones))
    if interval == "epoch":
        step_lrs = [[0.1 * 0.1 ** sum(e >= m for m in milestones)] * batches for e in range(epochs)]
    else:
        step_lrs = [
            [0.1 * 0.1 ** sum(s >= m for m in milestones) for s in range(e * batches, (e + 1) * batches)]
            for e in range(epochs)
        ]
    lrs, phases = reference_phases(step_lrs)
    assert heatmap.phase_of_epoch == phases
    assert [lr for lr, _, _ in heatmap.learning_rates] == pytest.approx(lrs, rel=1e-9)
    np.testing.assert_allclose(
        [(first, last) for _, first, last in heatmap.learning_rates],
        [(values[0], values[-1]) for values in step_lrs],
        rtol=1e-9,
    )
    assert [row["lr"] for row in heatmap.history[::batches]] == pytest.approx(lrs, rel=1e-9)


# -- issue 19: metrics score the images, not the standardised tensors (finding 2) ------------------


class TintedRGB(ClassificationDataModule):
    """RGB images with one random tint each, served standardised per channel (mean/std below)."""

    num_classes, in_channels, image_size = 3, 3, 6
    mean, std = (0.3, 0.5, 0.7), (0.1, 0.2, 0.3)

    def __init__(self):
        super().__init__(batch_size=BATCH, num_workers=0, val_size=0, seed=0, stratify=False)

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(4)
        tint = torch.rand(SAMPLES, 3, 1, 1, generator=generator)
        self.raw = (tint * 0.7 + 0.3 * torch.rand(SAMPLES, 3, 6, 6, generator=generator)).clamp(0, 1)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        labels = torch.randint(0, 3, (SAMPLES,), generator=generator)
        self.train_set = TensorDataset((self.raw - mean) / std, labels)
        self.val_set = TensorDataset(self.raw[:0], labels[:0])


class RGBModule(CNNModule):
    def __init__(self):
        super().__init__(small_cnn(batch_norm=False))
        torch.manual_seed(0)
        self.net[0] = nn.Conv2d(3, 4, 3)

    def train_dataloader(self):
        return None


def reference_order(raw: torch.Tensor, metric: str) -> list[int]:
    """Sorted sample indices from the raw images: float64 sums, colorsys HSV of the mean colour, Canny counts."""
    raw64 = raw.double()
    if metric == "intensity":
        keys = [(float(image.sum()),) for image in raw64]
    elif metric == "color":
        keys = [colorsys.rgb_to_hsv(*image.mean(dim=(1, 2)).tolist()) for image in raw64]
    else:
        keys = [(float(count),) for count in edges(raw)]
    return sorted(range(len(keys)), key=lambda i: (keys[i], i))


@pytest.mark.parametrize("metric", ["intensity", "color", "edges"])
def test_metrics_score_the_images_before_normalisation(tmp_path, metric, trainer_for):
    datamodule = TintedRGB()
    heatmap = MinibatchHeatmap(metric=metric, progress=False)
    trainer_for([heatmap]).fit(RGBModule(), datamodule=datamodule)
    order = reference_order(datamodule.raw, metric)
    assert heatmap._batches.sampler.order.tolist() == order
    primary = {
        "intensity": datamodule.raw.double().sum(dim=(1, 2, 3)),
        "color": torch.tensor(
            [colorsys.rgb_to_hsv(*im.mean(dim=(1, 2)).tolist())[0] for im in datamodule.raw.double()]
        ),
        "edges": edges(datamodule.raw).double(),
    }[metric]
    expected = [float(primary[order[k : k + BATCH]].mean()) for k in range(0, SAMPLES, BATCH)]
    np.testing.assert_allclose(heatmap.batch_values, expected, rtol=1e-5, atol=1e-6)
    if metric != "intensity":  # a positive affine map keeps intensity's order, not these
        scores = {"color": color, "edges": edges}[metric](datamodule.train_set.tensors[0])
        assert metric_order(scores).tolist() != order, "the test data tell the two apart"


def test_digits_denormalize_gives_the_stored_pixels():
    from sklearn.datasets import load_digits

    from lightning_tricks.datamodules import DigitsDataModule

    datamodule = DigitsDataModule(image_size=8, channels=3, val_size=0, test_size=0.2)
    datamodule.setup("fit")
    raw = torch.from_numpy(load_digits().images[datamodule.train_indices]).float() / 16
    images = datamodule.train_set.tensors[0]
    assert images.min() < 0, "the loader's tensors are standardised"
    np.testing.assert_allclose(datamodule.denormalize(images), raw[:, None].expand(-1, 3, -1, -1), atol=1e-6)


class FlatClassifier(pl.LightningModule):
    """A linear classifier over the flattened images of a torchvision datamodule."""

    def __init__(self, channels: int, size: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes))

    def compute_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def validation_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "svhn"])
def test_torchvision_datamodules_are_scored_on_the_stored_images_not_an_augmented_view(
    tmp_path, monkeypatch, name, trainer_for
):
    from test_datamodules import FORMATS

    spec = FORMATS[name]
    written = spec.write(tmp_path / "data", np.random.default_rng(7))
    spec.trust(monkeypatch, tmp_path / "data")

    def fit_order(seed: int) -> tuple[list[int], np.ndarray, ClassificationDataModule]:
        pl.seed_everything(seed, verbose=False)
        datamodule = spec.datamodule(
            tmp_path / "data", batch_size=BATCH, val_size=spec.val_size, augment=True
        )
        heatmap = MinibatchHeatmap(metric="intensity", progress=False)
        module = FlatClassifier(datamodule.in_channels, datamodule.image_size, datamodule.num_classes)
        trainer_for([heatmap], limit_train_batches=1, limit_val_batches=0).fit(module, datamodule=datamodule)
        return heatmap._batches.sampler.order.tolist(), heatmap.batch_values, datamodule

    order, values, datamodule = fit_order(1)
    stored = written.train_images[datamodule.train_indices]  # (N, H, W, C) uint8, in train_set order
    sums = [float(image.astype(np.float64).sum() / 255) for image in stored]
    reference = sorted(range(len(sums)), key=lambda i: (sums[i], i))
    assert order == reference
    expected = [np.mean([sums[i] for i in reference[k : k + BATCH]]) for k in range(0, len(sums), BATCH)]
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    assert fit_order(2)[0] == order, "a fit with another seed sorts the same way"
    torch.manual_seed(0)
    augmented = torch.stack([datamodule.train_set[i][0] for i in range(len(sums))])
    assert metric_order(intensity(datamodule.denormalize(augmented))).tolist() != order, "the crops move it"


def test_an_unaugmented_view_of_another_length_is_refused(tmp_path, trainer_for):
    class ShortView(TintedRGB):
        def unaugmented_train_set(self):
            return TensorDataset(*(tensor[:-1] for tensor in self.train_set.tensors))

    trainer = trainer_for([MinibatchHeatmap(progress=False)])
    with pytest.raises(ValueError, match=r"unaugmented_train_set\(\) has 35 samples.*train_set` 36"):
        trainer.fit(RGBModule(), datamodule=ShortView())


def test_color_on_grey_images_warns(tmp_path, trainer_for):
    with pytest.warns(UserWarning, match="grey"):
        trainer_for([MinibatchHeatmap(metric="color", progress=False)], max_epochs=1).fit(
            CNNModule(small_cnn())
        )


# -- issue 19: several heatmaps on one Trainer (finding 3) -----------------------------------------


class EpochStartWeights(pl.Callback):
    def __init__(self):
        self.nets = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.nets.append(copy.deepcopy(pl_module.net))


def distances_of_batches(nets, data, batches):
    """‖∇_k − ∇_e‖ of each batch at each epoch-start network, plain loops in float64."""
    images, labels = data.tensors
    rows = []
    for net in nets:
        net = copy.deepcopy(net).double()
        gradients = []
        for index in batches:
            net.zero_grad()
            F.cross_entropy(net(images[index].double()), labels[index]).backward()
            gradients.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        stacked = torch.stack(gradients)
        sizes = torch.tensor([len(index) for index in batches], dtype=torch.float64)
        full = (sizes[:, None] * stacked).sum(0) / sizes.sum()
        rows.append([float((g - full).norm()) for g in stacked])
    return np.array(rows)


def test_a_second_heatmap_measures_its_own_batches_without_changing_training(tmp_path, trainer_for):
    net = small_cnn(batch_norm=False)
    alone = MinibatchHeatmap(mode="exact", progress=False)
    module_alone = CNNModule(copy.deepcopy(net))
    trainer_for([alone], max_epochs=2, default_root_dir=tmp_path / "alone").fit(module_alone)

    leader = MinibatchHeatmap(mode="exact", progress=False)
    second = MinibatchHeatmap(metric="edges", mode="exact", memory_budget=4 * 367, progress=False)
    weights = EpochStartWeights()
    module = CNNModule(copy.deepcopy(net))
    trainer_for([leader, second, weights], max_epochs=2, default_root_dir=tmp_path / "both").fit(module)

    for a, b in zip(module_alone.parameters(), module.parameters()):
        assert torch.equal(a, b), "the second heatmap does not change training"
    np.testing.assert_array_equal(leader.matrix, alone.matrix)
    data = module.data
    order = torch.tensor(
        sorted(range(SAMPLES), key=lambda i: (float(edges(data.tensors[0][i : i + 1])[0]), i))
    )
    reference = distances_of_batches(weights.nets, data, list(order.split(BATCH)))
    np.testing.assert_allclose(second.matrix, reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(second.matrix, leader.matrix)

    folder = leader.run_dir
    assert second.run_dir == folder
    files = set(os.listdir(folder))
    assert {"heatmap_matrix.npy", "heatmap.csv", "heatmap.phase_0.png"} <= files
    assert {"heatmap_edges_l2_matrix.npy", "heatmap_edges_l2.csv", "heatmap_edges_l2.phase_0.png"} <= files
    np.testing.assert_array_equal(np.load(os.path.join(folder, "heatmap_edges_l2_matrix.npy")), second.matrix)
    assert not any(name.endswith(".tmp.npy") for name in files)
    with open(os.path.join(folder, "lightning_tricks.json")) as handle:
        entries = json.load(handle)["callbacks"]
    assert entries["heatmap"]["hyperparameters"]["metric"] == "intensity"
    assert entries["heatmap_edges_l2"]["hyperparameters"]["metric"] == "edges"
    for heatmap in (leader, second):  # results reads each heatmap's own records back
        records = load_minibatch_heatmap(folder, namespace=heatmap.namespace)
        read = np.array([[r["distance"] for r in records if r["epoch"] == e] for e in heatmap.epochs])
        np.testing.assert_allclose(read, heatmap.matrix, rtol=1e-6)


def test_two_identical_heatmaps_are_refused(tmp_path, trainer_for):
    """Lightning refuses two callbacks with one ``state_key`` (metric, descending, distance): they would
    measure the same matrix, and their files could not be told apart."""
    with pytest.raises(RuntimeError, match="state_key"):
        trainer_for([MinibatchHeatmap(progress=False), MinibatchHeatmap(progress=False)], max_epochs=3).fit(
            CNNModule(small_cnn())
        )


# -- issue 19: resume from a checkpoint of an epoch's last batch (finding 11) ----------------------


@pytest.mark.parametrize("resume_step", [5, 10])
def test_resume_from_a_step_checkpoint_on_an_epochs_last_batch(tmp_path, resume_step, trainer_for):
    net = small_cnn()
    uninterrupted = MinibatchHeatmap(progress=False)
    trainer_for([uninterrupted], max_epochs=4, default_root_dir=tmp_path / "full").fit(
        CNNModule(copy.deepcopy(net))
    )

    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    first = MinibatchHeatmap(progress=False)
    trainer_for(
        [first, checkpoint], max_epochs=3, default_root_dir=tmp_path / "part", enable_checkpointing=True
    ).fit(CNNModule(copy.deepcopy(net)))
    resumed = MinibatchHeatmap(progress=False)
    trainer_for([resumed], max_epochs=4, default_root_dir=tmp_path / "part").fit(
        CNNModule(copy.deepcopy(net)), ckpt_path=str(tmp_path / "ckpt" / f"step={resume_step}.ckpt")
    )
    assert resumed.epochs == uninterrupted.epochs == [0, 1, 2, 3]
    np.testing.assert_allclose(resumed.matrix, uninterrupted.matrix, rtol=0, atol=1e-6)


# -- issue 20 finding 7: the remainder batch is marked -------------------------------------------


def test_the_short_remainder_batch_is_marked_in_the_figure(tmp_path, trainer_for):
    heatmap = MinibatchHeatmap(progress=False)
    trainer_for([heatmap], max_epochs=1).fit(CNNModule(small_cnn()))
    axes = heatmap.phase_figure(0).axes[0]
    assert axes.get_xlabel().endswith(
        f"hatched: batch 4, the remainder ({SAMPLES % BATCH} of {BATCH} samples)"
    )
    assert [patch.get_hatch() for patch in axes.patches] == ["//"]
    even = MinibatchHeatmap(progress=False)
    trainer_for([even], max_epochs=1, default_root_dir=tmp_path / "even").fit(
        CNNModule(small_cnn(), samples=32)
    )
    axes = even.phase_figure(0).axes[0]
    assert "remainder" not in axes.get_xlabel() and len(axes.patches) == 0


# -- issue 20 finding 8: progress in the Trainer's bar, and none without it --------------------------

OUR_BARS = ("scoring images by", "gradients at the epoch-start weights")


def test_no_bar_of_ours_without_the_trainers_progress_bar(tmp_path, trainer_for, capfd):
    """``progress=True`` (the default) with ``Trainer(enable_progress_bar=False)``: nothing of ours on
    stdout or stderr, for the scoring and for a second heatmap's pass."""
    heatmaps = [MinibatchHeatmap(), MinibatchHeatmap(metric="edges")]
    trainer_for(heatmaps, max_epochs=1).fit(CNNModule(small_cnn()))
    out, err = capfd.readouterr()
    for text in (out, err):
        assert not any(bar in text for bar in OUR_BARS), text
        assert "it/s]" not in text and "s/it]" not in text, text


def test_the_scoring_and_a_second_heatmaps_pass_show_in_the_trainers_progress_bar(
    tmp_path, trainer_for, capfd
):
    """Lightning's bar conventions: on stdout, counted to the end (36 images, 5 batches), a bar
    redrawn as the Trainer's; ``progress=False`` hides ours and leaves the Trainer's."""
    heatmaps = [MinibatchHeatmap(), MinibatchHeatmap(metric="edges")]
    trainer_for(heatmaps, max_epochs=2, enable_progress_bar=True).fit(CNNModule(small_cnn()))
    out, err = capfd.readouterr()
    for metric in ("intensity", "edges"):
        assert re.search(rf"scoring images by {metric}: 100%.*36/36", out), out
    passes = re.findall(
        r"heatmap_edges_l2: gradients at the epoch-start weights: +(\d+)%[^\r\n]*?(\d+)/5", out
    )
    assert ("100", "5") in passes and ("0", "0") in passes, passes
    assert not any(bar in err for bar in OUR_BARS), err

    quiet = [MinibatchHeatmap(progress=False), MinibatchHeatmap(metric="edges", progress=False)]
    trainer_for(quiet, max_epochs=1, enable_progress_bar=True, default_root_dir=tmp_path / "b").fit(
        CNNModule(small_cnn())
    )
    out, err = capfd.readouterr()
    assert "Epoch 0" in out and not any(bar in out + err for bar in OUR_BARS), out


def test_checkpoint_states_of_earlier_releases_load():
    """A state written before the table moved out of the callback (one LR per epoch, as the first
    release wrote it, and the ``(lr, first, last)`` triples since) loads as it was written."""
    state = {
        "rows": [[1.0, 2.0], [3.0, 4.0]],
        "epochs": [0, 1],
        "lrs": [0.1, [0.01, 0.1, 0.01]],
        "batch_values": [0.5, 1.5],
        "fingerprint": [36, 2, 123],
    }
    heatmap = MinibatchHeatmap(phases="lr")
    heatmap.set_state(state)
    assert heatmap.learning_rates == [(0.1, 0.1, 0.1), (0.01, 0.1, 0.01)]
    assert heatmap.phase_of_epoch == [0, 1]
    np.testing.assert_array_equal(heatmap.matrix, [[1.0, 2.0], [3.0, 4.0]])
    assert heatmap.get_state() == {
        **state,
        "lrs": [[0.1, 0.1, 0.1], [0.01, 0.1, 0.01]],
        "fingerprint": (36, 2, 123),
    }


@pytest.mark.parametrize(
    ("step_lrs", "expected"),
    [([0.1, 0.1, 0.01], (0.1, 0.1, 0.01)), ([0.1, 0.01], (0.01, 0.1, 0.01)), ([0.2], (0.2, 0.2, 0.2))],
)
def test_an_epochs_learning_rate_is_the_one_most_steps_used_ties_to_the_later(step_lrs, expected):
    assert epoch_learning_rates(step_lrs) == expected


def test_further_heatmaps_are_named_by_metric_order_and_distance():
    assert heatmap_namespace("edges", False, "l2") == "heatmap_edges_l2"
    assert heatmap_namespace("my metric/v2", True, "cosine") == "heatmap_my_metric_v2_descending_cosine"
    assert heatmap_file("matrix", "heatmap_edges_l2") == "heatmap_edges_l2_matrix"
    assert heatmap_file("history", "heatmap") == "heatmap.csv"
    assert heatmap_file("spill", "heatmap_color_l2") == "heatmap_color_l2_gradients.tmp.npy"
