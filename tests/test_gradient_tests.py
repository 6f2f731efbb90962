"""Gradient tests from the Gram (norm, inner-product, orthogonality) against brute force.

The reference takes every sample's loss gradient with its own ``torch.autograd.grad`` (float64,
``helpers.cross_entropy_jacobian``), then computes each statistic the way its paper writes it, from the vectors: the batch gradient,
the deviations g_i − ḡ, the projections g_iᵀḡ, the components orthogonal to ḡ. The code under
test sees only F̃, collected by ``GramCollector`` from one backward of the mean loss, as
FisherSpectrum holds it at a measured step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cross_entropy_jacobian
from torch import nn

from lightning_tricks.gradients import (
    GramCollector,
    fisher_statistics,
    gradient_noise_parts,
    gradient_tests,
    needed_batch_size,
)

DTYPE = torch.float64
RTOL = 1e-9
BATCHES = [2, 7, 32]

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 5)
    )


def cnn_batchnorm_eval() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()  # eval: running statistics, so every sample has its own gradient


ARCHITECTURES = {"mlp": mlp, "cnn": cnn, "cnn_batchnorm_eval": cnn_batchnorm_eval}


def batch_of(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 1, 4, 4, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 5, (size,), generator=generator)
    return x, y


def reference_tests(grads: torch.Tensor) -> dict[str, float]:
    """The three statistics straight from the papers' definitions, with a Python loop over samples."""
    batch = len(grads)
    mean = grads.mean(0)  # the mini-batch gradient ḡ
    mean_sq = mean.dot(mean)
    deviations = sum((g - mean).dot(g - mean) for g in grads) / (batch - 1)  # Byrd et al. (3.9)
    projections = [g.dot(mean) for g in grads]
    projection_mean = sum(projections) / batch
    projection_var = sum((p - projection_mean) ** 2 for p in projections) / (batch - 1)
    orthogonal = [g - (p / mean_sq) * mean for g, p in zip(grads, projections)]
    orthogonal_var = sum(r.dot(r) for r in orthogonal) / (batch - 1)  # Bollapragada et al. (3.3)
    return {
        "norm_test": math.sqrt(deviations / (batch * mean_sq)),
        "inner_test": math.sqrt(projection_var / (batch * mean_sq**2)),
        "ortho_test": math.sqrt(orthogonal_var / (batch * mean_sq)),
    }


def cockpit_tests(grads: torch.Tensor, batch_gradient: torch.Tensor) -> dict[str, float]:
    """Cockpit's closed forms (its autograd references for NormTest, InnerTest and OrthoTest),
    from Σ‖g_i‖², the projections on the autograd batch gradient and its norm."""
    batch = len(grads)
    sum_sq = grads.square().sum()
    norm_sq = batch_gradient.dot(batch_gradient)
    projection_sq = (grads @ batch_gradient).square().sum()
    scale = batch * (batch - 1)
    return {
        "norm_test": math.sqrt((sum_sq / norm_sq - batch) / scale),
        "inner_test": math.sqrt((projection_sq / norm_sq**2 - batch) / scale),
        "ortho_test": math.sqrt((sum_sq / norm_sq - projection_sq / norm_sq**2) / scale),
    }


