"""GradientFlow against brute-force per-layer gradient statistics (seed 001_0184062a2e770d9a.txt
§2, Fig. 1–2: per layer, in depth order, the mean absolute value of the loss gradient).

References are float64 loops over hand-listed layers, independent of the engine's grouping.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import AtenOpsPerStep
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_tricks.callbacks.gradient_flow as flow_module
import lightning_tricks.gradients.flow_tracking as flow_tracking
from lightning_tricks.callbacks.gradient_flow import GradientFlow, GradientFlowAlarm
from lightning_tricks.gradients.flow_tracking import FigureBudget
from lightning_tricks.gradients.gradient_flow import (
    AlarmRule,
    EpochBins,
    FlowHistory,
    RunningFlow,
    epoch_average,
    exploding_flags,
    figure_due,
    layer_summary,
    log10_magnitude,
    vanishing_flags,
)
from lightning_tricks.gradients.layer_stats import (
    ForwardOrderRecorder,
    LayerFilter,
    LayerGradientStats,
    find_layers,
    first_uses,
    is_bias,
    sort_by_first_use,
    sort_by_forward_order,
)
from lightning_tricks.plotting import plot_gradient_flow

pytestmark = pytest.mark.usefixtures("single_thread")  # 2 threads on a busy 2-core machine: 10-100x slower


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


def scrambled_layers(
    net: ScrambledCNN, prefix: str = "", bias: bool = False
) -> list[tuple[str, list[nn.Parameter]]]:
    """The expected layers of ScrambledCNN in forward order, listed by hand: weights only (the
    seed's quantity, the default) or weights and biases."""
    listed = [
        ("conv1", [net.conv1.weight] + [net.conv1.bias] * bias),
        ("bn", [net.bn.weight] + [net.bn.bias] * bias),
        ("conv2", [net.conv2.weight]),
        ("head", [net.head.weight] + [net.head.bias] * bias),
        ("unused", [net.unused.weight] + [net.unused.bias] * bias),
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
            layers, _ = brute_force_stats(self.reference_layers(self))
            _, global_norm = brute_force_stats([("all", list(self.parameters()))])
            self.reference.append((layers, global_norm))
        if self.zero_nonfinite:
            for p in self.parameters():
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


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


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("arch, batch_size", [("cnn", 1), ("cnn", 7), ("resnet", 5), ("mlp", 16)])
def test_layer_gradient_stats_equal_brute_force(arch, batch_size, bias):
    torch.manual_seed(batch_size)
    if arch == "cnn":
        net = ScrambledCNN()
        listed = scrambled_layers(net, bias=bias)
    elif arch == "resnet":
        net = small_resnet(blocks=2)
        listed = [
            (name, [p for p_name, p in module.named_parameters(recurse=False) if bias or p_name != "bias"])
            for name, module in net.named_modules()
            if any(True for _ in module.parameters(recurse=False))
        ]
    else:
        net = deep_mlp(5, nn.Tanh).double()
        listed = [
            (f"{i}", [m.weight, m.bias][: 1 + bias]) for i, m in enumerate(net) if isinstance(m, nn.Linear)
        ]
    dtype = next(net.parameters()).dtype
    x = torch.randn(batch_size, 2, 8, 8, dtype=dtype)
    F.cross_entropy(net(x), torch.randint(0, 3, (batch_size,))).backward()
    by_name = {layer.name: layer for layer in find_layers(net, include_bias=bias)}
    assert all(set(map(id, by_name[name].parameters)) == set(map(id, params)) for name, params in listed)
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


def test_is_bias_and_weights_only_layers():
    assert all(map(is_bias, ["bias", "in_proj_bias", "bias_hh_l0", "bias_k"]))
    assert not any(map(is_bias, ["weight", "weight_hh_l0", "biased_scale", "in_proj_weight"]))
    net = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 2), nn.Linear(2, 1, bias=False))
    net.register_parameter("offset_bias", nn.Parameter(torch.zeros(1)))
    layers = find_layers(net, include_bias=False)
    assert [(layer.name, len(layer.parameters)) for layer in layers] == [("0", 1), ("1", 2), ("2", 1)]
    assert layers[1].parameters == (net[1].weight_ih_l0, net[1].weight_hh_l0)


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


def figure_parts(figure):
    """The heatmap's (layers, columns) data, its x extent, and the drawn epoch lines' labels."""
    heat_axes, line_axes = figure.axes[0], figure.axes[1]
    image = heat_axes.get_images()[0]
    lines = [line.get_label() for line in line_axes.get_lines() if line.get_label().startswith("epoch")]
    return np.ma.filled(image.get_array(), np.nan), image.get_extent(), lines


def test_plot_gradient_flow_heatmap_on_log_colours_and_last_epochs_as_lines():
    matrix = np.array([[1e-12, 1e-9, np.nan], [1e-4, 1e-3, 1e-3], [1e-2, 0.0, 1e-1]])
    figure = plot_gradient_flow(matrix, ["a", "b", "c"], [3, 4, 5], vanish_threshold=1e-8, max_lines=2)
    data, extent, lines = figure_parts(figure)
    np.testing.assert_array_equal(data, np.where(matrix > 0, matrix, np.nan))
    assert tuple(extent[:2]) == (3.0, 6.0)
    assert figure.axes[0].get_images()[0].norm.__class__.__name__ == "LogNorm"
    assert figure.axes[1].get_xscale() == "log" and lines == ["epoch 4", "epoch 5"]
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="matrix"):
        plot_gradient_flow(matrix, ["a", "b"])


