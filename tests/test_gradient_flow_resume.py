"""GradientFlow's per-epoch figures are bit-for-bit those of the uninterrupted fit after a resume.

A checkpoint must not change how the running sums are grouped: neither in the fit that saves it
(taking a checkpoint is not a read) nor in the fit resumed from it (the unfolded window travels in
the checkpoint, row by row). Checkpoints in the earlier format (the window folded into the partial
epoch's sums) still load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from lightning_tricks.callbacks.gradient_flow import GradientFlow
from lightning_tricks.gradients.flow_tracking import FlowTracker
from lightning_tricks.gradients.gradient_flow import AlarmRule, FlowHistory, RunningFlow
from lightning_tricks.gradients.layer_stats import LayerFilter, LayerGradientStats, find_layers

STEPS_PER_EPOCH = 7
EPOCHS = 3


@pytest.fixture
def fit_flow(tmp_path, trainer_for, tiny_module):
    """``fit_flow(name, ckpt_path=None, every_n_train_steps=None)``: a GradientFlow (logging at the
    Trainer's default ``log_every_n_steps``) through :data:`EPOCHS` epochs of
    :data:`STEPS_PER_EPOCH` steps of the tiny regression, in ``tmp_path / name``, saving a
    checkpoint ``step=<n>.ckpt`` every ``every_n_train_steps`` when given. Every batch holds the
    same samples, so that a fit resumed mid-epoch (a plain DataLoader restarts its epoch) sees the
    batches the uninterrupted fit saw."""

    def fit(name: str, ckpt_path: Path | None = None, every_n_train_steps: int | None = None) -> GradientFlow:
        module = tiny_module(samples=4 * STEPS_PER_EPOCH, batch_size=4)
        x, y = module.data.tensors
        module.data = TensorDataset(x[:4].repeat(STEPS_PER_EPOCH, 1), y[:4].repeat(STEPS_PER_EPOCH, 1))
        flow, callbacks, options = GradientFlow(), [], {}
        if every_n_train_steps is not None:
            checkpoint = ModelCheckpoint(
                dirpath=tmp_path / name / "ckpt",
                every_n_train_steps=every_n_train_steps,
                save_top_k=-1,
                filename="{step}",
            )
            callbacks, options = [checkpoint], {"enable_checkpointing": True}
        trainer = trainer_for(
            [flow, *callbacks], max_epochs=EPOCHS, default_root_dir=tmp_path / name, **options
        )
        assert trainer.log_every_n_steps == 50, "the Trainer's default"
        trainer.fit(module, ckpt_path=ckpt_path)
        return flow

    return fit


def per_epoch(flow: GradientFlow) -> dict[int, dict[str, float]]:
    """``{epoch: {layer: mean_abs}}`` of the fit's history."""
    table: dict[int, dict[str, float]] = {}
    for record in flow.history:
        table.setdefault(record["epoch"], {})[record["layer"]] = record["mean_abs"]
    return table


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint that ended before")  # batches repeat
@pytest.mark.parametrize(
    "saved_at",
    [3, 10, STEPS_PER_EPOCH],
    ids=["mid-epoch-0", "mid-epoch-1", "last-batch-of-epoch-0"],
)
def test_per_epoch_values_after_a_resume_equal_the_uninterrupted_fit_exactly(saved_at, fit_flow, tmp_path):
    full = per_epoch(fit_flow("full"))
    assert sorted(full) == list(range(EPOCHS)) and len(full[0]) == 2
    saving = per_epoch(fit_flow("saving", every_n_train_steps=saved_at))
    assert saving == full, "taking a checkpoint changed the fit's figures"
    resumed = per_epoch(fit_flow("resumed", ckpt_path=tmp_path / "saving" / "ckpt" / f"step={saved_at}.ckpt"))
    first = (saved_at - 1) // STEPS_PER_EPOCH  # the epoch of the checkpoint's last step
    assert sorted(resumed) == list(range(first, EPOCHS))
    assert resumed == {epoch: full[epoch] for epoch in resumed}


# -- the engine, without a Trainer -----------------------------------------------------------------


def drive(flow: RunningFlow, net: nn.ModuleList, grads: list[list[torch.Tensor]], steps: range) -> None:
    for step in steps:
        for layer, grad in zip(net, grads[step]):
            layer.weight.grad = grad
        assert flow.update(step)


@pytest.fixture
def engine():
    """``(net, stats, rule, grads)``: four one-output linear layers and 20 steps of float32
    gradients whose means span decades (so that a sum's grouping shows in its last bits)."""
    torch.manual_seed(0)
    net = nn.ModuleList([nn.Linear(5, 1, bias=False) for _ in range(4)])
    stats = LayerGradientStats(find_layers(net))
    rule = AlarmRule(1e-8, 1e-5, 1e3, True)
    grads = [[torch.randn(1, 5) * 10.0 ** float(torch.randint(-6, 3, ())) for _ in net] for _ in range(20)]
    return net, stats, rule, grads


@pytest.mark.parametrize("saved_after", [2, 5, 9, 13])
def test_running_flow_state_dict_neither_folds_nor_changes_the_sums(saved_after, engine):
    """Whole: read at step 0, then 19 steps in windows of 8. Saved: a checkpoint after
    ``saved_after`` steps (inside a window), resumed in a fresh flow: the same epoch average and
    alarm window to the bit; the saving flow itself unchanged by its checkpoint."""
    net, stats, rule, grads = engine
    whole = RunningFlow(stats, rule, capacity=8)
    drive(whole, net, grads, range(1))
    whole.read_step()
    drive(whole, net, grads, range(1, 20))
    expected, expected_window = whole.read_epoch()

    saving = RunningFlow(stats, rule, capacity=8)
    drive(saving, net, grads, range(1))
    saving.read_step()
    drive(saving, net, grads, range(1, saved_after))
    state = saving.state_dict()
    resumed = RunningFlow(stats, rule, capacity=8)
    resumed.load_state_dict(state)
    for flow in (saving, resumed):
        drive(flow, net, grads, range(saved_after, 20))
        average, window = flow.read_epoch()
        np.testing.assert_array_equal(average, expected)
        np.testing.assert_array_equal(window.flags, expected_window.flags)
        assert window.first.tolist() == expected_window.first.tolist()
        assert window.counts.tolist() == expected_window.counts.tolist()


def test_a_checkpoint_in_the_earlier_format_still_loads(engine):
    """The earlier :meth:`RunningFlow.state_dict` folded the window: the partial epoch's sums and
    counts, the steps and the unread alarm window, no rows. Resumed from one written by hand (sums
    from a float64 loop), the epoch average is the loop's over all 20 steps."""
    net, stats, rule, grads = engine
    means = np.array([[g.double().abs().mean().item() for g in step] for step in grads])
    earlier = {
        "epoch_partial": {name: [float(means[:12, i].sum()), 12.0] for i, name in enumerate(stats.names)},
        "steps_in_epoch": 12,
        "window": {
            "layers": {"vanishing": [stats.names[0]], "exploding": []},
            "first": [3, -1],
            "counts": [2, 0, 0],
        },
    }
    resumed = RunningFlow(stats, rule, capacity=8)
    resumed.load_state_dict(earlier)
    assert resumed.state_dict() == earlier, "kept as it is until the next step"
    drive(resumed, net, grads, range(12, 20))
    assert resumed.steps_in_epoch == 20
    average, window = resumed.read_epoch()
    np.testing.assert_allclose(average, means.mean(0), rtol=1e-6)
    assert window.first[0] == 3 and window.counts[0] >= 2 and window.flags[0, 0]


def test_an_earlier_format_checkpoint_of_an_ended_epoch_closes_that_epochs_column(engine):
    """A checkpoint in the earlier format saved after epoch 0's last step, before its end hook:
    resumed in epoch 1, epoch 0's column is its saved sums over counts, and epoch 1 starts empty."""
    net, stats, rule, grads = engine
    tracker = FlowTracker("grad_flow", LayerFilter(), False, tuple(rule[:3]), (8, 2))
    sums = {name: [0.5 * (i + 1), 4.0] for i, name in enumerate(stats.names)}
    earlier = {
        "history": FlowHistory(8, 2).state_dict(),
        "counts": {"vanishing": 1, "exploding": 0, "nonfinite": 0},
        "warned": ["vanishing"],
        "epoch": 0,
        "running": {
            "epoch_partial": sums,
            "steps_in_epoch": 4,
            "window": {"layers": {"vanishing": [], "exploding": []}, "first": [-1, -1], "counts": [0, 0, 0]},
        },
    }
    tracker.load_state_dict({"optimizers": {0: earlier}})
    for layer, grad in zip(net, grads[0]):
        layer.weight.grad = grad
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    flow, rows = tracker.flow(0, [optimizer], net, epoch=1, nonfinite_alarms=True)
    assert rows == [(0, 0, name, repr(total / count)) for name, (total, count) in sums.items()]
    assert flow.running.steps_in_epoch == 0 and flow.counts["vanishing"] == 1 and flow.warned == {"vanishing"}
    assert flow.update(step=4, epoch=1, due=False) is None
    average, _ = flow.running.read_epoch()
    expected = [g.double().abs().mean().item() for g in grads[0]]
    np.testing.assert_allclose(average, expected, rtol=1e-6)
