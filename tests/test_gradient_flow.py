"""GradientFlow against brute-force per-layer gradient statistics (seed 001_0184062a2e770d9a.txt
§2, Fig. 1–2: per layer, in depth order, the mean absolute value of the loss gradient).

References are float64 loops over hand-listed layers, independent of the engine's grouping.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tricks.callbacks.gradient_flow import GradientFlow, GradientFlowAlarm
from lightning_tricks.gradients.layer_stats import (
    ForwardOrderRecorder,
    LayerFilter,
    LayerGradientStats,
    find_layers,
    sort_by_forward_order,
)
from lightning_tricks.plotting import plot_gradient_flow

# ---------------------------------------------------------------------------------------------
# Networks, data, references
# ---------------------------------------------------------------------------------------------


class ScrambledCNN(nn.Module):
    """Registration order (head, conv2, bn, conv1, unused) differs from forward order."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(8, classes)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def scrambled_layers(net: ScrambledCNN, prefix: str = "") -> list[tuple[str, list[nn.Parameter]]]:
    """The expected layers of ScrambledCNN in forward order, listed by hand."""
    listed = [
        ("conv1", [net.conv1.weight, net.conv1.bias]),
        ("bn", [net.bn.weight, net.bn.bias]),
        ("conv2", [net.conv2.weight]),
        ("head", [net.head.weight, net.head.bias]),
        ("unused", [net.unused.weight, net.unused.bias]),
    ]
    return [(prefix + name, params) for name, params in listed]


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def small_resnet(blocks: int = 3, channels: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        *[BasicBlock(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )


def deep_mlp(depth: int, activation: type[nn.Module], width: int = 16, scale: float = 1.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(2 * 8 * 8, width), activation()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), activation()]
    net = nn.Sequential(*layers, nn.Linear(width, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def brute_force_stats(
    layers: list[tuple[str, list[nn.Parameter]]],
) -> tuple[dict[str, tuple[float, float, float]], float]:
    """Per layer (mean |g|, L2, max |g|) over the parameters with a gradient, and the global norm;
    float64 Python loops over the parameters."""
    out, total_sq = {}, 0.0
    for name, params in layers:
        grads = [p.grad.detach().double().flatten() for p in params if p.grad is not None]
        if not grads:
            continue
        abs_sum = sum(float(g.abs().sum()) for g in grads)
        count = sum(g.numel() for g in grads)
        sq = sum(float((g * g).sum()) for g in grads)
        out[name] = (abs_sum / count, math.sqrt(sq), max(float(g.abs().max()) for g in grads))
        total_sq += sq
    return out, math.sqrt(total_sq)


class Classifier(pl.LightningModule):
    """Cross-entropy classifier; records brute-force statistics of every optimiser step's
    gradient in its own ``on_before_optimizer_step`` (which Lightning calls after callbacks')."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.05,
        loss_scale: float = 1.0,
        nan_at_step: int | None = None,
        reference_layers=None,
        zero_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.loss_scale = loss_scale
        self.nan_at_step = nan_at_step
        self.reference_layers = reference_layers
        self.zero_nonfinite = zero_nonfinite
        self.reference: list[tuple[dict, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y) * self.loss_scale
        if self.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.reference_layers is not None:
            self.reference.append(brute_force_stats(self.reference_layers(self)))
        if self.zero_nonfinite:
            for p in self.parameters():
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call; has no ``add_figure`` (and no directory unless given)."""

    def __init__(self, save_dir: Path | None = None) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []
        self._save_dir = save_dir

    @property
    def save_dir(self) -> str | None:
        return None if self._save_dir is None else str(self._save_dir)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def make_trainer(tmp_path: Path, callbacks, logger=False, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def flow_warnings(records, kind: str) -> list[str]:
    return [str(r.message) for r in records if f"GradientFlow: {kind}" in str(r.message)]


# ---------------------------------------------------------------------------------------------
# Engine: grouping, order, batched statistics
# ---------------------------------------------------------------------------------------------


def test_find_layers_groups_weight_and_bias_and_gives_tied_parameters_to_their_first_owner():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 4))
    net[2].weight = net[0].weight
    net.register_parameter("scale", nn.Parameter(torch.ones(1)))
    layers = find_layers(net)
    assert [layer.name for layer in layers] == ["<root>", "0", "1", "2"]
    assert [len(layer.parameters) for layer in layers] == [1, 2, 2, 1]
    assert layers[3].parameters[0] is net[2].bias
    subset = find_layers(net, [net[1].weight, net[2].bias])
    assert [(layer.name, len(layer.parameters)) for layer in subset] == [("1", 1), ("2", 1)]


def test_forward_order_recorder_and_sort_put_unseen_layers_last_in_registration_order():
    net = ScrambledCNN()
    layers = find_layers(net)
    assert [layer.name for layer in layers] == ["head", "conv2", "bn", "conv1", "unused"]
    recorder = ForwardOrderRecorder()
    recorder.start((layer.name, layer.module) for layer in layers)
    net(torch.randn(2, 2, 8, 8))
    net(torch.randn(2, 2, 8, 8))
    recorder.stop()
    assert recorder.order == ["conv1", "bn", "conv2", "head"]
    assert not recorder.recording
    ordered = sort_by_forward_order(layers, recorder.order)
    assert [layer.name for layer in ordered] == [name for name, _ in scrambled_layers(net)]


def test_layer_filter_by_regex_and_type():
    layers = find_layers(ScrambledCNN())
    keep = LayerFilter(include=[nn.Conv2d, r"^head$"], exclude=r"conv2")
    assert [layer.name for layer in layers if keep(layer)] == ["head", "conv1"]
    no_linear = LayerFilter(exclude=nn.Linear)
    assert [layer.name for layer in layers if no_linear(layer)] == ["conv2", "bn", "conv1"]
    from_yaml = LayerFilter(
        include=["torch.nn.Conv2d", "torch.nn.Lineage", "he.d"], exclude="torch.nn.BatchNorm2d"
    )
    assert [layer.name for layer in layers if from_yaml(layer)] == ["head", "conv2", "conv1"]


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(include=3), TypeError, "include"),
        (dict(exclude=[nn.Conv2d, 1.5]), TypeError, "exclude"),
        (dict(include="conv("), ValueError, "include"),
    ],
)
def test_layer_filter_rejects_bad_patterns(kwargs, error, word):
    with pytest.raises(error, match=word):
        LayerFilter(**kwargs)


