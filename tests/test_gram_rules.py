"""One row per registered Gram rule, each checked against the shared brute-force reference.

A row builds a small float64 module of that type with random parameters and inputs; the collector
(loss Σ_i ℓ_i, ℓ_i = ‖f(x_i)‖²) must give G = J Jᵀ of ``helpers.reference_gram`` (one autograd.grad
per sample, seed 004 §3, eq. 6) with every parameter served by the registered rule (never the
generic fallback). A rule registered without a row here fails :func:`test_every_rule_has_a_row`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from helpers import reference_gram
from torch import Tensor, nn

from lightning_tricks.gradients import GRAM_RULES, GramCollector

DTYPE = torch.float64
RTOL = 1e-10
BATCH = 3

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


class Case(NamedTuple):
    """A module, its inputs with the batch along ``dims`` (one per input), and how to call it."""

    model: nn.Module
    inputs: tuple[Tensor, ...]
    dims: tuple[int, ...] = (0,)
    forward: Callable[..., Tensor] = nn.Module.__call__


def x(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE)


def tokens(*shape: int, vocab: int = 7) -> Tensor:
    return torch.randint(0, vocab, shape)


def first_output(model: nn.Module, *inputs: Tensor) -> Tensor:
    return model(*inputs)[0]


def self_attention(model: nn.Module, query: Tensor) -> Tensor:
    return model(query, query, query)[0]


CASES: dict[type[nn.Module], Callable[[], Case]] = {
    nn.Linear: lambda: Case(nn.Linear(4, 3), (x(BATCH, 2, 4),)),
    nn.Conv1d: lambda: Case(nn.Conv1d(2, 4, 3, padding=1), (x(BATCH, 2, 7),)),
    nn.Conv2d: lambda: Case(nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), (x(BATCH, 2, 6, 6),)),
    nn.Conv3d: lambda: Case(nn.Conv3d(2, 2, 2, dilation=(1, 2, 1)), (x(BATCH, 2, 3, 4, 3),)),
    nn.ConvTranspose1d: lambda: Case(nn.ConvTranspose1d(2, 3, 3, stride=2), (x(BATCH, 2, 4),)),
    nn.ConvTranspose2d: lambda: Case(nn.ConvTranspose2d(2, 2, 3, padding=1), (x(BATCH, 2, 4, 4),)),
    nn.ConvTranspose3d: lambda: Case(nn.ConvTranspose3d(2, 2, 2), (x(BATCH, 2, 2, 2, 2),)),
    nn.BatchNorm1d: lambda: Case(nn.BatchNorm1d(3).eval(), (x(BATCH, 3),)),  # train mode couples samples
    nn.BatchNorm2d: lambda: Case(nn.BatchNorm2d(3).eval(), (x(BATCH, 3, 4, 4),)),
    nn.BatchNorm3d: lambda: Case(nn.BatchNorm3d(3).eval(), (x(BATCH, 3, 2, 2, 2),)),
    nn.InstanceNorm1d: lambda: Case(nn.InstanceNorm1d(3, affine=True), (x(BATCH, 3, 5),)),
    nn.InstanceNorm2d: lambda: Case(nn.InstanceNorm2d(3, affine=True), (x(BATCH, 3, 3, 3),)),
    nn.InstanceNorm3d: lambda: Case(nn.InstanceNorm3d(3, affine=True), (x(BATCH, 3, 2, 2, 2),)),
    nn.GroupNorm: lambda: Case(nn.GroupNorm(2, 4), (x(BATCH, 4, 3, 3),)),
    nn.LayerNorm: lambda: Case(nn.LayerNorm((3, 4)), (x(BATCH, 2, 3, 4),)),
    nn.Embedding: lambda: Case(nn.Embedding(7, 3, padding_idx=0), (tokens(BATCH, 5),)),
    nn.EmbeddingBag: lambda: Case(nn.EmbeddingBag(7, 3, mode="mean"), (tokens(BATCH, 4),)),
    nn.PReLU: lambda: Case(nn.PReLU(3), (x(BATCH, 3, 4),)),
    nn.Bilinear: lambda: Case(nn.Bilinear(3, 2, 4), (x(BATCH, 3), x(BATCH, 2)), (0, 0)),
    nn.MultiheadAttention: lambda: Case(
        nn.MultiheadAttention(4, 2, batch_first=True), (x(BATCH, 3, 4),), forward=self_attention
    ),
    nn.RNN: lambda: Case(nn.RNN(3, 4, batch_first=True), (x(BATCH, 5, 3),), forward=first_output),
    nn.LSTM: lambda: Case(nn.LSTM(3, 4), (x(4, BATCH, 3),), (1,), first_output),
    nn.GRU: lambda: Case(
        nn.GRU(3, 4, num_layers=2, batch_first=True), (x(BATCH, 4, 3),), forward=first_output
    ),
    nn.TransformerEncoderLayer: lambda: Case(
        nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0), (x(3, BATCH, 4),), (1,)
    ),
    nn.TransformerDecoderLayer: lambda: Case(
        nn.TransformerDecoderLayer(4, 2, dim_feedforward=8, dropout=0.0),
        (x(3, BATCH, 4), x(2, BATCH, 4)),
        (1, 1),
    ),
}
if hasattr(nn, "RMSNorm"):
    CASES[nn.RMSNorm] = lambda: Case(nn.RMSNorm(4), (x(BATCH, 3, 4),))


def test_every_rule_has_a_row() -> None:
    assert {t.__name__ for t in GRAM_RULES} == {t.__name__ for t in CASES}


def build(module_type: type[nn.Module]) -> Case:
    torch.manual_seed(0)
    case = CASES[module_type]()
    case.model.to(DTYPE)
    with torch.no_grad():
        for param in case.model.parameters():
            param.normal_(0.0, 0.5)  # affine norms start at (1, 0), biases small: make every entry count
        for name, buffer in case.model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return case


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("module_type", list(CASES), ids=lambda t: t.__name__)
def test_rule_matches_the_reference(module_type: type[nn.Module], method: str) -> None:
    model, inputs, dims, forward = build(module_type)
    assert len(dims) == len(inputs)

    def sample_loss(i: int) -> Tensor:
        return forward(model, *(t.narrow(d, i, 1) for t, d in zip(inputs, dims))).square().sum()

    expected = reference_gram(model, sample_loss, BATCH)
    with GramCollector(model, loss_reduction="sum", method=method) as gram:
        forward(model, *inputs).square().sum().backward()
    error = ((gram.matrix() - expected).norm() / expected.norm()).item()
    assert error < RTOL
    assert gram.layer_names == [""] and "fallback" not in gram.methods.values()
    assert set(gram.methods) == {n for n, p in model.named_parameters() if p.requires_grad}
