"""MinibatchHeatmap resumed from step checkpoints, against the uninterrupted fit, epoch by epoch.

A row needs the epoch-start weights θ_e, which checkpoints do not hold (they stay small): a fit
resumed inside a measured epoch has no row for it and says so once, naming the epoch; every other
row equals the uninterrupted fit's, and the run folder agrees with the callback. The fixed batches
resume where the checkpoint left them, so training is the uninterrupted fit's too.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_tricks import MinibatchHeatmap
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.image_metrics import intensity
from lightning_tricks.results import load_minibatch_heatmap
from lightning_tricks.samplers import MetricSortedBatchSampler

BATCH = 300  # 1,438 training digits: 5 batches an epoch, the last of 238
EPOCHS = 3
LOST = r"MinibatchHeatmap \({namespace}\): resumed inside epoch {epoch}.* no row"

pytestmark = pytest.mark.usefixtures("single_thread")


def softmax_loss(module, batch):
    """The loss of the conftest's ``DigitsSoftmax`` (its ``training_step`` without the bookkeeping)."""
    images, labels = batch
    return F.cross_entropy(module.layer(images.flatten(1)), labels)


def heatmaps(every_n_epochs: int) -> list[MinibatchHeatmap]:
    """The leading heatmap (intensity, orders training) and a second one (edges, its own batches)."""
    options = dict(loss_fn=softmax_loss, every_n_epochs=every_n_epochs, mode="exact", progress=False)
    return [MinibatchHeatmap(**options), MinibatchHeatmap(metric="edges", **options)]


def sorted_by_hand(datamodule: DigitsDataModule) -> DigitsDataModule:
    """``datamodule`` with a user's own loader of intensity-sorted batches (the heatmap keeps it)."""

    def loader() -> DataLoader:
        images = datamodule.train_set.tensors[0]
        sampler = MetricSortedBatchSampler(intensity(images), BATCH)
        return DataLoader(datamodule.train_set, batch_sampler=sampler)

    datamodule.train_dataloader = loader
    return datamodule


@pytest.fixture
def fit_digits(tmp_path, trainer_for, digits_module):
    """``fit_digits(name, every_n_epochs, by_hand, ckpt_path=None, max_steps=-1)``: the two
    :func:`heatmaps` on the conftest's digits softmax regression for :data:`EPOCHS` epochs (stopped
    after ``max_steps`` if given; on a loader :func:`sorted_by_hand` if ``by_hand``) in
    ``tmp_path / name``, a checkpoint ``step=<n>.ckpt`` after every step; returns the heatmaps and
    the module."""

    def fit(
        name: str, every_n_epochs: int, by_hand: bool, ckpt_path: Path | None = None, max_steps: int = -1
    ):
        callbacks = heatmaps(every_n_epochs)
        saver = ModelCheckpoint(
            tmp_path / name / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"
        )
        trainer = trainer_for(
            [*callbacks, saver],
            max_epochs=EPOCHS,
            max_steps=max_steps,
            default_root_dir=tmp_path / name,
            enable_checkpointing=True,
        )
        assert trainer.log_every_n_steps == 50, "the Trainer's default"
        module = digits_module()
        datamodule = DigitsDataModule(image_size=8, batch_size=BATCH, val_size=0)
        trainer.fit(
            module, datamodule=sorted_by_hand(datamodule) if by_hand else datamodule, ckpt_path=ckpt_path
        )
        assert trainer.num_training_batches == 5
        return callbacks, module

    return fit