def test_plot_gradient_flow_is_bounded_whatever_the_number_of_epochs_and_layers():
    rng = np.random.default_rng(0)
    matrix = 10.0 ** rng.uniform(-20, 0, size=(300, 1000))
    matrix[5, :10] = np.nan
    figure = plot_gradient_flow(matrix, [f"layer{i}" for i in range(300)], max_columns=64, max_lines=5)
    data, extent, lines = figure_parts(figure)
    group = math.ceil(1000 / 64)
    assert data.shape == (300, math.ceil(1000 / group)) and tuple(extent[:2]) == (0.0, 1000.0)
    np.testing.assert_allclose(data[7, 1], matrix[7, group : 2 * group].mean())
    np.testing.assert_allclose(data[5, 0], matrix[5, 10:group].mean())
    assert lines == [f"epoch {e}" for e in range(995, 1000)]
    assert len(figure.axes[0].get_yticklabels()) <= 16
    assert figure.get_size_inches()[1] <= 9.0


# ---------------------------------------------------------------------------------------------
# Engine: alarms, epoch averages, bins, running statistics (no Trainer)
# ---------------------------------------------------------------------------------------------


def test_alarm_flags_equal_a_loop_over_layers():
    mean_abs = torch.tensor([1e-12, 1e-7, 5e-1, 2e4, float("nan"), 1e-1])
    present = torch.tensor([True, True, True, True, True, False])
    finite = torch.isfinite(mean_abs)
    valid, nonfinite = present & finite, present & ~finite
    last = 3  # deepest present layer
    vanish = vanishing_flags(mean_abs, valid, last, threshold=1e-8, ratio=1e-5)
    explode = exploding_flags(mean_abs, valid, nonfinite, threshold=1e3, nonfinite_alarms=True)
    m, ok = mean_abs.tolist(), valid.tolist()
    assert vanish.tolist() == [ok[i] and (m[i] < 1e-8 or m[i] < 1e-5 * m[last]) for i in range(6)]
    assert vanish.tolist() == [True, True, False, False, False, False]
    assert explode.tolist() == [False, False, False, True, True, False]
    quiet = exploding_flags(mean_abs, valid, nonfinite, threshold=None, nonfinite_alarms=False)
    assert not quiet.any()


def test_epoch_average_summary_and_log10():
    np.testing.assert_array_equal(epoch_average([3.0, 0.0], [2.0, 0.0]), [1.5, np.nan])
    summary = layer_summary(np.array([5e-19, 1e-3, 7.0, 2e-2]), np.array([True, True, False, True]))
    assert summary["min_layer_mean"] == 5e-19 and summary["max_layer_mean"] == 2e-2
    assert summary["first_to_last_ratio"] == pytest.approx(5e-19 / 2e-2)
    assert summary["log10_min_layer_mean"] == pytest.approx(math.log10(5e-19))
    assert summary["log10_first_to_last_ratio"] == pytest.approx(math.log10(5e-19 / 2e-2))
    assert log10_magnitude(0.0) == -math.inf and math.isnan(log10_magnitude(float("nan")))
    assert layer_summary(np.zeros(2), np.zeros(2, dtype=bool)) == {}