@pytest.mark.parametrize("arch, batch_size", [("cnn", 1), ("cnn", 7), ("resnet", 5), ("mlp", 16)])
def test_layer_gradient_stats_equal_brute_force(arch, batch_size):
    torch.manual_seed(batch_size)
    if arch == "cnn":
        net = ScrambledCNN()
        listed = scrambled_layers(net)
    elif arch == "resnet":
        net = small_resnet(blocks=2)
        listed = [(layer.name, list(layer.parameters)) for layer in find_layers(net)]
    else:
        net = deep_mlp(5, nn.Tanh).double()
        listed = [(f"{i}", [m.weight, m.bias]) for i, m in enumerate(net) if isinstance(m, nn.Linear)]
    dtype = next(net.parameters()).dtype
    x = torch.randn(batch_size, 2, 8, 8, dtype=dtype)
    F.cross_entropy(net(x), torch.randint(0, 3, (batch_size,))).backward()
    by_name = {layer.name: layer for layer in find_layers(net)}
    stats = LayerGradientStats([by_name[name] for name, _ in listed]).compute()
    expected, global_norm = brute_force_stats(listed)
    for i, (name, _) in enumerate(listed):
        if name not in expected:
            assert not stats.present[i] and stats.mean_abs[i] == 0
            continue
        assert stats.present[i]
        got = (stats.mean_abs[i], stats.l2[i], stats.max_abs[i])
        for value, reference in zip(got, expected[name], strict=True):
            assert float(value) == pytest.approx(reference, rel=1e-5, abs=1e-12)
    assert float(stats.global_norm) == pytest.approx(global_norm, rel=1e-5)
    assert stats.mean_abs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_layer_gradient_stats_global_norm_counts_other_parameters_and_survives_nan():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    net(torch.randn(3, 4)).sum().backward()
    layers = find_layers(net)
    stats = LayerGradientStats(layers[1:], other_parameters=net.parameters()).compute()
    _, expected_global = brute_force_stats([("all", list(net.parameters()))])
    assert stats.mean_abs.shape == (1,)
    assert float(stats.global_norm) == pytest.approx(expected_global, rel=1e-6)
    net[1].weight.grad[0, 0] = float("nan")
    stats = LayerGradientStats(layers).compute()
    assert torch.isfinite(stats.mean_abs[0]) and torch.isnan(stats.mean_abs[1])
    net.zero_grad(set_to_none=True)
    assert LayerGradientStats(layers).compute() is None


