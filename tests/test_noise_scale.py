"""The two-batch-size gradient-noise estimate (McCandlish et al. 2018, appendix A.1) against the
per-sample definition, and its promise to leave the model untouched; the pooled estimate a run
shares (appendix A) against its definition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.gradients import spectrum
from lightning_tricks.gradients.noise_scale import (
    EpochNoiseScale,
    half_batch_noise_parts,
    noise_scale_ratio,
    pooled_noise_scale,
    shared_noise_scale,
    split_batch,
    two_batch_noise_parts,
)
from lightning_tricks.gradients.spectrum import gradient_noise_parts

pytestmark = pytest.mark.usefixtures("single_thread")


def test_two_batch_parts_are_unbiased_on_synthetic_gradients():
    """g_i = G + ε_i with |G|² = 1 and tr Σ = 64: the mean of the estimates over many batches is the truth."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.zeros(64, dtype=torch.float64)
    mean[0] = 1.0
    estimates = []
    for _ in range(4000):
        samples = mean + torch.randn(16, 64, generator=generator, dtype=torch.float64)
        halves = samples[:8].mean(0), samples[8:].mean(0)
        small = (halves[0].square().sum() + halves[1].square().sum()) / 2
        big = samples.mean(0).square().sum()
        estimates.append(torch.stack(two_batch_noise_parts(small, big, 8, 16)))
    trace_sigma, grad_sq_norm = torch.stack(estimates).mean(0).tolist()
    assert trace_sigma == pytest.approx(64.0, rel=0.03)
    assert grad_sq_norm == pytest.approx(1.0, abs=0.15)


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Brute force: one autograd.grad per sample, flattened (rows = samples)."""
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


@pytest.mark.parametrize("batch_size", [4, 10])
def test_half_batch_parts_equal_their_definition_from_per_sample_gradients(batch_size):
    """Without coupling between samples, g_half = mean of its per-sample gradients, so the estimate
    is the formula applied to the brute-force halves; it also agrees in expectation with the
    Gram-based unbiased parts (checked by their common definition here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(batch_size, 5, dtype=torch.float64), torch.randint(0, 3, (batch_size,))
    parts = half_batch_noise_parts(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), batch_size)
    rows = per_sample_gradients(model, x, y)
    half = batch_size // 2
    g1, g2 = rows[:half].mean(0), rows[half : 2 * half].mean(0)
    expected = two_batch_noise_parts(
        (g1.square().sum() + g2.square().sum()) / 2, ((g1 + g2) / 2).square().sum(), half, 2 * half
    )
    torch.testing.assert_close(torch.stack(parts), torch.stack(expected), rtol=1e-10, atol=1e-12)
    assert all(torch.isfinite(torch.stack(gradient_noise_parts(rows @ rows.T))))


def test_half_batch_parts_leave_the_model_and_the_rng_untouched():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    F.cross_entropy(model(x), y).backward()
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    half_batch_noise_parts(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), 12)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_split_batch_slices_batched_leaves_only():
    batch = {
        "x": torch.arange(10).reshape(5, 2),
        "y": torch.arange(5),
        "scale": torch.tensor(2.0),
        "name": "a",
    }
    first, second = split_batch(batch, 5)
    assert first["y"].tolist() == [0, 1] and second["y"].tolist() == [2, 3]
    assert first["scale"] is batch["scale"] and second["name"] == "a"


# -- the pooled estimate a run shares (one formula, fed by measurers, read by policies) -------------


def brute_force_pooled(pairs: list[tuple[float, float]]) -> float:
    """McCandlish et al. 2018, appendix A: the mean tr Σ over the mean |G|² of the finite pairs."""
    finite = [(t, g) for t, g in pairs if math.isfinite(t) and math.isfinite(g)]
    return sum(t for t, _ in finite) / len(finite) / (sum(g for _, g in finite) / len(finite))


def test_the_epoch_estimate_pools_like_the_definition_and_survives_a_checkpoint():
    generator = torch.Generator().manual_seed(0)
    parts = (
        torch.randn(40, 2, generator=generator, dtype=torch.float64) + torch.tensor([30.0, 2.0])
    ).tolist()
    parts[3][0], parts[7][1] = math.nan, math.inf
    estimate = EpochNoiseScale()
    for t, g in parts[:10]:
        estimate.add(0, t, g)
    for t, g in parts[10:]:
        estimate.add(1, torch.tensor(t, dtype=torch.float64), torch.tensor(g, dtype=torch.float64))
    assert estimate.value() == pytest.approx(brute_force_pooled(parts[10:]), rel=1e-12)
    assert math.isnan(estimate.value(epoch=0)), "a new epoch starts a new pool"
    columns = torch.tensor(parts[10:], dtype=torch.float64).T
    by_hand = pooled_noise_scale(columns[0], columns[1])

    assert estimate.value() == pytest.approx(by_hand.item(), rel=1e-12)
    restored = EpochNoiseScale()
    restored.load_state_dict(estimate.state_dict())
    assert restored.value(epoch=1) == estimate.value(epoch=1) and restored.epoch == 1
    records = [{"epoch": 1, "trace_sigma": t, "grad_sq_norm": g} for t, g in parts[10:]]  # the older format
    restored.load_state_dict(records)
    assert restored.value() == pytest.approx(estimate.value(), rel=1e-12)
    restored.start(1)
    assert restored.value() == pytest.approx(estimate.value(), rel=1e-12), "a resumed epoch keeps its pool"
    restored.start(2)
    assert math.isnan(restored.value()) and restored.state_dict() == []


def test_the_epoch_estimate_takes_numbers_and_tensors_mixed_and_its_parts_are_tensors():
    """Python numbers (FisherSpectrum's host values) and tensors in turn pool like the definition;
    ``parts`` is a float64 tensor, and one read earlier does not change with later measurements."""
    generator = torch.Generator().manual_seed(1)
    parts = (
        torch.randn(12, 2, generator=generator, dtype=torch.float64) + torch.tensor([30.0, 2.0])
    ).tolist()
    parts[5][1] = math.nan
    estimate = EpochNoiseScale()
    estimate.add(0, *parts[0])
    early = estimate.parts()
    for k, (t, g) in enumerate(parts[1:], start=1):
        as_tensor = k % 3 == 0
        estimate.add(0, *(torch.tensor(v, dtype=torch.float64) if as_tensor else v for v in (t, g)))
        assert isinstance(estimate.parts(), torch.Tensor) and estimate.parts().dtype == torch.float64
    assert early.tolist() == [parts[0][0], parts[0][1], 1.0]
    assert estimate.value() == pytest.approx(brute_force_pooled(parts), rel=1e-12)
    assert estimate.parts().tolist()[2] == 11.0


def test_the_pooling_formula_exists_once_and_each_run_shares_one_estimate():
    assert spectrum.pooled_noise_scale is pooled_noise_scale
    assert spectrum.noise_scale_ratio is noise_scale_ratio

    class Run:  # any owner: a Trainer in practice
        pass

    run, other = Run(), Run()
    estimate = shared_noise_scale(run)
    estimate.add(3, 8.0, 1.0)
    assert shared_noise_scale(run) is estimate and shared_noise_scale(other) is not estimate
    assert shared_noise_scale(run).value() == 8.0 and not estimate.feeders
    assert shared_noise_scale(run, feeder="FisherSpectrum") is estimate
    assert estimate.feeders == {"FisherSpectrum"} and math.isnan(estimate.value()), (
        "a feeder starts a fit afresh"
    )