@pytest.mark.parametrize(
    ("every_n_epochs", "resume_step", "lost", "by_hand"),
    [
        (1, 3, 0, False),  # inside measured epoch 0: its row is lost
        (1, 7, 1, False),  # inside measured epoch 1, after epoch 0's row
        (1, 5, None, False),  # on epoch 0's last batch: its row is in the checkpoint
        (2, 7, None, False),  # inside epoch 1, which is not measured
        (1, 7, 1, True),  # the user's own sorted loader goes on with the epoch's next batch too
    ],
)
def test_a_resumed_fit_has_every_row_but_the_one_of_a_measured_epoch_it_restarted_inside(
    tmp_path, fit_digits, every_n_epochs, resume_step, lost, by_hand
):
    full, full_module = fit_digits("full", every_n_epochs, by_hand)
    assert [heatmap.epochs for heatmap in full] == [list(range(0, EPOCHS, every_n_epochs))] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_digits("killed", every_n_epochs, by_hand, max_steps=resume_step)
    stopped = [str(w.message) for w in caught if "the fit stopped before the last batch" in str(w.message)]
    assert len(stopped) == (2 if lost is not None else 0), "no half row of the epoch it stopped inside"
    checkpoint = tmp_path / "killed" / "ckpt" / f"step={resume_step}.ckpt"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, module = fit_digits("killed", every_n_epochs, by_hand, ckpt_path=checkpoint)

    messages = [str(w.message) for w in caught]
    for heatmap, reference in zip(resumed, full):
        pattern = LOST.format(namespace=re.escape(heatmap.namespace), epoch=lost)
        warned = [
            m
            for m in messages
            if re.search(LOST.format(namespace=re.escape(heatmap.namespace), epoch=r"\d+"), m)
        ]
        if lost is None:
            assert warned == []
            assert heatmap.epochs == reference.epochs
        else:
            assert len(warned) == 1 and re.search(pattern, warned[0]), warned
            assert "epoch-start weights" in warned[0] and "save_on_train_epoch_end=True" in warned[0]
            assert heatmap.epochs == [e for e in reference.epochs if e != lost]
        for epoch, row in zip(heatmap.epochs, heatmap.matrix):  # the others exact
            np.testing.assert_array_equal(row, reference.matrix[reference.epochs.index(epoch)])
        assert heatmap.learning_rates == [
            reference.learning_rates[reference.epochs.index(e)] for e in heatmap.epochs
        ]
        assert_run_folder_agrees(heatmap)
        chained = load_minibatch_heatmap(heatmap.run_dir, namespace=heatmap.namespace)  # the killed fit's too
        assert [(r["epoch"], r["batch"], r["distance"]) for r in chained] == [
            (r["epoch"], r["batch"], pytest.approx(r["distance"], rel=1e-12)) for r in heatmap.history
        ]

    assert len(module.batches) == EPOCHS * 5 - resume_step, "the epoch goes on with its next batch"
    for ours, theirs in zip(module.batches, full_module.batches[resume_step:]):
        assert torch.equal(ours, theirs)
    for (name, ours), theirs in zip(module.state_dict().items(), full_module.state_dict().values()):
        assert torch.equal(ours, theirs), name


def assert_run_folder_agrees(heatmap: MinibatchHeatmap) -> None:
    """The matrix file, its CSV, the history ``results`` reads back and the figures hold the
    callback's rows and nothing else (no half row, no NaN)."""
    folder = Path(heatmap.run_dir)
    ns = heatmap.namespace
    assert np.isfinite(heatmap.matrix).all() and heatmap.matrix.shape == (len(heatmap.epochs), 5)
    np.testing.assert_array_equal(np.load(folder / f"{ns}_matrix.npy"), heatmap.matrix)
    csv = np.loadtxt(folder / f"{ns}_matrix.csv", delimiter=",", skiprows=1, ndmin=2)
    assert csv[:, 0].tolist() == heatmap.epochs
    np.testing.assert_allclose(csv[:, 1:], heatmap.matrix, rtol=1e-12)
    records = load_minibatch_heatmap(folder, follow_resumes=False, namespace=ns)
    assert sorted({r["epoch"] for r in records}) == heatmap.epochs
    read = np.array([[r["distance"] for r in records if r["epoch"] == e] for e in heatmap.epochs])
    np.testing.assert_allclose(read, heatmap.matrix, rtol=1e-12)
    for phase in sorted(set(heatmap.phase_of_epoch)):
        assert (folder / f"{ns}.phase_{phase}.png").is_file()


def test_under_ddp_a_fit_resumed_inside_a_measured_epoch_loses_only_that_row(
    tmp_path, trainer_for, digits_module
):
    """Two processes (global batches of 600: 3 an epoch), resumed from the checkpoint of step 1: the
    run folder has epoch 1's row of the uninterrupted fit, bit for bit, and no row of epoch 0."""

    def fit(name: str, max_steps: int = -1, ckpt_path: Path | None = None) -> Path:
        saver = ModelCheckpoint(
            tmp_path / name / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"
        )
        options = dict(devices=2, strategy="ddp_fork", enable_checkpointing=True)
        trainer = trainer_for(
            [heatmaps(1)[0], saver],
            max_epochs=2,
            max_steps=max_steps,
            default_root_dir=tmp_path / name,
            **options,
        )
        datamodule = DigitsDataModule(image_size=8, batch_size=BATCH, val_size=0)
        trainer.fit(digits_module(), datamodule=datamodule, ckpt_path=ckpt_path)
        return tmp_path / name / "lightning_tricks_logs"

    full = np.load(fit("full") / "version_0" / "heatmap_matrix.npy")
    killed = fit("parts", max_steps=1)
    assert full.shape == (2, 3) and not (killed / "version_0" / "heatmap_matrix.npy").exists()
    resumed = fit("parts", ckpt_path=tmp_path / "parts" / "ckpt" / "step=1.ckpt") / "version_1"
    np.testing.assert_array_equal(np.load(resumed / "heatmap_matrix.npy"), full[1:])
    csv = np.loadtxt(resumed / "heatmap_matrix.csv", delimiter=",", skiprows=1, ndmin=2)
    assert csv[:, 0].tolist() == [1]
