"""FisherSpectrum never changes training and survives every fault (user-written modules, CPU).

The invariant: with the callback attached, parameters, buffers, optimiser state and
``requires_grad`` flags evolve bit for bit (``torch.equal``) as without it, or it refuses before
the first optimiser step with an error naming the problem; on every exit nothing stays hooked.
F̃ is checked against a brute-force trace Σ_i ‖∇ℓ_i‖² over the parameters trainable at each step.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from common import quiet_fit_trainer
from helpers import assert_identical, training_state
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    EarlyStopping,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks.fisher_spectrum import FisherSpectrum
from lightning_tricks.gradients import GramCollector

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


def make_data(n: int = 24, features: int = 6, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, features, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    )


class MLP(L.LightningModule):
    """A small user-written classifier with dropout (RNG) and Adam (optimiser state); it records
    the weights, batch and trainable parameter names of every step for the reference."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(6, 8), nn.BatchNorm1d(8)] if norm else [nn.Linear(6, 8)]
        self.backbone = nn.Sequential(*layers, nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.steps: list[tuple[dict[str, torch.Tensor], Any, list[str]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        self.steps.append((copy.deepcopy(self.state_dict()), batch, trainable))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.01)


def fit(module: L.LightningModule, callbacks: list, tmp_path, data=None, **kwargs) -> L.Trainer:
    """Fit with the Trainer's defaults (log_every_n_steps included); no files unless asked."""
    options = {"max_epochs": 2, **kwargs}
    ckpt_path = options.pop("ckpt_path", None)
    trainer = quiet_fit_trainer(callbacks, tmp_path, **options)
    trainer.fit(module, DataLoader(data or make_data(), batch_size=6), ckpt_path=ckpt_path)
    return trainer


def assert_training_unchanged(
    make_module, callbacks_factory, tmp_path, **kwargs
) -> tuple[Any, FisherSpectrum]:
    """Train twice, without and with FisherSpectrum (first in the list); the runs must be identical."""
    states = []
    for with_fisher in (False, True):
        torch.manual_seed(123)
        module, fisher = make_module(), FisherSpectrum()
        callbacks = ([fisher] if with_fisher else []) + callbacks_factory()
        trainer = fit(module, callbacks, tmp_path / str(with_fisher), **kwargs)
        states.append(training_state(module, trainer))
        assert_unhooked(module)
    assert_identical(states[1], states[0])
    return module, fisher


def assert_unhooked(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks, name
    for name, param in module.named_parameters():
        assert not param._backward_hooks, name


def reference_trace(make_module, state: dict[str, torch.Tensor], batch: Any, trainable: list[str]) -> float:
    """Tr F̃ = Σ_i ‖∇ℓ_i‖² over the trainable parameters, one autograd.grad per sample (float64,
    eval mode: no dropout, so only valid for steps where the model was measured without it)."""
    model = make_module().double()
    model.load_state_dict(state)
    params = [p for n, p in model.named_parameters() if n in trainable]
    x, y = batch
    total = 0.0
    for i in range(len(x)):
        sample = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        loss = model.training_step((sample, y[i : i + 1]), 0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        total += sum(g.pow(2).sum().item() for g in grads if g is not None)
    return total


# -- finding 1: freezing and unfreezing during training -------------------------------------------


class FreezeMiddle(BaseFinetuning):
    """Freezes the middle Linear at setup (after FisherSpectrum's) and unfreezes it at epoch 1
    (its input needs grad: only its weight's flag changes what autograd computes)."""

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone[3])

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone[3], optimizer, lr=0.01)


class NoDropoutMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.backbone[2] = nn.Identity()


def test_finetuning_freeze_is_respected_and_unfrozen_layers_enter_the_matrix(tmp_path):
    module, fisher = assert_training_unchanged(NoDropoutMLP, lambda: [FreezeMiddle()], tmp_path)
    assert len(fisher.history) == len(module.steps) == 8
    for record, (state, batch, trainable) in zip(fisher.history, module.steps):
        assert ("backbone.3.weight" in trainable) == (record["epoch"] == 1)
        expected = reference_trace(NoDropoutMLP, state, batch, trainable)
        assert record["trace"] == pytest.approx(expected, rel=1e-5)


def test_outside_use_check_runs_when_the_trainable_set_changes(tmp_path, monkeypatch):
    """The graph walk runs at the first measured step and again after the unfreezing (epoch 1),
    not at the steps in between (their forwards record no consumer nodes either)."""
    checked, recorded = [], []
    check, record = GramCollector.check_outside_use, GramCollector._record_consumers

    def counting_check(collector, loss):
        checked.append(len(fisher.history))
        check(collector, loss)

    def counting_record(collector, *args):
        recorded.append(collector.track_outside_use)
        record(collector, *args)

    monkeypatch.setattr(GramCollector, "check_outside_use", counting_check)
    monkeypatch.setattr(GramCollector, "_record_consumers", counting_record)
    fisher = FisherSpectrum()
    fit(NoDropoutMLP(), [fisher, FreezeMiddle()], tmp_path)
    assert len(fisher.history) == 8 and checked == [0, 4]
    assert recorded.count(True) == 2 + 3  # layers measured at step 0 (the middle one frozen), at step 4


class FreezesItself(MLP):
    """Freezes its head's weight (not the bias) at the start of epoch 1 (the module's own hook)."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.head.weight.requires_grad_(False)


def test_module_freezing_itself_mid_training_is_respected(tmp_path):
    module, _ = assert_training_unchanged(FreezesItself, list, tmp_path)
    assert not module.head.weight.requires_grad


# -- finding 2: a weight used outside its module; tied weights -----------------------------------


class FunctionalReuse(MLP):
    """The encoder's weight is also used functionally: z = enc(pre(x)); head(F.linear(z, encᵀ))."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.enc = nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.enc(torch.tanh(self.pre(x)))
        return self.head(F.linear(z, self.enc.weight.t()))


def test_weight_used_functionally_is_refused_before_any_update(tmp_path):
    module = FunctionalReuse()
    before = training_state(module)
    trainer = quiet_fit_trainer([FisherSpectrum()], tmp_path, max_epochs=1)
    with pytest.raises(ValueError, match=r"\['enc.weight'\] are used outside their module"):
        trainer.fit(module, DataLoader(make_data(), batch_size=6), ckpt_path=None)
    assert trainer.global_step == 0
    assert_identical(training_state(module), before)
    assert_unhooked(module)


class TiedLanguageModel(MLP):
    """Embedding and output projection share one Parameter (registered in both modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.out = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(idx)))).mean(dim=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def token_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randint(0, 7, (12, 3), generator=generator), torch.randint(0, 7, (12,), generator=generator)
    )


def test_tied_weights_train_identically_and_are_measured_exactly(tmp_path):
    module, fisher = assert_training_unchanged(TiedLanguageModel, list, tmp_path, data=token_data())
    for record, (state, batch, trainable) in zip(fisher.history, module.steps):
        expected = reference_trace(TiedLanguageModel, state, batch, trainable)
        assert record["trace"] == pytest.approx(expected, rel=1e-5)


# -- finding 3: an exception anywhere leaves nothing behind --------------------------------------


class Boom(Exception):
    pass


class FailsAt(MLP):
    """Raises at one hook point of global step 1."""

    def __init__(self, point: str) -> None:
        super().__init__()
        self.point = point

    def _maybe_fail(self, point: str) -> None:
        if self.point == point and self.global_step == 1:
            raise Boom(point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(x)
        self._maybe_fail("forward")
        return self.head(hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self._maybe_fail("training_step")
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._maybe_fail("before_backward")

    def on_after_backward(self) -> None:
        self._maybe_fail("after_backward")

    def on_before_optimizer_step(self, optimizer) -> None:
        self._maybe_fail("before_optimizer_step")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if self.point == "closure" and self.global_step == 1:
            optimizer_closure()
            raise Boom("closure")
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def plain_training(module: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for x, y in list(DataLoader(make_data(), batch_size=6))[:steps]:
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize(
    "point",
    ["forward", "training_step", "before_backward", "after_backward", "before_optimizer_step", "closure"],
)
def test_exception_at_any_point_leaves_the_model_unhooked(tmp_path, point):
    module = FailsAt(point)
    with pytest.raises(Boom):
        fit(module, [FisherSpectrum()], tmp_path)
    assert_unhooked(module)
    assert all(p.requires_grad for p in module.parameters())
    module.point = None
    never_hooked = MLP()
    never_hooked.load_state_dict(module.state_dict())
    for model in (module, never_hooked):
        torch.manual_seed(0)
        plain_training(model)
    assert_identical(training_state(module), training_state(never_hooked))


# -- finding 4: Lightning flows without a backward ------------------------------------------------


def test_swa_with_batchnorm_update_pass(tmp_path):
    assert_training_unchanged(
        lambda: MLP(norm=True), lambda: [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)], tmp_path
    )


class SkipsSteps(MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return None if batch_idx in (0, 2) else super().training_step(batch, batch_idx)


def test_training_step_returning_none_is_skipped(tmp_path):
    _, fisher = assert_training_unchanged(SkipsSteps, list, tmp_path)
    assert len(fisher.history) == 4  # 2 of 4 steps an epoch, 2 epochs


class NoOptimizer(MLP):
    def configure_optimizers(self):
        return None


def test_no_optimizer_is_not_measured(tmp_path):
    _, fisher = assert_training_unchanged(NoOptimizer, list, tmp_path)
    assert fisher.history == []


# -- finding 5: gradient accumulation, also scheduled later ---------------------------------------


@pytest.mark.parametrize("fisher_first", [True, False])
def test_scheduled_accumulation_is_refused_at_setup(tmp_path, fisher_first):
    callbacks = [FisherSpectrum(), GradientAccumulationScheduler({1: 2})]
    module = MLP()
    with pytest.raises(ValueError, match="gradient accumulation"):
        fit(module, callbacks if fisher_first else callbacks[::-1], tmp_path)
    assert module.steps == []
    assert_unhooked(module)


class AccumulateLater(Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            trainer.accumulate_grad_batches = 2


def test_accumulation_switched_on_later_is_refused(tmp_path):
    module = MLP()
    with pytest.raises(ValueError, match="gradient accumulation"):
        fit(module, [FisherSpectrum(), AccumulateLater()], tmp_path)
    assert len(module.steps) == 4  # refused at the first batch of epoch 1
    assert_unhooked(module)


# -- finding 6: batch dimension and empty batches -------------------------------------------------


class SequenceFirst(MLP):
    """Batches of (B, T, 6) are turned into (T, B, 6) before the layers."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x.transpose(0, 1)).mean(dim=0), y)


def test_batch_dimension_not_first_is_refused(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(24, 4, 6, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    )
    module = SequenceFirst()
    with pytest.raises(ValueError, match="batch dimension first"):
        fit(module, [FisherSpectrum()], tmp_path, data=data)
    assert_unhooked(module)


class DropsBatch(MLP):
    """Batch 1 of each epoch is filtered down to no sample at all."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        keep = slice(0, 0) if batch_idx == 1 else slice(None)
        return F.cross_entropy(self(x[keep]), y[keep], reduction="sum")


def test_empty_batch_is_skipped(tmp_path):
    _, fisher = assert_training_unchanged(DropsBatch, list, tmp_path)
    assert len(fisher.history) == 6


# -- finding 7: reuse of the callback; resume -----------------------------------------------------


def test_reused_callback_restarts_its_running_measures(tmp_path):
    reused, fresh = FisherSpectrum(), FisherSpectrum()
    fit(MLP(), [reused], tmp_path / "a")
    fit(
        MLP(),
        [reused, EarlyStopping("fisher/L", patience=100, check_on_train_epoch_end=True)],
        tmp_path / "b",
    )
    fit(MLP(), [fresh], tmp_path / "c")
    assert [h["step"] for h in reused.history] == [h["step"] for h in fresh.history]
    assert reused.L == fresh.L and reused.C_bar == fresh.C_bar


def test_resume_with_the_same_callback_keeps_the_checkpoint_state(tmp_path):
    """Lightning loads callback state after ``setup`` (where the measures restart): resuming with the
    same instance continues from the checkpoint, not from the instance's own later state."""
    full = FisherSpectrum()
    fit(NoDropoutMLP(), [full], tmp_path / "full", max_epochs=None, max_steps=8)
    fisher = FisherSpectrum()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(
        NoDropoutMLP(),
        [fisher, checkpoint],
        tmp_path / "a",
        max_epochs=None,
        max_steps=6,
        enable_checkpointing=True,
    )
    resume = str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")  # the instance itself has measured 6 steps
    fit(NoDropoutMLP(), [fisher], tmp_path / "b", max_epochs=None, max_steps=8, ckpt_path=resume)
    assert [h["step"] for h in fisher.history] == [4, 5, 6, 7], "this fit's measurements"
    assert fisher.L == pytest.approx(full.L, rel=1e-12)