def test_plot_gradient_flow_draws_one_line_per_epoch_on_a_log_axis():
    matrix = np.array([[1e-12, 1e-9, np.nan], [1e-4, 1e-3, 1e-3], [1e-2, 0.0, 1e-1]])
    figure = plot_gradient_flow(matrix, ["a", "b", "c"], [3, 4, 5], vanish_threshold=1e-8)
    axes = figure.axes[0]
    assert axes.get_yscale() == "log"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["a", "b", "c"]
    epoch_lines = [line for line in axes.get_lines() if line.get_linestyle() == "-"]
    assert len(epoch_lines) == 3
    with pytest.raises(ValueError, match="matrix"):
        plot_gradient_flow(matrix, ["a", "b"])


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(every_n_steps=0), ValueError, "every_n_steps"),
        (dict(every_n_steps=2.0), TypeError, "every_n_steps"),
        (dict(log_per_layer="yes"), TypeError, "log_per_layer"),
        (dict(vanish_threshold=-1.0), ValueError, "vanish_threshold"),
        (dict(explode_threshold="big"), TypeError, "explode_threshold"),
        (dict(vanish_ratio=1.5), ValueError, "vanish_ratio"),
        (dict(vanish_threshold=10.0, explode_threshold=1.0), ValueError, "vanish_threshold"),
        (dict(on_alarm="panic"), ValueError, "on_alarm"),
        (dict(include=[object]), TypeError, "include"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, word):
    with pytest.raises(error, match=word):
        GradientFlow(**kwargs)


def test_filters_selecting_no_layer_fail_at_setup(tmp_path):
    trainer = make_trainer(tmp_path, [GradientFlow(include=nn.LSTM)], max_epochs=1)
    with pytest.raises(ValueError, match="selects no layer"):
        trainer.fit(Classifier(ScrambledCNN()), loader())


# ---------------------------------------------------------------------------------------------
# Training: values, order, alarms
# ---------------------------------------------------------------------------------------------


