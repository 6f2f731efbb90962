"""BatchSizeScheduler: the batches training_step receives follow seed 004's dynamic sampling
(004_e5d92837cb57ce8a.txt §4.3: five equal stages, -MS per learning-rate stage) exactly, on a
user-written module and datamodule."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import BatchSizeScheduler, FisherSpectrum
from lightning_tricks.batch_size_policies import (
    BatchSizePolicy,
    DecayToBatchPolicy,
    Decision,
    ExplicitPolicy,
    NormTestPolicy,
    PolicyContext,
    StagedPolicy,
    split_physical,
    stage_of,
)
from lightning_tricks.plotting import plot_batch_size_schedule

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


class Recorder(pl.LightningModule):
    """A user's module: records (epoch, batch length, lr) for every training_step."""

    def __init__(self, scheduler: str = "none", lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        self.scheduler, self.lr = scheduler, lr
        self.seen: list[tuple[int, int, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, len(x), self.optimizers().param_groups[0]["lr"]))
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler == "multistep":
            return [optimizer], [
                torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[4, 6], gamma=0.1)
            ]
        if self.scheduler == "lambda":
            return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)]
        return optimizer


class Data(pl.LightningDataModule):
    """A user's datamodule with Lightning's `batch_size` convention."""

    def __init__(self, samples: int = 64, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(samples, 3, generator=generator, dtype=torch.float64)
        self.dataset = TensorDataset(x, (x.sum(1) > 0).long())

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size)


def sizes_per_epoch(module: Recorder) -> dict[int, set[int]]:
    """Batch lengths per epoch, ignoring the last partial batch."""
    per_epoch: dict[int, list[int]] = {}
    for epoch, length, _ in module.seen:
        per_epoch.setdefault(epoch, []).append(length)
    return {epoch: set(lengths[:-1]) or set(lengths) for epoch, lengths in per_epoch.items()}


# -- policies ---------------------------------------------------------------------------------


def test_stages_are_equal_and_later_stages_take_the_remainder():
    assert [stage_of(e, 10, 5) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [stage_of(e, 10, 3) for e in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [stage_of(e, 3, 5) for e in range(4)] == [1, 3, 4, 4]


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ((32, 64, 128, 256, 512), [32, 32, 64, 64, 128, 128, 256, 256, 512, 512]),
        ((512, 256, 128, 64, 32), [512, 512, 256, 256, 128, 128, 64, 64, 32, 32]),
        ((16, 16, 32, 32, 64), [16, 16, 16, 16, 32, 32, 32, 32, 64, 64]),
    ],
    ids=["s32-to-512", "s512-to-32", "s16-to-64"],
)
def test_seed_004_staged_policies(sizes, expected):
    assert [StagedPolicy(sizes).size_at(e, 10) for e in range(10)] == expected


def test_multistep_reruns_the_sequence_inside_each_lr_stage():
    policy = StagedPolicy((32, 64, 128, 256, 512), multistep=True)
    sizes = [policy.size_at(e, 20, [10, 15]) for e in range(20)]
    assert sizes == [32, 32, 64, 64, 128, 128, 256, 256, 512, 512, 32, 64, 128, 256, 512] + [
        32,
        64,
        128,
        256,
        512,
    ]


def test_explicit_policy_and_physical_split():
    policy = ExplicitPolicy({2: 16, 5: 8})
    assert [policy.size_at(e, initial=4) for e in range(7)] == [4, 4, 16, 16, 16, 8, 8]
    assert split_physical(512, 128) == (128, 4)
    assert split_physical(96, 40) == (32, 3)
    assert split_physical(512, None, world_size=2) == (256, 1)
    with pytest.raises(ValueError, match="divisible by 2"):
        split_physical(33, None, world_size=2)


def test_increase_instead_of_decay_grows_by_one_over_gamma_up_to_the_maximum():
    policy = DecayToBatchPolicy(gamma=0.5, max_size=16)
    assert [policy.size_at(e, 4, [2, 4, 6]) for e in range(8)] == [4, 4, 8, 8, 16, 16, 16, 16]
    assert DecayToBatchPolicy(gamma=0.1, max_size=8).size_at(5, 32, [1]) == 32, "never below the start"


def test_norm_test_grows_to_the_first_size_that_passes():
    policy = NormTestPolicy(theta=1.0, growth=2.0, max_size=256)
    assert [policy.next_size(2, b) for b in (0.0, 2.0, 16.0, 17.0, 1e9)] == [2, 2, 16, 32, 256]
    assert NormTestPolicy(theta=0.5, growth=2.0, max_size=256).next_size(2, 16.0) == 64, "B >= B_noise/θ²"
    assert policy.next_size(8, math.inf) == 16 and policy.next_size(8, math.nan) == 8


# -- on a Trainer ------------------------------------------------------------------------------


def test_training_step_receives_the_staged_sizes(trainer_for, tmp_path):
    module, data = Recorder(), Data(samples=64)
    scheduler = BatchSizeScheduler.staged([2, 4, 8, 16, 32])
    trainer_for([scheduler], max_epochs=10).fit(module, datamodule=data)
    expected = [2, 2, 4, 4, 8, 8, 16, 16, 32, 32]
    assert sizes_per_epoch(module) == {e: {size} for e, size in enumerate(expected)}
    assert [r["size"] for r in scheduler.history] == [2, 4, 8, 16, 32]
    assert [r["epoch"] for r in scheduler.history] == [0, 2, 4, 6, 8]