def collected_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F̃ as FisherSpectrum gets it (one backward of the mean loss), and the batch gradient."""
    model.zero_grad()
    with GramCollector(model, loss_reduction="mean") as collector:
        F.cross_entropy(model(x), y).backward()
    batch_gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return collector.matrix(), batch_gradient


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_statistics_match_per_sample_loop(architecture: str, batch: int) -> None:
    torch.manual_seed(batch)
    model = ARCHITECTURES[architecture]().to(DTYPE)
    x, y = batch_of(batch, seed=batch)
    grads = cross_entropy_jacobian(model, x, y)  # row i = ∇ℓ_i, one autograd.grad per sample
    gram, batch_gradient = collected_gram(model, x, y)
    # ḡ, the mean of the per-sample gradients, is the gradient of the mean loss
    torch.testing.assert_close(grads.mean(0), batch_gradient, rtol=1e-12, atol=1e-14)

    tests = gradient_tests(gram)
    expected = reference_tests(grads)
    cockpit = cockpit_tests(grads, batch_gradient)
    for name, value in expected.items():
        actual = getattr(tests, name).item()
        assert actual == pytest.approx(value, rel=RTOL), f"{name}: {actual} vs per-sample loop {value}"
        assert actual == pytest.approx(cockpit[name], rel=1e-7), (
            f"{name}: {actual} vs Cockpit {cockpit[name]}"
        )
    assert tests.batch_size.item() == batch
    assert tests.norm_test**2 == pytest.approx((tests.inner_test**2 + tests.ortho_test**2).item(), rel=1e-12)


def test_invariant_to_gradient_scale_and_sum_reduction() -> None:
    """F̃ of the mean loss's gradients (F̃/B²), a loss scale or r² give the same statistics."""
    torch.manual_seed(0)
    model = mlp().to(DTYPE)
    x, y = batch_of(7, seed=0)
    gram, _ = collected_gram(model, x, y)
    base = gradient_tests(gram)
    for factor in (1 / 49, 65536.0**2, 0.3):
        scaled = gradient_tests(gram * factor)
        for name in ("norm_test", "inner_test", "ortho_test"):
            assert getattr(scaled, name).item() == pytest.approx(getattr(base, name).item(), rel=1e-12)


def test_identical_gradients_pass_every_test() -> None:
    grads = torch.tensor([[1.0, 2.0, -1.0]], dtype=DTYPE).expand(4, 3)
    tests = gradient_tests(grads @ grads.T)
    assert tests.norm_test.item() == tests.inner_test.item() == tests.ortho_test.item() == 0.0


def test_gradients_along_the_mean_have_no_orthogonal_part() -> None:
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    grads = torch.tensor([[0.5], [1.0], [2.5]], dtype=DTYPE) * direction
    tests = gradient_tests(grads @ grads.T)
    assert tests.ortho_test.item() == pytest.approx(0.0, abs=1e-7)
    assert tests.inner_test.item() == pytest.approx(tests.norm_test.item(), rel=1e-12)
    assert tests.norm_test.item() == pytest.approx(reference_tests(grads)["norm_test"], rel=1e-12)


def test_batched_grams() -> None:
    torch.manual_seed(1)
    grads = torch.randn(3, 5, 8, dtype=DTYPE) + 0.5
    grams = grads @ grads.transpose(1, 2)
    tests = gradient_tests(grams)
    assert tests.norm_test.shape == (3,)
    for k in range(3):
        expected = reference_tests(grads[k])
        for name, value in expected.items():
            assert getattr(tests, name)[k].item() == pytest.approx(value, rel=1e-12)


# -- edge cases: documented values, never an exception ---------------------------------------------


def test_single_sample_is_nan() -> None:
    tests = gradient_tests(torch.tensor([[4.0]], dtype=DTYPE))
    assert all(math.isnan(getattr(tests, name).item()) for name in ("norm_test", "inner_test", "ortho_test"))
    assert tests.batch_size.item() == 1


def test_zero_gradients_are_nan() -> None:
    tests = gradient_tests(torch.zeros(5, 5, dtype=DTYPE))
    assert all(math.isnan(getattr(tests, name).item()) for name in ("norm_test", "inner_test", "ortho_test"))


def test_zero_batch_gradient_with_scatter_is_inf() -> None:
    """g_2 = −g_1: ḡ = 0 exactly, the samples disagree; no threshold passes."""
    grads = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=DTYPE)
    tests = gradient_tests(grads @ grads.T)
    for name in ("norm_test", "inner_test", "ortho_test"):
        assert getattr(tests, name).item() == math.inf, name


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gram_is_nan(bad: float) -> None:
    gram = torch.eye(4, dtype=DTYPE) + 0.5
    gram[1, 2] = gram[2, 1] = bad
    tests = gradient_tests(gram)
    assert all(math.isnan(getattr(tests, name).item()) for name in ("norm_test", "inner_test", "ortho_test"))
    assert tests.batch_size.item() == 4