def test_logged_values_and_history_equal_brute_force_in_forward_order(tmp_path):
    torch.manual_seed(0)
    module = Classifier(ScrambledCNN(), reference_layers=lambda m: scrambled_layers(m.net, "net."))
    logger = MemoryLogger()
    flow = GradientFlow(every_n_steps=1, log_per_layer=True)
    trainer = make_trainer(tmp_path, [flow], logger=logger, accumulate_grad_batches=2)
    trainer.fit(module, loader(n=64, batch_size=8))

    names = [name for name, _ in scrambled_layers(module.net, "net.")]
    assert flow.history[0].layer_names == names
    steps = [(step, m) for step, m in logger.logged if "grad_flow/global_norm" in m]
    assert [step for step, _ in steps] == list(range(8)) == list(range(len(module.reference)))
    for (_, metrics), (expected, global_norm) in zip(steps, module.reference, strict=True):
        assert metrics["grad_flow/global_norm"] == pytest.approx(global_norm, rel=1e-5)
        assert not any("net.unused" in key for key in metrics)
        for name, values in expected.items():
            for stat, value in zip(("mean_abs", "l2", "max_abs"), values, strict=True):
                assert metrics[f"grad_flow/layers/{name}/{stat}"] == pytest.approx(value, rel=1e-5)
        means = [v[0] for v in expected.values()]
        assert metrics["grad_flow/min_layer_mean"] == pytest.approx(min(means), rel=1e-5)
        assert metrics["grad_flow/max_layer_mean"] == pytest.approx(max(means), rel=1e-5)
        first, last = expected["net.conv1"][0], expected["net.head"][0]
        assert metrics["grad_flow/first_to_last_ratio"] == pytest.approx(first / last, rel=1e-5)

    matrix = flow.history[0].matrix
    assert flow.history[0].epochs == [0, 1]
    for epoch in range(2):
        epoch_refs = [ref for ref, _ in module.reference[4 * epoch : 4 * epoch + 4]]
        for row, name in enumerate(names[:-1]):
            assert matrix[row, epoch] == pytest.approx(np.mean([r[name][0] for r in epoch_refs]), rel=1e-5)
    assert np.isnan(matrix[-1]).all()


def test_logging_follows_log_every_n_steps_by_default(tmp_path):
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, [GradientFlow()], logger=logger, max_epochs=1, log_every_n_steps=3)
    trainer.fit(Classifier(ScrambledCNN()), loader(n=128, batch_size=16))
    assert [step for step, m in logger.logged if "grad_flow/global_norm" in m] == [2, 5]


def test_deep_sigmoid_net_raises_vanishing_alarm_naming_its_early_layers(tmp_path):
    torch.manual_seed(0)
    flow = GradientFlow(every_n_steps=2, on_alarm="raise")
    trainer = make_trainer(tmp_path, [flow], max_epochs=1)
    with pytest.raises(GradientFlowAlarm, match=r"vanishing gradients at step 0 in layers: net\.1, net\.3"):
        trainer.fit(Classifier(deep_mlp(12, nn.Sigmoid)), loader())


