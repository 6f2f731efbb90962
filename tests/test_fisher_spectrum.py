"""FisherSpectrum against a brute-force reference: per-sample autograd loop, numpy eigenvalues."""

from __future__ import annotations

import copy
import csv
import math
import os
import sys
from collections import Counter

import helpers
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common import quiet_fit_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tbparse import SummaryReader
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tricks.callbacks._base import run_directory
from lightning_tricks.callbacks.fisher_spectrum import FisherSpectrum
from lightning_tricks.gradients import GramCollector
from lightning_tricks.gradients.spectrum import fisher_statistics
from lightning_tricks.plotting import beacon_map
from lightning_tricks.results import load_fisher_spectrum

LR = 0.05


def make_data(n: int = 32, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    return TensorDataset(x, y)


def single_forward_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x), y)


def two_forward_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The network runs twice in one step (a flipped view): its layers are shared by two calls."""
    return F.cross_entropy(net(x), y) + 0.5 * F.cross_entropy(net(x.flip(-1)), y)


class SmallNet(L.LightningModule):
    """Conv + Linear classifier in float64 that records (params, batch) of every step."""

    def __init__(self, lr: float = LR, nan_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 3)
        ).double()
        self.lr = lr
        self.nan_at_step = nan_at_step
        self.snapshots: list[tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor], float]] = []

    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return single_forward_loss(self.net, *batch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.snapshots.append((copy.deepcopy(self.net.state_dict()), batch, lr))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        if self.global_step == self.nan_at_step:
            loss = loss * torch.nan
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step == self.nan_at_step:  # keep the weights finite after the NaN step
            for parameter in self.parameters():
                parameter.grad = torch.nan_to_num(parameter.grad, nan=0.0)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def reference_gram(
    state: dict[str, torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn=single_forward_loss,
    frozen: tuple[str, ...] = (),
) -> np.ndarray:
    """F̃ = JᵀJ with J's columns from a per-sample loop of torch.autograd.grad (float64; helpers.py),
    over the parameters whose names do not start with one of ``frozen``."""
    net = SmallNet().net
    net.load_state_dict(state)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(not name.startswith(frozen))
    x, y = batch
    return helpers.reference_gram(net, lambda i: loss_fn(net, x[i : i + 1], y[i : i + 1]), len(x)).numpy()


def reference_statistics(gram: np.ndarray, lr: float) -> dict[str, float]:
    """Seed 004 eq. 7–8 and the noise scale, written out with numpy."""
    batch = gram.shape[0]
    eigenvalues = np.linalg.eigvalsh(gram)
    nonzero = eigenvalues[eigenvalues > batch * np.finfo(np.float64).eps * eigenvalues.max()]
    trace = float(np.trace(gram))
    # unbiased tr Σ and |G|² (McCandlish et al. 2018, appendix A); B_simple = +inf where |G|² ≤ 0
    trace_sigma = (trace - gram.sum() / batch) / (batch - 1) if batch > 1 else math.nan
    grad_sq = (gram.sum() - trace) / (batch * (batch - 1)) if batch > 1 else math.nan
    tests = reference_gradient_tests(gram) if batch > 1 else {}
    return {
        **tests,
        "c_k": math.sqrt(nonzero.max() / nonzero.min()),
        "trace": trace,
        "lambda_max": float(eigenvalues.max()),
        "rank": float(len(nonzero)),
        "l_k": lr / batch * math.sqrt(trace),
        "noise_scale": trace_sigma / grad_sq if grad_sq > 0 else (math.inf if trace_sigma > 0 else math.nan),
    }


def reference_gradient_tests(gram: np.ndarray) -> dict[str, float]:
    """The three gradient tests by their definitions, from F̃_ij = g_iᵀg_j alone: with ḡ the batch
    mean, ‖g_i − ḡ‖² = F̃_ii − 2 g_iᵀḡ + ‖ḡ‖², g_iᵀḡ = (F̃1)_i / B, ‖ḡ‖² = 1ᵀF̃1 / B²."""
    batch = gram.shape[0]
    mean_sq = gram.sum() / batch**2
    projections = gram.sum(axis=1) / batch
    deviations = np.diag(gram) - 2 * projections + mean_sq  # ‖g_i − ḡ‖²
    orthogonal = np.diag(gram) - projections**2 / mean_sq  # ‖g_i − (g_iᵀḡ/‖ḡ‖²) ḡ‖²
    return {
        "norm_test": math.sqrt(deviations.sum() / (batch - 1) / (batch * mean_sq)),
        "inner_test": math.sqrt(np.var(projections, ddof=1) / (batch * mean_sq**2)),
        "ortho_test": math.sqrt(orthogonal.sum() / (batch - 1) / (batch * mean_sq)),
    }


def fit(
    module: L.LightningModule,
    callbacks: list,
    tmp_path,
    *,
    batch_size: int = 8,
    max_steps: int = 6,
    **trainer_kwargs,
):
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    trainer = quiet_fit_trainer(callbacks, tmp_path, max_steps=max_steps, **trainer_kwargs)
    trainer.fit(module, DataLoader(make_data(), batch_size=batch_size), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("batch_size", [1, 5, 8])
def test_history_matches_brute_force_reference(tmp_path, batch_size):
    module = SmallNet()
    fisher = FisherSpectrum()
    fit(module, [fisher], tmp_path, batch_size=batch_size)

    assert [h["step"] for h in fisher.history] == list(range(6))
    energies = []
    for record, (state, batch, lr) in zip(fisher.history, module.snapshots):
        expected = reference_statistics(reference_gram(state, batch), lr)
        energies.append(expected["l_k"])
        assert record["batch_size"] == batch_size
        assert record["lr"] == pytest.approx(lr, rel=1e-12)
        for key in ("trace", "lambda_max", "l_k"):
            assert record[key] == pytest.approx(expected[key], rel=1e-9), key
        if batch_size > 1:
            assert record["c_k"] == pytest.approx(expected["c_k"], rel=1e-6)
            assert record["rank"] == expected["rank"]
            assert record["noise_scale"] == pytest.approx(expected["noise_scale"], rel=1e-8)
            for key in ("norm_test", "inner_test", "ortho_test"):
                assert record[key] == pytest.approx(expected[key], rel=1e-8), key
        else:
            assert record["c_k"] == pytest.approx(1.0) and math.isnan(record["noise_scale"])
            assert all(math.isnan(record[key]) for key in ("norm_test", "inner_test", "ortho_test"))
    conditions = [h["c_k"] for h in fisher.history]
    assert fisher.C_bar == pytest.approx(np.mean(conditions), rel=1e-12)
    assert fisher.L == pytest.approx(sum(energies), rel=1e-9)
    assert [h["C_bar"] for h in fisher.history] == pytest.approx(np.cumsum(conditions) / np.arange(1, 7))
    assert fisher.noise_scale == fisher.history[-1]["noise_scale"] or batch_size == 1


def test_every_n_steps_counts_each_measurement_n_times(tmp_path):
    module = SmallNet()
    fisher = FisherSpectrum(every_n_steps=3)
    fit(module, [fisher], tmp_path, max_steps=7)

    assert [h["step"] for h in fisher.history] == [0, 3, 6]
    energies = [h["l_k"] for h in fisher.history]
    assert fisher.L == pytest.approx(3 * sum(energies), rel=1e-12)
    assert fisher.C_bar == pytest.approx(np.mean([h["c_k"] for h in fisher.history]), rel=1e-12)
    state, batch, lr = module.snapshots[3]
    assert energies[1] == pytest.approx(
        reference_statistics(reference_gram(state, batch), lr)["l_k"], rel=1e-9
    )


class StepProbe(Callback):
    """Per training step, from ``on_train_batch_start`` to ``on_train_batch_end`` (listed first, it
    opens and closes before the other callbacks' hooks of those names): the top-level aten ops
    (torch.profiler; not called by another aten op), the Python calls into the Gram engine's
    files, and whether the model carried a hook after the backward."""

    def __init__(self) -> None:
        self.ops: dict[int, Counter] = {}
        self.engine_calls: dict[int, int] = {}
        self.hooked: dict[int, bool] = {}

    def _count(self, frame, event, arg) -> None:
        if event == "call" and "gradients/gram" in frame.f_code.co_filename.replace("\\", "/"):
            self._calls += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._calls = 0
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.__enter__()
        sys.setprofile(self._count)

    def on_after_backward(self, trainer, pl_module):
        self.hooked[trainer.global_step] = any(
            m._forward_hooks or m._forward_pre_hooks for m in pl_module.modules()
        ) or any(p._backward_hooks for p in pl_module.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sys.setprofile(None)
        self._profiler.__exit__(None, None, None)
        step = trainer.global_step - 1
        self.engine_calls[step] = self._calls
        events = self._profiler.events()
        self.ops[step] = Counter(
            e.name for e in events if _aten(e) and not (e.cpu_parent and _aten(e.cpu_parent))
        )


def _aten(event) -> bool:
    return event.name.startswith("aten::")


def test_unmeasured_steps_run_nothing_of_the_engine(tmp_path):
    """Hooks are attached for measured steps only: an unmeasured step has the plain step's aten
    ops, no call into the Gram engine and no hook on the model."""
    probes = {}
    for name, callbacks in {"plain": [], "fisher": [FisherSpectrum(every_n_steps=3)]}.items():
        probes[name] = StepProbe()
        fit(SmallNet(), [probes[name], *callbacks], tmp_path / name, max_steps=6)
    plain, fisher = probes["plain"], probes["fisher"]
    for step in range(6):
        measured = step % 3 == 0
        assert fisher.hooked[step] == measured and not plain.hooked[step], step
        assert (fisher.engine_calls[step] > 0) == measured and plain.engine_calls[step] == 0, step
        assert (fisher.ops[step] == plain.ops[step]) != measured, step


@pytest.mark.parametrize(("every", "attaches"), [(1, 1), (3, 2)])
def test_hooks_stay_between_consecutive_measured_steps_only(tmp_path, monkeypatch, every, attaches):
    """Every step measured: the hooks are registered once (idle between steps); every 3rd step:
    attached at steps 0 and 3, taken off for the steps between."""
    registered = []
    attach = GramCollector.attach

    def counting_attach(collector):
        registered.append(not collector.attached)
        return attach(collector)

    monkeypatch.setattr(GramCollector, "attach", counting_attach)
    fisher = FisherSpectrum(every_n_steps=every)
    fit(SmallNet(), [fisher], tmp_path, max_steps=6)
    assert len(fisher.history) == 6 // every and sum(registered) == attaches


class HookProbe(Callback):
    """Whether the model carries a forward hook at each validation batch."""

    def __init__(self) -> None:
        self.hooked: list[bool] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.hooked.append(any(m._forward_hooks or m._forward_pre_hooks for m in pl_module.modules()))


def test_validation_runs_without_hooks_when_every_step_is_measured(tiny_module, trainer_for):
    fisher, probe = FisherSpectrum(), HookProbe()
    trainer_for([fisher, probe], max_steps=4, val_check_interval=2).fit(tiny_module())
    assert len(fisher.history) == 4 and probe.hooked and not any(probe.hooked)


class TwoForwardNet(SmallNet):
    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return two_forward_loss(self.net, *batch)


def test_a_network_run_twice_in_a_step_is_measured_exactly(tmp_path):
    """Documented behaviour: per-sample gradients sum over every call of a layer in the step."""
    module = TwoForwardNet()
    fisher = FisherSpectrum()
    fit(module, [fisher], tmp_path, max_steps=3)
    for record, (state, batch, lr) in zip(fisher.history, module.snapshots):
        expected = reference_statistics(reference_gram(state, batch, two_forward_loss), lr)
        assert record["trace"] == pytest.approx(expected["trace"], rel=1e-9)
        assert record["c_k"] == pytest.approx(expected["c_k"], rel=1e-6)


def test_statistics_of_a_rank_deficient_matrix():
    """Duplicate per-sample gradients: the zero eigenvalues are left out of c (eq. 7)."""
    jacobian = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    stats = fisher_statistics(jacobian.T @ jacobian)
    assert stats.rank.item() == 2
    assert stats.condition.item() == pytest.approx(math.sqrt(4.0 / 2.0))
    assert stats.trace.item() == pytest.approx(6.0)


def test_non_finite_gram_gives_nan_statistics_without_raising():
    gram = torch.eye(4, dtype=torch.float64)
    gram[1, 2] = torch.nan
    stats = fisher_statistics(gram)
    scalars = (stats.condition, stats.trace, stats.lambda_max, stats.rank, stats.noise_scale)
    assert all(math.isnan(value.item()) for value in scalars)
    assert torch.isnan(stats.eigenvalues).all()


def test_nan_loss_does_not_crash_and_is_left_out_of_running_measures(tmp_path):
    module = SmallNet(nan_at_step=2)
    fisher = FisherSpectrum()
    with pytest.warns(UserWarning, match="non-finite"):
        fit(module, [fisher], tmp_path, max_steps=4)

    conditions = [h["c_k"] for h in fisher.history]
    assert math.isnan(conditions[2]) and math.isnan(fisher.history[2]["l_k"])
    finite = [c for c in conditions if math.isfinite(c)]
    assert len(finite) == 3
    assert fisher.C_bar == pytest.approx(np.mean(finite), rel=1e-12)
    assert math.isfinite(fisher.L)


def test_resume_continues_running_measures_exactly(tmp_path):
    full = FisherSpectrum()
    fit(SmallNet(), [full], tmp_path / "full", max_steps=8)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = FisherSpectrum()
    fit(SmallNet(), [first, checkpoint], tmp_path / "a", max_steps=4, enable_checkpointing=True)
    resumed = FisherSpectrum()
    fit(
        SmallNet(),
        [resumed],
        tmp_path / "b",
        max_steps=8,
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"),
    )

    assert [h["step"] for h in resumed.history] == [4, 5, 6, 7], "this fit's measurements"
    for ours, reference in zip(resumed.history, full.history[4:]):
        assert ours["c_k"] == pytest.approx(reference["c_k"], rel=1e-9)
        assert ours["L"] == pytest.approx(reference["L"], rel=1e-9)
    assert resumed.C_bar == pytest.approx(full.C_bar, rel=1e-9)
    assert resumed.L == pytest.approx(full.L, rel=1e-9)


class EpochNoiseScaleProbe(Callback):
    """FisherSpectrum's epoch-pooled noise scale at each epoch's end (what BatchSizeScheduler reads)."""

    def __init__(self, fisher: FisherSpectrum) -> None:
        self.fisher, self.values = fisher, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.values.append(self.fisher.epoch_noise_scale)


@pytest.mark.parametrize("resume_step", [2, 4, 6], ids=["mid-epoch", "epoch-last-batch", "next-epoch"])
def test_resume_keeps_the_epoch_pooled_noise_scale(tmp_path, resume_step):
    """Four identical batches an epoch, so a resumed epoch trains on the data it would have (a plain
    loader restarts it from its first batch); the epoch's pooled parts come from the checkpoint."""
    x = make_data(8).tensors[0]
    data = TensorDataset(x.repeat(4, 1, 1, 1), torch.zeros(32, dtype=torch.long))  # one class: |G|² > 0

    def run(callbacks, max_steps, ckpt_path=None):
        trainer = quiet_fit_trainer(callbacks, tmp_path, max_steps=max_steps, enable_checkpointing=True)
        trainer.fit(SmallNet(), DataLoader(data, batch_size=8), ckpt_path=ckpt_path)

    full = EpochNoiseScaleProbe(FisherSpectrum())
    run([full.fisher, full], 8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_step, save_top_k=-1)
    run([FisherSpectrum(), checkpoint], resume_step)
    resumed = EpochNoiseScaleProbe(FisherSpectrum())
    ckpt = tmp_path / "ckpt" / f"epoch={(resume_step - 1) // 4}-step={resume_step}.ckpt"
    run([resumed.fisher, resumed], 8, ckpt_path=str(ckpt))

    assert all(math.isfinite(value) for value in full.values), full.values
    np.testing.assert_allclose(
        resumed.values, full.values[len(full.values) - len(resumed.values) :], rtol=1e-9
    )


def test_logs_namespaced_metrics_and_writes_epoch_csv_for_beacon_map(tmp_path):
    """With the Trainer's default log_every_n_steps every measurement reaches TensorBoard at its step."""
    fisher = FisherSpectrum(log_eigenvalues=True)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = fit(SmallNet(), [fisher], tmp_path, max_steps=8, logger=logger)

    expected = {"c_k", "C_bar", "l_k", "L", "trace", "lambda_max", "rank", "noise_scale", "trace_sigma"}
    assert {f"fisher/{name}" for name in expected} <= set(trainer.callback_metrics)
    scalars = SummaryReader(str(tmp_path / "run" / "version_0"), pivot=False).scalars
    for name in ("c_k", "L", "l_k"):
        series = scalars[scalars["tag"] == f"fisher/{name}"]
        assert series["step"].tolist() == list(range(8)), name
        assert series["value"].tolist() == pytest.approx([h[name] for h in fisher.history], rel=1e-6), name
    csv_path = tmp_path / "run" / "version_0" / "fisher_spectrum.csv"
    rows = np.genfromtxt(csv_path, delimiter=",", names=True)
    assert rows["epoch"].tolist() == [0.0, 1.0]  # 32 samples / batch 8 = 4 steps an epoch
    assert rows["L"][-1] == pytest.approx(fisher.L, rel=1e-9)
    assert rows["C_bar"][0] == pytest.approx(fisher.history[3]["C_bar"], rel=1e-9)

    histograms = SummaryReader(str(tmp_path / "run" / "version_0"), pivot=False).histograms
    eigenvalues = histograms[histograms["tag"] == "fisher/eigenvalues"]
    assert eigenvalues["step"].tolist() == list(range(8))
    for (_, row), record in zip(eigenvalues.iterrows(), fisher.history):
        assert row["counts"].sum() == 8, "one entry per eigenvalue of the B = 8 matrix"
        assert row["limits"][-2] < record["lambda_max"] <= row["limits"][-1], "λmax in the top bucket"

    figure = beacon_map({"s8": csv_path}, color_by="batch_size")
    assert figure.axes and figure.axes[0].get_xlabel().startswith("C̄")


def test_the_epoch_row_has_the_loaders_batch_size_when_the_last_batch_is_ragged(tmp_path):
    """30 samples at 8: batches of 8, 8, 8, 6, each measured; the history keeps each step's size, the
    epoch's row of fisher_spectrum.csv (the beacons' size) the loader's 8, its other columns the last step's."""
    fisher = FisherSpectrum()
    trainer = quiet_fit_trainer(
        [fisher], tmp_path, max_epochs=2, logger=TensorBoardLogger(tmp_path, name="run")
    )
    trainer.fit(SmallNet(), DataLoader(make_data(n=30), batch_size=8))
    assert [r["batch_size"] for r in fisher.history] == [8, 8, 8, 6] * 2
    rows = np.genfromtxt(tmp_path / "run" / "version_0" / "fisher_spectrum.csv", delimiter=",", names=True)
    assert rows["batch_size"].tolist() == [8.0, 8.0]
    assert rows["step"].tolist() == [3.0, 7.0] and rows["L"][-1] == pytest.approx(fisher.L, rel=1e-12)


def test_csv_logger_works_and_eigenvalue_histogram_is_skipped(tmp_path):
    fisher = FisherSpectrum(log_eigenvalues=True)
    trainer = fit(SmallNet(), [fisher], tmp_path, max_steps=4, logger=CSVLogger(tmp_path))
    assert trainer.callback_metrics["fisher/C_bar"].item() == pytest.approx(fisher.C_bar, rel=1e-12)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("fisher/L")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    assert (tmp_path / "lightning_logs" / "version_0" / "fisher_spectrum.csv").exists()


class ManualModule(SmallNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "match"),
    [
        (ManualModule, {}, "automatic optimisation"),
        (SmallNet, {"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
    ],
)
def test_unsupported_training_setups_raise_at_setup(tmp_path, module, trainer_kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(module(), [FisherSpectrum()], tmp_path, **trainer_kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": 1.5}, TypeError, "every_n_steps"),
        ({"loss_reduction": "none"}, ValueError, "loss_reduction"),
        ({"rank_rtol": 0.0}, ValueError, "rank_rtol"),
        ({"unsupported": "ignore"}, ValueError, "unsupported"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        FisherSpectrum(**kwargs)


def test_resume_with_a_changed_knob_warns_and_keeps_the_state(tmp_path):
    """The state key is the callback's identity, not its knobs: a resumed fit with another
    every_n_steps keeps the checkpoint's running sums (it used to drop them silently)."""
    assert FisherSpectrum(every_n_steps=1).state_key == FisherSpectrum(every_n_steps=5).state_key
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = FisherSpectrum()
    fit(SmallNet(), [first, checkpoint], tmp_path / "a", max_steps=4, enable_checkpointing=True)
    resumed = FisherSpectrum(every_n_steps=2)
    with pytest.warns(UserWarning, match="every_n_steps: 1 -> 2"):
        fit(
            SmallNet(),
            [resumed],
            tmp_path / "b",
            max_steps=6,
            ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"),
        )
    assert [h["step"] for h in resumed.history] == [4]
    assert resumed.L == pytest.approx(first.L + 2 * resumed.history[0]["l_k"], rel=1e-12)


class InterleavedShards(SmallNet):
    """Rank r trains on samples r, r + 2, …: the two local batches of 4 make up the single
    process's batch of 8."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(
            make_data(), num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(make_data(), batch_size=4, sampler=sampler)


def test_ddp_two_processes_trace_and_L_equal_single_process_with_global_batch(tmp_path):
    """Each rank measures its local batch of 4; Tr F̃ (hence l, L) is summed to the global batch
    of 8 and must equal one process training on the same 8 samples per step."""
    single = FisherSpectrum()
    fit(SmallNet(), [single], tmp_path / "single", batch_size=8, max_steps=4)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ddp", save_last=True)
    ddp = FisherSpectrum()
    trainer = quiet_fit_trainer(
        [ddp, checkpoint],
        tmp_path,
        max_steps=4,
        devices=2,
        strategy="ddp_spawn",
        enable_checkpointing=True,
        use_distributed_sampler=False,
    )
    trainer.fit(InterleavedShards())

    with open(tmp_path / "lightning_tricks_logs" / "version_0" / "fisher_history.csv") as handle:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    assert [h["batch_size"] for h in history] == [8.0] * 4, "rank 0 wrote every measurement once"
    for ours, reference in zip(history, single.history):
        assert ours["trace"] == pytest.approx(reference["trace"], rel=1e-9)
        assert ours["l_k"] == pytest.approx(reference["l_k"], rel=1e-9)
        assert ours["L"] == pytest.approx(reference["L"], rel=1e-9)
        assert math.isfinite(ours["c_k"]) and ours["rank"] <= 4


class Float32Net(SmallNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = self.net.float()


@pytest.mark.parametrize("scaled", [False, True], ids=["bf16-mixed", "16-mixed-with-GradScaler"])
def test_mixed_precision_measures_the_unscaled_per_sample_gradients(tmp_path, scaled):
    """Under AMP F̃ is that of the true gradients: a GradScaler's factor S is divided out (S²)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    if scaled:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        options = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]}
    else:
        options = {"precision": "bf16-mixed"}
    module = Float32Net()
    fisher = FisherSpectrum()
    data = TensorDataset(make_data().tensors[0].float(), make_data().tensors[1])
    trainer = quiet_fit_trainer([fisher], tmp_path, max_steps=2, **options)
    trainer.fit(module, DataLoader(data, batch_size=8))
    for record, (state, batch, lr) in zip(fisher.history, module.snapshots):
        double_state = {name: value.double() for name, value in state.items()}
        expected = reference_statistics(reference_gram(double_state, (batch[0].double(), batch[1])), lr)
        assert record["trace"] == pytest.approx(expected["trace"], rel=0.05)
        assert record["lambda_max"] == pytest.approx(expected["lambda_max"], rel=0.05)


def test_training_and_other_callbacks_see_the_gradients_they_would_without_it(tmp_path):
    """The collector only reads activations and output gradients: the parameters after training
    and GradientFlow's per-layer statistics equal, bit for bit, a run without FisherSpectrum."""
    from lightning_tricks import GradientFlow

    runs = {}
    for name, callbacks in {"plain": [], "fisher": [FisherSpectrum()]}.items():
        module, flow = SmallNet(), GradientFlow(log_every_n_steps=1)
        fit(module, [*callbacks, flow], tmp_path / name, max_steps=8)
        runs[name] = (module, flow.flows[0].matrix)
    for ours, reference in zip(runs["fisher"][0].parameters(), runs["plain"][0].parameters(), strict=True):
        assert torch.equal(ours, reference)
    np.testing.assert_array_equal(runs["fisher"][1], runs["plain"][1])


class CrashAtEpochEnd(Callback):
    """Fails the fit in on_train_epoch_end, before FisherSpectrum's own hook writes the epoch row."""

    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("crash")


def test_checkpoint_on_an_epochs_last_batch_keeps_that_epochs_row(tmp_path):
    """Saved on epoch 0's last step, the fit dies before its epoch-end hook: the resumed fit writes
    epoch 0's (C̄, L) row, so the beacon-map table has every epoch."""
    full = FisherSpectrum()
    fit(SmallNet(), [full], tmp_path / "full", max_steps=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(RuntimeError, match="crash"):
        fit(
            SmallNet(),
            [CrashAtEpochEnd(), FisherSpectrum(), checkpoint],
            tmp_path / "a",
            max_steps=8,
            enable_checkpointing=True,
        )
    resumed = FisherSpectrum()
    trainer = fit(
        SmallNet(),
        [resumed],
        tmp_path / "b",
        max_steps=8,
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"),
    )
    rows = load_fisher_spectrum(run_directory(trainer))
    assert [row["epoch"] for row in rows] == [0, 1]
    assert [row["L"] for row in rows] == pytest.approx(
        [full.history[3]["L"], full.history[7]["L"]], rel=1e-12
    )


def test_exclude_leaves_the_named_modules_out_of_f_and_trains_them_as_usual(tmp_path):
    """``FisherSpectrum(exclude=["net.0"])``: F̃ over the other parameters (brute force with the
    convolution frozen in the reference), while the convolution trains exactly as without the callback."""
    module, plain = SmallNet(), SmallNet()
    fisher = FisherSpectrum(exclude=["net.0"])
    fit(module, [fisher], tmp_path)
    fit(plain, [], tmp_path)
    helpers.assert_identical(module.state_dict(), plain.state_dict())
    assert fisher.hyperparameters()["exclude"] == ("net.0",)
    for record, (state, batch, _) in zip(fisher.history, module.snapshots):
        expected = reference_gram(state, batch, frozen=("0.",))
        assert record["trace"] == pytest.approx(float(np.trace(expected)), rel=1e-9)


def test_exclude_names_a_module_the_model_does_not_have(tmp_path):
    with pytest.raises(ValueError, match=r"exclude: the model has no module named 'net\.9'"):
        fit(SmallNet(), [FisherSpectrum(exclude=["net.9"])], tmp_path)
    with pytest.raises(TypeError, match=r"`exclude` must be a list of module names"):
        FisherSpectrum(exclude="net.0")


class ReadsFisherHistory(Callback):
    """Reads fisher_history.csv at each batch start, as another process would, and fails the fit
    at step 5."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        path = os.path.join(run_directory(trainer), "fisher_history.csv")
        if os.path.exists(path):
            with open(path) as handle:
                self.seen.append([int(row["step"]) for row in csv.DictReader(handle)])
        else:
            self.seen.append([])
        if trainer.global_step == 5:
            raise RuntimeError("crash")


def test_history_csv_holds_every_measured_row_at_once_and_after_a_crash(tmp_path):
    """The history file stays open during the fit, but each row is on disk (for the OS) as soon as it
    is measured — a kill at any moment leaves every measured row — and the file is closed when the
    fit fails; the same callback's next fit writes its own run's file."""
    fisher, reader = FisherSpectrum(), ReadsFisherHistory()
    with pytest.raises(RuntimeError, match="crash"):
        fit(SmallNet(), [fisher, reader], tmp_path, max_steps=8)
    assert reader.seen == [list(range(step)) for step in range(6)]
    assert fisher._history_file._handle is None
    for steps, run in (([0, 1, 2, 3, 4], "version_0"), ([0, 1, 2], "version_1")):
        if run == "version_1":
            fit(SmallNet(), [fisher], tmp_path, max_steps=3)
        with open(tmp_path / "lightning_tricks_logs" / run / "fisher_history.csv") as handle:
            assert [int(row["step"]) for row in csv.DictReader(handle)] == steps