@pytest.mark.parametrize("epochs, max_columns", [(5, 8), (1000, 8), (333, 64), (64, 64), (65, 64)])
def test_epoch_bins_equal_a_brute_force_binning(epochs, max_columns):
    rng = np.random.default_rng(epochs)
    values = rng.uniform(size=(epochs, 3))
    values[rng.uniform(size=values.shape) < 0.1] = np.nan
    bins = EpochBins(max_columns)
    for epoch in range(epochs):
        names = ["a", "b", "c"] if epoch < epochs // 2 else ["c", "a", "b"]
        order = [0, 1, 2] if epoch < epochs // 2 else [2, 0, 1]
        bins.add(epoch, names, values[epoch, order])
    matrix, edges = bins.matrix()
    width = 1
    while math.ceil(epochs / width) > max_columns:
        width *= 2
    assert matrix.shape == (3, math.ceil(epochs / width)) and bins.names == ["a", "b", "c"]
    assert edges[0] == 0 and edges[-1] == epochs and np.all(np.diff(edges[:-1]) == width)
    for column in range(matrix.shape[1]):
        chunk = values[column * width : (column + 1) * width]
        for row in range(3):
            finite = chunk[:, row][np.isfinite(chunk[:, row])]
            expected = finite.mean() if finite.size else np.nan
            np.testing.assert_allclose(matrix[row, column], expected, rtol=1e-12)
    restored = EpochBins(max_columns // 2)
    restored.load_state_dict(bins.state_dict())
    assert restored.matrix()[0].shape[1] <= max_columns // 2


def test_figure_schedule_is_logarithmic():
    drawn = [epoch + 1 for epoch in range(1000) if figure_due(epoch)]
    assert drawn == [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512]


def test_figure_budget_allows_a_figure_while_figures_took_at_most_their_share(monkeypatch):
    """A fake clock: the budget compares the figures' seconds with ``share`` x the seconds since
    the start (figures included)."""
    clock = [100.0]
    monkeypatch.setattr(flow_tracking.time, "perf_counter", lambda: clock[0])
    budget = FigureBudget(share=0.25)
    clock[0] += 4.0  # 4 s of training, no figure yet
    assert budget.allows()
    with budget.timing():
        clock[0] += 2.0  # a 2 s figure: 2 of 6 s is 33 %
    assert budget.spent == 2.0 and not budget.allows()
    clock[0] += 2.0  # 2 of 8 s is 25 %
    assert budget.allows()
    budget.restart()
    assert budget.spent == 0.0 and budget.allows()


def gradient_sequence(steps: int, layers: int = 4, seed: int = 0) -> list[list[Tensor | None]]:
    """Per step, one ``(1, 3)`` gradient per layer with mean |g| spread over 1e-12..1e4, NaN in
    layer 1 now and then, and layer 0 without a gradient at step 9."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        scale = 10.0 ** (torch.rand(layers, 1, 1, generator=generator) * 16 - 12)
        grads = list(scale * torch.randn(layers, 1, 3, generator=generator, dtype=torch.float64).float())
        if torch.rand(1, generator=generator) < 0.2:
            grads[1] = grads[1].clone().fill_(float("nan"))
        if step == 9:
            grads[0] = None
        out.append(grads)
    return out


def brute_force_flow(sequence, rule, steps):
    """Loops over steps and layers, float64: epoch average, per-kind flagged layers, first step
    flagged and steps counted (vanishing, exploding, nonfinite)."""
    layers = len(sequence[0])
    sums, counts = [0.0] * layers, [0] * layers
    flags, first, totals = [set(), set()], [-1, -1], [0, 0, 0]
    for step in steps:
        grads = sequence[step]
        means = [None if g is None else g.double().abs().mean().item() for g in grads]
        last = max(i for i, m in enumerate(means) if m is not None)
        valid = [m is not None and math.isfinite(m) for m in means]
        nonfinite = [m is not None and not math.isfinite(m) for m in means]
        vanish = [
            valid[i] and (means[i] < rule.vanish_threshold or means[i] < rule.vanish_ratio * means[last])
            for i in range(layers)
        ]
        explode = [(valid[i] and means[i] > rule.explode_threshold) or nonfinite[i] for i in range(layers)]
        for kind, flagged in enumerate((vanish, explode)):
            flags[kind] |= {i for i in range(layers) if flagged[i]}
            if any(flagged) and first[kind] < 0:
                first[kind] = step
            totals[kind] += any(flagged)
        totals[2] += any(nonfinite)
        for i in range(layers):
            if valid[i]:
                sums[i] += means[i]
                counts[i] += 1
    average = [sums[i] / counts[i] if counts[i] else math.nan for i in range(layers)]
    return average, flags, first, totals


def test_running_flow_equals_a_loop_over_steps_and_survives_a_mid_window_checkpoint():
    """Windows folded when full (capacity 4), when layer 0 loses its gradient and at reads; a
    checkpoint between two reads; all against a float64 loop over steps and layers."""
    rule = AlarmRule(1e-8, 1e-5, 1e3, True)
    net = nn.ModuleList([nn.Linear(3, 1, bias=False) for _ in range(4)])
    stats = LayerGradientStats(find_layers(net))
    sequence = gradient_sequence(20)

    def run(flow, steps):
        for step in steps:
            for layer, grad in zip(net, sequence[step]):
                layer.weight.grad = grad
            assert flow.update(step)

    whole = RunningFlow(stats, rule, capacity=4)
    run(whole, range(20))
    average, window = whole.read_epoch()
    expected, flags, first, totals = brute_force_flow(sequence, rule, range(20))
    np.testing.assert_allclose(average, expected, rtol=1e-6)
    assert [set(np.flatnonzero(row)) for row in window.flags] == flags
    assert window.first.tolist() == first and window.counts.tolist() == totals
    assert totals[0] > 0 and totals[2] > 0 and first[0] == 0

    first_part = RunningFlow(stats, rule, capacity=4)
    run(first_part, range(7))
    values, early = first_part.read_step()  # a logged step: window emptied
    last_means = [g.double().abs().mean().item() for g in sequence[6]]
    np.testing.assert_allclose(values["mean_abs"], last_means, rtol=1e-6)
    run(first_part, range(7, 13))
    second = RunningFlow(stats, rule, capacity=4)
    second.load_state_dict(first_part.state_dict())
    run(second, range(13, 20))
    resumed_average, late = second.read_epoch()
    np.testing.assert_allclose(resumed_average, average, rtol=1e-6)
    np.testing.assert_array_equal(early.counts + late.counts, window.counts)
    np.testing.assert_array_equal(early.flags | late.flags, window.flags)
    assert [e if e >= 0 else later for e, later in zip(early.first, late.first)] == first
    _, late_flags, late_first, late_totals = brute_force_flow(sequence, rule, range(7, 20))
    assert late.first.tolist() == late_first and late.counts.tolist() == late_totals
    assert [set(np.flatnonzero(row)) for row in late.flags] == late_flags
    net.zero_grad(set_to_none=True)
    assert not second.update(20)


def test_flow_history_checkpoint_is_bounded_and_keeps_bins_and_recent_epochs():
    history = FlowHistory(max_columns=16, max_recent=3)
    for epoch in range(500):
        history.add_epoch(epoch, ["x", "y"], np.array([epoch, 2.0 * epoch], dtype=float))
    state = history.state_dict()
    assert len(state["bins"]["sum"][0]) <= 16 and len(state["recent"]) == 3
    assert history.matrix.shape == (2, 500) and len(history.records(0)) == 1000
    restored = FlowHistory(max_columns=16, max_recent=3)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.binned_matrix()[0], history.binned_matrix()[0])
    assert restored.recent_matrix()[1] == [497, 498, 499] and restored.matrix.shape == (2, 0)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(log_every_n_steps=0), ValueError, "every_n_steps"),
        (dict(log_every_n_steps=2.0), TypeError, "log_every_n_steps"),
        (dict(include_bias=1), TypeError, "include_bias"),
        (dict(max_figure_columns=1), ValueError, "max_figure_columns"),
        (dict(figure_lines=-1), ValueError, "figure_lines"),
        (dict(figure_lines=2.5), TypeError, "figure_lines"),
        (dict(figure_time_share=0.0), ValueError, "figure_time_share"),
        (dict(figure_time_share=2.0), ValueError, "figure_time_share"),
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


def test_filters_selecting_no_layer_fail_at_setup(trainer_for, tiny_module):
    trainer = trainer_for([GradientFlow(include=nn.LSTM)])
    with pytest.raises(
        ValueError, match=r"selects no layer of TinyRegression; its 2 layers are: net\.0, net\.2"
    ):
        trainer.fit(tiny_module())


# ---------------------------------------------------------------------------------------------
# Training: values, order, alarms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_logged_values_and_history_equal_brute_force_in_forward_order(bias, trainer_for, memory_logger):
    torch.manual_seed(0)
    module = Classifier(ScrambledCNN(), reference_layers=lambda m: scrambled_layers(m.net, "net.", bias))
    logger = memory_logger()
    flow = GradientFlow(log_every_n_steps=1, log_per_layer=True, include_bias=bias)
    trainer = trainer_for([flow], logger=logger, max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(module, loader(n=64, batch_size=8))

    names = [name for name, _ in scrambled_layers(module.net, "net.")]
    assert flow.flows[0].layer_names == names
    steps = [(step, m) for step, m in logger.logged if "grad_flow/global_norm" in m]
    assert [step for step, _ in steps] == list(range(8)) == list(range(len(module.reference)))
    for (_, metrics), (expected, global_norm) in zip(steps, module.reference, strict=True):
        assert metrics["grad_flow/global_norm"] == pytest.approx(global_norm, rel=1e-5)
        assert not any("net.unused" in key for key in metrics)
        for name, values in expected.items():
            for stat, value in zip(("mean_abs", "l2", "max_abs"), values, strict=True):
                assert metrics[f"grad_flow_{stat}/{name}"] == pytest.approx(value, rel=1e-5)
        means = [v[0] for v in expected.values()]
        assert metrics["grad_flow/min_layer_mean"] == pytest.approx(min(means), rel=1e-5)
        assert metrics["grad_flow/max_layer_mean"] == pytest.approx(max(means), rel=1e-5)
        assert metrics["grad_flow/log10_min_layer_mean"] == pytest.approx(math.log10(min(means)), rel=1e-5)
        first, last = expected["net.conv1"][0], expected["net.head"][0]
        assert metrics["grad_flow/first_to_last_ratio"] == pytest.approx(first / last, rel=1e-5)
        assert metrics["grad_flow/log10_first_to_last_ratio"] == pytest.approx(
            math.log10(first / last), rel=1e-5
        )

    matrix = flow.flows[0].matrix
    assert flow.flows[0].epochs == [0, 1]
    for epoch in range(2):
        epoch_refs = [ref for ref, _ in module.reference[4 * epoch : 4 * epoch + 4]]
        for row, name in enumerate(names[:-1]):
            assert matrix[row, epoch] == pytest.approx(np.mean([r[name][0] for r in epoch_refs]), rel=1e-5)
    assert np.isnan(matrix[-1]).all()
    records = flow.history
    assert len(records) == 2 * len(names) and records[0] == {
        "epoch": 0,
        "optimizer": 0,
        "layer": "net.conv1",
        "mean_abs": matrix[0, 0],
    }


class TextClassifier(pl.LightningModule):
    """A user-written Transformer text classifier: embedding, ``nn.TransformerEncoder`` (whose
    ``MultiheadAttention`` uses ``out_proj.weight`` functionally: that Linear's forward never
    runs), mean pooling, a linear head. Records the brute-force mean |g| of the embedding and of
    the head at every optimiser step."""

    def __init__(self, vocabulary: int = 30, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(vocabulary, width)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, 3)
        self.first_over_last: list[float] = []

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return F.cross_entropy(self.head(self.encoder(self.embedding(tokens)).mean(1)), labels)

    def on_before_optimizer_step(self, optimizer):
        first, last = (p.grad.double().abs().mean().item() for p in (self.embedding.weight, self.head.weight))
        self.first_over_last.append(first / last)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_transformer_out_proj_sits_inside_its_layer_and_the_ratio_compares_embedding_and_head(
    trainer_for, memory_logger
):
    """Finding: ordered by forward hooks, both ``self_attn.out_proj`` came after the head, so
    ``first_to_last_ratio`` divided by an attention projection's gradient."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 30, (24, 7), generator=generator)
    labels = torch.randint(0, 3, (24,), generator=generator)
    data = TensorDataset(tokens, labels)
    module, logger = TextClassifier(), memory_logger()
    flow = GradientFlow(log_every_n_steps=1)
    trainer_for([flow], logger=logger, max_epochs=1).fit(module, DataLoader(data, batch_size=8))

    names = flow.flows[0].layer_names
    expected = ["embedding"]
    for i in range(2):
        block = f"encoder.layers.{i}."
        parts = ("self_attn", "self_attn.out_proj", "norm1", "linear1", "linear2", "norm2")
        expected += [block + name for name in parts]
    assert names == expected + ["head"]
    tag = "grad_flow/first_to_last_ratio"
    ratios = [metrics[tag] for _, metrics in logger.logged if tag in metrics]
    assert ratios == pytest.approx(module.first_over_last, rel=1e-5) and len(ratios) == 3


def test_a_parametrized_weight_sits_where_its_module_uses_it():
    """Sibling: ``parametrizations.weight`` (weight norm) owns the trained tensors but never runs."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    torch.nn.utils.parametrizations.weight_norm(net[2])
    loss = net(torch.randn(5, 4)).square().sum()
    layers = find_layers(net, include_bias=False)
    order = [layer.name for layer in sort_by_first_use(layers, first_uses(loss), [])]
    assert order == ["0", "2.parametrizations.weight", "4"]


def test_logging_follows_the_trainers_log_every_n_steps_with_phase_step_mod_n(trainer_for, memory_logger):
    logger = memory_logger()
    trainer = trainer_for([GradientFlow()], logger=logger, max_epochs=1, log_every_n_steps=3)
    trainer.fit(Classifier(ScrambledCNN()), loader(n=128, batch_size=16))
    assert [step for step, m in logger.logged if "grad_flow/global_norm" in m] == [0, 3, 6]
    logger = memory_logger()
    trainer = trainer_for([GradientFlow(log_every_n_steps=5)], logger=logger, max_epochs=1)
    trainer.fit(Classifier(ScrambledCNN()), loader(n=128, batch_size=16))
    assert [step for step, m in logger.logged if "grad_flow/global_norm" in m] == [0, 5]


@pytest.mark.parametrize("after_clipping", [False, True])
def test_gradients_are_read_before_clipping_unless_after_clipping(after_clipping, trainer_for, memory_logger):
    torch.manual_seed(0)
    module = Classifier(
        ScrambledCNN(), loss_scale=100.0, reference_layers=lambda m: scrambled_layers(m.net, "net.")
    )
    logger = memory_logger()
    flow = GradientFlow(log_every_n_steps=1, after_clipping=after_clipping)
    trainer = trainer_for([flow], logger=logger, max_epochs=1, gradient_clip_val=0.5)
    trainer.fit(module, loader())
    norms = [metrics["grad_flow/global_norm"] for _, metrics in logger.logged]
    unclipped = [global_norm for _, global_norm in module.reference]  # the module's hook runs before clipping
    assert len(norms) == 4 and min(unclipped) > 1.0
    if after_clipping:
        np.testing.assert_allclose(norms, 0.5, rtol=1e-4)
        assert all(not hook_list for hook_list in (o._optimizer_step_post_hooks for o in trainer.optimizers))
    else:
        np.testing.assert_allclose(norms, unclipped, rtol=1e-5)


def test_deep_sigmoid_net_raises_vanishing_alarm_naming_its_early_layers(trainer_for):
    torch.manual_seed(0)
    flow = GradientFlow(log_every_n_steps=2, on_alarm="raise")
    trainer = trainer_for([flow], max_epochs=1)
    with pytest.raises(GradientFlowAlarm, match=r"vanishing gradients at step 0 in layers: net\.1, net\.3"):
        trainer.fit(Classifier(deep_mlp(12, nn.Sigmoid)), loader())


def test_vanishing_warning_is_given_once_and_counted(trainer_for, memory_logger):
    torch.manual_seed(0)
    logger = memory_logger()
    flow = GradientFlow(log_every_n_steps=2)
    trainer = trainer_for([flow], logger=logger, max_epochs=2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(Classifier(deep_mlp(12, nn.Sigmoid)), loader())
    assert len(flow_warnings(records, "vanishing")) == 1
    assert logger.logged[-1][0] == 6 and logger.logged[-1][1]["grad_flow/vanishing_steps"] == 7  # steps 0-6
    assert flow.alarm_counts[0]["vanishing"] == 8  # step 7 read back at the epoch end
    assert logger.logged[-1][1]["grad_flow/first_to_last_ratio"] < 1e-5


@pytest.mark.parametrize("net_name", ["small_resnet", "resnet20"])
def test_healthy_resnet_raises_no_alarm(net_name, trainer_for, memory_logger):
    torch.manual_seed(0)
    if net_name == "resnet20":
        from lightning_tricks.models import build_net

        net = build_net("resnet20", 3, in_channels=2)
    else:
        net = small_resnet()
    logger = memory_logger()
    trainer = trainer_for([GradientFlow(log_every_n_steps=2, on_alarm="raise")], logger=logger, max_epochs=1)
    trainer.fit(Classifier(net, lr=0.02), loader())
    last = logger.logged[-1][1]
    assert last["grad_flow/vanishing_steps"] == 0 and last["grad_flow/exploding_steps"] == 0
    assert last["grad_flow/first_to_last_ratio"] > 1e-3


def test_scaled_loss_triggers_exploding_alarm_and_stop(trainer_for):
    torch.manual_seed(0)
    flow = GradientFlow(log_every_n_steps=1, on_alarm="stop")
    trainer = trainer_for([flow], max_epochs=3)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(Classifier(deep_mlp(4, nn.ReLU), lr=0.0, loss_scale=1e7), loader())
    messages = flow_warnings(records, "exploding")
    assert len(messages) == 1 and "step 0" in messages[0] and "net.1" in messages[0]
    assert "Stopping" in messages[0]
    assert trainer.global_step < 12


def test_huge_learning_rate_diverges_to_nonfinite_and_raises(trainer_for):
    torch.manual_seed(0)
    flow = GradientFlow(log_every_n_steps=1, explode_threshold=None, on_alarm="raise")
    trainer = trainer_for([flow], max_epochs=5)
    with pytest.raises(GradientFlowAlarm, match="exploding"):
        trainer.fit(Classifier(deep_mlp(6, nn.ReLU, scale=3.0), lr=1e6), loader())
    assert flow.alarm_counts[0]["nonfinite"] + flow.alarm_counts[0]["exploding"] >= 1


def test_nan_gradients_never_crash_and_are_left_out_of_the_history(trainer_for, memory_logger):
    torch.manual_seed(0)
    module = Classifier(
        ScrambledCNN(),
        nan_at_step=2,
        zero_nonfinite=True,
        reference_layers=lambda m: scrambled_layers(m.net, "net."),
    )
    logger = memory_logger()
    flow = GradientFlow(log_every_n_steps=3)
    trainer = trainer_for([flow], logger=logger, max_epochs=2, limit_train_batches=4)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(module, loader())
    assert trainer.global_step == 8
    assert len(flow_warnings(records, "exploding")) == 1
    assert logger.logged[-1][1]["grad_flow/nonfinite_steps"] == 1
    finite_steps = [ref for ref, _ in module.reference[:4] if not math.isnan(ref["net.conv1"][0])]
    assert len(finite_steps) == 3
    expected = np.mean([ref["net.conv1"][0] for ref in finite_steps])
    assert flow.flows[0].matrix[0, 0] == pytest.approx(expected, rel=1e-5)


class GrowingOptimizerClassifier(Classifier):
    """Trains only the head in epoch 0, then adds the backbone as a parameter group (fine-tuning)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.head.parameters(), lr=0.05)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            backbone = [p for name, p in self.net.named_parameters() if not name.startswith("head.")]
            self.optimizers().optimizer.add_param_group({"params": backbone})


