"""Assertions and brute-force references shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import is_top_level_aten  # benchmarks/common.py: one walk of the profile for both


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Equal structure (dicts, lists, tuples), and every tensor equal bit for bit, compared on the
    CPU whatever device it is on."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual.cpu(), expected.cpu()), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def jacobian_row(grads: tuple, params: list[torch.Tensor]) -> torch.Tensor:
    """One row of J: the gradients concatenated, zeros for parameters that got none."""
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def per_sample_jacobian(
    params: list[torch.Tensor], sample_loss: Callable[[int], torch.Tensor], batch: int
) -> torch.Tensor:
    """J (B, P): row i = ∇ℓ_i over ``params``, ``sample_loss(i)`` computed on sample i alone, one
    ``torch.autograd.grad`` per sample (the brute-force reference of seed 004 eq. 6's J_k)."""
    rows = [
        jacobian_row(torch.autograd.grad(sample_loss(i), params, allow_unused=True), params)
        for i in range(batch)
    ]
    return torch.stack(rows)


def reference_gram(
    model: torch.nn.Module, sample_loss: Callable[[int], torch.Tensor], batch: int
) -> torch.Tensor:
    """G = J Jᵀ over the model's trainable parameters (:func:`per_sample_jacobian`)."""
    jacobian = per_sample_jacobian([p for p in model.parameters() if p.requires_grad], sample_loss, batch)
    return jacobian @ jacobian.T


class AtenOpsPerStep(pl.Callback):
    """Per training step (``on_train_batch_start`` to ``on_train_batch_end``), the top-level aten
    ops (no aten op above them in the profile, ``benchmarks/common.py``'s
    :func:`~common.is_top_level_aten`) it ran: :attr:`names` (op name → calls) and :attr:`counts`
    (their number)."""

    def __init__(self) -> None:
        self.names: list[Counter[str]] = []
        self._profiler: torch.profiler.profile | None = None

    @property
    def counts(self) -> list[int]:
        return [sum(step.values()) for step in self.names]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._profiler.__exit__(None, None, None)
        events = self._profiler.events()
        self.names.append(Counter(event.name for event in events if is_top_level_aten(event)))


# -- fixtures: shared references, states and command lines ------------------------------------------

LOGGER_KINDS = ("tensorboard", "csv", "wandb", "mlflow", "none")
"""Every logger the callbacks support; ``"none"`` is ``logger=False`` (conftest's ``make_logger``)."""


def sample_cross_entropy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[int], torch.Tensor]:
    """``sample_loss(i)`` for :func:`per_sample_jacobian`: ℓ_i = cross-entropy of ``model`` on sample
    i alone (a batch of one, so no other sample can reach it)."""
    return lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])


def cross_entropy_jacobian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """J (B, P): row i = ∇ℓ_i of :func:`sample_cross_entropy` over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return per_sample_jacobian(params, sample_cross_entropy(model, x, y), len(x))


def training_state(module: torch.nn.Module, trainer: pl.Trainer | None = None) -> dict[str, Any]:
    """Everything a fit leaves that a diagnostic must not change, for :func:`assert_identical`: every
    parameter, buffer and ``requires_grad`` flag of ``module`` and each optimiser's state."""
    state: dict[str, Any] = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters()}
    state.update({f"buffer:{n}": b.clone() for n, b in module.named_buffers()})
    state.update({f"flag:{n}": p.requires_grad for n, p in module.named_parameters()})
    if trainer is not None:
        for i, optimizer in enumerate(trainer.optimizers):
            state[f"optim:{i}"] = copy.deepcopy(optimizer.state_dict())
    return state


def cli_fit(config: Path | str, settings: dict[str, Any] | None = None) -> list[str]:
    """The arguments of ``lightning_tricks.cli`` that fit ``config`` with no progress bar and
    ``--key value`` for each of ``settings`` (``{"trainer.max_steps": 2, "test_after_fit": False}``;
    booleans written as the CLI spells them)."""
    arguments = ["fit", "-c", str(config)]
    for key, value in {"trainer.enable_progress_bar": False, **(settings or {})}.items():
        arguments += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return arguments


class LearningRates(pl.Callback):
    """The first optimiser's learning rate at the start of every training batch (:attr:`lrs`), with
    the epoch it fell in (:attr:`epochs`)."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.append(trainer.current_epoch)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