@pytest.mark.parametrize("case", ["random", "rank one", "zero mean", "non-finite", "single sample"])
def test_trace_sigma_given_by_fisher_statistics_changes_nothing(case: str) -> None:
    """FisherSpectrum passes the tr Σ its ``fisher_statistics`` computed: the tests come out bit
    for bit as when they compute it themselves."""
    torch.manual_seed(0)
    grads = torch.randn(6, 40, dtype=DTYPE)
    if case == "rank one":
        grads = torch.randn(6, 1, dtype=DTYPE) * torch.randn(1, 40, dtype=DTYPE)
    elif case == "zero mean":
        grads = grads - grads.mean(0)
    elif case == "single sample":
        grads = grads[:1]
    gram = grads @ grads.T
    if case == "non-finite":
        gram[1, 2] = math.nan
    own, given = gradient_tests(gram), gradient_tests(gram, fisher_statistics(gram).trace_sigma)
    for mine, theirs in zip(own, given):
        assert torch.equal(mine.nan_to_num(-1.0, -2.0), theirs.nan_to_num(-1.0, -2.0))


def test_float32_gram_is_promoted() -> None:
    grads = torch.randn(6, 9, generator=torch.Generator().manual_seed(3)) + 1.0
    tests = gradient_tests(grads @ grads.T)
    assert tests.norm_test.dtype == DTYPE
    assert tests.norm_test.item() == pytest.approx(reference_tests(grads.to(DTYPE))["norm_test"], rel=1e-5)


# -- needed batch size ------------------------------------------------------------------------------


def test_needed_batch_size_is_the_papers_sample_size_rule() -> None:
    """Byrd et al.: |S| = ‖Var_i(g_i)‖₁ / (θ²‖ḡ‖²); the test passes at that size."""
    torch.manual_seed(2)
    grads = torch.randn(16, 10, dtype=DTYPE) + 0.2
    tests = gradient_tests(grads @ grads.T)
    mean = grads.mean(0)
    variance = (grads - mean).square().sum() / 15
    theta = 0.5
    needed = needed_batch_size(tests.norm_test, tests.batch_size, theta)
    assert needed.item() == pytest.approx((variance / (theta**2 * mean.dot(mean))).item(), rel=1e-12)
    assert math.sqrt(variance / (needed * mean.dot(mean))) == pytest.approx(theta, rel=1e-12)  # passes there
    assert needed_batch_size(torch.tensor(math.inf), 8, theta).item() == math.inf
    assert math.isnan(needed_batch_size(torch.tensor(math.nan), 8, theta).item())


def test_norm_test_is_the_noise_scale_in_disguise() -> None:
    """θ_norm² = tr Σ / (B|G|² + tr Σ) = B_simple / (B + B_simple), B_simple = tr Σ / |G|²; above 1
    exactly when the unbiased |G|² is negative."""
    torch.manual_seed(4)
    grads = torch.randn(9, 20, dtype=DTYPE) + 0.3
    gram = grads @ grads.T
    trace_sigma, grad_sq_norm = gradient_noise_parts(gram)
    noise_scale = (trace_sigma / grad_sq_norm).item()
    assert grad_sq_norm.item() > 0
    expected = noise_scale / (9 + noise_scale)
    assert gradient_tests(gram).norm_test.item() ** 2 == pytest.approx(expected, rel=1e-12)

    hidden = grads - grads.mean(0) + 1e-3  # the mean gradient drowns in the noise: |G|² < 0
    gram = hidden @ hidden.T
    trace_sigma, grad_sq_norm = gradient_noise_parts(gram)
    assert grad_sq_norm.item() < 0
    theta_sq = gradient_tests(gram).norm_test.item() ** 2
    assert theta_sq > 1
    assert theta_sq == pytest.approx((trace_sigma / (9 * grad_sq_norm + trace_sigma)).item(), rel=1e-9)


@pytest.mark.parametrize("threshold", [0, -1.0, math.inf, math.nan, True, "0.9"])
def test_needed_batch_size_rejects_bad_threshold(threshold) -> None:
    with pytest.raises(ValueError, match="`threshold`"):
        needed_batch_size(torch.tensor(1.0), 8, threshold)