def test_layers_added_to_the_optimizer_join_the_flow_in_forward_order(trainer_for):
    torch.manual_seed(0)
    flow = GradientFlow()
    trainer_for([flow], max_epochs=2).fit(GrowingOptimizerClassifier(ScrambledCNN()), loader())
    history = flow.flows[0]
    assert history.layer_names == [name for name, _ in scrambled_layers(ScrambledCNN(), "net.")]
    matrix = history.matrix
    assert np.isnan(matrix[:3, 0]).all() and np.isfinite(matrix[3]).all()
    assert np.isfinite(matrix[:3, 1]).all() and np.isnan(matrix[4]).all()


class FrozenBackboneClassifier(GrowingOptimizerClassifier):
    """The backbone frozen (``requires_grad=False``) in epoch 0, so the first step's autograd graph
    reaches the head only; unfrozen and added to the optimiser in epoch 1."""

    def on_fit_start(self):
        for name, p in self.net.named_parameters():
            p.requires_grad_(name.startswith("head."))

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            for p in self.net.parameters():
                p.requires_grad_(True)
        super().on_train_epoch_start()


def test_layers_frozen_at_the_first_step_join_the_flow_in_forward_order(trainer_for):
    """Layers the first step's graph does not reach keep their forward-hook place among those it
    reaches (not all after them)."""
    torch.manual_seed(0)
    flow = GradientFlow()
    trainer_for([flow], max_epochs=2).fit(FrozenBackboneClassifier(ScrambledCNN()), loader())
    assert flow.flows[0].layer_names == [name for name, _ in scrambled_layers(ScrambledCNN(), "net.")]


