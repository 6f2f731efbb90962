"""The CUDA paths; every test here is skipped without a CUDA GPU (so on CI).

- The Gram engine on the GPU against a float64 per-sample loop on the CPU (float32 with TF32 off,
  and float64 on the GPU).
- The diagnostics (FisherSpectrum, GradientFlow, MinibatchHeatmap) leave GPU training bit for bit
  unchanged at 32-bit, 16-mixed (GradScaler) and bf16-mixed precision, deterministic kernels on.
- FisherSpectrum's first-step Tr F̃ under each precision against the float64 reference.
- The engine's capture path (forward, backward, the (B, B) matrix) makes no host sync.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at its first use

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_identical, reference_gram, sample_cross_entropy, training_state
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import FisherSpectrum, GradientFlow, MinibatchHeatmap
from lightning_tricks.gradients import GramCollector, fisher_statistics
from lightning_tricks.image_metrics import intensity
from lightning_tricks.results import load_fisher_history
from lightning_tricks.samplers import MetricSortedBatchSampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PRECISIONS = ["32-true", "16-mixed", "bf16-mixed"]


@pytest.fixture
def exact_cuda() -> Iterator[None]:
    """Deterministic kernels and no TF32, restored afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark = saved[1]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2], saved[3]


# -- the engine on the GPU --------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.LayerNorm(8 * 4 * 4), nn.Linear(8 * 4 * 4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


class SequenceNet(nn.Module):
    """Embedding, attention, LSTM: the rule-based and the vector-Jacobian (fallback-style) paths."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.head = nn.Linear(6, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h, _ = self.attention(h, h, h, need_weights=False)
        h, _ = self.lstm(h)
        return self.head(h[:, -1])


NETS = {
    "conv": (ConvNet, lambda b, g: torch.randn(b, 3, 8, 8, generator=g)),
    "sequence": (SequenceNet, lambda b, g: torch.randint(0, 11, (b, 7), generator=g)),
}


def cpu_float64_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G_ij = <∇ℓ_i, ∇ℓ_j> from one ``autograd.grad`` per sample (``helpers.reference_gram``),
    float64 on the CPU."""
    model = copy.deepcopy(model).cpu().double()
    x, y = x.cpu(), y.cpu()
    x = x.double() if x.is_floating_point() else x
    return reference_gram(model, sample_cross_entropy(model, x, y), len(x))


def cuda_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with GramCollector(model, loss_reduction="mean") as gram:
        F.cross_entropy(model(x), y).backward()
    return gram.matrix()


@pytest.mark.parametrize("batch", [1, 6, 33])
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-11)])
def test_gram_on_the_gpu_matches_the_cpu_float64_loop(net, batch, dtype, rtol, exact_cuda):
    generator = torch.Generator().manual_seed(batch)
    torch.manual_seed(0)
    factory, make_input = NETS[net]
    model = factory().to(dtype)
    x, y = make_input(batch, generator), torch.randint(0, 5, (batch,), generator=generator)
    if x.is_floating_point():
        x = x.to(dtype)
    expected = cpu_float64_gram(model, x, y)
    actual = cuda_gram(model.cuda(), x.cuda(), y.cuda())
    assert actual.device.type == "cuda" and actual.dtype == torch.float64
    error = (actual.cpu() - expected).norm() / expected.norm()
    assert error < rtol


def test_capture_path_makes_no_host_sync(exact_cuda):
    """Forward, backward and ``matrix()`` with CUDA's sync debug mode set to raise on a sync."""
    torch.manual_seed(0)
    model = ConvNet().cuda()
    x, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 5, (16,), device="cuda")
    collector = GramCollector(model, loss_reduction="mean")
    cuda_gram(model, x, y)  # first call: lazy initialisation (cuBLAS handles) may sync once
    torch.cuda.set_sync_debug_mode("error")
    try:
        with collector:
            F.cross_entropy(model(x), y).backward()
        gram = collector.matrix()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    statistics = fisher_statistics(gram)
    assert torch.isfinite(statistics.trace.cpu())