def test_explicit_schedule_on_the_module_attribute(trainer_for, tmp_path):
    class ModuleWithLoader(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 4
            self.data = Data(samples=48)

        def train_dataloader(self):
            return DataLoader(self.data.dataset, batch_size=self.batch_size)

    module = ModuleWithLoader()
    trainer_for([BatchSizeScheduler(schedule={1: 8, 3: 2})], max_epochs=4).fit(module)
    assert sizes_per_epoch(module) == {0: {4}, 1: {8}, 2: {8}, 3: {2}}


def test_multistep_reads_multisteplr_milestones(trainer_for, tmp_path):
    module, data = Recorder(scheduler="multistep"), Data(samples=32)
    scheduler = BatchSizeScheduler.staged([2, 4], multistep=True)
    trainer_for([scheduler], max_epochs=8).fit(module, datamodule=data)
    # LR stages [0, 4), [4, 6), [6, 8): the sequence 2, 4 inside each
    assert sizes_per_epoch(module) == {0: {2}, 1: {2}, 2: {4}, 3: {4}, 4: {2}, 5: {4}, 6: {2}, 7: {4}}


def test_multistep_with_fractional_milestones(trainer_for, tmp_path):
    module, data = Recorder(), Data(samples=32)
    scheduler = BatchSizeScheduler.staged([2, 4], multistep=True, lr_milestones=[0.5])
    trainer_for([scheduler], max_epochs=4).fit(module, datamodule=data)
    assert sizes_per_epoch(module) == {0: {2}, 1: {4}, 2: {2}, 3: {4}}


@pytest.mark.parametrize(("scaling", "power"), [("linear", 1.0), ("sqrt", 0.5), ("none", 0.0)])
@pytest.mark.parametrize("kind", ["multistep", "lambda"])
def test_lr_scaling_composes_with_lr_schedulers(trainer_for, tmp_path, scaling, power, kind):
    sizes = [2, 4, 8, 16]
    module, data = Recorder(scheduler=kind), Data(samples=32)
    scheduler = BatchSizeScheduler(sizes=sizes, lr_scaling=scaling)
    trainer_for([scheduler], max_epochs=8).fit(module, datamodule=data)
    lr_per_epoch = {epoch: lr for epoch, _, lr in module.seen}
    for epoch in range(8):
        base = 0.1 * (0.1 ** sum(epoch >= m for m in (4, 6)) if kind == "multistep" else 0.5**epoch)
        size = sizes[epoch // 2]
        assert lr_per_epoch[epoch] == pytest.approx(base * (size / 2) ** power, rel=1e-12), epoch


def test_increase_instead_of_decay_keeps_the_lr_until_the_batch_is_at_its_maximum(trainer_for, tmp_path):
    """MultiStepLR(milestones=[4, 6], gamma=0.1): at epoch 4 the batch grows 2 → 20 and the LR stays
    0.1; at epoch 6 the batch is at max_size = 20, so the LR decays to 0.01 (Smith et al. 2018)."""
    module, data = Recorder(scheduler="multistep"), Data(samples=64, batch_size=2)
    scheduler = BatchSizeScheduler.increase_instead_of_decay(max_size=20)
    trainer_for([scheduler], max_epochs=8).fit(module, datamodule=data)
    assert sizes_per_epoch(module) == {e: {2 if e < 4 else 20} for e in range(8)}
    lr_per_epoch = {epoch: lr for epoch, _, lr in module.seen}
    assert [lr_per_epoch[e] for e in range(8)] == pytest.approx([0.1] * 6 + [0.01] * 2, rel=1e-12)
    assert scheduler.lr_scaling == "linear"


class NoiseScaleProblem(pl.LightningModule):
    """Per-sample gradients g_i = -2 x_i at w = 0 (lr = 0 keeps w there) with x_i = μ + ε_i,
    |μ|² = 1, ε_i ~ N(0, I_16): tr Σ = 4·16 and |G|² = 4, so the noise scale B_noise is exactly 16;
    ``noise=False`` gives identical samples (B_noise = 0)."""

    def __init__(self, noise: bool, samples: int = 1024, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.net = nn.Linear(16, 1, bias=False).double()
        nn.init.zeros_(self.net.weight)
        generator = torch.Generator().manual_seed(3)
        x = torch.zeros(samples, 16, dtype=torch.float64)
        x[:, 0] = 1.0
        if noise:
            x += torch.randn(samples, 16, generator=generator, dtype=torch.float64)
        self.data = TensorDataset(x, torch.ones(samples, 1, dtype=torch.float64))
        self.sizes: list[int] = []

    def compute_loss(self, batch):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        self.sizes.append(len(batch[0]))
        return self.compute_loss(batch)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("noise", [True, False], ids=["noisy", "noiseless"])
def test_adaptive_policy_settles_at_the_known_noise_scale(trainer_for, tmp_path, noise):
    module = NoiseScaleProblem(noise)
    fisher = FisherSpectrum()
    scheduler = BatchSizeScheduler.noise_adaptive(max_size=256)
    trainer_for([fisher, scheduler], max_epochs=4).fit(module)
    sizes = [record["size"] for record in scheduler.history]
    if noise:  # B_noise = 16: the first power of two that passes the norm test is 16 (32 if over-estimated)
        assert sizes[0] == 2 and sizes[-1] in (16, 32) and sizes == sorted(sizes)
        assert 12 < fisher.epoch_noise_scale < 20 and scheduler.noise_scale == fisher.epoch_noise_scale
    else:
        assert sizes == [2] and set(module.sizes) == {2}


def test_adaptive_policy_without_fisher_spectrum_uses_its_own_two_batch_estimate(trainer_for, tmp_path):
    """No FisherSpectrum: the halves of every noise_every_n_steps-th batch give tr Σ and |G|²
    (McCandlish et al. appendix A.1); B_noise = 16 is found again."""
    module = NoiseScaleProblem(noise=True)
    scheduler = BatchSizeScheduler.noise_adaptive(max_size=256, noise_every_n_steps=2)
    trainer_for([scheduler], max_epochs=3).fit(module)
    sizes = [record["size"] for record in scheduler.history]
    assert sizes[0] == 2 and sizes[-1] in (16, 32)
    assert 12 < scheduler.noise_scale < 20


class RepeatedBatchProblem(NoiseScaleProblem):
    """32 noisy samples repeated: every batch is the same, so a resumed epoch trains on the data it
    would have (a plain loader restarts it from its first batch), and SGD moves the weights."""

    def __init__(self) -> None:
        super().__init__(noise=True, samples=32, batch_size=32)
        x, y = self.data.tensors
        self.data = TensorDataset(x.repeat(4, 1), y.repeat(4, 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_resume_mid_epoch_keeps_the_own_estimates_of_the_epoch(trainer_for, tmp_path):
    def fit(callbacks, ckpt_path=None):
        scheduler = BatchSizeScheduler.noise_adaptive(max_size=128, noise_every_n_steps=1)
        trainer_for([scheduler, *callbacks], max_epochs=1, enable_checkpointing=True).fit(
            RepeatedBatchProblem(), ckpt_path=ckpt_path
        )
        return scheduler.noise_scale

    full = fit([])
    fit([ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)])
    resumed = fit([], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert math.isfinite(full) and resumed == pytest.approx(full, rel=1e-9)


def test_adaptive_policy_without_fisher_spectrum_needs_a_loss(trainer_for, tmp_path):
    class NoLoss(NoiseScaleProblem):
        compute_loss = None

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

    with pytest.raises(ValueError, match="compute_loss"):
        trainer_for([BatchSizeScheduler.noise_adaptive(max_size=64)], max_epochs=1).fit(NoLoss(True))


def test_accumulation_fallback_gives_the_large_batch_gradient(trainer_for, tmp_path):
    """max_physical_batch_size: 16 samples as 4 micro-batches of 4 = one batch of 16 (float64)."""
    runs = {}
    for name, cap in {"large": None, "capped": 4}.items():
        module, data = Recorder(), Data(samples=64)
        scheduler = BatchSizeScheduler(schedule={0: 16}, max_physical_batch_size=cap)
        trainer_for(default_root_dir=tmp_path / name, callbacks=[scheduler], max_epochs=2).fit(
            module, datamodule=data
        )
        runs[name] = (module, scheduler)
    large, capped = runs["large"][0], runs["capped"][0]
    assert {length for _, length, _ in capped.seen} == {4}
    assert runs["capped"][1].history[0] | {"lr": 0} == {
        "epoch": 0,
        "step": 0,
        "size": 16,
        "physical": 4,
        "accumulation": 4,
        "lr": 0,
    }
    for p, q in zip(large.parameters(), capped.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert not torch.equal(next(large.parameters()), next(Recorder().parameters()))


def test_logs_size_and_lr_at_each_epoch_start_with_default_log_every_n_steps(trainer_for, tmp_path):
    module, data = Recorder(), Data(samples=32)
    scheduler = BatchSizeScheduler(sizes=[4, 8], lr_scaling="linear")
    fit = trainer_for([scheduler], max_epochs=4, logger=CSVLogger(tmp_path, name="csv"))
    fit.fit(module, datamodule=data)
    with open(Path(fit.logger.log_dir) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("batch_size/size")]
    # epochs of 8, 8, 4, 4 steps start at steps 0, 8, 16, 20
    assert [(int(r["step"]), float(r["batch_size/size"]), float(r["batch_size/lr"])) for r in rows] == [
        (0, 4, 0.1),
        (8, 4, 0.1),
        (16, 8, pytest.approx(0.2)),
        (20, 8, pytest.approx(0.2)),
    ]
    assert fit.callback_metrics["batch_size/size"].item() == 8
    with open(Path(fit.logger.log_dir) / "batch_size.csv") as handle:
        assert [int(r["size"]) for r in csv.DictReader(handle)] == [4, 8]


@pytest.mark.parametrize("save", ["epoch_end", "mid_epoch"])
def test_resume_continues_the_schedule(trainer_for, tmp_path, save):
    sizes = [2, 4, 8, 16]
    full_module = Recorder(scheduler="lambda")
    full_scheduler = BatchSizeScheduler(sizes=sizes, lr_scaling="linear")
    trainer_for(default_root_dir=tmp_path / "full", callbacks=[full_scheduler], max_epochs=8).fit(
        full_module, datamodule=Data(samples=32)
    )

    every = {"epoch_end": dict(every_n_epochs=3), "mid_epoch": dict(every_n_train_steps=41)}[save]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **every)
    first = Recorder(scheduler="lambda")
    callbacks = [BatchSizeScheduler(sizes=sizes, lr_scaling="linear"), checkpoint]
    run = trainer_for(
        default_root_dir=tmp_path / "first", callbacks=callbacks, max_epochs=8, enable_checkpointing=True
    )
    run.fit(first, datamodule=Data(samples=32))
    path = sorted((tmp_path / "ckpt").glob("*.ckpt"))[0]

    resumed = Recorder(scheduler="lambda")
    resumed_scheduler = BatchSizeScheduler(sizes=sizes, lr_scaling="linear")
    trainer_for(default_root_dir=tmp_path / "resumed", callbacks=[resumed_scheduler], max_epochs=8).fit(
        resumed, datamodule=Data(samples=32), ckpt_path=path
    )
    done = len(full_module.seen) - len(resumed.seen)
    expected = full_module.seen[done:]
    assert [(epoch, length) for epoch, length, _ in resumed.seen] == [(e, n) for e, n, _ in expected]
    assert [lr for *_, lr in resumed.seen] == pytest.approx([lr for *_, lr in expected], rel=1e-12)
    assert resumed_scheduler.size == 16
    # the schedule figure's data: every epoch, the checkpointed ones included
    assert [row[:2] for row in resumed_scheduler.epochs] == [row[:2] for row in full_scheduler.epochs]
    assert [row[2] for row in resumed_scheduler.epochs] == pytest.approx(
        [row[2] for row in full_scheduler.epochs]
    )
    assert len(full_scheduler.epochs) == 8
    if save == "mid_epoch":
        return  # Lightning restarts a plain DataLoader from the epoch's first batch: only the schedule is exact
    for p, q in zip(resumed.parameters(), full_module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class GlobalBatchProbe(pl.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.seen, self.directory / f"rank{trainer.global_rank}.pt")


def test_ddp_scheduled_size_is_the_global_batch(trainer_for, tmp_path):
    module, data = Recorder(), Data(samples=32)
    callbacks = [BatchSizeScheduler(sizes=[4, 8]), GlobalBatchProbe(tmp_path)]
    trainer_for(callbacks, max_epochs=2, strategy="ddp_fork", devices=2).fit(module, datamodule=data)
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert {(epoch, length) for epoch, length, _ in seen} == {(0, 2), (1, 4)}


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(), "exactly one"),
        (dict(sizes=[2], schedule={0: 2}), "exactly one"),
        (dict(sizes=[]), "at least one"),
        (dict(sizes=[0]), "sizes\\[0\\]"),
        (dict(schedule={-1: 4}), "epochs"),
        (dict(schedule={0: 4}, multistep=True), "needs `sizes`"),
        (dict(sizes=[2], lr_scaling="square"), "lr_scaling"),
        (dict(sizes=[2], max_physical_batch_size=0), "max_physical_batch_size"),
        (dict(sizes=[2], multistep=True, lr_milestones=[1.5]), "lr_milestones"),
        (dict(max_size=64, lr_scaling="sqrt"), "linear"),
        (dict(sizes=[2], gamma=0.5), "needs `max_size`"),
        (dict(max_size=64, gamma=2.0), "gamma"),
        (dict(sizes=[2], adaptive=True), "needs `max_size`"),
        (dict(max_size=64, adaptive=True, growth=1.0), "growth"),
        (dict(max_size=64, adaptive=True, theta=0), "theta"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeScheduler(**kwargs)


def test_setup_refusals(trainer_for, tmp_path):
    with pytest.raises(ValueError, match="batch_size.*Expose"):
        trainer_for([BatchSizeScheduler(sizes=[2])], max_epochs=1).fit(
            Recorder(), DataLoader(Data().dataset, batch_size=4)
        )
    with pytest.raises(ValueError, match="accumulation"):
        trainer_for([BatchSizeScheduler(sizes=[2])], max_epochs=1, accumulate_grad_batches=2).fit(
            Recorder(), datamodule=Data()
        )
    with pytest.raises(ValueError, match="accumulation"):
        callbacks = [BatchSizeScheduler(sizes=[2]), GradientAccumulationScheduler({1: 2})]
        trainer_for(callbacks, max_epochs=2).fit(Recorder(), datamodule=Data())
    with pytest.raises(ValueError, match="max_epochs"):
        trainer_for([BatchSizeScheduler(sizes=[2])], max_epochs=-1, max_steps=3).fit(
            Recorder(), datamodule=Data()
        )
    with pytest.raises(ValueError, match="lr_milestones"):
        trainer_for([BatchSizeScheduler(sizes=[2], multistep=True)], max_epochs=2).fit(
            Recorder(), datamodule=Data()
        )


def test_reuse_for_a_second_fit_starts_the_schedule_again(trainer_for, tmp_path):
    scheduler = BatchSizeScheduler(sizes=[2, 4])
    for run in ("a", "b"):
        module = Recorder()
        trainer_for(default_root_dir=tmp_path / run, callbacks=[scheduler], max_epochs=2).fit(
            module, datamodule=Data(samples=16)
        )
        assert sizes_per_epoch(module) == {0: {2}, 1: {4}}
    assert [r["size"] for r in scheduler.history] == [2, 4]
    assert math.isclose(copy.deepcopy(scheduler).history[0]["lr"], 0.1)


def test_runs_beside_the_other_callbacks_and_fisher_follows_the_batch_size(trainer_for, tmp_path):
    from lightning_tricks import GradientFlow, RandomGradient

    module, data = Recorder(), Data(samples=32)
    fisher = FisherSpectrum(every_n_steps=2)
    callbacks = [BatchSizeScheduler(sizes=[2, 8]), fisher, GradientFlow(), RandomGradient(seed=0)]
    trainer_for(callbacks, max_epochs=2).fit(module, datamodule=data)
    assert sizes_per_epoch(module) == {0: {2}, 1: {8}}
    measured = {(record["epoch"], record["batch_size"]) for record in fisher.history}
    assert measured == {(0, 2.0), (1, 8.0)}, "F̃ is B×B for the batch size of its step"
    assert all(math.isfinite(record["L"]) for record in fisher.history)


class AdaptiveProbe(pl.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        scheduler = next(c for c in trainer.callbacks if isinstance(c, BatchSizeScheduler))
        record = {"sizes": [r["size"] for r in scheduler.history], "noise_scale": scheduler.noise_scale}
        torch.save(record, self.directory / f"adaptive{trainer.global_rank}.pt")


def test_ddp_adaptive_policy_agrees_across_ranks(trainer_for, tmp_path):
    """Each rank estimates from its own half of the global batch; the epoch sums are all-reduced,
    so both ranks take the same decision, near the known noise scale of 16."""
    module = NoiseScaleProblem(noise=True, batch_size=2)  # 2 per process: a global batch of 4
    callbacks = [
        BatchSizeScheduler.noise_adaptive(max_size=256, noise_every_n_steps=1),
        AdaptiveProbe(tmp_path),
    ]
    trainer_for(callbacks, max_epochs=2, strategy="ddp_fork", devices=2).fit(module)
    records = [torch.load(tmp_path / f"adaptive{rank}.pt") for rank in (0, 1)]
    assert records[0] == records[1]
    assert records[0]["sizes"][0] == 4 and records[0]["sizes"][-1] in (16, 32)
    assert 12 < records[0]["noise_scale"] < 20


# -- seed 004's stages: the sizes and the samples each size trains on -------------------------


def seed_004_sizes(sizes, max_epochs, lr_stages=None):
    """Seed 004 §4.3 written out: the sequence over equal stages of each LR stage (one LR stage: -∅)."""
    per_epoch = []
    for length in lr_stages or [max_epochs]:
        per_epoch += [size for size in sizes for _ in range(length // len(sizes))]
    return per_epoch


@pytest.mark.parametrize(
    ("sizes", "epochs", "milestones", "lr_stages"),
    [
        ((32, 64, 128, 256, 512), 20, [0.5, 0.75], [10, 5, 5]),
        ((32, 32, 64, 64, 128), 20, [0.5, 0.75], [10, 5, 5]),
        ((2, 4), 8, [4, 6], [4, 2, 2]),
        ((2, 4, 8), 12, [0.5, 0.75], [6, 3, 3]),
    ],
)
def test_ms_and_plain_share_the_units_of_each_size(
    trainer_for, tmp_path, sizes, epochs, milestones, lr_stages
):
    """-MS re-runs the sequence in each LR stage; -∅ and -MS train every size on the same number of
    samples (seed 004 §4.3), checked on the batches training_step receives."""
    samples = max(sizes)
    units = {}
    for multistep in (False, True):
        module, data = Recorder(), Data(samples=samples, batch_size=2)
        scheduler = BatchSizeScheduler(sizes=list(sizes), multistep=multistep, lr_milestones=milestones)
        trainer_for(default_root_dir=tmp_path / str(multistep), callbacks=[scheduler], max_epochs=epochs).fit(
            module, datamodule=data
        )
        expected = seed_004_sizes(sizes, epochs, lr_stages if multistep else None)
        assert sizes_per_epoch(module) == {epoch: {size} for epoch, size in enumerate(expected)}
        units[multistep] = {size: 0 for size in sizes}
        for epoch, length, _ in module.seen:
            units[multistep][expected[epoch]] += length
        assert units[multistep] == {size: expected.count(size) * samples for size in sizes}
    assert units[False] == units[True]


@pytest.mark.parametrize(
    ("sizes", "epochs", "milestones", "fits"),
    [
        (
            (32, 64, 128, 256, 512),
            10,
            [0.5, 0.75],
            "20, 40, 60",
        ),  # LR stages 5, 3, 2 (the old layout skipped sizes)
        ((32, 64, 128, 256, 512), 25, [0.5, 0.75], "20, 40, 60"),  # 12, 7, 6 (round(12.5), round(18.75))
        ((2, 4, 8), 10, None, "3, 6, 9"),  # -∅, 10 epochs for 3 stages
        ((2, 4, 8, 16, 32), 3, None, "5, 10, 15"),  # fewer epochs than sizes
    ],
)
def test_stages_that_are_not_equal_whole_epochs_are_refused_naming_the_epochs_that_fit(
    trainer_for, tmp_path, sizes, epochs, milestones, fits
):
    multistep = milestones is not None
    scheduler = BatchSizeScheduler(sizes=list(sizes), multistep=multistep, lr_milestones=milestones)
    with pytest.raises(ValueError, match=f"multiple of {len(sizes)}.*max_epochs = {fits}"):
        trainer_for([scheduler], max_epochs=epochs).fit(Recorder(), datamodule=Data())


def test_multistep_refusal_with_milestones_read_from_multisteplr(trainer_for, tmp_path):
    scheduler = BatchSizeScheduler(sizes=[2, 4, 8], multistep=True)  # MultiStepLR [4, 6]: stages 4, 2, 2
    with pytest.raises(ValueError, match="4, 2, 2 epochs"):
        trainer_for([scheduler], max_epochs=8).fit(Recorder(scheduler="multistep"), datamodule=Data())


# -- accumulation: the gradient of one batch of the window's samples --------------------------


class GradientProbe(pl.Callback):
    """The gradient the optimiser receives at each step (lr = 0 keeps the parameters fixed)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).clone())


def window_gradients(module: Recorder, data: Data, sizes_per_epoch: list[int]) -> list[torch.Tensor]:
    """Brute force, float64: for each optimiser step, the mean-loss gradient of its samples as one batch."""
    x, y = data.dataset.tensors
    grads = []
    for size in sizes_per_epoch:
        for start in range(0, len(x), size):
            module.zero_grad()
            F.cross_entropy(module.net(x[start : start + size]), y[start : start + size]).backward()
            grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]).clone())
    return grads


@pytest.mark.parametrize(
    ("samples", "sizes", "physical"),
    [
        (64, [16], 4),  # every window full
        (40, [16], 4),  # last window: 2 full micro-batches of 4
        (61, [16], 4),  # prime: last window 4 + 4 + 4 + 1
        (37, [4, 12], 3),  # prime: 12 = 4 × 3, last windows 1 and 3 + 3 + 3 + 1
        (1000, [32, 128], 32),  # the finding: 1000 = 7 × 128 + 104
    ],
)
def test_capped_batches_give_the_one_batch_gradient_of_every_window(
    trainer_for, tmp_path, samples, sizes, physical
):
    module, data = Recorder(lr=0.0), Data(samples=samples, batch_size=physical)
    probe = GradientProbe()
    scheduler = BatchSizeScheduler(sizes=sizes, max_physical_batch_size=physical)
    trainer_for([scheduler, probe], max_epochs=len(sizes)).fit(module, datamodule=data)
    expected = window_gradients(module, data, sizes)
    assert len(probe.grads) == len(expected)
    for step, (got, want) in enumerate(zip(probe.grads, expected)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=f"step {step}")


def test_manual_optimisation_refuses_sizes_that_need_accumulation(trainer_for, tmp_path):
    class Manual(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            optimizer.step()

    match = "manual optimisation.*sizes\\[1\\] = 8 cannot run as 2 micro-batches of 4"
    with pytest.raises(ValueError, match=match):
        trainer_for([BatchSizeScheduler(sizes=[4, 8], max_physical_batch_size=4)], max_epochs=2).fit(
            Manual(), datamodule=Data()
        )
    module = Manual()  # within the cap: trained as scheduled
    trainer_for([BatchSizeScheduler(sizes=[2, 4], max_physical_batch_size=4)], max_epochs=2).fit(
        module, datamodule=Data(samples=16)
    )
    assert sizes_per_epoch(module) == {0: {2}, 1: {4}}


# -- linear LR scaling composes with every torch scheduler ------------------------------------


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.9**k),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda k: 0.95),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 7], gamma=0.5),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=6),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=9),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=24, power=2.0),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=0.01),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=3, T_mult=2, eta_min=0.02
    ),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=21),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=5),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=9, eta_min=0.01),
        ]
    ),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=9, eta_min=0.01),
        ],
        milestones=[6],
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, factor=0.5, patience=1, min_lr=0.02
    ),
}


class ScheduledRecorder(Recorder):
    """Recorder with one of SCHEDULERS stepped every step; ReduceLROnPlateau monitors a fixed series."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def training_step(self, batch, batch_idx):
        self.log("plateau", 1.0 + 0.0 * self.global_step)  # never improves: the LR decays to min_lr
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = {"scheduler": SCHEDULERS[self.name](optimizer), "interval": "step", "monitor": "plateau"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


@pytest.mark.parametrize("scaling", ["linear", "sqrt"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_scaling_multiplies_every_schedulers_lr_at_every_step(trainer_for, tmp_path, name, scaling):
    """Sizes 2 then 8 on 16 samples (8 steps, then 2 per epoch): against the same schedule unscaled,
    the LR of every step is ×1 before the change and exactly ×4 (sqrt: ×2) after it."""
    lrs = {}
    for run in ("none", scaling):
        module = ScheduledRecorder(name)
        scheduler = BatchSizeScheduler(sizes=[2, 8], lr_scaling=run)
        trainer_for(default_root_dir=tmp_path / run, callbacks=[scheduler], max_epochs=4).fit(
            module, datamodule=Data(samples=16)
        )
        lrs[run] = [lr for *_, lr in module.seen]
    factor = 4.0 if scaling == "linear" else 2.0
    ratios = [scaled / plain for scaled, plain in zip(lrs[scaling], lrs["none"])]
    assert len(ratios) == 20
    assert ratios == pytest.approx([1.0] * 16 + [factor] * 4, rel=1e-12)


def test_lr_scaling_refuses_a_scheduler_it_cannot_scale_by_name(trainer_for, tmp_path):
    class Halving(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [0.1 * 0.5**self.last_epoch for _ in self.optimizer.param_groups]

    class Custom(Recorder):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            return [optimizer], [Halving(optimizer)]

    with pytest.raises(ValueError, match="not for Halving.*lr_scaling='none'"):
        trainer_for([BatchSizeScheduler(sizes=[2, 4], lr_scaling="linear")], max_epochs=2).fit(
            Custom(), datamodule=Data()
        )
    trainer_for([BatchSizeScheduler(sizes=[2, 4])], max_epochs=2).fit(Custom(), datamodule=Data())


# -- arguments --------------------------------------------------------------------------------


SMITH, ADAPTIVE = BatchSizeScheduler.increase_instead_of_decay, BatchSizeScheduler.noise_adaptive


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [
        (
            BatchSizeScheduler,
            dict(sizes=[2], multistep=True, lr_milestones=5),
            TypeError,
            "`lr_milestones`.*got 5",
        ),
        (SMITH, dict(max_size=-1), ValueError, "`max_size`.*>= 1; got -1"),
        (SMITH, dict(max_size=0), ValueError, "`max_size`.*>= 1; got 0"),
        (SMITH, dict(max_size="big"), TypeError, "`max_size`.*'big'"),
        (ADAPTIVE, dict(max_size=64, growth=math.inf), ValueError, "`growth`.*finite.*inf"),
        (ADAPTIVE, dict(max_size=64, theta=math.nan), ValueError, "`theta`.*nan"),
        (BatchSizeScheduler, dict(sizes=[2], batch_arg_name=3), TypeError, "`batch_arg_name`.*got 3"),
        (BatchSizeScheduler, dict(sizes=32), TypeError, "`sizes`.*got 32"),
        (BatchSizeScheduler, dict(schedule=[(0, 4)]), TypeError, "`schedule`.*epoch: size"),
        (BatchSizeScheduler, dict(sizes=[2], multistep="yes"), TypeError, "`multistep`.*True or False"),
        (BatchSizeScheduler, dict(sizes=[2], loss_fn="mse"), TypeError, "`loss_fn`.*'mse'"),
    ],
)
def test_bad_arguments_are_refused_at_construction_naming_the_argument(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sizes=[4, 64]), "`sizes\\[1\\]` = 64 is larger than the 40 training samples.*1..40"),
        (dict(schedule={1: 41}), "`schedule\\[1\\]` = 41"),
        (dict(max_size=128, lr_milestones=[1], gamma=0.5), "`max_size` = 128"),
    ],
)
def test_sizes_larger_than_the_dataset_are_refused_before_training(trainer_for, tmp_path, kwargs, match):
    module = Recorder()
    with pytest.raises(ValueError, match=match):
        fit = trainer_for([BatchSizeScheduler(**kwargs)], max_epochs=2)
        fit.fit(module, datamodule=Data(samples=40))
    assert module.seen == []


# -- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("save", ["last_batch", "epoch_end"])
def test_resumed_history_and_logged_steps_match_the_uninterrupted_run(trainer_for, tmp_path, save):
    """A checkpoint on an epoch's last batch (every_n_train_steps) restores Lightning's step counter
    one short until the first batch; the history and the epoch-start logs keep the right step."""
    sizes, data = [2, 4, 8, 16], dict(samples=32)
    full = BatchSizeScheduler(sizes=sizes)
    logger = CSVLogger(tmp_path, name="full")
    trainer_for(default_root_dir=tmp_path / "full", callbacks=[full], max_epochs=8, logger=logger).fit(
        Recorder(), datamodule=Data(**data)
    )

    every = {"last_batch": dict(every_n_train_steps=32), "epoch_end": dict(every_n_epochs=2)}[save]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **every)
    logger = CSVLogger(tmp_path, name="resumed", version=0)
    callbacks = [BatchSizeScheduler(sizes=sizes), checkpoint]
    trainer_for(
        default_root_dir=tmp_path / "a",
        callbacks=callbacks,
        max_epochs=8,
        enable_checkpointing=True,
        logger=logger,
    ).fit(Recorder(), datamodule=Data(**data))
    path = next((tmp_path / "ckpt").glob("*step=32.ckpt"))
    resumed = BatchSizeScheduler(sizes=sizes)
    logger = CSVLogger(tmp_path, name="resumed", version=0)
    trainer_for(default_root_dir=tmp_path / "b", callbacks=[resumed], max_epochs=8, logger=logger).fit(
        Recorder(), datamodule=Data(**data), ckpt_path=path
    )
    assert resumed.history == full.history
    assert [(r["epoch"], r["step"]) for r in resumed.history] == [(0, 0), (2, 32), (4, 48), (6, 56)]

    def logged(name):
        with open(tmp_path / name / "version_0" / "metrics.csv") as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("batch_size/size")]
        return [(int(r["step"]), float(r["batch_size/size"])) for r in rows]

    expected = [(32, 4), (40, 4), (48, 8), (52, 8), (56, 16), (58, 16)]
    assert logged("resumed")[-6:] == logged("full")[-6:] == expected


def shipped_staged_runs() -> dict[str, tuple[dict, int]]:
    """``name: (BatchSizeScheduler init_args, max_epochs)`` of the shipped staged configs and grid runs."""
    import yaml

    from lightning_tricks.sweep import load_grid

    root = Path(__file__).resolve().parents[1] / "configs"
    runs = {}

    def scheduler_args(config: dict) -> dict:
        callbacks = config["trainer"]["callbacks"]
        return next(c for c in callbacks if c["class_path"].endswith("BatchSizeScheduler"))["init_args"]

    for path in sorted(root.glob("batch_size_*.yaml")):
        config = yaml.safe_load(path.read_text())
        runs[path.stem] = (scheduler_args(config), config["trainer"]["max_epochs"])
    grid = load_grid(root / "experiments" / "seed004_dynamic.grid.yaml")
    base = yaml.safe_load(grid.base.read_text())
    for run in grid.runs:
        overrides = {key.rsplit(".", 1)[-1]: value for key, value in run.overrides if "callbacks" in key}
        runs[run.name] = ({**scheduler_args(base), **overrides}, base["trainer"]["max_epochs"])
    return runs


@pytest.mark.parametrize(
    ("ms", "plain", "sequence"),
    [
        ("batch_size_s32_to_512_ms", "batch_size_s32_to_512", (32, 64, 128, 256, 512)),
        ("s32-to-512-MS-lr0.1", "s32-to-512-lr0.1", (32, 64, 128, 256, 512)),
        ("s32-to-128-MS-lr0.1", "s32-to-128-lr0.1", (32, 32, 64, 64, 128)),  # five stages, as s16-to-64
    ],
)
def test_shipped_ms_configs_train_each_size_on_the_samples_of_their_plain_partner(ms, plain, sequence):
    """Per-epoch sizes of the shipped configs against seed 004 §4.3 written out (LR decays at 50 % and
    75 %): the same epochs, hence samples, of every size with and without -MS."""
    runs = shipped_staged_runs()
    epochs = {}
    for name, lr_stages in ((plain, None), (ms, "seed")):
        args, max_epochs = runs[name]
        policy = BatchSizeScheduler(**args).policy
        context = PolicyContext(max_epochs=max_epochs, initial_size=32)
        stages = [max_epochs // 2, max_epochs // 4, max_epochs // 4] if lr_stages else None
        policy.validate(context)
        per_epoch = [policy.size_for(e, 0, context) for e in range(max_epochs)]
        assert per_epoch == seed_004_sizes(sequence, max_epochs, stages)
        epochs[name] = {size: per_epoch.count(size) for size in sequence}
    assert epochs[ms] == epochs[plain]


def test_schedule_figure_at_fit_end_shows_every_epochs_size_and_lr(trainer_for, tmp_path):
    module, data = Recorder(scheduler="multistep"), Data(samples=64)
    scheduler = BatchSizeScheduler.staged([2, 4, 8, 16])
    trainer_for([scheduler], max_epochs=8).fit(module, datamodule=data)
    seen = {epoch: (length, lr) for epoch, length, lr in module.seen if length > 1}  # independent record
    expected = [(e, [2, 2, 4, 4, 8, 8, 16, 16][e], seen[e][1]) for e in range(8)]
    assert scheduler.epochs == expected  # the LR read at the epoch's start, as training_step saw it
    assert {e: seen[e][0] for e in seen} == {e: size for e, size, _ in expected}
    png = next(tmp_path.rglob("batch_size.schedule.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    figure = plot_batch_size_schedule(*zip(*scheduler.epochs))
    size_axes, lr_axes = figure.axes
    (size_line,), (lr_line,) = size_axes.get_lines(), lr_axes.get_lines()
    np.testing.assert_array_equal(size_line.get_xdata(), np.repeat(np.arange(8), 2) + np.tile([0, 1], 8))
    np.testing.assert_array_equal(size_line.get_ydata(), np.repeat([e[1] for e in expected], 2))
    np.testing.assert_allclose(lr_line.get_ydata(), np.repeat([e[2] for e in expected], 2), rtol=1e-12)
    assert lr_axes.get_yscale() == "log" and size_axes.get_xlabel() == "epoch"


def test_schedule_figure_leaves_missing_epochs_as_gaps_and_refuses_mismatched_data():
    figure = plot_batch_size_schedule([0, 1, 3], [2, 4, 8], [0.1, 0.1, 0.01])
    x = figure.axes[0].get_lines()[0].get_xdata()
    np.testing.assert_array_equal(x[:4], [0, 1, 1, 2])
    assert np.isnan(x[4]) and list(x[5:]) == [3, 4]
    with pytest.raises(ValueError, match="one length"):
        plot_batch_size_schedule([0, 1], [2], [0.1, 0.1])


# -- the policy protocol: a user's policy, its state in checkpoints, DDP -----------------------


class DoubleEvery:
    """A user's policy in ten lines (BatchSizeScheduler's docstring example)."""

    def __init__(self, every: int, cap: int) -> None:
        self.every, self.cap = every, cap

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        return min(self.cap, context.initial_size * 2 ** (epoch // self.every))


class CountingDoubleEvery(DoubleEvery):
    """DoubleEvery with state (its number of decisions, kept in checkpoints) that records each call."""

    def __init__(self, every: int, cap: int) -> None:
        super().__init__(every, cap)
        self.decisions = 0
        self.calls: list[tuple[int, int, PolicyContext]] = []

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        self.decisions += 1
        self.calls.append((epoch, step, context))
        return super().size_for(epoch, step, context)

    def state_dict(self) -> dict:
        return {"decisions": self.decisions}

    def load_state_dict(self, state: dict) -> None:
        self.decisions = state["decisions"]


def test_a_ten_line_user_policy_drives_the_scheduler_once_per_epoch(trainer_for):
    """32 samples: 16 steps an epoch at size 2, 8 at 4, 4 at 8; one decision per epoch (the last for
    the epoch after training), each with the context of that moment."""
    module, data, policy = Recorder(), Data(samples=32, batch_size=2), CountingDoubleEvery(every=2, cap=8)
    assert isinstance(policy, BatchSizePolicy) and isinstance(DoubleEvery(1, 2), BatchSizePolicy)
    scheduler = BatchSizeScheduler(policy, lr_scaling="linear")
    trainer_for([scheduler], max_epochs=6).fit(module, datamodule=data)
    assert sizes_per_epoch(module) == {e: {[2, 2, 4, 4, 8, 8][e]} for e in range(6)}
    assert [(r["epoch"], r["step"], r["size"]) for r in scheduler.history] == [
        (0, 0, 2),
        (2, 32, 4),
        (4, 48, 8),
    ]
    assert [(epoch, step) for epoch, step, _ in policy.calls] == [
        (e, s) for e, s in enumerate([0, 16, 32, 40, 48, 52, 56])
    ]
    first, third = policy.calls[0][2], policy.calls[3][2]
    assert (first.size, first.initial_size, first.max_epochs, first.world_size, first.decisions) == (
        None,
        2,
        6,
        1,
        (),
    )
    assert third.size == 4 and third.decisions == (Decision(0, 0, 2), Decision(2, 32, 4))
    assert third.metrics["batch_size/size"] == 4.0 and math.isnan(third.noise_scale)
    assert [lr for epoch, _, lr in module.seen if epoch >= 4] == pytest.approx([0.4] * 8), "linear LR scaling"
    assert scheduler.hyperparameters()["policy"] is policy and scheduler.sizes is None
    with pytest.raises(ValueError, match="exactly one of `policy`"):
        BatchSizeScheduler(policy, sizes=[2])
    with pytest.raises(TypeError, match="`policy`.*size_for"):
        BatchSizeScheduler(policy=lambda epoch: 4)
    with pytest.raises(TypeError, match="`policy`.*size_for"):
        BatchSizeScheduler(DoubleEvery)  # the class, not a policy


@pytest.mark.parametrize("save", ["mid_epoch", "epoch_end"])
def test_a_user_policy_resumes_mid_stage_with_its_state_and_the_same_sizes(trainer_for, tmp_path, save):
    """Stage [2, 4) trains size 4 (8 steps an epoch from step 32): a checkpoint inside epoch 2 or after
    it resumes the schedule, and the policy's own state comes back from the checkpoint."""
    full_module, full_policy = Recorder(), CountingDoubleEvery(every=2, cap=8)
    full = BatchSizeScheduler(full_policy)
    trainer_for([full], max_epochs=6, default_root_dir=tmp_path / "full").fit(
        full_module, datamodule=Data(samples=32, batch_size=2)
    )

    every = {"mid_epoch": dict(every_n_train_steps=36), "epoch_end": dict(every_n_epochs=3)}[save]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **every)
    first = BatchSizeScheduler(CountingDoubleEvery(every=2, cap=8))
    trainer_for(
        [first, checkpoint], max_epochs=6, enable_checkpointing=True, default_root_dir=tmp_path / "a"
    ).fit(Recorder(), datamodule=Data(samples=32, batch_size=2))
    path = next((tmp_path / "ckpt").glob(f"*step={ {'mid_epoch': 36, 'epoch_end': 40}[save] }.ckpt"))

    resumed_module, resumed_policy = Recorder(), CountingDoubleEvery(every=2, cap=8)
    resumed = BatchSizeScheduler(resumed_policy)
    trainer_for([resumed], max_epochs=6, default_root_dir=tmp_path / "b").fit(
        resumed_module, datamodule=Data(samples=32, batch_size=2), ckpt_path=path
    )
    resumed_epochs = sizes_per_epoch(resumed_module)
    assert min(resumed_epochs) == {"mid_epoch": 2, "epoch_end": 3}[save]
    assert resumed_epochs == {
        e: sizes for e, sizes in sizes_per_epoch(full_module).items() if e in resumed_epochs
    }
    assert resumed.history == full.history and resumed.epochs == full.epochs
    assert resumed_policy.decisions == full_policy.decisions == 7, (
        "7 = 4 or 3 from the checkpoint + this fit's"
    )


class FirstRankWins:
    """A policy whose processes disagree (rank r asks for (r + 1)× the size): rank 0's answer is applied."""

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        assert context.world_size == 2
        rank = torch.distributed.get_rank()
        return context.initial_size * (1 + rank) * (2 if epoch else 1)


class HistoryProbe(GlobalBatchProbe):
    def on_train_end(self, trainer, pl_module):
        scheduler = next(c for c in trainer.callbacks if isinstance(c, BatchSizeScheduler))
        record = {"seen": {(e, n) for e, n, _ in pl_module.seen}, "history": scheduler.history}
        torch.save(record, self.directory / f"history{trainer.global_rank}.pt")


def test_ddp_a_user_policy_takes_rank_zeros_decision_on_every_rank(trainer_for, tmp_path):
    """2 processes (gloo), 4 samples each per batch: a global 8, then 16; both ranks train rank 0's sizes."""
    callbacks = [BatchSizeScheduler(FirstRankWins()), HistoryProbe(tmp_path)]
    trainer_for(callbacks, max_epochs=2, strategy="ddp_fork", devices=2).fit(
        Recorder(), datamodule=Data(samples=32)
    )
    records = [torch.load(tmp_path / f"history{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert records[0] == records[1]
    assert records[0]["seen"] == {(0, 4), (1, 8)}
    assert [r["size"] for r in records[0]["history"]] == [8, 16]


class NoiseReader:
    """A user's policy that reads the epoch's noise scale (and keeps the size)."""

    reads_noise_scale = True

    def __init__(self) -> None:
        self.seen: list[float] = []

    def size_for(self, epoch: int, step: int, context: PolicyContext) -> int:
        self.seen.append(context.noise_scale)
        return context.size or context.initial_size


class CountedLoss(NoiseScaleProblem):
    """compute_loss counts its calls (the scheduler's own estimate); training_step does not use it."""

    def __init__(self) -> None:
        super().__init__(noise=True, samples=64, batch_size=8)
        self.loss_calls = 0

    def compute_loss(self, batch):
        self.loss_calls += 1
        return super().compute_loss(batch)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0]), batch[1])


@pytest.mark.parametrize("with_fisher", [True, False], ids=["fed-by-FisherSpectrum", "own-estimate"])
def test_a_policy_reads_the_shared_noise_scale_without_an_extra_pass_when_fisher_feeds_it(
    trainer_for, with_fisher
):
    """The scheduler imports no callback: FisherSpectrum feeds the run's estimate and the policy reads
    the epoch's pooled value (no half-batch pass); without it the scheduler measures by itself."""
    module, policy, fisher = CountedLoss(), NoiseReader(), FisherSpectrum()
    scheduler = BatchSizeScheduler(policy, noise_every_n_steps=2)
    trainer_for([fisher, scheduler] if with_fisher else [scheduler], max_epochs=2).fit(module)
    assert math.isnan(policy.seen[0]) and all(math.isfinite(value) for value in policy.seen[1:])
    assert len(policy.seen) == 3 and policy.seen[-1] == scheduler.noise_scale
    if with_fisher:
        assert module.loss_calls == 0 and scheduler.noise_scale == fisher.epoch_noise_scale
    else:
        assert module.loss_calls == 2 * 2 * 4, "2 epochs × 4 measured steps × 2 halves"
    assert 8 < scheduler.noise_scale < 30, "B_noise = 16 (NoiseScaleProblem)"


def test_a_checkpoint_of_the_earlier_format_resumes_the_own_estimate(trainer_for, tmp_path):
    """Checkpoints written before the policy protocol kept the own estimate's sums as ``noise_sums``
    (Σ tr Σ, Σ |G|², count) and no ``decided_epoch``: they resume to the same epoch noise scale."""

    def fit(callbacks, ckpt_path=None):
        scheduler = BatchSizeScheduler.noise_adaptive(max_size=128, noise_every_n_steps=1)
        trainer_for([scheduler, *callbacks], enable_checkpointing=True).fit(
            RepeatedBatchProblem(), ckpt_path=ckpt_path
        )
        return scheduler.noise_scale

    full = fit([])
    fit([ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)])
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("BatchSizeScheduler")]
    state = checkpoint["callbacks"][key]
    (parts,) = state.pop("noise_parts")
    del state["decided_epoch"]
    state.update(noise_sums=[parts["trace_sigma"], parts["grad_sq_norm"], 2.0], noise_epoch=parts["epoch"])
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    resumed = fit([], ckpt_path=str(tmp_path / "earlier.ckpt"))
    assert math.isfinite(full) and resumed == pytest.approx(full, rel=1e-9)