def test_vanishing_warning_is_given_once_and_counted(tmp_path):
    torch.manual_seed(0)
    logger = MemoryLogger()
    flow = GradientFlow(every_n_steps=2)
    trainer = make_trainer(tmp_path, [flow], logger=logger, max_epochs=2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(Classifier(deep_mlp(12, nn.Sigmoid)), loader())
    assert len(flow_warnings(records, "vanishing")) == 1
    assert logger.logged[-1][1]["grad_flow/vanishing_steps"] == 8
    assert logger.logged[-1][1]["grad_flow/first_to_last_ratio"] < 1e-5


@pytest.mark.parametrize("net_name", ["small_resnet", "resnet20"])
def test_healthy_resnet_raises_no_alarm(tmp_path, net_name):
    torch.manual_seed(0)
    if net_name == "resnet20":
        from lightning_tricks.models import build_net

        net = build_net("resnet20", 3, in_channels=2)
    else:
        net = small_resnet()
    logger = MemoryLogger()
    trainer = make_trainer(
        tmp_path, [GradientFlow(every_n_steps=2, on_alarm="raise")], logger=logger, max_epochs=1
    )
    trainer.fit(Classifier(net, lr=0.02), loader())
    last = logger.logged[-1][1]
    assert last["grad_flow/vanishing_steps"] == 0 and last["grad_flow/exploding_steps"] == 0
    assert last["grad_flow/first_to_last_ratio"] > 1e-3


def test_scaled_loss_triggers_exploding_alarm_and_stop(tmp_path):
    torch.manual_seed(0)
    flow = GradientFlow(every_n_steps=1, on_alarm="stop")
    trainer = make_trainer(tmp_path, [flow], max_epochs=3)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(Classifier(deep_mlp(4, nn.ReLU), lr=0.0, loss_scale=1e7), loader())
    messages = flow_warnings(records, "exploding")
    assert len(messages) == 1 and "step 0" in messages[0] and "net.1" in messages[0]
    assert "Stopping" in messages[0]
    assert trainer.global_step < 12


def test_huge_learning_rate_diverges_to_nonfinite_and_raises(tmp_path):
    torch.manual_seed(0)
    flow = GradientFlow(every_n_steps=1, explode_threshold=None, on_alarm="raise")
    trainer = make_trainer(tmp_path, [flow], max_epochs=5)
    with pytest.raises(GradientFlowAlarm, match="exploding"):
        trainer.fit(Classifier(deep_mlp(6, nn.ReLU, scale=3.0), lr=1e6), loader())
    assert flow._alarm_counts[0]["nonfinite"] + flow._alarm_counts[0]["exploding"] >= 1


def test_nan_gradients_never_crash_and_are_left_out_of_the_history(tmp_path):
    torch.manual_seed(0)
    module = Classifier(
        ScrambledCNN(),
        nan_at_step=2,
        zero_nonfinite=True,
        reference_layers=lambda m: scrambled_layers(m.net, "net."),
    )
    logger = MemoryLogger()
    flow = GradientFlow(every_n_steps=3)
    trainer = make_trainer(tmp_path, [flow], logger=logger, max_epochs=2, limit_train_batches=4)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(module, loader())
    assert trainer.global_step == 8
    assert len(flow_warnings(records, "exploding")) == 1
    assert logger.logged[-1][1]["grad_flow/nonfinite_steps"] == 1
    finite_steps = [ref for ref, _ in module.reference[:4] if not math.isnan(ref["net.conv1"][0])]
    assert len(finite_steps) == 3
    expected = np.mean([ref["net.conv1"][0] for ref in finite_steps])
    assert flow.history[0].matrix[0, 0] == pytest.approx(expected, rel=1e-5)


class GrowingOptimizerClassifier(Classifier):
    """Trains only the head in epoch 0, then adds the backbone as a parameter group (fine-tuning)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.head.parameters(), lr=0.05)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            backbone = [p for name, p in self.net.named_parameters() if not name.startswith("head.")]
            self.optimizers().optimizer.add_param_group({"params": backbone})


def test_layers_added_to_the_optimizer_join_the_flow_in_forward_order(tmp_path):
    torch.manual_seed(0)
    flow = GradientFlow()
    make_trainer(tmp_path, [flow], max_epochs=2).fit(GrowingOptimizerClassifier(ScrambledCNN()), loader())
    history = flow.history[0]
    assert history.layer_names == [name for name, _ in scrambled_layers(ScrambledCNN(), "net.")]
    matrix = history.matrix
    assert np.isnan(matrix[:3, 0]).all() and np.isfinite(matrix[3]).all()
    assert np.isfinite(matrix[:3, 1]).all() and np.isnan(matrix[4]).all()


# ---------------------------------------------------------------------------------------------
# Loggers and files
# ---------------------------------------------------------------------------------------------


def read_csv_matrix(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path) as handle:
        rows = list(csv.reader(handle))
    return rows[0], [row[0] for row in rows[1:]], np.array([[float(v) for v in row[1:]] for row in rows[1:]])


def test_tensorboard_gets_the_figure_and_scalars_and_files_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    flow = GradientFlow(every_n_steps=2)
    trainer = make_trainer(tmp_path, [flow], logger=logger, max_epochs=2)
    trainer.fit(Classifier(ScrambledCNN()), loader())

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [image.step for image in events.Images("grad_flow/figure")] == [0, 1]
    scalars = set(events.Tags()["scalars"])
    assert {"grad_flow/global_norm", "grad_flow/min_layer_mean", "grad_flow/first_to_last_ratio"} <= scalars
    assert not any(tag.startswith("grad_flow/layers/") for tag in scalars)
    history = flow.history[0]
    np.testing.assert_array_equal(np.load(Path(logger.log_dir) / "grad_flow.npy"), history.matrix)
    header, names, matrix = read_csv_matrix(Path(logger.log_dir) / "grad_flow.csv")
    assert header == ["layer", "epoch_0", "epoch_1"] and names == history.layer_names
    np.testing.assert_array_equal(matrix, history.matrix)


def test_csv_logger_gets_scalars_without_figures_and_no_logger_still_writes_files(tmp_path):
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(
        tmp_path, [GradientFlow(every_n_steps=2, log_per_layer=True)], logger=logger, max_epochs=1
    )
    trainer.fit(Classifier(ScrambledCNN()), loader())
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert "grad_flow/global_norm" in header and "grad_flow/layers/net.conv1/mean_abs" in header
    assert (Path(logger.log_dir) / "grad_flow.npy").exists()

    bare = tmp_path / "bare"
    flow = GradientFlow()
    make_trainer(bare, [flow], logger=False, max_epochs=1).fit(Classifier(ScrambledCNN()), loader())
    np.testing.assert_array_equal(np.load(bare / "grad_flow.npy"), flow.history[0].matrix)


# ---------------------------------------------------------------------------------------------
# Multiple optimisers, AMP, resume, DDP
# ---------------------------------------------------------------------------------------------


class TwoOptimizerModule(pl.LightningModule):
    """A GAN-shaped manual-optimisation module: a generator and a critic, one optimiser each."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 128))
        self.critic = nn.Sequential(nn.Flatten(), nn.Linear(128, 8), nn.Tanh(), nn.Linear(8, 1))
        self.reference: list[tuple[int, dict]] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_gen, opt_critic = self.optimizers()
        fake = self.gen(torch.randn(x.shape[0], 4)).view_as(x)
        critic_loss = self.critic(fake.detach()).mean() - self.critic(x).mean()
        opt_critic.zero_grad()
        self.manual_backward(critic_loss)
        opt_critic.step()
        gen_loss = -self.critic(fake).mean()
        opt_gen.zero_grad()
        self.manual_backward(gen_loss)
        opt_gen.step()

    def on_before_optimizer_step(self, optimizer):
        index = [o.optimizer for o in self.optimizers()].index(optimizer)
        part = self.gen if index == 0 else self.critic
        prefix = "gen" if index == 0 else "critic"
        layers = [
            (f"{prefix}.{i}", [m.weight, m.bias]) for i, m in enumerate(part) if isinstance(m, nn.Linear)
        ]
        self.reference.append((index, brute_force_stats(layers)[0]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.critic.parameters(), 1e-3)


def test_multiple_optimizers_keep_separate_flows(tmp_path):
    torch.manual_seed(0)
    module = TwoOptimizerModule()
    logger = MemoryLogger(save_dir=tmp_path)
    flow = GradientFlow(every_n_steps=1, log_per_layer=True)
    trainer = make_trainer(tmp_path, [flow], logger=logger, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, loader())
    assert flow.history[0].layer_names == ["gen.0", "gen.2"]
    assert flow.history[1].layer_names == ["critic.1", "critic.3"]
    assert len(logger.logged) == len(module.reference) == 4
    assert not any("grad_flow/global_norm" in metrics for _, metrics in logger.logged)
    for (_, metrics), (index, expected) in zip(logger.logged, module.reference, strict=True):
        for name, (mean, _, _) in expected.items():
            assert metrics[f"grad_flow/opt{index}/layers/{name}/mean_abs"] == pytest.approx(mean, rel=1e-5)
    assert (tmp_path / "grad_flow_opt0.npy").exists() and (tmp_path / "grad_flow_opt1.csv").exists()


def test_amp_grad_scaler_gradients_are_read_unscaled_and_its_overflow_steps_raise_no_alarm(tmp_path):
    torch.manual_seed(0)
    module = Classifier(ScrambledCNN(), reference_layers=lambda m: scrambled_layers(m.net, "net."))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    logger = MemoryLogger()
    flow = GradientFlow(every_n_steps=1, log_per_layer=True)
    trainer = make_trainer(
        tmp_path, [flow], logger=logger, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]
    )
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(module, loader(n=160))
    assert not flow_warnings(records, "exploding")
    skipped = logger.logged[-1][1]["grad_flow/nonfinite_steps"]
    assert 1 <= skipped < 10 and 1.0 < scaler.get_scale() < 2.0**24
    finite = []
    for (_, metrics), (expected, _) in zip(logger.logged, module.reference, strict=True):
        value = expected["net.head"][0]
        if math.isfinite(value):
            assert metrics["grad_flow/layers/net.head/mean_abs"] == pytest.approx(value, rel=1e-5)
            assert value < 1.0
            finite.append(value)
    assert len(finite) == 10 - skipped
    assert flow.history[0].matrix[3, 0] == pytest.approx(np.mean(finite), rel=1e-5)


def test_resume_from_checkpoint_keeps_the_history(tmp_path):
    def run(root: Path, max_epochs: int, ckpt_path=None) -> GradientFlow:
        torch.manual_seed(0)
        flow = GradientFlow(every_n_steps=2)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
        trainer = make_trainer(root, [flow, checkpoint], max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(Classifier(ScrambledCNN()), loader(), ckpt_path=ckpt_path)
        return flow

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "resumed", 3, ckpt_path=tmp_path / "part" / "last.ckpt")
    assert resumed.history[0].epochs == [0, 1, 2]
    np.testing.assert_allclose(resumed.history[0].matrix, full.history[0].matrix, rtol=1e-6, equal_nan=True)
    assert resumed.state_dict()["steps"] == full.state_dict()["steps"] == {0: 12}


class ShardedClassifier(Classifier):
    """Classifier without BatchNorm (so DDP and one process see the same function); rank k reads
    samples k, k + W, …, so the W per-rank batches of step t form the global batch t."""

    def __init__(self, batch_size: int) -> None:
        torch.manual_seed(0)
        super().__init__(deep_mlp(4, nn.Tanh))
        self.batch_size = batch_size

    def train_dataloader(self):
        dataset = loader(n=64).dataset
        sampler = DistributedSampler(
            dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False
        )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path):
    def run(root: Path, devices: int, batch_size: int, strategy: str = "auto") -> CSVLogger:
        logger = CSVLogger(root, name="csv", version=0)
        flow = GradientFlow(every_n_steps=1, log_per_layer=True)
        trainer = make_trainer(
            root, [flow], logger=logger, devices=devices, strategy=strategy, use_distributed_sampler=False
        )
        trainer.fit(ShardedClassifier(batch_size))
        return logger

    single = run(tmp_path / "single", 1, 16)
    ddp = run(tmp_path / "ddp", 2, 8, "ddp_fork")
    np.testing.assert_allclose(
        np.load(Path(ddp.log_dir) / "grad_flow.npy"),
        np.load(Path(single.log_dir) / "grad_flow.npy"),
        rtol=1e-5,
    )

    def logged(logger: CSVLogger) -> dict[str, list[float]]:
        with open(Path(logger.log_dir) / "metrics.csv") as handle:
            rows = list(csv.DictReader(handle))
        return {k: [float(r[k]) for r in rows if r[k]] for k in rows[0] if k.startswith("grad_flow/")}

    single_metrics, ddp_metrics = logged(single), logged(ddp)
    assert single_metrics.keys() == ddp_metrics.keys() and "grad_flow/layers/net.1/mean_abs" in single_metrics
    assert len(single_metrics["grad_flow/global_norm"]) == 8
    for key, values in single_metrics.items():
        np.testing.assert_allclose(ddp_metrics[key], values, rtol=1e-5, err_msg=key)
