"""What the user trains is bit-for-bit what it is without the collector.

The project's invariant (a diagnostic never changes what the user trains) needs every ``.grad``,
and everything downstream of it (parameters, BatchNorm buffers, optimiser state), to be
*identical* to a plain step's, not merely close. Each test runs the same steps twice, plainly and
inside a collector, and compares with ``torch.equal``; the Gram matrix is checked against a float64
per-sample reference in ``tests/test_gram.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.gradients import GramCollector
from lightning_tricks.models import build_net

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


class Block(nn.Module):
    """Residual block with BatchNorm and the in-place ReLU/addition of torchvision's ResNets."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Block(8, 8, 1),
        Block(8, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16, bias=False), nn.Tanh(), nn.Linear(16, 4)
    )


class SequenceLinear(nn.Module):
    """Linear layers on 3-D inputs: contiguous, transposed (non-contiguous) with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(5, 8, bias=False)
        self.c = nn.Linear(5, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):  # x: (B, 5, 6)
        transposed = x.transpose(1, 2)
        h = self.a(x) + self.b(transposed).mean(1, True) + self.c(transposed)[:, :1]
        return self.out(torch.tanh(h)).mean(dim=1)


def convs() -> nn.Module:
    """Strides, padding, dilation, groups, bias, padding="same" with an even kernel, padding modes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
        nn.ReLU(),
        nn.Conv2d(8, 6, 4, padding="same", padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 4, padding="same", bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 6, (3, 2), padding="same", dilation=(1, 3)),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular", bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding="valid", stride=(1, 2)),
        nn.Flatten(),
        nn.LazyLinear(4),
    )


class Transposed(nn.Module):
    """ConvTranspose2d with stride, groups, output padding, dilation and an ``output_size`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.norm = nn.GroupNorm(3, 6)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, dilation=2, bias=False)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.norm(self.up1(x)))
        h = self.up2(h, output_size=[2 * h.shape[-2] + 2, 2 * h.shape[-1] + 2])
        return self.out(h.mean(dim=(2, 3)))


def sequence_convs() -> nn.Module:
    """Conv1d and Conv3d."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv1d(4, 8, 3, padding=2, dilation=2, groups=2)
            self.conv2 = nn.Conv1d(8, 6, 4, stride=2, padding=1)
            self.conv3 = nn.Conv3d(1, 2, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2))
            self.out = nn.Linear(6 + 2, 4)

        def forward(self, x):  # x: (B, 4, 12)
            h = self.conv2(torch.relu(self.conv1(x))).mean(-1)
            v = self.conv3(x[:, None, :, :3, None].expand(-1, -1, -1, -1, 5)).mean(dim=(2, 3, 4))
            return self.out(torch.cat([h, v], dim=1))

    return Net()


class Shared(nn.Module):
    """One Linear and one Conv2d called twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 4)

    def forward(self, x):
        h = self.conv(torch.relu(self.conv(x))).mean(dim=(2, 3))
        return self.out(self.fc(torch.tanh(self.fc(h))))


ARCHITECTURES = {
    "resnet_train": (resnet, (3, 8, 8)),
    "mlp": (mlp, (12,)),
    "sequence_linear": (SequenceLinear, (5, 6)),
    "convs": (convs, (3, 12, 12)),
    "conv_transpose": (Transposed, (4, 3, 3)),
    "conv1d_conv3d": (sequence_convs, (4, 12)),
    "weight_sharing": (Shared, (3, 6, 6)),
}


def build(arch: str, batch: int, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = ARCHITECTURES[arch]
    model = factory()
    x = torch.randn(batch, *shape)
    model(x)  # materialise lazy modules
    return model.to(dtype), x.to(dtype), torch.randint(0, 4, (batch,))


def loss_and_grads(model: nn.Module, x, y, collector: GramCollector | None = None):
    """The loss and every parameter's ``.grad`` after one forward/backward (inside ``collector``)."""
    model.zero_grad(set_to_none=True)
    if collector is None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    else:
        with collector:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def assert_bitwise(actual: list[torch.Tensor], expected: list[torch.Tensor], model: nn.Module) -> None:
    names = [n for n, _ in model.named_parameters()]
    for name, a, e in zip(names, actual, expected):
        assert a is not None and a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a, e), f"{name}: max difference {(a - e).abs().max().item():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5, 32])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_gradients_are_bitwise_those_of_a_plain_backward(arch: str, batch: int, dtype: torch.dtype) -> None:
    model, x, y = build(arch, batch, dtype)
    plain_loss, plain = loss_and_grads(model, x, y)
    collector = GramCollector(model)
    measured_loss, measured = loss_and_grads(model, x, y, collector)
    assert torch.equal(measured_loss, plain_loss)
    assert_bitwise(measured, plain, model)
    assert collector.matrix().shape == (batch, batch)
    assert all(p.requires_grad for p in model.parameters())


def proxy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The host-overhead benchmark's model: CIFAR ResNet-20 on 3×8×8 images, B = 8."""
    torch.manual_seed(0)
    return build_net("resnet20", 10), torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))


@pytest.mark.parametrize("arch", ["proxy", "resnet_train", "mlp", "convs"])
def test_training_with_the_collector_every_step_is_bitwise_unchanged(arch: str) -> None:
    """Five SGD steps with momentum: the last ``.grad``, parameters, BatchNorm buffers and optimiser
    state identical (the proxy is the host-overhead benchmark's model)."""
    model, x, y = proxy() if arch == "proxy" else build(arch, 16, torch.float32)
    runs = []
    for with_collector in (False, True):
        torch.manual_seed(1)
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        collector = GramCollector(net).attach()
        collector.enabled = with_collector
        for step in range(5):
            collector.reset()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x + step), y).backward()
            if with_collector:
                collector.matrix()
            optimizer.step()
        collector.detach()
        runs.append((net.state_dict(), optimizer.state_dict()["state"], [p.grad for p in net.parameters()]))
    (plain_params, plain_state, plain_grads), (measured_params, measured_state, measured_grads) = runs
    assert_bitwise(measured_grads, plain_grads, model)
    for name, value in plain_params.items():
        assert torch.equal(measured_params[name], value), name
    for key, state in plain_state.items():
        assert torch.equal(measured_state[key]["momentum_buffer"], state["momentum_buffer"])


@pytest.mark.parametrize("arch", ["resnet_train", "convs", "sequence_linear"])
def test_float32_blocks_keep_trace_and_spectrum_to_float32_accuracy(arch: str) -> None:
    """Each layer's block is computed in float32 and summed in float64: trace and eigenvalues agree
    with a float64 per-sample loop (``autograd.grad`` one sample at a time) to float32 accuracy."""
    model, x, y = build(arch, 12, torch.float32)
    model.eval()  # per-sample gradients exist (BatchNorm with running statistics)
    reference_model = copy.deepcopy(model).to(torch.float64)
    params = [p for p in reference_model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(reference_model(x[i : i + 1].double()), y[i : i + 1], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    jacobian = torch.stack(rows)
    reference = jacobian @ jacobian.T
    with GramCollector(model, loss_reduction="sum") as collector:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    gram = collector.matrix()
    assert gram.dtype == torch.float64
    assert abs(gram.trace() / reference.trace() - 1) < 1e-5
    eigenvalues, expected = torch.linalg.eigvalsh(gram), torch.linalg.eigvalsh(reference)
    assert ((eigenvalues - expected).abs() / expected.max()).max() < 1e-5
