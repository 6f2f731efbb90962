"""BatchSizeScheduler: the batches training_step receives follow seed 004's dynamic sampling
(004_e5d92837cb57ce8a.txt §4.3: five equal stages, -MS per learning-rate stage) exactly, on a
user-written module and datamodule."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import BatchSizeScheduler, FisherSpectrum
from lightning_tricks.batch_size_policies import (
    DecayToBatchPolicy,
    ExplicitPolicy,
    NormTestPolicy,
    StagedPolicy,
    split_physical,
    stage_of,
)

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


def trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


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


def test_training_step_receives_the_staged_sizes(tmp_path):
    module, data = Recorder(), Data(samples=64)
    scheduler = BatchSizeScheduler.staged([2, 4, 8, 16, 32])
    trainer(tmp_path, [scheduler], max_epochs=10).fit(module, datamodule=data)
    expected = [2, 2, 4, 4, 8, 8, 16, 16, 32, 32]
    assert sizes_per_epoch(module) == {e: {size} for e, size in enumerate(expected)}
    assert [r["size"] for r in scheduler.history] == [2, 4, 8, 16, 32]
    assert [r["epoch"] for r in scheduler.history] == [0, 2, 4, 6, 8]


def test_explicit_schedule_on_the_module_attribute(tmp_path):
    class ModuleWithLoader(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 4
            self.data = Data(samples=48)

        def train_dataloader(self):
            return DataLoader(self.data.dataset, batch_size=self.batch_size)

    module = ModuleWithLoader()
    trainer(tmp_path, [BatchSizeScheduler(schedule={1: 8, 3: 2})], max_epochs=4).fit(module)
    assert sizes_per_epoch(module) == {0: {4}, 1: {8}, 2: {8}, 3: {2}}


def test_multistep_reads_multisteplr_milestones(tmp_path):
    module, data = Recorder(scheduler="multistep"), Data(samples=32)
    scheduler = BatchSizeScheduler.staged([2, 4], multistep=True)
    trainer(tmp_path, [scheduler], max_epochs=8).fit(module, datamodule=data)
    # LR stages [0, 4), [4, 6), [6, 8): the sequence 2, 4 inside each
    assert sizes_per_epoch(module) == {0: {2}, 1: {2}, 2: {4}, 3: {4}, 4: {2}, 5: {4}, 6: {2}, 7: {4}}


def test_multistep_with_fractional_milestones(tmp_path):
    module, data = Recorder(), Data(samples=32)
    scheduler = BatchSizeScheduler.staged([2, 4], multistep=True, lr_milestones=[0.5])
    trainer(tmp_path, [scheduler], max_epochs=4).fit(module, datamodule=data)
    assert sizes_per_epoch(module) == {0: {2}, 1: {4}, 2: {2}, 3: {4}}


@pytest.mark.parametrize(("scaling", "power"), [("linear", 1.0), ("sqrt", 0.5), ("none", 0.0)])
@pytest.mark.parametrize("kind", ["multistep", "lambda"])
def test_lr_scaling_composes_with_lr_schedulers(tmp_path, scaling, power, kind):
    sizes = [2, 4, 8, 16]
    module, data = Recorder(scheduler=kind), Data(samples=32)
    scheduler = BatchSizeScheduler(sizes=sizes, lr_scaling=scaling)
    trainer(tmp_path, [scheduler], max_epochs=8).fit(module, datamodule=data)
    lr_per_epoch = {epoch: lr for epoch, _, lr in module.seen}
    for epoch in range(8):
        base = 0.1 * (0.1 ** sum(epoch >= m for m in (4, 6)) if kind == "multistep" else 0.5**epoch)
        size = sizes[epoch // 2]
        assert lr_per_epoch[epoch] == pytest.approx(base * (size / 2) ** power, rel=1e-12), epoch


def test_increase_instead_of_decay_keeps_the_lr_until_the_batch_is_at_its_maximum(tmp_path):
    """MultiStepLR(milestones=[4, 6], gamma=0.1): at epoch 4 the batch grows 2 → 20 and the LR stays
    0.1; at epoch 6 the batch is at max_size = 20, so the LR decays to 0.01 (Smith et al. 2018)."""
    module, data = Recorder(scheduler="multistep"), Data(samples=64, batch_size=2)
    scheduler = BatchSizeScheduler.increase_instead_of_decay(max_size=20)
    trainer(tmp_path, [scheduler], max_epochs=8).fit(module, datamodule=data)
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
def test_adaptive_policy_settles_at_the_known_noise_scale(tmp_path, noise):
    module = NoiseScaleProblem(noise)
    fisher = FisherSpectrum()
    scheduler = BatchSizeScheduler.noise_adaptive(max_size=256)
    trainer(tmp_path, [fisher, scheduler], max_epochs=4).fit(module)
    sizes = [record["size"] for record in scheduler.history]
    if noise:  # B_noise = 16: the first power of two that passes the norm test is 16 (32 if over-estimated)
        assert sizes[0] == 2 and sizes[-1] in (16, 32) and sizes == sorted(sizes)
        assert 12 < fisher.epoch_noise_scale < 20 and scheduler.noise_scale == fisher.epoch_noise_scale
    else:
        assert sizes == [2] and set(module.sizes) == {2}


def test_adaptive_policy_without_fisher_spectrum_uses_its_own_two_batch_estimate(tmp_path):
    """No FisherSpectrum: the halves of every noise_every_n_steps-th batch give tr Σ and |G|²
    (McCandlish et al. appendix A.1); B_noise = 16 is found again."""
    module = NoiseScaleProblem(noise=True)
    scheduler = BatchSizeScheduler.noise_adaptive(max_size=256, noise_every_n_steps=2)
    trainer(tmp_path, [scheduler], max_epochs=3).fit(module)
    sizes = [record["size"] for record in scheduler.history]
    assert sizes[0] == 2 and sizes[-1] in (16, 32)
    assert 12 < scheduler.noise_scale < 20


def test_adaptive_policy_without_fisher_spectrum_needs_a_loss(tmp_path):
    class NoLoss(NoiseScaleProblem):
        compute_loss = None

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

    with pytest.raises(ValueError, match="compute_loss"):
        trainer(tmp_path, [BatchSizeScheduler.noise_adaptive(max_size=64)], max_epochs=1).fit(NoLoss(True))


def test_accumulation_fallback_gives_the_large_batch_gradient(tmp_path):
    """max_physical_batch_size: 16 samples as 4 micro-batches of 4 = one batch of 16 (float64)."""
    runs = {}
    for name, cap in {"large": None, "capped": 4}.items():
        module, data = Recorder(), Data(samples=64)
        scheduler = BatchSizeScheduler(schedule={0: 16}, max_physical_batch_size=cap)
        trainer(tmp_path / name, [scheduler], max_epochs=2).fit(module, datamodule=data)
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


def test_logs_size_and_lr_at_each_epoch_start_with_default_log_every_n_steps(tmp_path):
    module, data = Recorder(), Data(samples=32)
    scheduler = BatchSizeScheduler(sizes=[4, 8], lr_scaling="linear")
    fit = trainer(tmp_path, [scheduler], max_epochs=4, logger=CSVLogger(tmp_path, name="csv"))
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
def test_resume_continues_the_schedule(tmp_path, save):
    sizes = [2, 4, 8, 16]
    full_module = Recorder(scheduler="lambda")
    trainer(tmp_path / "full", [BatchSizeScheduler(sizes=sizes, lr_scaling="linear")], max_epochs=8).fit(
        full_module, datamodule=Data(samples=32)
    )

    every = {"epoch_end": dict(every_n_epochs=3), "mid_epoch": dict(every_n_train_steps=41)}[save]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **every)
    first = Recorder(scheduler="lambda")
    callbacks = [BatchSizeScheduler(sizes=sizes, lr_scaling="linear"), checkpoint]
    run = trainer(tmp_path / "first", callbacks, max_epochs=8, enable_checkpointing=True)
    run.fit(first, datamodule=Data(samples=32))
    path = sorted((tmp_path / "ckpt").glob("*.ckpt"))[0]

    resumed = Recorder(scheduler="lambda")
    resumed_scheduler = BatchSizeScheduler(sizes=sizes, lr_scaling="linear")
    trainer(tmp_path / "resumed", [resumed_scheduler], max_epochs=8).fit(
        resumed, datamodule=Data(samples=32), ckpt_path=path
    )
    done = len(full_module.seen) - len(resumed.seen)
    expected = full_module.seen[done:]
    assert [(epoch, length) for epoch, length, _ in resumed.seen] == [(e, n) for e, n, _ in expected]
    assert [lr for *_, lr in resumed.seen] == pytest.approx([lr for *_, lr in expected], rel=1e-12)
    assert resumed_scheduler.size == 16
    if save == "mid_epoch":
        return  # Lightning restarts a plain DataLoader from the epoch's first batch: only the schedule is exact
    for p, q in zip(resumed.parameters(), full_module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class GlobalBatchProbe(pl.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.seen, self.directory / f"rank{trainer.global_rank}.pt")


def test_ddp_scheduled_size_is_the_global_batch(tmp_path):
    module, data = Recorder(), Data(samples=32)
    callbacks = [BatchSizeScheduler(sizes=[4, 8]), GlobalBatchProbe(tmp_path)]
    trainer(tmp_path, callbacks, max_epochs=2, strategy="ddp_fork", devices=2).fit(module, datamodule=data)
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


def test_setup_refusals(tmp_path):
    with pytest.raises(ValueError, match="batch_size.*Expose"):
        trainer(tmp_path, [BatchSizeScheduler(sizes=[2])], max_epochs=1).fit(
            Recorder(), DataLoader(Data().dataset, batch_size=4)
        )
    with pytest.raises(ValueError, match="accumulation"):
        trainer(tmp_path, [BatchSizeScheduler(sizes=[2])], max_epochs=1, accumulate_grad_batches=2).fit(
            Recorder(), datamodule=Data()
        )
    with pytest.raises(ValueError, match="accumulation"):
        callbacks = [BatchSizeScheduler(sizes=[2]), GradientAccumulationScheduler({1: 2})]
        trainer(tmp_path, callbacks, max_epochs=2).fit(Recorder(), datamodule=Data())
    with pytest.raises(ValueError, match="max_epochs"):
        trainer(tmp_path, [BatchSizeScheduler(sizes=[2])], max_epochs=-1, max_steps=3).fit(
            Recorder(), datamodule=Data()
        )
    with pytest.raises(ValueError, match="lr_milestones"):
        trainer(tmp_path, [BatchSizeScheduler(sizes=[2], multistep=True)], max_epochs=2).fit(
            Recorder(), datamodule=Data()
        )


def test_reuse_for_a_second_fit_starts_the_schedule_again(tmp_path):
    scheduler = BatchSizeScheduler(sizes=[2, 4])
    for run in ("a", "b"):
        module = Recorder()
        trainer(tmp_path / run, [scheduler], max_epochs=2).fit(module, datamodule=Data(samples=16))
        assert sizes_per_epoch(module) == {0: {2}, 1: {4}}
    assert [r["size"] for r in scheduler.history] == [2, 4]
    assert math.isclose(copy.deepcopy(scheduler).history[0]["lr"], 0.1)


def test_runs_beside_the_other_callbacks_and_fisher_follows_the_batch_size(tmp_path):
    from lightning_tricks import GradientFlow, RandomGradient

    module, data = Recorder(), Data(samples=32)
    fisher = FisherSpectrum(every_n_steps=2)
    callbacks = [BatchSizeScheduler(sizes=[2, 8]), fisher, GradientFlow(), RandomGradient(seed=0)]
    trainer(tmp_path, callbacks, max_epochs=2).fit(module, datamodule=data)
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


def test_ddp_adaptive_policy_agrees_across_ranks(tmp_path):
    """Each rank estimates from its own half of the global batch; the epoch sums are all-reduced,
    so both ranks take the same decision, near the known noise scale of 16."""
    module = NoiseScaleProblem(noise=True, batch_size=2)  # 2 per process: a global batch of 4
    callbacks = [
        BatchSizeScheduler.noise_adaptive(max_size=256, noise_every_n_steps=1),
        AdaptiveProbe(tmp_path),
    ]
    trainer(tmp_path, callbacks, max_epochs=2, strategy="ddp_fork", devices=2).fit(module)
    records = [torch.load(tmp_path / f"adaptive{rank}.pt") for rank in (0, 1)]
    assert records[0] == records[1]
    assert records[0]["sizes"][0] == 4 and records[0]["sizes"][-1] in (16, 32)
    assert 12 < records[0]["noise_scale"] < 20