# ---------------------------------------------------------------------------------------------
# Loggers and files
# ---------------------------------------------------------------------------------------------


def read_history_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_every_logged_value_reaches_tensorboard_and_csv_at_its_own_step(tmp_path, trainer_for, memory_logger):
    """Trainer's default log_every_n_steps (50): values at steps 0, 50, 100 in every logger."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    csv_logger, memory = CSVLogger(tmp_path, name="csv"), memory_logger()
    flow = GradientFlow(log_per_layer=True)
    trainer = trainer_for([flow], logger=[tensorboard, csv_logger, memory], max_epochs=2)
    trainer.fit(Classifier(ScrambledCNN()), loader(n=64, batch_size=1))

    assert [step for step, _ in memory.logged] == [0, 50, 100]
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    with open(Path(csv_logger.log_dir) / "metrics.csv") as handle:
        csv_rows = {int(row["step"]): row for row in csv.DictReader(handle)}
    for step, metrics in memory.logged:
        assert len(metrics) == 10 + 3 * 4  # summaries, log10 copies, counts; 3 statistics x 4 layers
        for tag, value in metrics.items():
            scalars = {event.step: event.value for event in events.Scalars(tag)}
            assert scalars[step] == pytest.approx(value, rel=1e-6), tag
            assert float(csv_rows[step][tag]) == pytest.approx(value, rel=1e-12), tag
    assert {tag.split("/")[0] for tag in events.Tags()["scalars"]} == {
        "grad_flow",
        "grad_flow_mean_abs",
        "grad_flow_l2",
        "grad_flow_max_abs",
    }
    assert [image.step for image in events.Images("grad_flow/figure")] == [63, 127]
    run_dir = Path(tensorboard.log_dir)
    assert flow.run_dir == str(run_dir) and (run_dir / "grad_flow.figure.png").exists()
    np.testing.assert_array_equal(np.load(run_dir / "grad_flow.npy"), flow.flows[0].matrix)
    rows = read_history_csv(run_dir / "grad_flow.csv")
    assert [{k: str(v) for k, v in r.items()} for r in flow.history] == [
        {**r, "mean_abs": str(float(r["mean_abs"]))} for r in rows
    ]
    assert [r["layer"] for r in rows[:5]] == [name for name, _ in scrambled_layers(ScrambledCNN(), "net.")]


def test_early_stopping_can_monitor_the_global_norm(trainer_for):
    torch.manual_seed(0)
    stopper = EarlyStopping(monitor="grad_flow/global_norm", mode="min", stopping_threshold=1e9)
    trainer = trainer_for([GradientFlow(), stopper], max_epochs=5)
    trainer.fit(Classifier(ScrambledCNN()), loader())
    assert trainer.current_epoch == 1 and trainer.global_step == 4
    assert float(trainer.callback_metrics["grad_flow/global_norm"]) > 0


@pytest.mark.parametrize("use_logger", [False, True])
def test_files_go_to_the_run_folder_and_nothing_to_the_working_directory(
    tmp_path, monkeypatch, use_logger, trainer_for
):
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    logger = CSVLogger(root, name="csv") if use_logger else False
    flow = GradientFlow()
    trainer_for([flow], default_root_dir=root, logger=logger, max_epochs=2).fit(
        Classifier(ScrambledCNN()), loader()
    )
    run_dir = Path(flow.run_dir)
    expected = Path(logger.log_dir) if use_logger else root / "lightning_tricks_logs" / "version_0"
    assert run_dir == expected and list(cwd.iterdir()) == []
    assert {"grad_flow.csv", "grad_flow.npy", "grad_flow.figure.png", "lightning_tricks.json"} <= set(
        os.listdir(run_dir)
    )
    np.testing.assert_array_equal(np.load(run_dir / "grad_flow.npy"), flow.flows[0].matrix)
    assert len(read_history_csv(run_dir / "grad_flow.csv")) == 2 * 5  # net.unused: rows of NaN


def test_figure_and_checkpoint_stay_bounded_over_300_tiny_epochs(monkeypatch, trainer_for):
    figures = []

    def spy(*args, **kwargs):
        figures.append(plot_gradient_flow(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(flow_module, "plot_gradient_flow", spy)
    torch.manual_seed(0)
    flow = GradientFlow(max_figure_columns=16, figure_lines=3, figure_time_share=1.0)
    trainer = trainer_for([flow], max_epochs=300)
    trainer.fit(Classifier(deep_mlp(3, nn.Tanh)), loader(n=4, batch_size=4))
    assert len(figures) == 10 + 1  # after 1, 2, 3, 4, 8, ..., 256 epochs, and after the last
    data, extent, lines = figure_parts(figures[-1])
    assert data.shape == (3, 300 // 32 + 1) and tuple(extent[:2]) == (0.0, 300.0)
    assert lines == ["epoch 297", "epoch 298", "epoch 299"]
    state = flow.state_dict()["optimizers"][0]
    assert len(state["history"]["bins"]["sum"][0]) <= 16 and len(state["history"]["recent"]) == 3
    assert flow.flows[0].matrix.shape == (3, 300)
    binned = np.nanmean(flow.flows[0].matrix[:, 256:288], axis=1)
    np.testing.assert_allclose(data[:, 8], binned, rtol=1e-12)

    figures.clear()
    budget = GradientFlow(figure_time_share=1e-9)
    trainer_for([budget], max_epochs=20).fit(Classifier(deep_mlp(3, nn.Tanh)), loader(n=4, batch_size=4))
    assert len(figures) == 2  # the first figure exhausts the budget; the last epoch's is always drawn
    assert figure_parts(figures[-1])[2][-1] == "epoch 19"


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
        layers = [(f"{prefix}.{i}", [m.weight]) for i, m in enumerate(part) if isinstance(m, nn.Linear)]
        self.reference.append((index, brute_force_stats(layers)[0]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.critic.parameters(), 1e-3)


def test_multiple_optimizers_keep_separate_flows(tmp_path, trainer_for, memory_logger):
    torch.manual_seed(0)
    module = TwoOptimizerModule()
    logger = memory_logger(save_dir=tmp_path)
    flow = GradientFlow(log_every_n_steps=1, log_per_layer=True)
    trainer = trainer_for([flow], logger=logger, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, loader())
    assert flow.flows[0].layer_names == ["gen.0", "gen.2"]
    assert flow.flows[1].layer_names == ["critic.1", "critic.3"]
    assert len(logger.logged) == len(module.reference) == 4
    assert [step for step, _ in logger.logged] == [0, 0, 1, 1]  # the training step, for each optimiser
    assert not any("grad_flow/global_norm" in metrics for _, metrics in logger.logged)
    for (_, metrics), (index, expected) in zip(logger.logged, module.reference, strict=True):
        for name, (mean, _, _) in expected.items():
            assert metrics[f"grad_flow_opt{index}_mean_abs/{name}"] == pytest.approx(mean, rel=1e-5)
    run_dir = Path(flow.run_dir)
    assert run_dir == tmp_path / "memory" / "version_0"
    np.testing.assert_array_equal(np.load(run_dir / "grad_flow_opt1.npy"), flow.flows[1].matrix)
    assert (run_dir / "grad_flow.opt0.figure.png").exists() and (
        run_dir / "grad_flow.opt1.figure.png"
    ).exists()
    assert {row["optimizer"] for row in read_history_csv(run_dir / "grad_flow.csv")} == {"0", "1"}


def test_amp_grad_scaler_gradients_are_read_unscaled_and_its_overflow_steps_raise_no_alarm(
    trainer_for, memory_logger, fit_vanishing
):
    torch.manual_seed(0)
    module = Classifier(ScrambledCNN(), reference_layers=lambda m: scrambled_layers(m.net, "net."))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    logger = memory_logger()
    flow = GradientFlow(log_every_n_steps=1, log_per_layer=True)
    trainer = trainer_for(
        [flow], logger=logger, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]
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
            assert metrics["grad_flow_mean_abs/net.head"] == pytest.approx(value, rel=1e-5)
            assert value < 1.0
            finite.append(value)
    assert len(finite) == 10 - skipped
    assert flow.flows[0].matrix[3, 0] == pytest.approx(np.mean(finite), rel=1e-5)


@pytest.fixture
def fit_vanishing(trainer_for, memory_logger):
    """``fit_vanishing(root, flow, max_epochs, ckpt_path=None, **checkpoint)``: a 12-layer sigmoid
    MLP (every step vanishes), 4 steps an epoch, in ``root``, checkpoints as asked; the logger."""

    def fit(root: Path, flow: GradientFlow, max_epochs: int, ckpt_path=None, **checkpoint):
        torch.manual_seed(0)
        logger = memory_logger(save_dir=root)
        callbacks = [flow, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, **checkpoint)]
        options = dict(default_root_dir=root, logger=logger, max_epochs=max_epochs, enable_checkpointing=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer_for(callbacks, **options).fit(
                Classifier(deep_mlp(12, nn.Sigmoid)), loader(), ckpt_path=ckpt_path
            )
        return logger

    return fit


def assert_same_run_history(resumed: GradientFlow, full: GradientFlow) -> None:
    for ours, reference in zip(resumed.flows[0].binned_matrix(), full.flows[0].binned_matrix()):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, equal_nan=True)
    ours, epochs = resumed.flows[0].recent_matrix()
    reference, reference_epochs = full.flows[0].recent_matrix()
    assert epochs == reference_epochs
    np.testing.assert_allclose(ours, reference, rtol=1e-6, equal_nan=True)
    assert resumed.alarm_counts == full.alarm_counts


def test_resume_from_an_epoch_end_checkpoint_continues_history_files_and_counts(tmp_path, fit_vanishing):
    full = GradientFlow(log_every_n_steps=2)
    fit_vanishing(tmp_path / "full", full, 3)
    part = GradientFlow(log_every_n_steps=2)
    fit_vanishing(tmp_path / "part", part, 2, save_last=True)
    resumed = GradientFlow(log_every_n_steps=2)
    fit_vanishing(tmp_path / "resumed", resumed, 3, ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt")
    assert resumed.flows[0].epochs == [2] and full.flows[0].epochs == [0, 1, 2]
    np.testing.assert_allclose(resumed.flows[0].matrix[:, 0], full.flows[0].matrix[:, 2], rtol=1e-6)
    assert_same_run_history(resumed, full)
    assert full.alarm_counts[0]["vanishing"] == 12
    rows = read_history_csv(Path(part.run_dir) / "grad_flow.csv") + read_history_csv(
        Path(resumed.run_dir) / "grad_flow.csv"
    )
    assert rows == read_history_csv(Path(full.run_dir) / "grad_flow.csv")


def test_alarm_counts_are_exact_across_a_checkpoint_taken_between_two_logged_steps(tmp_path, fit_vanishing):
    full = GradientFlow(log_every_n_steps=4)
    full_log = fit_vanishing(tmp_path / "full", full, 3)
    part = GradientFlow(log_every_n_steps=4)
    fit_vanishing(tmp_path / "part", part, 3, every_n_train_steps=3, filename="{step}")
    # 6 steps done (0-5): logged at 0 and 4, step 5 not read back yet, epoch 1 half done
    resumed = GradientFlow(log_every_n_steps=4)
    resumed_log = fit_vanishing(
        tmp_path / "resumed", resumed, 3, ckpt_path=tmp_path / "part" / "ckpt" / "step=6.ckpt"
    )
    # (a plain DataLoader restarts mid-epoch, so the gradients differ; the counts must not)
    assert [step for step, _ in resumed_log.logged] == [8]
    logged, reference = resumed_log.logged[0][1], dict(full_log.logged)[8]
    assert logged["grad_flow/vanishing_steps"] == reference["grad_flow/vanishing_steps"] == 9
    assert logged["grad_flow/nonfinite_steps"] == reference["grad_flow/nonfinite_steps"] == 0
    assert resumed.alarm_counts == full.alarm_counts == {0: {"vanishing": 12, "exploding": 0, "nonfinite": 0}}


def test_checkpoint_on_an_epochs_last_batch_keeps_that_epochs_column(tmp_path, fit_vanishing):
    full = GradientFlow()
    fit_vanishing(tmp_path / "full", full, 3)
    part = GradientFlow()
    fit_vanishing(tmp_path / "part", part, 1, every_n_train_steps=4, filename="{step}")
    resumed = GradientFlow()
    fit_vanishing(tmp_path / "resumed", resumed, 3, ckpt_path=tmp_path / "part" / "ckpt" / "step=4.ckpt")
    assert resumed.flows[0].epochs == [0, 1, 2]
    np.testing.assert_allclose(resumed.flows[0].matrix, full.flows[0].matrix, rtol=1e-6)
    assert_same_run_history(resumed, full)
    assert {row["epoch"] for row in read_history_csv(Path(resumed.run_dir) / "grad_flow.csv")} == {
        "0",
        "1",
        "2",
    }


def test_resume_with_a_changed_knob_warns_and_keeps_the_state(tmp_path, fit_vanishing):
    assert GradientFlow(vanish_threshold=1e-3, log_every_n_steps=3).state_key == GradientFlow().state_key
    assert GradientFlow(exclude="head").state_key != GradientFlow().state_key
    part = GradientFlow()
    fit_vanishing(tmp_path / "part", part, 2, save_last=True)
    resumed = GradientFlow(log_every_n_steps=3, figure_lines=2)
    with pytest.warns(
        UserWarning, match=r"changed settings \(log_every_n_steps: None -> 3, figure_lines: 5 -> 2\)"
    ):
        state = torch.load(tmp_path / "part" / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][
            resumed.state_key
        ]
        resumed.load_state_dict(state)
    fit_vanishing(tmp_path / "resumed", resumed, 3, ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt")
    _, edges = resumed.flows[0].binned_matrix()
    assert edges.tolist() == [0, 1, 2, 3] and resumed.flows[0].recent_matrix()[1] == [1, 2]
    assert resumed.alarm_counts[0]["vanishing"] == 12


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


def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path, trainer_for):
    def run(root: Path, devices: int, batch_size: int, strategy: str = "auto") -> CSVLogger:
        logger = CSVLogger(root, name="csv", version=0)
        flow = GradientFlow(log_every_n_steps=1, log_per_layer=True)
        trainer = trainer_for(
            [flow],
            default_root_dir=root,
            logger=logger,
            max_epochs=2,
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,
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
        return {k: [float(r[k]) for r in rows if r[k]] for k in rows[0] if k.startswith("grad_flow")}

    single_metrics, ddp_metrics = logged(single), logged(ddp)
    assert single_metrics.keys() == ddp_metrics.keys() and "grad_flow_mean_abs/net.1" in single_metrics
    assert len(single_metrics["grad_flow/global_norm"]) == 8
    for key, values in single_metrics.items():
        np.testing.assert_allclose(ddp_metrics[key], values, rtol=1e-5, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Host overhead
# ---------------------------------------------------------------------------------------------


def ops_per_step(trainer_for, depth: int, flow: GradientFlow | None) -> AtenOpsPerStep:
    torch.manual_seed(0)
    profile = AtenOpsPerStep()
    callbacks = [profile] if flow is None else [flow, profile]
    trainer_for(callbacks).fit(Classifier(deep_mlp(depth, nn.Tanh)), loader(n=96))
    return profile


def test_a_step_costs_at_most_15_aten_ops_whatever_the_depth(trainer_for):
    """GradientFlow's per-step work is a fixed handful of batched ops (the three norms of every
    gradient and a ``stack``), not a few per layer (it was 19 + 7 per parameter: 61 at depth 3, 187 at 12);
    steps 1-4 are not logged, step 5 is (the window folded into layers and alarms in batch, read
    back in one transfer, eleven scalars logged)."""
    extra = {}
    for depth in (3, 12):
        plain = ops_per_step(trainer_for, depth, None)
        with_flow = ops_per_step(trainer_for, depth, GradientFlow(log_every_n_steps=5))
        extra[depth] = [a - b for a, b in zip(with_flow.counts, plain.counts, strict=True)]
        norms = {"aten::_foreach_norm": 2, "aten::_foreach_abs": 1, "aten::_foreach_max": 1, "aten::stack": 1}
        for step in range(1, 5):  # nothing but the norms: no host read, no per-layer op
            assert with_flow.names[step] - plain.names[step] == norms
    assert extra[3][1:] == extra[12][1:], "independent of the number of layers"
    assert max(extra[3][1:5]) <= 15 and extra[3][1:5] == [extra[3][1]] * 4
    assert extra[3][5] <= 130, "the fold, one transfer, and the logged scalars"