def test_statistics_on_the_gpu_equal_the_cpu_ones_and_stay_on_the_gpu():
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(32, 200, generator=generator, dtype=torch.float64)
    gram = jacobian @ jacobian.T
    on_cpu, on_gpu = fisher_statistics(gram), fisher_statistics(gram.cuda())
    for name, expected in on_cpu._asdict().items():
        assert getattr(on_gpu, name).device.type == "cuda", name
        torch.testing.assert_close(getattr(on_gpu, name).cpu(), expected, rtol=1e-12, atol=0)


# -- Lightning on the GPU: the diagnostics never change training --------------------------------------


def make_data(n: int = 48, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 5, (n,), generator=generator)
    )


class UserModule(L.LightningModule):
    """A user-written classifier: BatchNorm (buffers), dropout (RNG), Adam (optimiser state)."""

    def __init__(self, dropout: float = 0.2, batchnorm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(8 * 8 * 8, 5),
        )

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


DIAGNOSTICS = {
    "FisherSpectrum": lambda: FisherSpectrum(),
    "GradientFlow": lambda: GradientFlow(),
    "MinibatchHeatmap": lambda: MinibatchHeatmap(metric="intensity", progress=False),
}
SORTED_BATCHES = {"MinibatchHeatmap"}
"""Seed 002's protocol trains on metric-sorted fixed batches, so its baseline trains on those too."""


def make_loader(sorted_batches: bool, shuffle: bool) -> DataLoader:
    data = make_data()
    if sorted_batches:
        return DataLoader(data, batch_sampler=MetricSortedBatchSampler(intensity(data.tensors[0]), 8))
    return DataLoader(data, batch_size=8, shuffle=shuffle)


def fit_on_gpu(
    trainer_for, module: L.LightningModule, callbacks: list, root, precision: str, loader: DataLoader
) -> L.Trainer:
    """Two epochs on one GPU, logged to TensorBoard at the Trainer's default log_every_n_steps=50."""
    logger = TensorBoardLogger(root, name="tb")
    trainer = trainer_for(
        callbacks, accelerator="gpu", precision=precision, max_epochs=2, logger=logger, default_root_dir=root
    )
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("diagnostic", list(DIAGNOSTICS))
def test_diagnostic_leaves_gpu_training_unchanged(diagnostic, precision, tmp_path, exact_cuda, trainer_for):
    states = []
    for attached in (False, True):
        L.seed_everything(123)
        module = UserModule()
        callbacks = [DIAGNOSTICS[diagnostic]()] if attached else []
        loader = make_loader(sorted_batches=diagnostic in SORTED_BATCHES, shuffle=True)
        trainer = fit_on_gpu(trainer_for, module, callbacks, tmp_path / str(attached), precision, loader)
        states.append(training_state(module, trainer))
    assert_identical(states[1], states[0])


def first_step_trace(trainer_for, precision: str, root) -> tuple[float, dict[str, torch.Tensor], Any]:
    """FisherSpectrum's Tr F̃ at step 0 on the GPU, and the weights and batch it was measured on."""
    L.seed_everything(0)
    module = UserModule(dropout=0.0, batchnorm=False)
    weights = copy.deepcopy(module.net.state_dict())
    loader = make_loader(False, shuffle=False)
    trainer = fit_on_gpu(trainer_for, module, [FisherSpectrum()], root, precision, loader)
    run = load_fisher_history(trainer.loggers[0].log_dir)
    return run[0]["trace"], weights, make_data()[:8]


@pytest.mark.parametrize("precision, rtol", [("32-true", 1e-5), ("16-mixed", 2e-2), ("bf16-mixed", 5e-2)])
def test_first_step_trace_matches_the_float64_reference(precision, rtol, tmp_path, exact_cuda, trainer_for):
    """Tr F̃ = Σ_i ‖∇ℓ_i‖² (seed 004 §3, eq. 6), the loss scale of 16-mixed divided out."""
    trace, weights, (x, y) = first_step_trace(trainer_for, precision, tmp_path)
    net = UserModule(dropout=0.0, batchnorm=False).net
    net.load_state_dict(weights)
    expected = torch.trace(cpu_float64_gram(net, x, y)).item()
    assert trace == pytest.approx(expected, rel=rtol)
